"""Every `vlwb train` preset on the same shapes world for the same steps: does the loss fall, and what does a step cost
against `clip`'s, measured in the same run (`python tests/benchmarks/bench_presets.py [--steps 60]`)."""
import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

PRESETS = ("clip", "siglip", "filip", "dreamlip", "tcl", "negclip")


class StepTimer(L.Callback):
    "Writes the wall time of every training step after the first `skip` (warm-up) to $VLWB_STEP_TIMES."
    def __init__(self, skip: int = 5): self.skip, self.times, self.t0 = skip, [], None
    def on_train_batch_start(self, trainer, module, batch, i): self.t0 = time.perf_counter()
    def on_train_batch_end(self, trainer, module, outputs, batch, i):
        if trainer.global_step > self.skip: self.times.append(time.perf_counter() - self.t0)
    def on_train_end(self, trainer, module):
        Path(os.environ["VLWB_STEP_TIMES"]).write_text("\n".join(map(str, self.times)))


def mean(xs): return sum(xs) / len(xs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--model", default="builtin:tiny")
    a = ap.parse_args()
    from vlwb.shapes import generate_shapes_world
    tmp = Path(tempfile.mkdtemp(prefix="vlwb-bench-presets-"))
    try:
        generate_shapes_world(tmp / "world", n_train=4000, n_val=200, n_test=0, seed=0, progress=False)
        rows = {}
        for p in PRESETS:
            times = tmp / f"{p}.times"
            env = dict(os.environ, HF_HUB_OFFLINE="1", VLWB_STEP_TIMES=str(times),
                       PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
            r = subprocess.run([shutil.which("vlwb"), "train", p, "--data.shapes", str(tmp / "world"),
                                "--out", str(tmp / p),
                                "--model.model", a.model, "--trainer.max_steps", str(a.steps), "--progress", "false",
                                "--trainer.val_check_interval", str(a.steps), "--save_every", str(a.steps),
                                "--trainer.callbacks+=bench_presets.StepTimer"],
                               env=env, capture_output=True, text=True)
            if r.returncode: sys.exit(f"{p}: {r.stderr[-3000:]}")
            log = [row for row in csv.DictReader(open(tmp / p / "logs" / "metrics.csv")) if row.get("train/loss")]
            loss = [float(row["train/loss"]) for row in log]
            step = [float(t) for t in times.read_text().split()]
            rows[p] = (mean(loss[:10]), mean(loss[-10:]), mean(step))
        print(f"{'preset':10} {'loss first 10':>14} {'last 10':>8} {'falls':>6} {'s/step':>7} {'x clip':>7}   "
              f"({a.steps} steps, {a.model})")
        for p, (l0, l1, s) in rows.items():
            print(f"{p:10} {l0:14.3f} {l1:8.3f} {str(l1 < l0):>6} {s:7.3f} {s / rows['clip'][2]:7.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
