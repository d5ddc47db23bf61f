"""bench/lr_probe.py's mechanism on a narrow network and a tiny store: a probe interrupted and
resumed is the straight run bit for bit, a history row every ``every`` steps holding the mean
of those steps' losses, and a folder made with other settings is refused."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from store_helpers import write_store
from vfcore.checkpoint import read_checkpoint
from vfcore.errors import CheckpointError, InvalidParameterError
from vfcore.model import Preset

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "lr_probe.py"
spec = importlib.util.spec_from_file_location("lr_probe", SCRIPT)
lr_probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lr_probe)

#: A narrow network: 32 mm at 4 mm (8^3 input), base width 2, one pool (4^3 grid); dropout on,
#: so torch's global generator is part of the state a resume must restore.
TINY = Preset("probe-test", crop=32, zoom=4, base=2, head=(4, 2), mlp=(4,), dropout=0.2,
              pools=(True, False, False, False), lr=1e-3, augment="light", batch_size=4)
#: 18 training vertebrae (6 fractured): a balanced epoch of 18 draws = 4 batches of 4, so
#: 6 steps cross an epoch boundary, and step 3 is mid-epoch and mid-row.
STEPS, EVERY, BATCH = 6, 2, 4


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_store(tmp_path_factory.mktemp("probe") / "run", n=30)


def run_probe(store: Path, out: Path, steps: int, **kw) -> list[dict]:
    torch.set_num_threads(1)
    return lr_probe.probe(store, out, TINY, steps=steps, batch_size=BATCH, every=EVERY,
                          log=lambda line: None, **kw)


def test_resumed_equals_straight_bit_for_bit(store, tmp_path):
    straight = run_probe(store, tmp_path / "straight", STEPS)
    run_probe(store, tmp_path / "resumed", 3)                     # interrupted after 3 steps
    part = read_checkpoint(tmp_path / "resumed" / "last.pt")
    assert part["step"] == 3 and part["position"] == 3 and len(part["history"]) == 1
    resumed = run_probe(store, tmp_path / "resumed", STEPS)
    assert resumed == straight                                    # every float equal, not close
    a = read_checkpoint(tmp_path / "straight" / "last.pt")
    b = read_checkpoint(tmp_path / "resumed" / "last.pt")
    assert a["losses"] == b["losses"] and a["step"] == b["step"] == STEPS
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:                                       # weights and BN statistics
        assert torch.equal(a["model"][name], b["model"][name]), name
    moments = [(s["exp_avg"], t["exp_avg"]) for s, t in zip(a["optimizer"]["state"].values(),
                                                           b["optimizer"]["state"].values())]
    assert all(torch.equal(s, t) for s, t in moments)
    assert torch.equal(a["rng"]["sampler"], b["rng"]["sampler"])


def test_history_rows_every_every_steps(store, tmp_path):
    history = run_probe(store, tmp_path / "p", STEPS)
    assert [row["step"] for row in history] == [2, 4, 6]
    assert list(history[0]) == list(lr_probe.HISTORY_COLUMNS)
    losses = read_checkpoint(tmp_path / "p" / "last.pt")["losses"]
    assert len(losses) == STEPS
    # the loss column: mean of the row's own steps, by hand
    for row, (a, b) in zip(history, [(0, 1), (2, 3), (4, 5)]):
        assert row["loss"] == pytest.approx((losses[a] + losses[b]) / 2, rel=1e-12)
    # validation figures of 6 vertebrae (2 fractured): an AUC is a share of 2 x 4 pairs
    assert all(8 * row["val_auc"] == pytest.approx(round(8 * row["val_auc"])) for row in history)
    csv = pd.read_csv(tmp_path / "p" / "history.csv")
    assert csv["step"].tolist() == [2, 4, 6]
    np.testing.assert_array_equal(csv["loss"].to_numpy(), [row["loss"] for row in history])


def test_folder_with_other_settings_is_refused(store, tmp_path):
    run_probe(store, tmp_path / "p", 2)
    with pytest.raises(CheckpointError) as err:
        run_probe(store, tmp_path / "p", 4, lr=3e-4)
    assert str(tmp_path / "p" / "last.pt") in str(err.value) and "lr" in str(err.value)
    with pytest.raises(CheckpointError, match="seed"):
        run_probe(store, tmp_path / "p", 4, seed=1)
    with pytest.raises(InvalidParameterError, match="every"):
        lr_probe.probe(store, tmp_path / "q", TINY, steps=4, every=0)
