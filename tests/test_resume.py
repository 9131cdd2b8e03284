"""`vlwb train`: presets run, bf16 works on the CPU, fp16 is refused, and a run killed mid-epoch resumes to the same
weights."""
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
SMALL = ["--data.batch_size", "16", "--trainer.max_steps", "14", "--save_every", "4", "--progress", "false",
         "--model.model", "builtin:micro"]


def _train(*args, **kw):
    exe = shutil.which("vlwb")
    return subprocess.run([exe, "train", *args], capture_output=True, text=True, env=ENV, timeout=600, **kw)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from vlwb.shapes import generate_shapes_world
    d = tmp_path_factory.mktemp("w")
    generate_shapes_world(d, 96, 16, 0, seed=0, progress=False)
    return d


@pytest.mark.parametrize("preset", ["clip", "tcl"])
def test_killed_mid_epoch_resumes_to_identical_weights(tmp_path, world, preset):
    "SIGKILLed and resumed: the same weights as an uninterrupted run (for tcl, the momentum model and queues too)."
    base = [preset, "--data.shapes", str(world)] + SMALL
    r = _train(*base, "--out", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr[-3000:]
    # checkpoints at steps 4, 8 and 12: the newest two are kept (--keep_resume 2), and last.ckpt
    assert sorted(p.name for p in (tmp_path / "a" / "resume").iterdir()) == \
        ["epoch=0-step=12.ckpt", "epoch=0-step=8.ckpt", "last.ckpt"]
    # the same run, killed (SIGKILL: no clean-up) as soon as its step-4 checkpoint exists: 4 of 6 steps into the first
    # pass
    b = tmp_path / "b"
    p = subprocess.Popen([shutil.which("vlwb"), "train", *base, "--out", str(b)], env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    ckpt = b / "resume" / "epoch=0-step=4.ckpt" # (the run is one Lightning epoch over an endless stream)
    t0 = time.time()
    while not ckpt.exists() and p.poll() is None and time.time() - t0 < 300: time.sleep(0.01)
    time.sleep(0.2) # let the file be complete (Lightning writes it whole, then it appears)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (b / "resume" / "epoch=0-step=12.ckpt").exists()
    r = _train(*base, "--out", str(b), "--ckpt_path", str(ckpt))
    assert r.returncode == 0, r.stderr[-3000:]
    wa, wb = (load_file(tmp_path / "a" / "checkpoint" / "model.safetensors"),
              load_file(b / "checkpoint" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa), \
        "resumed weights differ from the uninterrupted run"
    if preset == "tcl": # Lightning's last checkpoint holds the whole module: momentum model and queues identical too
        sa, sb = (torch.load(d / "resume" / "epoch=0-step=12.ckpt", weights_only=True)["state_dict"]
                  for d in (tmp_path / "a", b))
        extra = [k for k in sa if k.startswith(("momentum_model.", "objectives.terms.tcl."))]
        assert any("queue.feats" in k for k in extra) and any(k.startswith("momentum_model.") for k in extra)
        assert all(torch.equal(sa[k], sb[k]) for k in extra), [k for k in extra if not torch.equal(sa[k], sb[k])]
    # and the resumed run did resume: it did not start from step 0
    log = (b / "logs" / "metrics.csv").read_text().splitlines()
    assert log[-1].split(",")[1] == "13"


@pytest.mark.parametrize("preset", ["siglip", "filip", "dreamlip", "tcl", "negclip"])
def test_every_preset_trains(tmp_path, world, preset):
    r = _train(preset, "--data.shapes", str(world), "--out", str(tmp_path / preset), *SMALL, "--trainer.max_steps", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    header = (tmp_path / preset / "logs" / "metrics.csv").read_text().splitlines()[0]
    term = {"siglip": "siglip", "filip": "filip", "dreamlip": "grouping", "tcl": "tcl_lmi",
            "negclip": "hardneg"}[preset]
    assert f"train/{term}" in header


def test_flags_override_the_preset(tmp_path, world):
    r = _train("clip", "--data.shapes", str(world), "--out", str(tmp_path / "o"), *SMALL, "--trainer.max_steps", "2",
               "--model.objectives", '{"clip": 1.0, "hardneg": 0.5}', "--data.n_negatives", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train/hardneg" in (tmp_path / "o" / "logs" / "metrics.csv").read_text().splitlines()[0]


def test_bf16_mixed_trains_on_the_cpu(tmp_path, world):
    r = _train("clip", "--data.shapes", str(world), "--out", str(tmp_path / "bf"), *SMALL, "--trainer.max_steps", "3",
               "--trainer.precision", "bf16-mixed")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = (tmp_path / "bf" / "logs" / "metrics.csv").read_text().splitlines()
    assert len(rows) >= 4 and "nan" not in rows[-1]


def test_fp16_on_the_cpu_is_refused_with_a_reason(tmp_path, world):
    r = _train("clip", "--data.shapes", str(world), "--out", str(tmp_path / "f"), *SMALL,
               "--trainer.precision", "16-mixed")
    assert r.returncode != 0 and "bf16-mixed" in r.stderr and "CPU" in r.stderr


def test_nan_stops_the_run_naming_step_and_objective_and_keeps_the_checkpoint(tmp_path, world):
    """A learning rate of 1e9 blows the weights up: the run stops at the first non-finite loss; the last checkpoint is
    whole."""
    r = _train("clip", "--data.shapes", str(world), "--out", str(tmp_path / "n"), *SMALL, "--trainer.max_steps", "40",
               "--model.lr", "1e9", "--model.warmup_steps", "1", "--save_every", "1")
    assert r.returncode != 0
    import json, re
    m = re.search(r"FloatingPointError: step (\d+) \(train\): objective 'clip' gave a non-finite loss", r.stderr)
    assert m, r.stderr[-2000:]
    from vlwb.models import load
    load(tmp_path / "n" / "checkpoint") # the last checkpoint is whole: it loads
    saved = json.loads((tmp_path / "n" / "checkpoint" / "config.json").read_text())["global_step"]
    assert saved <= int(m.group(1)) # and it is from before the failing step (the failing step saved nothing)


def test_keep_resume_below_minus_one_is_refused(tmp_path, world):
    r = _train("clip", "--data.shapes", str(world), "--out", str(tmp_path / "r"), *SMALL, "--keep_resume", "-2")
    assert r.returncode != 0 and "--keep_resume -2" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "r" / "resume").exists()
