"""The study harness end to end on a micro grid (2 arms x 2 seeds x a few steps): tables, summary, paired differences
and figures; finished runs skipped; a study killed in the middle of a run resumes that run, to the weights it would
have had."""
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from safetensors.torch import load_file

from vlwb.study import Study, run_study, read_csv, run_dir

SPEC = {"name": "micro", "baseline": "clip", "seeds": [0, 1], "model": "builtin:micro", "steps": 8, "batch_size": 16,
        "world": {"n_train": 64, "n_val": 8, "n_test": 24, "seed": 0}, "tasks": "zeroshot,retrieval",
        "arms": {"clip": {"preset": "clip"}, "siglip": {"preset": "siglip"}}, "claims": {"text_retrieval_recall@1": 1}}


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-c", "import sys; from vlwb.cli import main; sys.exit(main())", *args],
                            env=dict(os.environ, HF_HUB_OFFLINE="1"), start_new_session=True, **kw)


def test_killed_study_resumes_and_matches_an_uninterrupted_one(tmp_path):
    spec = tmp_path / "micro.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    # uninterrupted, in-process
    ref = run_study(Study.from_dict(SPEC), tmp_path / "ref-runs", tmp_path / "ref-studies", progress=False)
    assert sorted(ref["did"].values()) == ["trained"] * 4
    # through the CLI, SIGKILLed (with its children) as soon as the first run has its step-2 checkpoint
    p = _cli("study", str(spec), "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "studies"),
             "--no-progress", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = run_dir(tmp_path / "runs" / "micro", "clip", 0)
    t0 = time.time()
    while not (first / "resume" / "epoch=0-step=2.ckpt").exists() and p.poll() is None and time.time() - t0 < 300:
        time.sleep(0.01)
    time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not (first / "eval.json").exists(), "the first run finished before the study could be killed"
    # as if killed between the step checkpoint and its copy last.ckpt: the study resumes from the step one
    (first / "resume" / "last.ckpt").unlink(missing_ok=True)
    out = _cli("study", str(spec), "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "studies"),
               "--no-progress", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = out.communicate(timeout=900)
    assert out.returncode == 0, stderr[-3000:]
    assert "study micro: 2 arms x 2 seeds" in stdout and "siglip - clip" in stdout, stdout
    assert (first / "timing.json").exists() and '"resumed": true' in (first / "timing.json").read_text()
    for arm, seed in [("clip", 0), ("clip", 1), ("siglip", 0), ("siglip", 1)]:
        wa = load_file(run_dir(tmp_path / "ref-runs" / "micro", arm, seed) / "checkpoint" / "model.safetensors")
        wb = load_file(run_dir(tmp_path / "runs" / "micro", arm, seed) / "checkpoint" / "model.safetensors")
        assert all((wa[k] == wb[k]).all() for k in wa), (arm, seed)
    a, b = (read_csv(tmp_path / "ref-studies" / "micro" / "results.csv"),
            read_csv(tmp_path / "studies" / "micro" / "results.csv"))
    key = lambda r: (r["arm"], r["seed"], r["metric"])
    va, vb = ({key(r): r["value"] for r in a if r["metric"] != "train_seconds"},
              {key(r): r["value"] for r in b if r["metric"] != "train_seconds"})
    assert va == vb and len(va) >= 4 * 5
    # tables: one summary row per arm and metric over 2 seeds; paired rows for siglip only
    summary = read_csv(tmp_path / "studies" / "micro" / "summary.csv")
    assert {(r["arm"], r["n"]) for r in summary if r["metric"] == "text_retrieval_recall@1"} == \
        {("clip", 2), ("siglip", 2)}
    paired = read_csv(tmp_path / "studies" / "micro" / "paired.csv")
    assert {r["arm"] for r in paired} == {"siglip"} and all(r["seeds"] == "0 1" for r in paired)
    curves = read_csv(tmp_path / "studies" / "micro" / "curves.csv")
    assert {(r["arm"], r["seed"]) for r in curves} == {("clip", 0), ("clip", 1), ("siglip", 0), ("siglip", 1)}
    # and again: nothing left to do
    again = run_study(Study.from_dict(SPEC), tmp_path / "runs", tmp_path / "studies", progress=False)
    assert set(again["did"].values()) == {"done"}
    # a task added to the spec: every run is evaluated again, none retrained, and the new metrics join the table
    before = {arm: load_file(run_dir(tmp_path / "runs" / "micro", arm, 0) / "checkpoint" / "model.safetensors")
              for arm in ("clip", "siglip")}
    more = run_study(Study.from_dict({**SPEC, "tasks": "zeroshot,retrieval,long"}), tmp_path / "runs",
                     tmp_path / "studies", progress=False)
    assert set(more["did"].values()) == {"re-evaluated"}
    for arm, w in before.items():
        after = load_file(run_dir(tmp_path / "runs" / "micro", arm, 0) / "checkpoint" / "model.safetensors")
        assert all((w[k] == after[k]).all() for k in w)
    assert any(r["metric"] == "long_image_retrieval_recall@1"
               for r in read_csv(tmp_path / "studies" / "micro" / "results.csv"))


def test_paired_differences_pair_runs_by_seed():
    from vlwb.study import paired_differences
    rows = [{"study": "s", "arm": "a", "seed": s, "metric": "m", "value": v} for s, v in [(0, 1.0), (1, 5.0), (2, 3.0)]]
    rows += [{"study": "s", "arm": "b", "seed": s, "metric": "m", "value": v}
             for s, v in [(2, 3.5), (0, 1.5), (1, 5.5), (7, 9.0)]]
    d = paired_differences(rows, "a")[0]
    assert d["seeds"] == "0 1 2" and d["n"] == 3 # seed 7 has no baseline run: left out
    assert abs(d["mean"] - 0.5) < 1e-12 and abs(d["std"]) < 1e-12 # paired by seed, the difference is exactly 0.5


def test_bad_spec_is_named(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("- just a list\n")
    with pytest.raises(ValueError, match="a study is a YAML mapping"): Study.load(p)


def test_a_changed_study_never_reuses_old_runs(tmp_path):
    "A run folder made with other settings (more steps, say) is refused by name rather than skipped or resumed."
    from vlwb.core import write_json
    from vlwb.study import run_one
    s = Study.from_dict(SPEC)
    d = run_dir(tmp_path, "clip", 0)
    write_json(d / "run.json", {"train": ["clip", "--trainer.max_steps", "999"], "tasks": s.tasks})
    with pytest.raises(ValueError, match="was trained with other settings"):
        run_one(s, s.arms[0], 0, tmp_path, tmp_path / "world")
