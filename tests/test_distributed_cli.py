"""``torchrun --nproc_per_node 2 -m vfcore train|dissect`` (gloo, CPU) against the same
commands in one process: the dissection's files bit for bit, training with one writer, a
history close to one process's, resumed across world sizes, and errors that name the rank."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from store_helpers import run_cli, write_store

PROJECT = Path(__file__).resolve().parents[1]
#: The small preset, without augmentation, on the 30-patch store: 18 draws, batches of 4.
TRAIN = ("--preset", "small", "--batch-size", "4", "--augment", "none", "--device", "cpu",
         "--quiet")
DISSECT = ("--split", "test+val", "--batch-size", "2", "--device", "cpu", "--no-export",
           "--quiet", "--force")


def torchrun(*argv, timeout: float = 300, env: dict | None = None):
    """``torchrun --nproc_per_node 2 -m vfcore <argv>`` on this machine (gloo, 1 thread each)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}),
               PYTHONPATH=str(PROJECT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "vfcore",
           *map(str, argv)]
    return subprocess.run(cmd, env=env, cwd=PROJECT, capture_output=True, text=True,
                          timeout=timeout)


def _history(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "model" / "seed0" / "history.csv").drop(columns="samples_per_s")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``one``: 2 epochs in one process; ``two``: 1 epoch in one process, then resumed to 2
    epochs under torchrun with 2 ranks (proc: that job)."""
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("cli")
    one, two = write_store(base / "one", n=30), write_store(base / "two", n=30)
    assert run_cli("train", one, "--epochs", "2", *TRAIN)[0] == 0
    assert run_cli("train", two, "--epochs", "1", *TRAIN)[0] == 0
    first = _history(two)
    proc = torchrun("train", two, "--epochs", "2", *TRAIN)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"one": one, "two": two, "proc": proc, "first": first}


def test_torchrun_train_resumes_a_one_process_run_with_one_writer(runs):
    two, proc = runs["two"], runs["proc"]
    assert proc.stdout.count("best seed 0 of [0]") == 1            # rank 0 alone reports
    model = two / "model"
    assert sorted(p.name for p in model.rglob("*")) == sorted(
        ["best.pt", "metrics.json", "seed0", "best.pt", "last.pt", "history.csv"])  # no .part
    last = torch.load(model / "seed0" / "last.pt", weights_only=True)
    assert [r["epoch"] for r in last["history"]] == [0, 1]
    h1, h2 = _history(runs["one"]), _history(two)
    # epoch 1 is the one-process run's, unchanged by the 2-rank job that resumed it
    pd.testing.assert_frame_equal(h2.iloc[:1], runs["first"])
    pd.testing.assert_frame_equal(h2.iloc[:1], h1.iloc[:1])
    # epoch 2 ran on 2 ranks: the same draws and global batches as one process; it differs by
    # the ranks' own dropout streams (the small preset's dropout 0.1) and by float rounding.
    # Dropout alone moves this loss a lot: one process resumed with 5 other dropout seeds gave
    # 0.55-0.70 (0.551 with this one). tests/test_distributed.py pins the rounding-only case
    # (no dropout) tightly; here a loose bound, and the validation figures exist.
    assert h2["loss"][1] == pytest.approx(h1["loss"][1], rel=0.3)
    assert h2.notna().all().all() and len(h2) == 2


def test_torchrun_dissect_writes_the_one_process_files_bit_for_bit(runs, tmp_path):
    from vfcore.dissect import load_dissection_set
    from vfcore.run import RunFolder
    from vfcore.train import load_checkpoint, predict

    run = runs["one"]
    # two epochs call nothing fractured at 0.5: dissect at the median probability of the set,
    # so that both rankings (true and false positives) exist
    model, _ = load_checkpoint(RunFolder(run).checkpoint)
    patches, _, _ = load_dissection_set(run, "test+val")
    threshold = float(np.median(predict(model, patches, model.preset, device="cpu")))
    dissect = (*DISSECT, "--threshold", repr(threshold))
    code, out, err = run_cli("dissect", run, *dissect)
    assert code == 0, err
    ref = tmp_path / "ref"
    shutil.copytree(run / "dissection", ref)
    proc = torchrun("dissect", run, *dissect)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("dissected layer") == 1
    got = run / "dissection"
    for name in ("thresholds.npz", "stats.npz", "tail.npz"):
        a, b = np.load(ref / name), np.load(got / name)
        assert sorted(a.files) == sorted(b.files), name
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}:{key}")
    assert np.load(ref / "thresholds.npz")["T"].size == 128              # small: 128 units
    csvs = sorted(p.name for p in ref.glob("*.csv"))
    assert "samples.csv" in csvs and "ranking_tp.csv" in csvs and "ranking_fp.csv" in csvs and sorted(p.name for p in got.glob("*.csv")) == csvs
    for name in csvs:                                                  # rankings, samples
        assert (ref / name).read_bytes() == (got / name).read_bytes(), name
    import json
    meta = json.loads((got / "meta.json").read_text())
    assert meta["processes"] == 2 and meta["n_samples"] == 12


def test_an_error_names_its_rank_and_the_job_fails(tmp_path):
    """Both ranks find no checkpoint: each says so, naming itself; the exit status is not 0."""
    run = write_store(tmp_path / "run", n=30)
    proc = torchrun("dissect", run, "--device", "cpu", timeout=120,
                    env={"VFCORE_DIST_TIMEOUT": "20"})
    assert proc.returncode != 0
    assert "vfcore: error: rank 0 of 2: " in proc.stderr, proc.stderr[-3000:]
    assert "notebook" in proc.stderr.split("vfcore: error: rank 0 of 2: ")[1].splitlines()[0]
