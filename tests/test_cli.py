"The `vlwb` console script, run as a user runs it."
import json
import os
import shutil
import subprocess

import vlwb

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _vlwb(*args, **kw):
    exe = shutil.which("vlwb")
    assert exe, "the vlwb console script is not installed (pip install -e .)"
    return subprocess.run([exe, *args], capture_output=True, text=True, env=ENV, timeout=600, **kw)


def test_quickstart_small(tmp_path):
    r = _vlwb("quickstart", "--out", str(tmp_path / "qs"), "--n-train", "64", "--n-test", "60", "--steps", "4",
              "--batch-size", "32", "--model", "builtin:micro", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "qs" / "metrics.json").read_text())
    for k in ("zeroshot_shape_top1", "zeroshot_shape_chance", "zeroshot_color_top1", "zeroshot_color_chance",
              "i2t_r1", "t2i_r1"):
        assert 0.0 <= m[k] <= 1.0, k
    assert m["steps"] == 4 and m["zeroshot_shape_chance"] == 0.2 and m["zeroshot_color_chance"] == 1 / 6
    assert "zero-shot shape top-1" in r.stdout and "chance 20.0%" in r.stdout
    loaded = vlwb.load(tmp_path / "qs" / "checkpoint")
    assert loaded.spec["config"]["embed_dim"] == 64
    log = (tmp_path / "qs" / "logs" / "metrics.csv").read_text().splitlines()
    assert "train/loss" in log[0] and len(log) >= 5


def test_shapes_command_writes_splits(tmp_path):
    r = _vlwb("shapes", str(tmp_path / "w"), "--n-train", "5", "--n-val", "2", "--n-test", "3", "--size", "32")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [len((tmp_path / "w" / f"{s}.jsonl").read_text().splitlines())
            for s in ("train", "val", "test")] == [5, 2, 3]


def test_unknown_command_fails_with_usage():
    r = _vlwb("nonsense")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_data_check_prints_counts_by_reason(tmp_path):
    from PIL import Image
    Image.new("RGB", (8, 8), "red").save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    lines = [{"image": "ok.png", "caption": "red"}, {"image": "bad.png", "caption": "x"},
             {"image": "gone.png", "caption": "y"}, {"image": "ok.png", "caption": ""}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(l) for l in lines) + "\n{broken\n")
    r = _vlwb("data", "check", str(tmp_path / "d.jsonl"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "5 records, 1 good, 4 skipped" in r.stdout
    for reason in ("not an image", "missing image", "empty caption", "bad JSON line"): assert f"1  {reason}" in r.stdout
    r = _vlwb("data", "check", str(tmp_path / "d.jsonl"), "--json")
    assert json.loads(r.stdout)["skipped"] == {"not an image": 1, "missing image": 1, "empty caption": 1,
                                               "bad JSON line": 1}


def test_data_check_of_shards_and_samples(tmp_path):
    r = _vlwb("shapes", str(tmp_path / "w"), "--n-train", "12", "--n-val", "0", "--n-test", "0", "--shard-size", "5")
    assert r.returncode == 0, r.stderr[-2000:]
    r = _vlwb("data", "check", str(tmp_path / "w" / "shards" / "train-*.tar"))
    assert r.returncode == 0 and "12 records, 12 good, 0 skipped" in r.stdout, r.stdout + r.stderr[-2000:]
    samples = os.path.join(os.path.dirname(__file__), "..", "data", "skimage_samples.jsonl")
    r = _vlwb("data", "check", samples)
    assert r.returncode == 0 and "19 records, 19 good, 0 skipped" in r.stdout, r.stdout + r.stderr[-2000:]
