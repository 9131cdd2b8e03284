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
        "arms": {"clip": {"preset": "clip"}, "siglip": {"preset": "siglip"}}, "claims": {"text_retrieval_recall@1": 1},
        "pilot": True, "primary": "text_retrieval_recall@1", "delta": 0.05, "competence": {"zeroshot_shape_acc1": 0.9}}


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
    from vlwb.verdicts import paired_differences
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


def test_study_cli_judges_with_the_gate_and_records_provenance(tmp_path):
    "Through `vlwb study`: a micro baseline far below its shape bar gets no verdict; study.json says what made it."
    import json
    spec = tmp_path / "micro.yaml"
    spec.write_text(yaml.safe_dump(SPEC | {"steps": 3}))
    out = _cli("study", str(spec), "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "studies"),
               "--no-progress", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = out.communicate(timeout=900)
    assert out.returncode == 0, stderr[-3000:]
    assert "against the bar 0.900: MISSED" in stdout and "pilot: untestable at this budget" in stdout, stdout
    verdicts = read_csv(tmp_path / "studies" / "micro" / "verdicts.csv")
    assert [(v["arm"], v["role"], v["verdict"]) for v in verdicts] == \
        [("siglip", "primary", "pilot: untestable at this budget")]
    assert verdicts[0]["chance"] == 1 / 24 # recall@1 over the 24 test images
    info = json.loads((tmp_path / "studies" / "micro" / "study.json").read_text())
    prov = info["provenance"]
    assert prov["commit"] and prov["torch"] and prov["cpu"] and "threads" in prov and prov["wall_seconds"] > 0, prov
    assert info["spec_hash"] == Study.from_dict(SPEC | {"steps": 3}).spec_hash()
    assert info["gate"]["met"] is False and info["gate"]["bars"][0]["metric"] == "zeroshot_shape_acc1"
    # each seed drew its own world
    assert (tmp_path / "runs" / "micro" / "world-0").is_dir() and (tmp_path / "runs" / "micro" / "world-1").is_dir()


def test_study_check_flags_a_study_whose_code_changed(tmp_path):
    """`vlwb study --check`: a study made at this checkout's first commit is stale (its losses changed since), one made
    at HEAD is current (where the working tree's study code is committed), and one without a commit is said to be so."""
    import json
    from vlwb.provenance import STUDY_CODE, git, repo_root
    repo = repo_root()
    head, root = git(repo, "rev-parse", "HEAD"), git(repo, "rev-list", "--max-parents=0", "HEAD")
    if not head or not root or git(repo, "rev-parse", "--is-shallow-repository") == "true":
        pytest.skip("vlwb does not run from a whole git checkout")
    for name, commit in (("old", root.split()[0]), ("now", head), ("bare", None)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "study.json").write_text(json.dumps({"provenance": {"commit": commit}}))
    out = _cli("study", "--check", "--results", str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
               text=True)
    stdout, stderr = out.communicate(timeout=120)
    assert out.returncode == 1, (stdout, stderr)
    lines = {line.split()[0]: line for line in stdout.splitlines()}
    assert "stale" in lines["old"] and "vlwb/" in lines["old"], stdout
    assert "no commit recorded" in lines["bare"]
    dirty = git(repo, "status", "--porcelain", "--", *STUDY_CODE)
    assert ("current" in lines["now"]) == (not dirty), stdout


def test_tuning_on_validation_then_fine_tuning_from_a_shared_start(tmp_path):
    """Every arm tries the same learning rates with a tuning seed on the validation split, from the shared start of
    that seed; the reported seeds then fine-tune the same start with the
    chosen values, and study.json and tuning.csv say what was tried and chosen."""
    import json
    from vlwb.study import choose
    small = {"name": "clip", "model": "builtin:micro", "steps": 4, "batch_size": 16, "n_train": 64, "n_test": 24}
    spec = SPEC | {"steps": 3, "tasks": "zeroshot,retrieval", "start": small, "warmup": 0.34,
                   "tune": {"model.lr": [1e-4, 3e-3]}, "tune_seeds": [7],
                   "arms": {"clip": {"preset": "clip"},
                            "hardneg": {"preset": "clip", "overrides": {"data.n_negatives": 1,
                                                                        "model.objectives": {"clip": 1.0,
                                                                                             "hardneg": 1.0}}}}}
    s = Study.from_dict(spec)
    out = run_study(s, tmp_path / "runs", tmp_path / "studies", progress=False)
    root = tmp_path / "runs" / "micro"
    assert sum(k[0].startswith("tune/") for k in out["did"]) == 2 + 2 # 2 learning rates for each arm
    shared = list((tmp_path / "runs" / "shared").glob("clip-*/seed-*/checkpoint"))
    assert sorted(p.parent.name for p in shared) == ["seed-0", "seed-1", "seed-7"] # reported and tuning seeds
    run = json.loads((run_dir(root, "hardneg", 0) / "run.json").read_text())
    args = dict(zip(run["train"][1::2], run["train"][2::2]))
    assert args["--model.model"] == str(next(p for p in shared if p.parent.name == "seed-0")) # fine-tunes the start
    assert args["--model.warmup_steps"] == "1" # 0.34 of 3 steps
    info = json.loads((tmp_path / "studies" / "micro" / "study.json").read_text())
    tried = read_csv(tmp_path / "studies" / "micro" / "tuning.csv")
    assert len(tried) == 4 and sum(str(r["chosen"]) == "True" for r in tried) == 2
    for arm in ("clip", "hardneg"): # the chosen values are the ones the reported runs used
        chosen, rows = choose(s, next(a for a in s.arms if a.name == arm), root)
        assert info["tuned"][arm] == chosen
        assert max(r["mean"] for r in rows) == next(r for r in rows if r["chosen"])["mean"]
        a = json.loads((run_dir(root, arm, 1) / "run.json").read_text())["train"]
        assert a[a.index("--model.lr") + 1] == json.dumps(chosen["model.lr"])
    assert json.loads((run_dir(root, "tune/clip-0", 7) / "run.json").read_text())["split"] == "val"
    assert info["spec_hash"] == s.spec_hash() and info["tune"] == {"model.lr": [1e-4, 3e-3]}


def test_study_index_writes_one_row_per_committed_study(tmp_path):
    "`vlwb study --index` over a copy of the committed studies: one row each, every verdict judged by its spec."
    import shutil
    from pathlib import Path
    src = Path(__file__).resolve().parent.parent / "studies"
    shutil.copytree(src, tmp_path / "studies", ignore=shutil.ignore_patterns("README.md"))
    out = _cli("study", "--index", "--results", str(tmp_path / "studies"), stdout=subprocess.PIPE,
               stderr=subprocess.PIPE, text=True)
    stdout, stderr = out.communicate(timeout=120)
    assert out.returncode == 0, stderr
    page = (tmp_path / "studies" / "README.md").read_text()
    judged = [f.stem for f in (src / "specs").glob("*.yaml") if (src / f.stem / "summary.csv").exists()]
    rows = [line for line in page.splitlines() if line.startswith("| `")]
    assert sorted(r.split("`")[1] for r in rows) == sorted(judged), page
    assert all(("untestable at this budget" in r) or ("reproduces" in r) or ("inconclusive" in r) or
               ("opposite" in r) for r in rows), page
