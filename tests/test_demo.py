"""`vlwb demo` in a subprocess on a free port, driven through HTTP with gradio_client: every tab answers, 50 concurrent
requests succeed, bad input gets a message, nothing outside the app's folder is served, and the process stops
cleanly."""
import base64
import io
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlwb.records import read_records

ROOT = Path(__file__).resolve().parent.parent
gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ignore_sigint():
    "What a background job of a non-interactive shell (or nohup) inherits: SIGINT ignored."
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def start_demo(args, tmp_path, timeout=120):
    """`vlwb demo ARGS` in a subprocess started with SIGINT ignored, as from a background shell: (process, URL, log
    path)."""
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    log = open(tmp_path / f"demo-{port}.log", "w+")
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from vlwb.cli import main; sys.exit(main())", "demo",
                             "--port", str(port), *args], cwd=tmp_path, env=env,
                            stdout=log, stderr=subprocess.STDOUT, preexec_fn=_ignore_sigint)
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"vlwb demo exited with {proc.returncode}: {Path(log.name).read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                if r.status == 200: return proc, f"http://127.0.0.1:{port}/", Path(log.name)
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise TimeoutError(f"vlwb demo did not answer in {timeout} s: {Path(log.name).read_text()[-3000:]}")


def stop(proc, sig=signal.SIGINT) -> int:
    "Send `sig` and return the exit code; fails if the process has not ended within 10 s."
    proc.send_signal(sig)
    try: return proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


@pytest.fixture(scope="module")
def demo(clip_run, tmp_path_factory):
    ckpt, test = clip_run
    tmp = tmp_path_factory.mktemp("demo")
    proc, url, log = start_demo(["--model", str(ckpt), "--gallery", str(test)], tmp)
    yield Client(url, verbose=False), url, test, str(ckpt), proc, log
    if proc.poll() is None: stop(proc)


def _single(test, color=None):
    "Test images holding a single object: (path, record)."
    out = []
    for r in read_records(test):
        if len(r["objects"]) == 1 and (color is None or r["objects"][0]["color"] == color):
            out.append((str(Path(test).parent / r["image"]), r))
    return out


def test_every_tab_answers(demo):
    c, url, test, model, _, _ = demo
    assert set(c.view_api(print_info=False, return_format="dict")["named_endpoints"]) >= {
        "/zeroshot", "/retrieve", "/words", "/alignment", "/attention", "/negatives", "/compare"}
    # zero-shot: colours are what a 150-step model has learned; the true colour ranks first for most single objects
    colours = "red, green, blue, yellow, orange, purple"
    singles = _single(test)[:12]
    right = 0
    for path, rec in singles:
        label, note = c.predict(handle_file(path), colours, "a {}", model, api_name="/zeroshot")
        assert note == "" and len(label["confidences"]) == 6
        assert abs(sum(x["confidence"] for x in label["confidences"]) - 1) < 1e-4
        right += label["label"] == rec["objects"][0]["color"]
    print(f"zero-shot colour through the app: {right}/{len(singles)} single-object test images (chance 1/6)")
    assert right >= len(singles) / 2
    # retrieval: k images with their cosine, best first
    hits, note = c.predict("a red circle", 5, model, api_name="/retrieve")
    cos = [float(x) for x in re.findall(r"<figcaption>cos (-?[0-9.]+):", hits)]
    assert len(cos) == 5 and cos == sorted(cos, reverse=True)
    pngs = [base64.b64decode(b) for b in re.findall(r"src='data:image/png;base64,([^']+)'", hits)]
    assert len(pngs) == 5 and all(Image.open(io.BytesIO(b)).size == (64, 64) for b in pngs) # real images, inlined
    # alignment, attention, compare: plotly figures
    path, rec = singles[0]
    words = c.predict(rec["captions"][0], model, api_name="/words")
    assert [w[0] for w in words["choices"]] == rec["captions"][0].split()
    fig, note = c.predict(handle_file(path), rec["captions"][0], "1", model, api_name="/alignment")
    assert fig["type"] == "plotly" and '"heatmap"' in fig["plot"] and note == ""
    fig, note = c.predict(handle_file(path), rec["captions"][0], 0, -1, model, api_name="/attention")
    assert fig["type"] == "plotly" and "gradient relevance" in fig["plot"]
    negs, _ = c.predict(rec["captions"][0], api_name="/negatives")
    assert len(negs.split("\n")) >= 2
    fig, note = c.predict(handle_file(path), rec["captions"][0], negs, [model], api_name="/compare")
    assert fig["type"] == "plotly" and '"bar"' in fig["plot"]


def test_fifty_concurrent_requests(demo):
    _, url, test, model, _, _ = demo
    path, rec = _single(test)[0]
    jobs = [("/zeroshot", (handle_file(path), "red, green, blue", "a {}", model)),
            ("/retrieve", ("a blue square", 3, model)),
            ("/alignment", (handle_file(path), rec["captions"][0], "0", model))]
    def one(i): # fifty users, each with their own session, as fifty browsers would be
        name, args = jobs[i % 3]
        client = Client(url, verbose=False)
        try: return name, client.submit(*args, api_name=name).result(120)
        finally: client.close()
    t0 = time.time()
    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(one, range(50)))
    print(f"50 concurrent requests answered in {time.time() - t0:.1f} s")
    assert len(results) == 50
    for name, out in results:
        assert out[-1] == "" and out[0], (name, out[-1]) # a value and no error message


def test_bad_input_gets_a_message(demo, tmp_path):
    c, url, test, model, _, _ = demo
    path, rec = _single(test)[0]
    garbage = tmp_path / "notes.png"
    garbage.write_bytes(b"this is a text file, not a PNG")
    label, note = c.predict(handle_file(str(garbage)), "red, blue", "a {}", model, api_name="/zeroshot")
    assert not label and note.startswith("⚠️") and "notes.png cannot be used" in note
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(Path(path).read_bytes()[:200])
    _, note = c.predict(handle_file(str(truncated)), "red", "a {}", model, api_name="/zeroshot")
    assert note.startswith("⚠️") and "cut.png" in note
    big = tmp_path / "big.png"
    Image.fromarray(np.full((3000, 4000, 3), 200, np.uint8)).save(big)
    label, note = c.predict(handle_file(str(big)), "red, blue", "a {}", model, api_name="/zeroshot")
    assert label["label"] in ("red", "blue") and "downscaled to 1024x768" in note
    _, note = c.predict(handle_file(path), " ,\n, ", "a {}", model, api_name="/zeroshot")
    assert note == "⚠️ type at least one label (comma- or line-separated)"
    labels = ", ".join(f"thing{i}" for i in range(1000))
    label, note = c.predict(handle_file(path), labels, "a {}", model, api_name="/zeroshot")
    assert len(label["confidences"]) == 10 and note == ""
    fig, note = c.predict(handle_file(path), "a red circle " * 100, "0", model, api_name="/alignment")
    assert fig["type"] == "plotly" and "longer than the model's 32 tokens" in note
    _, note = c.predict(handle_file(path), "", "0", model, api_name="/alignment")
    assert note == "⚠️ type a caption first"
    _, note = c.predict(handle_file(path), "a red circle", "zebra", model, api_name="/alignment")
    assert "'zebra' is not a word of the caption" in note
    # only the app's files are served
    for p in ("/etc/passwd", str(ROOT / "README.md"), path):
        for route in ("gradio_api/file=", "file="):
            try:
                with urllib.request.urlopen(f"{url}{route}{p}", timeout=5) as r: status = r.status
            except urllib.error.HTTPError as e: status = e.code
            assert status in (403, 404), (route, p, status)


def test_stops_cleanly_and_removes_uploads(demo):
    c, url, test, model, proc, log = demo
    path, _ = _single(test)[0]
    c.predict(handle_file(path), "red", "a {}", model, api_name="/zeroshot")
    text = log.read_text()
    assert "vlwb demo: serving" in text and "Traceback" not in text, text[-2000:]
    uploads = Path(text.split("uploads in ")[1].split(",")[0])
    assert uploads.is_dir() and any(uploads.rglob("*.png")) # the upload landed in the app's folder
    assert stop(proc) == 0
    assert "Traceback" not in log.read_text()
    assert not uploads.exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly(clip_run, tmp_path, sig):
    """Started with SIGINT ignored, the demo still ends on SIGINT and on SIGTERM: exit 0 within seconds, uploads folder
    gone."""
    ckpt, test = clip_run
    proc, url, log = start_demo(["--model", str(ckpt)], tmp_path)
    c = Client(url, verbose=False)
    c.predict(handle_file(_single(test)[0][0]), "red, blue", "a {}", str(ckpt), api_name="/zeroshot")
    uploads = Path(log.read_text().split("uploads in ")[1].split(",")[0])
    assert uploads.is_dir()
    t0 = time.time()
    assert stop(proc, sig) == 0
    print(f"{sig.name}: ended in {time.time() - t0:.1f} s")
    text = log.read_text()
    assert f"stopped by {sig.name}" in text and "Traceback" not in text, text[-2000:]
    assert not uploads.exists()
    assert not any(Path(tempfile.gettempdir()).glob(uploads.name)) # and nothing of that name left elsewhere


def test_share_without_network_keeps_serving(clip_run, tmp_path):
    ckpt, test = clip_run
    proc, url, log = start_demo(["--model", str(ckpt), "--share"], tmp_path, timeout=180)
    try:
        c = Client(url, verbose=False)
        label, note = c.predict(handle_file(_single(test)[0][0]), "red, blue", "a {}", str(ckpt), api_name="/zeroshot")
        assert label["label"] in ("red", "blue")
        text = log.read_text()
        assert "public link" in text, text[-2000:]
        print([l for l in text.splitlines() if "public link" in l])
    finally:
        stop(proc)


QUICKSTART = ROOT / "runs" / "quickstart"


@pytest.mark.skipif(not (QUICKSTART / "checkpoint" / "model.safetensors").exists(),
                    reason="runs/quickstart/checkpoint is absent (run `vlwb quickstart` first; CI does)")
def test_quickstart_model_ranks_circle_first(tmp_path):
    "Through the app, the quick start's model (zero-shot shape 97%) names most red circles of its test split 'circle'."
    test = QUICKSTART / "shapes" / "test.jsonl"
    proc, url, _ = start_demo(["--model", str(QUICKSTART / "checkpoint")], tmp_path)
    try:
        c = Client(url, verbose=False)
        firsts = [c.predict(handle_file(p), "circle, square, triangle, star, diamond", "a {}",
                            str(QUICKSTART / "checkpoint"), api_name="/zeroshot")[0]["label"]
                  for p, r in _single(test, "red") if r["objects"][0]["shape"] == "circle"]
    finally:
        stop(proc)
    print(f"red circles named 'circle' first: {firsts.count('circle')}/{len(firsts)} (chance 1/5)")
    assert len(firsts) >= 5 and firsts.count("circle") > len(firsts) / 2
