"""Widget update latency of vlwb.widgets.Explorer with builtin:tiny on this CPU, per kind of update, against the 300 ms budget
and against its peer in the same run: the model work alone (encode image + caption with attention, and the relevance backward).

    python tests/benchmarks/bench_widgets.py
"""
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch

from vlwb.models import create_model
from vlwb.shapes import generate_shapes_world
from vlwb.text import hard_negatives
from vlwb.widgets import Explorer
from vlwb import interpret


def main(n=20):
    torch.manual_seed(0)
    tiny = create_model("builtin:tiny").eval()
    with tempfile.TemporaryDirectory() as d:
        test = generate_shapes_world(d, n_train=0, n_val=0, n_test=n + 2, seed=0, progress=False, shard_size=0)["test"]
        ex = Explorer({"tiny": tiny}, source=test)
        acts = {"new image (model runs)": [], "word": [], "layer/head": [], "caption comparison": []}
        peer = []
        def timed(key, fn, view):
            start = len(ex.timings)
            t0 = time.perf_counter()
            fn()
            wall = (time.perf_counter() - t0) * 1000
            assert any(v == view for v, _ in ex.timings[start:]), f"{key} did not redraw {view}"
            acts[key].append(wall)
        for i in range(1, n + 1):
            ex.w_tabs.selected_index = 0
            timed("new image (model runs)", lambda: setattr(ex.w_image, "value", i), "alignment")
            timed("word", lambda: setattr(ex.w_token, "value", (ex.w_token.value + 1) % len(ex.w_token.options)), "alignment")
            ex.w_tabs.selected_index = 1
            timed("layer/head", lambda: setattr(ex.w_head, "value", (ex.w_head.value + 2) % 4 - 1), "attention")
            ex.w_tabs.selected_index = 2
            gen = "\n".join(n["text"] for n in hard_negatives(ex.w_caption.value, per_kind=1))
            others = gen if ex.w_others.value != gen else "\n".join(ex.entry["negatives"][:2]) # a change, so a redraw
            timed("caption comparison", lambda: setattr(ex.w_others, "value", others), "compare")
            x, cap = interpret.prepare(tiny, ex.entry["image"]), ex.w_caption.value
            t0 = time.perf_counter()
            interpret.word_patch_alignment(tiny, x, cap)
            interpret.explain(tiny, x, cap)
            peer.append((time.perf_counter() - t0) * 1000)
    p = lambda v, q: statistics.quantiles(v, n=20)[18] if q == 95 else statistics.median(v)
    print(f"Explorer updates, builtin:tiny, {n} images, {torch.get_num_threads()} threads (wall time of the widget change, figure built and sent)")
    print(f"{'update':<26}{'p50 ms':>8}{'p95 ms':>8}{'p95/300ms':>11}{'p50/model work':>16}")
    for k, v in acts.items():
        print(f"{k:<26}{p(v, 50):8.0f}{p(v, 95):8.0f}{p(v, 95) / 300:11.2f}{p(v, 50) / p(peer, 50):16.2f}")
    print(f"{'peer: model work alone':<26}{p(peer, 50):8.0f}{p(peer, 95):8.0f}")
    worst = max(p(v, 95) for v in acts.values())
    print(f"slowest p95 {worst:.0f} ms: {'within' if worst < 300 else 'OVER'} the 300 ms budget")
    return 0 if worst < 300 else 1


if __name__ == "__main__":
    sys.exit(main())
