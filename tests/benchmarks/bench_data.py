"""Data benchmarks: how fast the shapes world is generated, and whether the loader outpaces a training step.

    python tests/benchmarks/bench_data.py [--n 8000] [--batch-size 128]

Prints images/s of shapes world generation (in memory, and written as PNG + JSONL + tar shards) with 1 and with all
processes, then samples/s of the loaders (JSONL + PNG files, and tar shards; 0 and 2 worker processes) beside samples/s
a training step of builtin:tiny consumes, and their ratio (above 1: the loader is not the bottleneck).
"""
import argparse
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _render(args):
    from vlwb.shapes import make_record
    split, start, stop = args
    for i in range(start, stop): make_record(split, i, seed=0)
    return stop - start


def generation(n: int, workers: int) -> float:
    "Images/s of `make_record` (scene, pixels, masks, captions, negatives) in memory."
    chunks = [("train", s, min(s + 500, n)) for s in range(0, n, 500)]
    t = time.perf_counter()
    if workers == 1: done = sum(map(_render, chunks))
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool: done = sum(pool.map(_render, chunks))
    return done / (time.perf_counter() - t)


def writing(n: int, workers: int, files: bool) -> float:
    "Images/s of `generate_shapes_world` writing to disk."
    from vlwb.shapes import generate_shapes_world
    d = tempfile.mkdtemp()
    try:
        t = time.perf_counter()
        generate_shapes_world(d, n, 0, 0, seed=0, workers=workers, files=files, shard_size=1000, progress=False)
        return n / (time.perf_counter() - t)
    finally: shutil.rmtree(d)


def loader_rate(source: str, batch_size: int, workers: int, batches: int = 12) -> float:
    "Samples/s of the training dataloader (decode, transform, tokenise, collate)."
    from vlwb.data import PairDataModule
    dm = PairDataModule(source, batch_size=batch_size, num_workers=workers, shuffle_buffer=500)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    next(it) # worker start-up is not throughput
    t, n = time.perf_counter(), 0
    for _ in range(batches): n += next(it).n_images
    return n / (time.perf_counter() - t)


def train_rate(source: str, batch_size: int, steps: int = 6) -> float:
    "Samples/s a training step (forward, backward, AdamW) of builtin:tiny consumes, on batches already in memory."
    import torch
    from vlwb.data import PairDataModule
    from vlwb.train import VLModule
    dm = PairDataModule(source, batch_size=batch_size)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module = VLModule("builtin:tiny")
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3) # the optimiser VLModule configures, without its schedule
    def step():
        opt.zero_grad()
        loss = module.objectives(*module(batch), batch, module.model.scale)["loss"]
        loss.backward()
        opt.step()
    step()
    t = time.perf_counter()
    for _ in range(steps): step()
    return steps * batch.n_images / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8000, help="images generated per measurement")
    p.add_argument("--batch-size", type=int, default=128)
    a = p.parse_args()
    import torch
    _render(("train", 0, 50)) # warm-up: the first call imports vlwb.shapes; no clock runs yet
    cpus = os.cpu_count() or 1
    print(f"shapes world generation, 64x64, {a.n} images ({cpus} CPUs)")
    for w in sorted({1, cpus}):
        print(f"  in memory       {w} process{'es' if w > 1 else '  '}: {generation(a.n, w):8.0f} images/s")
    for w in sorted({1, cpus}):
        print(f"  written (PNG+JSONL+shards), {w} process{'es' if w > 1 else ''}: "
              f"{writing(a.n, w, True):8.0f} images/s")
        print(f"  written (shards only),      {w} process{'es' if w > 1 else ''}: "
              f"{writing(a.n, w, False):8.0f} images/s")

    from vlwb.shapes import generate_shapes_world
    d = tempfile.mkdtemp()
    try:
        paths = generate_shapes_world(d, 4000, 0, 0, seed=0, progress=False)
        torch.set_num_threads(cpus)
        train = train_rate(str(paths["train"]), a.batch_size)
        print(f"\ntraining step, builtin:tiny, batch {a.batch_size}: {train:8.0f} samples/s consumed")
        for name, src in (("JSONL + PNG files", str(paths["train"])), ("tar shards", f"{d}/shards")):
            for w in (0, 2):
                r = loader_rate(src, a.batch_size, w)
                print(f"loader, {name:17s}, {w} workers:  {r:8.0f} samples/s   = {r / train:5.1f}x the training step")
    finally: shutil.rmtree(d)


if __name__ == "__main__":
    main()
