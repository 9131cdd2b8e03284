"""Objective benchmarks, each against its peer in the same run.

    python tests/benchmarks/bench_losses.py

1. `clip` forward + backward at B=1024, D=512 against open_clip's `ClipLoss`: time ratio and the two values.
2. `filip` similarities (both directions) forward + backward at B=T=128, I=64, L=32, D=256, chunked (vlwb) against the
   naive all-pairs einsum: peak memory ratio, time ratio, and the largest difference of the values. Each runs in a fresh
   process whose resident memory is sampled every 0.2 ms by a thread (glibc is told to return every large block to the
   system at once, MALLOC_MMAP_THRESHOLD_, so resident memory follows live tensors); peak = highest sample - the sample
   just before the call.
"""
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def _median_time(fn, reps=7):
    fn() # warm-up
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def clip_bench():
    from open_clip.loss import ClipLoss
    from vlwb.losses import clip_loss
    g = torch.Generator().manual_seed(0)
    u0, v0 = F.normalize(torch.randn(1024, 512, generator=g), dim=-1), F.normalize(torch.randn(1024, 512, generator=g), dim=-1)
    scale = torch.tensor(14.3)
    ref_loss = ClipLoss()
    def run(f):
        def go():
            u, v = u0.clone().requires_grad_(), v0.clone().requires_grad_()
            l = f(u, v, scale)
            l.backward()
            return l
        return go
    t_ours, t_ref = _median_time(run(clip_loss)), _median_time(run(ref_loss))
    a, b = run(clip_loss)().item(), run(ref_loss)().item()
    print(f"clip  B=1024 D=512  fwd+bwd: vlwb {t_ours*1e3:7.2f} ms, open_clip ClipLoss {t_ref*1e3:7.2f} ms, "
          f"ratio {t_ours / t_ref:.2f}x; loss {a:.6f} vs {b:.6f}")


def filip_child(kind):
    "Run in a fresh process: peak memory rise and time of one filip forward+backward."
    from vlwb.losses import filip_similarity, filip_similarity_naive
    g = torch.Generator().manual_seed(0)
    B, T, I, L, D = 128, 128, 64, 32, 256
    x = F.normalize(torch.randn(B, I, D, generator=g), dim=-1).requires_grad_()
    y = F.normalize(torch.randn(T, L, D, generator=g), dim=-1).requires_grad_()
    mask = torch.arange(L)[None] < torch.randint(4, L + 1, (T, 1), generator=g)
    f = (lambda: filip_similarity(x, y, mask)) if kind == "chunked" else (lambda: filip_similarity_naive(x, y, mask))
    import threading
    page = os.sysconf("SC_PAGE_SIZE")
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
    samples, stop = [], threading.Event()
    def watch():
        while not stop.is_set():
            samples.append(rss())
            time.sleep(0.0002)
    base = rss()
    th = threading.Thread(target=watch)
    th.start()
    t = time.perf_counter()
    s_i, s_t = f()
    (s_i.sum() + s_t.sum()).backward()
    elapsed = time.perf_counter() - t
    stop.set()
    th.join()
    peak = (max(samples) - base) / 1024 # KiB
    reps = [elapsed]
    for _ in range(4):
        x.grad = y.grad = None
        t = time.perf_counter()
        s_i, s_t = f()
        (s_i.sum() + s_t.sum()).backward()
        reps.append(time.perf_counter() - t)
    print(json.dumps({"peak_mb": peak / 1024, "time": sorted(reps)[2], "s_i": s_i[:4, :4].tolist(), "s_t": s_t[:4, :4].tolist()}))


def filip_bench():
    res = {}
    for kind in ("naive", "chunked"):
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run([sys.executable, __file__, "--filip-child", kind], capture_output=True, text=True, check=True, env=env)
        res[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    n, c = res["naive"], res["chunked"]
    diff = max(abs(a - b) for k in ("s_i", "s_t") for ra, rb in zip(n[k], c[k]) for a, b in zip(ra, rb))
    print(f"filip B=T=128 I=64 L=32 D=256 fwd+bwd: peak memory vlwb {c['peak_mb']:7.1f} MB, naive einsum {n['peak_mb']:7.1f} MB, "
          f"ratio {c['peak_mb'] / n['peak_mb']:.3f}; time vlwb {c['time']*1e3:.0f} ms, naive {n['time']*1e3:.0f} ms, "
          f"ratio {c['time'] / n['time']:.2f}x; max |difference| {diff:.2e}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--filip-child":
        filip_child(sys.argv[2])
    else:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        clip_bench()
        filip_bench()
