"""A real browser: headless Chromium opens `vlwb report`'s HTML page and JupyterLab running 09_widgets, and the
screenshots show drawn heat maps (pixel variance inside each plot), not blank boxes. Screenshots are kept in
$VLWB_SCREENSHOTS (default: the test's temp folder) for a person to look at."""
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="headless Chromium and chromedriver are not installed "
                                "(Debian: apt-get install chromium chromium-driver); browser screenshots not taken")


def _browser(width=1400, height=2400):
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
              f"--window-size={width},{height}"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


def _shots_dir(tmp_path) -> Path:
    d = Path(os.environ.get("VLWB_SCREENSHOTS", tmp_path))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _wait(fn, timeout, what):
    t0 = time.time()
    while time.time() - t0 < timeout:
        out = fn()
        if out: return out
        time.sleep(0.5)
    raise TimeoutError(f"waited {timeout} s for {what}")


def _plot_variances(driver, png: Path, selector: str) -> list[float]:
    "Screenshot the page and return the pixel variance inside each element matching `selector`."
    from selenium.webdriver.common.by import By
    driver.save_screenshot(str(png))
    shot = np.asarray(Image.open(png).convert("L"), dtype=np.float64)
    scale = shot.shape[1] / driver.execute_script("return window.innerWidth")
    out = []
    for el in driver.find_elements(By.CSS_SELECTOR, selector):
        r = driver.execute_script("const r = arguments[0].getBoundingClientRect(); "
                                  "return [r.left, r.top, r.width, r.height]", el)
        x0, y0, w, h = (int(v * scale) for v in r)
        crop = shot[max(y0, 0):max(y0, 0) + h, max(x0, 0):max(x0, 0) + w]
        if crop.size > 100 and h > 50: out.append(float(crop.var()))
    return out


def test_report_renders_in_chromium(filip_model, tmp_path):
    from vlwb.report import write_report
    _, _, run = filip_model
    page = write_report(run, tmp_path / "report.html", n_images=2, progress=False)
    html = page.read_text()
    assert not re.search(r"<script[^>]*\bsrc=", html) and html.count("<script") > 5 # self-contained: plotly.js inlined
    driver = _browser()
    try:
        driver.get(page.as_uri())
        n = _wait(lambda: len(driver.find_elements("css selector", ".js-plotly-plot .heatmaplayer image")) >= 10, 60,
                  "heat maps drawn")
        driver.execute_script("window.scrollTo(0, document.querySelector('h2 + div').getBoundingClientRect().top - 20)")
        time.sleep(1)
        png = _shots_dir(tmp_path) / "report.png"
        var = _plot_variances(driver, png, ".js-plotly-plot")
    finally:
        driver.quit()
    print(f"report screenshot: {png}; pixel variance per visible plot: {[round(v) for v in var]}")
    assert n and len(var) >= 2
    assert max(var) > 300 # heat maps over images, not a blank frame (a white page has variance 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_jupyterlab_runs_the_widgets(filip_model, tmp_path):
    "JupyterLab opens a copy of nbs/09_widgets.ipynb, runs every cell, and the explorer's figures appear in the page."
    from selenium.webdriver.common.by import By
    _, _, run = filip_model
    work = tmp_path / "lab"
    (work / "nbs").mkdir(parents=True)
    shutil.copy(ROOT / "nbs" / "09_widgets.ipynb", work / "nbs")
    (work / "runs").mkdir()
    (work / "runs" / "viz-filip").symlink_to(run) # the notebook's model: the fixture's run (same settings)
    (work / "data").symlink_to(ROOT / "data")
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", JUPYTER_CONFIG_DIR=str(tmp_path / "jcfg"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "jrt"))
    lab = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", f"--port={port}",
                            "--ServerApp.ip=127.0.0.1",
                            "--IdentityProvider.token=", "--ServerApp.password=", "--ServerApp.disable_check_xsrf=True",
                            f"--ServerApp.root_dir={work}", "--LabApp.news_url=None",
                            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
                           env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "lab.log", "w"))
    driver = None
    try:
        _wait(lambda: _ok(f"http://127.0.0.1:{port}/api/status"), 60, "JupyterLab to start")
        driver = _browser(1400, 1800)
        driver.get(f"http://127.0.0.1:{port}/lab/tree/nbs/09_widgets.ipynb")
        _wait(lambda: driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell"), 90, "the notebook to open")
        time.sleep(3) # Run All waits for the kernel if it is still starting
        _menu(driver, "Run", "Run All Cells")
        plots = _wait(lambda: driver.find_elements(By.CSS_SELECTOR,
                                                   ".widget-output .js-plotly-plot .heatmaplayer image"),
                      240, "the explorer's figures")
        time.sleep(3) # let the last cells (driving the widgets) finish
        explorer = driver.find_elements(By.CSS_SELECTOR, ".widget-vbox")
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", explorer[0] if explorer else plots[0])
        time.sleep(1)
        png = _shots_dir(tmp_path) / "jupyterlab-widgets.png"
        var = _plot_variances(driver, png, ".widget-output .js-plotly-plot")
        errors = [e.text
                  for e in driver.find_elements(By.CSS_SELECTOR, "[data-mime-type='application/vnd.jupyter.stderr']")
                  if "Error" in e.text]
    finally:
        if driver: driver.quit()
        lab.terminate()
        lab.wait(20)
    print(f"JupyterLab screenshot: {png}; pixel variance per explorer plot: {[round(v) for v in var]}")
    assert not errors, errors
    assert var and max(var) > 300


def _ok(url) -> bool:
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=2) as r: return r.status == 200
    except OSError:
        return False


def _menu(driver, top: str, item: str):
    "Click JupyterLab's menu bar entry `top`, then its item `item`."
    from selenium.webdriver.common.by import By
    bar = _wait(lambda: [e for e in driver.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-itemLabel") if e.text == top],
                30, f"menu {top}")
    bar[0].click()
    entry = _wait(lambda: [e for e in driver.find_elements(By.CSS_SELECTOR, ".lm-Menu-itemLabel") if e.text == item],
                  10, f"menu item {item}")
    entry[0].click()


def test_demo_renders_in_chromium(clip_run, tmp_path):
    "The Gradio app in headless Chromium: tabs, the example image, and a zero-shot answer after pressing 'classify'."
    from selenium.webdriver.common.by import By
    from test_demo import start_demo, stop
    ckpt, test = clip_run
    proc, url, log = start_demo(["--model", str(ckpt), "--gallery", str(test)], tmp_path)
    driver = _browser(1300, 1100)
    try:
        driver.get(url)
        _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "button[role='tab']"), 60, "the app's tabs")
        _wait(lambda: [b for b in driver.find_elements(By.TAG_NAME, "button") if b.text == "classify"], 30,
              "the classify button")[0].click()
        _wait(lambda: [e for e in driver.find_elements(By.CSS_SELECTOR,
                                                       "[data-testid='label-output-value'], .output-class")
                       if e.text.strip()], 60, "a zero-shot answer")
        time.sleep(1)
        png = _shots_dir(tmp_path) / "demo.png"
        tabs = [b.text for b in driver.find_elements(By.CSS_SELECTOR, "button[role='tab']")]
        var = _plot_variances(driver, png, "[data-testid='image'] img, .image-container img")
        answer = driver.find_elements(By.CSS_SELECTOR, "[data-testid='label-output-value'], .output-class")[0].text
    finally:
        driver.quit()
        stop(proc)
    print(f"demo screenshot: {png}; tabs {tabs}; answer {answer!r}; image pixel variance {[round(v) for v in var]}")
    assert {"zero-shot", "retrieval", "alignment", "attention", "compare"} <= set(tabs)
    assert answer.strip() in ("circle", "square", "triangle", "star", "diamond")
    assert var and max(var) > 100
