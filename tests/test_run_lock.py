"""One writer per run folder, and provenance checked on read (issue 23, items 1-2).

Concurrency is tested with real processes: a second Python process holds the run folder's
lock (``vfcore.lock.writer_lock``) while this one tries each writing stage; every stage stops
with ``RunLockedError`` naming the holder's pid and command, and leaves the run folder as it
was. Staleness is tested with real files: a dissection written for one checkpoint, then
``best.pt`` replaced (a retraining), then every reader asked.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from store_helpers import run_cli
from vfcore.errors import InvalidParameterError, RunLockedError, StaleArtifactError
from vfcore.lock import LOCK_NAME, holder, writer_lock
from vfcore.run import RunFolder

PROJECT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(PROJECT)}
HOLD = """
import sys
from vfcore.lock import writer_lock
with writer_lock(sys.argv[1], "test holder " + sys.argv[2]):
    print("locked", flush=True)
    sys.stdin.read()          # held until the parent closes stdin or kills us
"""


@contextlib.contextmanager
def held_elsewhere(folder: Path, tag: str = "A"):
    """A real second process holding the writer lock of ``folder``."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), tag], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=ENV, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LOCK_NAME}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """8 test vertebrae (random HU, a bright block on half), an untrained small network as
    ``model/best.pt`` and its dissection of the test split (about 5 s on 2 CPU cores)."""
    import torch

    from vfcore.checkpoint import save_checkpoint
    from vfcore.dissect import dissect_run
    from vfcore.model import build_model

    run = tmp_path_factory.mktemp("locked") / "run"
    store = RunFolder(run).patches
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        case = f"sub-t{i:02d}"
        (store / case).mkdir(parents=True)
        ct = rng.integers(-200, 300, (96, 96, 96)).astype(np.int16)
        ct[30:60, 30:60, 30:60] += 800 * (i % 2)
        np.save(store / case / "L1_ct.npy", ct)
        rows.append({"case": case, "patient": case, "label": 20, "level": "L1", "fracture": i % 2,
                     "grade": 2 * (i % 2), "shape": "", "split": "test",
                     "ct_path": f"{case}/L1_ct.npy", "mask_path": "", "concept_path": "",
                     "source_sha256": "", "out_of_field": 0.0, "reason": ""})
    pd.DataFrame(rows).to_csv(RunFolder(run).manifest, index=False)
    torch.manual_seed(0)
    save_checkpoint(RunFolder(run).checkpoint, build_model("small"))
    dissect_run(run, "test", threshold=0.5, B=20, progress=False)
    return run


def _retrain(run: Path, seed: int) -> None:
    """What a retraining does to the run folder: another ``best.pt``."""
    import torch

    from vfcore.checkpoint import save_checkpoint
    from vfcore.model import build_model

    torch.manual_seed(seed)
    save_checkpoint(RunFolder(run).checkpoint, build_model("small"))


# --------------------------------------------------------------------------------------------
# The lock itself
# --------------------------------------------------------------------------------------------


def test_a_second_process_is_refused_with_the_holder_named(tmp_path):
    with held_elsewhere(tmp_path, "A") as proc:
        info = holder(tmp_path)
        assert info["pid"] == proc.pid and info["command"] == "test holder A"
        with pytest.raises(RunLockedError) as err:
            with writer_lock(tmp_path, "me"):
                pass
        text = str(err.value)
        assert str(proc.pid) in text and "test holder A" in text and "since" in text
        assert err.value.path == str(tmp_path / LOCK_NAME)
    assert holder(tmp_path) is None           # released when the holder ended
    with writer_lock(tmp_path, "me") as mine:
        assert mine["pid"] == os.getpid()


def test_the_lock_goes_with_a_killed_holder(tmp_path):
    with held_elsewhere(tmp_path) as proc:
        proc.send_signal(signal.SIGKILL)      # kill -9: no cleanup code runs
        proc.wait(timeout=30)
    with writer_lock(tmp_path, "after kill -9"):
        assert holder(tmp_path)["command"] == "after kill -9"


def test_reentrant_in_one_process_and_shared_by_its_threads(tmp_path):
    with writer_lock(tmp_path, "outer"):
        with writer_lock(tmp_path, "inner") as info:
            assert info["command"] == "outer"     # the same hold, not a second one
        seen = []
        def other_thread():
            with writer_lock(tmp_path, "t") as info:
                seen.append(info)

        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        assert seen and seen[0]["command"] == "outer"
    assert not (tmp_path / LOCK_NAME).exists()   # removed once the outermost hold ends


def test_a_refused_writer_leaves_no_folder_behind(tmp_path):
    from vfcore.patches import extract_patches

    with pytest.raises(Exception):
        extract_patches(tmp_path / "no-root", tmp_path / "new-run", progress=False)
    assert not (tmp_path / "new-run").exists()


def test_waiting_for_the_holder_when_asked(tmp_path, monkeypatch):
    with held_elsewhere(tmp_path) as proc:
        threading.Timer(0.5, proc.stdin.close).start()   # the holder finishes in 0.5 s
        monkeypatch.setenv("VFCORE_LOCK_WAIT", "30")
        start = time.monotonic()
        with writer_lock(tmp_path, "patient"):
            assert 0.3 < time.monotonic() - start < 25


@pytest.mark.parametrize("value", ["soon", "-1", "inf"])
def test_a_bad_lock_wait_is_a_typed_error(tmp_path, monkeypatch, value):
    monkeypatch.setenv("VFCORE_LOCK_WAIT", value)
    with pytest.raises(InvalidParameterError, match="VFCORE_LOCK_WAIT"):
        with writer_lock(tmp_path, "x"):
            pass
    assert not (tmp_path / LOCK_NAME).exists()


def test_ranks_other_than_0_take_no_lock(tmp_path, monkeypatch):
    from vfcore.lock import writes

    @writes("rank job")
    def job(run_dir):
        return "ran"

    with held_elsewhere(tmp_path):
        monkeypatch.setenv("RANK", "1")
        assert job(tmp_path) == "ran"
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(RunLockedError):
            job(tmp_path)


# --------------------------------------------------------------------------------------------
# Every writing stage takes it (a real second process holds it)
# --------------------------------------------------------------------------------------------


def _stages(run: Path) -> dict:
    from vfcore.dissect import dissect_run
    from vfcore.export import export_units
    from vfcore.patches import extract_patches
    from vfcore.phantom import write_phantom_root
    from vfcore.prerequisites import prepare
    from vfcore.train import fit, train_seed

    return {
        "extract_patches": lambda: extract_patches(run / "data", run, progress=False),
        "fit": lambda: fit(run, "small", epochs=1, progress=False),
        "train_seed": lambda: train_seed(run, "small", 0, epochs=1, progress=False),
        "dissect_run": lambda: dissect_run(run, "test", force=True, progress=False),
        "export_units": lambda: export_units(run, progress=False),
        "prepare": lambda: prepare(run, "training"),     # no manifest: it would build one
        "write_phantom_root": lambda: write_phantom_root(run, n_scans=1, progress=False),
    }


@pytest.mark.parametrize("stage", ["extract_patches", "fit", "train_seed", "dissect_run",
                                   "export_units", "prepare", "write_phantom_root"])
def test_every_writing_stage_stops_while_another_process_writes(small_run, tmp_path, stage):
    run = small_run
    if stage == "prepare":           # a run folder that misses notebook 01's output
        run = tmp_path / "fresh"
        run.mkdir()
    before = files_under(run)
    with held_elsewhere(run, stage) as proc:
        with pytest.raises(RunLockedError) as err:
            _stages(run)[stage]()
        assert str(proc.pid) in str(err.value) and f"test holder {stage}" in str(err.value)
    assert files_under(run) == before     # nothing written, nothing removed


def test_the_command_line_exits_2_naming_the_holder(small_run):
    with held_elsewhere(small_run, "cli") as proc:
        done = subprocess.run([sys.executable, "-m", "vfcore", "dissect", str(small_run),
                               "--split", "test", "--force", "--no-export", "--quiet"],
                              capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 2, done.stderr
    assert f"process {proc.pid}" in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.startswith("vfcore: error:") and LOCK_NAME in done.stderr


# --------------------------------------------------------------------------------------------
# Provenance: a retrained network never meets the old dissection silently
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def stale_run(small_run, tmp_path) -> Path:
    """A copy of the small run whose ``best.pt`` was replaced after the dissection."""
    import shutil

    run = tmp_path / "stale"
    shutil.copytree(small_run, run)
    _retrain(run, seed=1)
    return run


def test_load_artifacts_refuses_a_dissection_of_the_old_checkpoint(stale_run):
    from vfcore.dissect import load_artifacts

    with pytest.raises(StaleArtifactError) as err:
        load_artifacts(stale_run)
    assert err.value.path == str(RunFolder(stale_run).path("dissection_meta"))
    assert "notebooks/03_quantile_thresholding.ipynb" in str(err.value)
    assert "another checkpoint" in str(err.value)


def test_a_rebuilt_manifest_makes_the_dissection_stale(small_run, tmp_path):
    import shutil

    from vfcore.dissect import load_artifacts

    run = tmp_path / "remade"
    shutil.copytree(small_run, run)
    manifest = RunFolder(run).manifest
    manifest.write_text(manifest.read_text().replace("sub-t07,sub-t07", "sub-t07,sub-t07b"))
    with pytest.raises(StaleArtifactError, match="patch manifest"):
        load_artifacts(run)


def test_prepare_sees_the_stale_step_and_rebuilds_it(stale_run):
    from vfcore.prerequisites import missing_steps
    from vfcore.provenance import stale_steps

    assert "ranking" in stale_steps(stale_run)
    assert missing_steps(stale_run, "alignment") == ["ranking"]
    assert missing_steps(stale_run, "training") == []      # training reads only the store


def test_a_reader_in_another_process_is_refused_and_the_command_rebuilds(stale_run):
    code = ("import sys\nfrom vfcore.dissect import load_artifacts\n"
            "from vfcore.errors import StaleArtifactError\n"
            "try:\n    load_artifacts(sys.argv[1])\nexcept StaleArtifactError as e:\n"
            "    print(e)\n    sys.exit(3)\n")
    done = subprocess.run([sys.executable, "-c", code, str(stale_run)], capture_output=True,
                          text=True, env=ENV, timeout=300)
    assert done.returncode == 3 and "stale dissection" in done.stdout
    code, out, err = run_cli("dissect", stale_run, "--split", "test", "--no-export", "--quiet")
    assert code == 0, err
    from vfcore.dissect import load_artifacts
    from vfcore.io import sha256_file

    meta = load_artifacts(stale_run).meta               # rebuilt for the new network
    assert meta["checkpoint_sha256"] == sha256_file(RunFolder(stale_run).checkpoint)


def test_exports_of_an_earlier_dissection_are_stale_for_prepare(small_run, tmp_path):
    import shutil

    from vfcore.provenance import stale_steps

    run = tmp_path / "exports"
    shutil.copytree(small_run, run)
    (RunFolder(run).path("exemplars")).write_text(json.dumps({"dissection_id": "0" * 16}))
    assert "earlier dissection" in stale_steps(run)["ranking"]


def test_a_model_trained_on_another_store_is_stale_for_prepare(tmp_path):
    import torch

    from vfcore.checkpoint import save_checkpoint
    from vfcore.model import build_model
    from vfcore.prerequisites import missing_steps
    from vfcore.provenance import stale_steps

    from store_helpers import write_store

    run = write_store(tmp_path / "run", n=6)
    torch.manual_seed(0)
    save_checkpoint(RunFolder(run).checkpoint, build_model("small"),
                    config={"manifest_sha256": "0" * 64})
    assert "another patch store" in stale_steps(run)["training"]
    assert missing_steps(run, "thresholds") == ["training"]
    from vfcore.io import sha256_file

    save_checkpoint(RunFolder(run).checkpoint, build_model("small"),
                    config={"manifest_sha256": sha256_file(RunFolder(run).manifest)})
    assert stale_steps(run) == {} and missing_steps(run, "thresholds") == []


def test_writing_a_run_folders_phantom_root_waits_for_no_one(small_run, tmp_path):
    """The phantom root of a run (``<run>/data``) is locked with its run folder: while another
    process writes the run, the phantom is not rewritten under it."""
    from vfcore.phantom import write_phantom_root

    with held_elsewhere(small_run, "run") as proc:
        with pytest.raises(RunLockedError, match=str(proc.pid)):
            write_phantom_root(RunFolder(small_run).data, n_scans=1, progress=False)
    assert not RunFolder(small_run).data.exists()


def test_a_forced_dissection_that_fails_keeps_the_old_one(small_run, tmp_path, monkeypatch):
    """--force (or a new identity) removes the old set only once the new pass is done."""
    import shutil

    import vfcore.dissect.artifacts as artifacts
    from vfcore.dissect import dissect_run, load_artifacts

    run = tmp_path / "forced"
    shutil.copytree(small_run, run)
    before = files_under(run)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifacts, "dissect_sharded", interrupted)
    monkeypatch.setattr(artifacts, "dissect", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dissect_run(run, "test", q_tail=0.01, force=True, progress=False)
    assert files_under(run) == before
    assert load_artifacts(run).meta["q_tail"] == 0.005


@pytest.mark.slow
def test_exports_that_fail_halfway_keep_the_old_ones(small_run, tmp_path, monkeypatch):
    import shutil

    import vfcore.export as export
    from vfcore.dissect import load_artifacts

    from vfcore.dissect import dissect_run

    run = tmp_path / "exported"
    shutil.copytree(small_run, run)
    probability = load_artifacts(run).samples["probability"]   # both outcomes at the median
    dissect_run(run, "test", threshold=float(probability.median()), B=20, progress=False)
    export.export_units(run, top=1, top_fp=1, nifti_top=1, progress=False)
    before = files_under(run)
    assert any(k.startswith("dissection/collages/") for k in before)
    real, calls = export._export_unit, []

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(export, "_export_unit", fail_second)
    with pytest.raises(OSError):
        export.export_units(run, top=1, top_fp=1, nifti_top=1, progress=False)
    assert files_under(run) == before
    assert not (RunFolder(run).dissection / ".exports-new").exists()
    assert load_artifacts(run, require_exports=True).units is not None
