"""Notebook 05 in a real browser: JupyterLab on loopback + headless Chromium (Playwright).

The test starts from the README command's run folder (``vfcore run-notebooks --run runs/phantom
--quick``; the ``readme_run`` fixture), opens ``notebooks/05_concept_explorer.ipynb`` itself in
JupyterLab (served from the project root, the notebook unchanged: its default ``RUN_DIR``
must find that folder), runs every cell, moves the slice slider with the keyboard and
picks another unit in the list, and checks that the picture on screen is the expected slice
of the expected unit, at least 480 px wide in a 1500 px window, with an exemplar of the same
unit beside it (the strongest of notebook 04's subset, ground-truth fractures by r_k, at its
best slice), and that the displayed explorer carries a PNG of its view for GitHub: the PNG shown by the browser is decoded and compared pixel by pixel
with the CT slice, the HU window and the unit's thresholded activation, computed here from
the checkpoint with ``vfcore.dissect.activations`` and ``scipy.ndimage.zoom`` (not with the
explorer's code). The readout and the status line must name the same unit and slice.

Chromium is Debian's (``apt-get install chromium``; ``playwright install`` cannot work
offline). Without it the test is skipped with the reason, except in CI (``CI`` set), where a
missing browser is a failure. A screenshot and the timings are saved in the test's tmp folder
and copied to ``runs/test-artifacts/browser/``.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from explorer_reference import check_image, parse_readout, parse_status, ref_best_slice, ref_unit

pytestmark = [pytest.mark.browser, pytest.mark.slow]

PROJECT = Path(__file__).resolve().parents[1]
NOTEBOOK = PROJECT / "notebooks" / "05_concept_explorer.ipynb"
ARTIFACTS = PROJECT / "runs" / "test-artifacts" / "browser"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"the browser test must run in CI, but {reason} (.ci/run installs Chromium)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def playwright_api():
    if CHROMIUM is None:
        _unavailable("Chromium is not installed (Debian: apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the Python package playwright is not installed (pip install playwright)")
    return sync_playwright


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory, playwright_api):
    """JupyterLab on a free loopback port, with its own config/runtime/settings folders."""
    home = tmp_path_factory.mktemp("jupyterlab")
    config = home / "config"
    (config / "labconfig").mkdir(parents=True)
    (config / "labconfig" / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    settings = home / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    # render every cell (JupyterLab 4 may skip cells outside the viewport)
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    # the notebook is the repository's own file: never save outputs into it
    docmanager = home / "settings" / "@jupyterlab" / "docmanager-extension"
    docmanager.mkdir(parents=True)
    (docmanager / "plugin.jupyterlab-settings").write_text(json.dumps({"autosave": False}))
    port = _free_port()
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(config), JUPYTER_RUNTIME_DIR=str(home / "runtime"),
               IPYTHONDIR=str(home / "ipython"))
    log_path = home / "lab.log"
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--ServerApp.token=", "--ServerApp.password=", "--allow-root",
           "--ServerApp.disable_check_xsrf=True", "--LabApp.expose_app_in_browser=True",
           f"--LabApp.user_settings_dir={home / 'settings'}",
           f"--LabApp.workspaces_dir={home / 'workspaces'}", f"--ServerApp.root_dir={PROJECT}"]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/api/status", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer /api/status in 120 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"url": url, "log": log_path, "start_s": time.perf_counter() - start}
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


KERNEL_IDLE = """() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  return !!k && k.status === 'idle';
}"""

# Progress of "run all": how many code cells ran, and the first error output if any.
RUN_STATE = """() => {
  const w = window.jupyterapp.shell.currentWidget;
  const cells = w.content.widgets.filter(c => c.model.type === 'code');
  let error = null;
  for (const c of cells) {
    const outs = c.model.outputs.toJSON();
    const e = outs.find(o => o.output_type === 'error');
    if (e && !error) error = e.ename + ': ' + e.evalue + '\\n' + (e.traceback || []).join('\\n');
  }
  const k = w.sessionContext.session.kernel;
  return {total: cells.length, done: cells.filter(c => c.model.executionCount !== null).length,
          idle: k.status === 'idle', error: error};
}"""

IMAGE_BYTES = """async (selector) => {
  const img = document.querySelector(selector);
  const r = await fetch(img.src);
  const b = new Uint8Array(await r.arrayBuffer());
  let s = '';
  for (let i = 0; i < b.length; i += 8192) s += String.fromCharCode.apply(null, b.subarray(i, i + 8192));
  return {src: img.src, png: btoa(s)};
}"""


# The exemplar row: one matplotlib PNG in the Output widget, decoded by the browser.
EXEMPLARS_SHOWN = """() => {
  const imgs = [...document.querySelectorAll('.vf-explorer .vf-exemplars img')];
  return imgs.length === 1 && imgs[0].complete && imgs[0].naturalWidth > 0;
}"""


def _shown(page) -> dict:
    """Readout, status and the image's PNG. The kernel sets the image before the texts, and
    the front end applies updates in order, so reading the texts first means the image read
    next is at least as new as they are."""
    readout = page.inner_text(".vf-explorer .vf-readout")
    status = page.inner_text(".vf-explorer .vf-status")
    img = page.evaluate(IMAGE_BYTES, ".vf-explorer .vf-image")
    return {"src": img["src"], "png": base64.b64decode(img["png"]), "readout": readout, "status": status}


# The explorer's output in the notebook model: the widget and, beside it, a PNG of its view.
EMBEDDED_PNG = """() => {
  const w = window.jupyterapp.shell.currentWidget;
  for (const c of w.content.widgets) {
    if (c.model.type !== 'code') continue;
    for (const o of c.model.outputs.toJSON()) {
      const d = o.data || {};
      if (d['application/vnd.jupyter.widget-view+json'] && d['image/png']) return d['image/png'].length;
    }
  }
  return 0;
}"""


def _strongest_fractured_exemplar(run_dir: Path, unit: int) -> str:
    """'<case> <level>' of the unit's first exemplar as notebook 04 lists it (ground-truth
    fractures, largest r_k from stats.npz, ties by index), computed here from the artifacts."""
    import pandas as pd

    samples = pd.read_csv(run_dir / "dissection" / "samples.csv", dtype={"case": str, "level": str})
    with np.load(run_dir / "dissection" / "stats.npz") as s:
        r = s["r"][:, unit]
    order = [i for i in np.argsort(-r, kind="stable") if samples.fracture[i] == 1 and r[i] > 0]
    return f"{samples.case[order[0]]} {samples.level[order[0]]}" if order else ""


class Reference:
    """Unit maps of one sample computed here from the checkpoint (not with vfcore.explorer)."""

    def __init__(self, run_dir: Path, sample_name: str):
        from vfcore import dissect as dx

        art = dx.load_artifacts(run_dir)
        samples = art.samples
        names = samples["case"].astype(str) + " " + samples["level"].astype(str)
        row = samples[names == sample_name].iloc[0]
        self.patch = np.load(run_dir / "patches" / row["ct_path"])
        net = dx.load_network(run_dir)
        A, _ = dx.activations(net.model, self.patch[None], net.layer, transform=net.transform, device="cpu")
        self.A, self.T = A[0], art.dissection.T
        self.field = art.field

    def map(self, unit: int) -> tuple[np.ndarray, np.ndarray]:
        """(activation, mask) of a unit on the patch (``explorer_reference.ref_unit``)."""
        f = self.field[0]
        return ref_unit(self.A[unit], float(self.T[unit]), f.start, f.stop - f.start)

    def r(self) -> np.ndarray:
        """r_k = sum(M_k * A_k) (Eq. 2) on the network's grid."""
        return np.where(self.A > self.T[:, None, None, None], self.A, 0).reshape(len(self.T), -1).sum(1)

    def top(self, n: int = 10) -> list[int]:
        r = self.r()
        return sorted(range(len(r)), key=lambda k: (-r[k], k))[:n]


def _wait_for(page, predicate, what: str, timeout_s: float = 30.0, poll_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        page.wait_for_timeout(poll_s * 1000)


def test_notebook_05_in_chromium(lab, playwright_api, readme_run, tmp_path):
    run_dir, _ = readme_run
    if run_dir.resolve() != (PROJECT / "runs" / "phantom").resolve():
        pytest.skip("VFCORE_TEST_RUN points elsewhere: notebook 05's default RUN_DIR would not find it")
    timings = {"lab_start_s": round(lab["start_s"], 1)}
    name = NOTEBOOK.relative_to(PROJECT).as_posix()
    original = NOTEBOOK.read_bytes()
    t0 = time.perf_counter()
    with playwright_api() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1800})
            page.goto(f"{lab['url']}/lab/tree/{name}")
            page.wait_for_selector(".jp-Notebook", timeout=90_000)
            page.wait_for_function(KERNEL_IDLE, timeout=90_000)
            timings["notebook_open_s"] = round(time.perf_counter() - t0, 1)

            # run all cells; stop at the first error output
            t_run = time.perf_counter()
            page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
            page.wait_for_timeout(1000)
            deadline = time.monotonic() + 300
            while True:
                state = page.evaluate(RUN_STATE)
                assert state["error"] is None, f"a cell of notebook 05 failed:\n{state['error']}"
                if state["done"] == state["total"] and state["idle"]:
                    break
                assert time.monotonic() < deadline, f"run-all did not finish in 300 s: {state}"
                page.wait_for_timeout(500)
            timings["run_all_s"] = round(time.perf_counter() - t_run, 1)
            page.wait_for_selector(".vf-explorer .vf-image", timeout=30_000)
            page.locator(".vf-explorer").scroll_into_view_if_needed()

            # what is on screen after run-all: the most confident true positive, its top unit
            first = _shown(page)
            unit0, view0, s0 = parse_readout(first["readout"])
            assert parse_status(first["status"]) == (unit0, view0, s0), first
            sample_name = first["status"].split("Showing ", 1)[1].split(":", 1)[0]
            ref = Reference(run_dir, sample_name)
            top = ref.top()
            assert unit0 == top[0], f"the first unit shown must be the most relevant: {unit0} vs {top}"
            assert view0 == "sagittal"
            T0 = float(ref.T[unit0])
            assert s0 == ref_best_slice(*ref.map(unit0), view0)
            fires = ref.r() > 0
            check_image(first["png"], ref.patch, *ref.map(unit0), T0, view0, s0, min_on=int(fires[unit0]))

            # three slider steps with the keyboard; each must show the next slice
            page.focus(".vf-explorer .vf-slice-slider .noUi-handle")
            latencies, shown = [], first
            for step in range(1, 4):
                old = shown["src"]
                t = time.perf_counter()
                page.keyboard.press("ArrowRight")
                page.wait_for_function(
                    "(old) => document.querySelector('.vf-explorer .vf-image').src !== old", arg=old,
                    timeout=30_000, polling="raf")
                latencies.append(1000 * (time.perf_counter() - t))
                shown = _wait_for(page, lambda: (lambda v: v if parse_readout(v["readout"])[2] == s0 + step
                                                 and v["src"] != old else None)(_shown(page)),
                                  f"the readout to reach slice {s0 + step}")
            s1 = s0 + 3
            assert parse_readout(shown["readout"]) == (unit0, "sagittal", s1)
            assert parse_status(shown["status"]) == (unit0, "sagittal", s1)
            assert page.inner_text(".vf-explorer .vf-slice-slider .widget-readout").strip() == str(s1)
            check_image(shown["png"], ref.patch, *ref.map(unit0), T0, "sagittal", s1, min_on=0)
            assert shown["png"] != first["png"]
            timings["slider_step_ms"] = [round(v) for v in latencies]

            # another unit from the list: the third most relevant, shown at its best slice
            t = time.perf_counter()
            old = shown["src"]
            page.select_option(".vf-explorer .vf-unit-select select", index=2)
            unit2 = top[2]
            shown = _wait_for(page, lambda: (lambda v: v if parse_readout(v["readout"])[0] == unit2
                                             and parse_status(v["status"])[0] == unit2
                                             and v["src"] != old else None)(_shown(page)),
                              f"unit {unit2} on screen")
            timings["unit_change_ms"] = round(1000 * (time.perf_counter() - t))
            T2 = float(ref.T[unit2])
            s2 = ref_best_slice(*ref.map(unit2), "sagittal")
            assert parse_readout(shown["readout"]) == (unit2, "sagittal", s2)
            assert parse_status(shown["status"]) == (unit2, "sagittal", s2)
            check_image(shown["png"], ref.patch, *ref.map(unit2), T2, "sagittal", s2, min_on=int(fires[unit2]))

            # the exemplar row follows the selected unit
            _wait_for(page, lambda: page.inner_text(".vf-explorer .vf-exemplar-header").startswith(f"unit {unit2}:")
                      and page.evaluate(EXEMPLARS_SHOWN), f"the exemplars of unit {unit2}", timeout_s=60)

            # two views side by side, each at least 480 px wide: this vertebra and an exemplar
            box = page.locator(".vf-explorer .vf-image").bounding_box()
            ex_box = page.locator(".vf-explorer .vf-exemplar-image").bounding_box()
            timings["image_px"] = [round(box["width"]), round(ex_box["width"])]
            assert box["width"] >= 480 and ex_box["width"] >= 480, timings["image_px"]
            assert ex_box["x"] >= box["x"] + box["width"] - 1, (box, ex_box)
            assert ex_box["y"] < box["y"] + box["height"] and box["y"] < ex_box["y"] + ex_box["height"], (box, ex_box)
            exemplar = _strongest_fractured_exemplar(run_dir, unit2)
            if exemplar:  # the exemplar beside the sample: the strongest, at its best slice
                _wait_for(page, lambda: f"unit {unit2}: {exemplar}," in page.inner_text(
                    ".vf-explorer .vf-exemplar-readout"), f"exemplar {exemplar} of unit {unit2}")
                ex_ref = Reference(run_dir, exemplar)
                ex_png = base64.b64decode(page.evaluate(IMAGE_BYTES, ".vf-explorer .vf-exemplar-image")["png"])
                check_image(ex_png, ex_ref.patch, *ex_ref.map(unit2), T2, "sagittal",
                            ref_best_slice(*ex_ref.map(unit2), "sagittal"), min_on=0)

            # the saved output carries a PNG of the explorer (GitHub and nbviewer show it)
            assert page.evaluate(EMBEDDED_PNG) > 1000

            # the executed notebook also shows static figures
            assert page.locator(".jp-OutputArea-output img").count() >= 2

            shot = tmp_path / "explorer.png"
            page.locator(".vf-explorer").screenshot(path=str(shot))
            timings["total_s"] = round(time.perf_counter() - t0, 1)
        finally:
            browser.close()
    assert NOTEBOOK.read_bytes() == original, "the browser run must not save outputs into the repository's notebook"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "explorer.png")
    (tmp_path / "timings.json").write_text(json.dumps(timings, indent=2))
    shutil.copy(tmp_path / "timings.json", ARTIFACTS / "timings.json")
    print(f"browser test timings: {timings}; median slider step "
          f"{statistics.median(timings['slider_step_ms'])} ms; screenshot {ARTIFACTS / 'explorer.png'}")
