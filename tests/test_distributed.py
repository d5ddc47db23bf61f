"""vfcore.distributed and TopQuantile's state: against numpy.quantile, one-process passes and
direct counts. The multi-process checks run one real ``torchrun`` job of 2 gloo processes on
the CPU (this file is also that job's script: ``python tests/test_distributed.py <mode> <out>``).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vfcore import dissect as D
from vfcore.errors import FormatError, StateMismatchError
from vfcore.io import atomic_save
from vfcore.model import Preset

torch.set_num_threads(1)
PROJECT = Path(__file__).resolve().parents[1]

#: A network small enough for seconds of CPU: 32^3 input, 32 units on 4^3 in down_tr512, no
#: dropout (so one process and two ranks differ only by the rounding of the sums).
TINY = Preset("tiny", zoom=2, base=2, head=(4, 4, 2, 2), mlp=(8, 4), dropout=0.0,
              batch_size=4, patience=50, max_epochs=2)
N, BATCH, Q = 37, 4, 0.05            # 10 batches: rank 0 gets 5 (20 samples), rank 1 5 (17)
#: Training's learning rate in the DDP test (see the comment there).
LR = 1e-4


# --------------------------------------------------------------------------------------------
# TopQuantile: merge, state, refusal (one process)
# --------------------------------------------------------------------------------------------

def _awkward(rng, n=23, k=6, shape=(3, 4, 2)) -> np.ndarray:
    """Ties (rounded unit, all-zero unit, constant unit, ReLU-like unit) and negative values."""
    a = rng.standard_normal((n, k, *shape)).astype(np.float32)
    a[:, 0] = np.round(a[:, 0] * 2) / 2
    a[:, 1] = 0.0
    a[:, 2] = 1.25
    a[:, 3] = np.maximum(a[:, 3] - 1.0, 0)
    a[:, 4] = np.round(a[:, 4])
    return a


def _pass(a: np.ndarray, q: float, n_samples: int, batch: int = 3) -> D.TopQuantile:
    tq = D.TopQuantile(q, n_samples=n_samples)
    for s in range(0, len(a), batch):
        tq.update(torch.from_numpy(a[s:s + batch]))
    return tq


def _ref_tail(a: np.ndarray, T: np.ndarray) -> set:
    """Every (unit, sample, position, value) with value > T_k, counted directly."""
    flat = a.reshape(a.shape[0], a.shape[1], -1)
    s, k, p = np.nonzero(flat > T[None, :, None])
    return set(zip(k.tolist(), s.tolist(), p.tolist(), flat[s, k, p].tolist()))


def _tail_set(tq: D.TopQuantile) -> set:
    t = tq.tail()
    return set(zip(t["unit"].tolist(), t["sample"].tolist(), t["position"].tolist(),
                   t["value"].tolist()))


def _assert_same(x: D.TopQuantile, y: D.TopQuantile) -> None:
    np.testing.assert_array_equal(x.thresholds(), y.thresholds())
    np.testing.assert_array_equal(x.realised_tail(), y.realised_tail())
    assert _tail_set(x) == _tail_set(y)
    for key in ("min", "max", "zero_fraction"):
        np.testing.assert_array_equal(x.summary()[key], y.summary()[key])
    for key in x.flags():
        np.testing.assert_array_equal(x.flags()[key], y.flags()[key])


@pytest.mark.parametrize("q", [D.Q_TAIL_PAPER, 0.05, 0.3])
def test_merge_of_shards_equals_one_pass_and_numpy(q):
    a = _awkward(np.random.default_rng(3))
    n = len(a)
    ref = np.array([np.quantile(a[:, k].ravel(), 1 - q) for k in range(a.shape[1])], np.float32)
    one = _pass(a, q, n)
    np.testing.assert_array_equal(one.thresholds(), ref)
    assert _tail_set(one) == _ref_tail(a, ref)
    for cuts in ([11], [1], [22], [7, 15], [5, 6, 20]):       # N = 23: never an even split
        edges = [0, *cuts, n]
        shards = [_pass(a[lo:hi], q, n) for lo, hi in zip(edges, edges[1:])]
        merged = shards[0]
        for s in shards[1:]:
            merged = merged.merge(s)
        np.testing.assert_array_equal(merged.thresholds(), ref)
        assert _tail_set(merged) == _ref_tail(a, ref)
        _assert_same(merged, one)
        for key, value in one.tail().items():                   # in the same order: files
            np.testing.assert_array_equal(merged.tail()[key], value, err_msg=key)  # bit for bit
        assert merged.values.shape[1] <= D.quantile.tail_size(n * 24, q)   # still the split's m


def test_merge_into_an_empty_pass():
    a = _awkward(np.random.default_rng(4))
    full = D.TopQuantile(0.1, n_samples=len(a))
    full.update(torch.from_numpy(a))
    left, right = D.TopQuantile(0.1, n_samples=len(a)), D.TopQuantile(0.1, n_samples=len(a))
    left.update(torch.from_numpy(a[:10]))
    right.update(torch.from_numpy(a[10:]))
    merged = D.TopQuantile(0.1, n_samples=len(a)).merge(left).merge(right)
    _assert_same(merged, full)
    assert left.n_samples == 10                                 # merge copies, never aliases


def test_interrupted_pass_resumed_from_disk_equals_an_uninterrupted_one(tmp_path):
    a = _awkward(np.random.default_rng(5), n=29)
    q = 0.05
    straight = _pass(a, q, len(a), batch=4)
    first = _pass(a[:12], q, len(a), batch=4)                   # "killed" after 3 batches
    path = tmp_path / "thresholds.pt"
    context = {"layer": "features", "split": "test"}
    atomic_save(path, lambda tmp: torch.save(first.state_dict(context), tmp), suffix=".pt")
    resumed = D.TopQuantile(q, n_samples=len(a))
    resumed.load_state_dict(torch.load(path, weights_only=True), context=context, units=6)
    for s in range(12, len(a), 4):
        resumed.update(torch.from_numpy(a[s:s + 4]))
    _assert_same(resumed, straight)
    assert not list(tmp_path.glob(".*.part*"))


def test_a_state_of_another_pass_is_refused_with_the_reason():
    a = _awkward(np.random.default_rng(6))
    part = _pass(a[:10], 0.05, len(a))
    state = part.state_dict({"layer": "down_tr512", "split": "test"})
    cases = [(D.TopQuantile(0.01, n_samples=len(a)), {}, None, "q_tail=0.05"),
             (D.TopQuantile(0.05, n_samples=len(a) + 1), {}, None, "n_samples=23"),
             (D.TopQuantile(0.05, n_samples=len(a)), {"layer": "down_tr256"}, None, "layer"),
             (D.TopQuantile(0.05, n_samples=len(a)), {"split": "val"}, None, "split='test'"),
             (D.TopQuantile(0.05, n_samples=len(a)), {}, 512, "6 units")]
    for tq, context, units, reason in cases:
        with pytest.raises(StateMismatchError, match=reason):
            tq.load_state_dict(state, context=context, units=units)
    fed = D.TopQuantile(0.05, n_samples=len(a))
    fed.update(torch.from_numpy(a[:2, :4]))                     # another unit count
    with pytest.raises(StateMismatchError, match="6 units x 24 positions, this pass has 4"):
        fed.load_state_dict(state)
    with pytest.raises(StateMismatchError, match="q_tail"):
        _pass(a[:10], 0.05, len(a)).merge(_pass(a[10:], 0.1, len(a)))
    with pytest.raises(StateMismatchError, match="more than n_samples"):
        _pass(a, 0.05, len(a)).merge(_pass(a[:3], 0.05, len(a)))
    with pytest.raises(FormatError):
        D.TopQuantile(0.05, n_samples=len(a)).load_state_dict({"values": torch.zeros(1)})


# --------------------------------------------------------------------------------------------
# The dissection pass: one process (no torchrun) and its resumption
# --------------------------------------------------------------------------------------------

class _Quantize(torch.nn.Module):
    def forward(self, x):
        return torch.round(x * 4) / 4                          # heavy ties above T_k too


def _case() -> tuple[torch.nn.Module, torch.Tensor]:
    """A conv net whose 'features' layer (6 units on 4^3) has ReLU zeros and rounded values."""
    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.add_module("stem", torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1),
                                               torch.nn.BatchNorm3d(4), torch.nn.ReLU(),
                                               torch.nn.MaxPool3d(2)))
    net.add_module("features", torch.nn.Sequential(torch.nn.Conv3d(4, 6, 3, padding=1),
                                                   torch.nn.ReLU(), _Quantize()))
    net.add_module("head", torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6 * 64, 1)))
    x = torch.rand(N, 1, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    return net, x


FIELDS = ("T", "realised_tail", "unit_min", "unit_max", "zero_fraction", "max", "mean", "r",
          "mask_size", "probability")


def _arrays(d) -> dict:
    out = {k: getattr(d, k) for k in FIELDS}
    out.update({f"flag_{k}": v for k, v in d.flags.items()})
    out.update({f"tail_{k}": v for k, v in d.tail.items()})
    return out


def _assert_same_dissection(x: dict, y: dict) -> None:
    for key in FIELDS + tuple(k for k in x if k.startswith("flag_")):
        np.testing.assert_array_equal(x[key], y[key], err_msg=key)
    tails = [set(zip(*(d[f"tail_{k}"].tolist() for k in ("unit", "sample", "position", "value"))))
             for d in (x, y)]
    assert tails[0] == tails[1]


def test_one_process_pass_equals_dissect_and_resumes(tmp_path):
    from vfcore.dissect.sharded import dissect_sharded

    net, x = _case()
    ref = D.dissect(net, x, "features", q_tail=Q, batch_size=BATCH, device="cpu", progress=False)
    one = dissect_sharded(net, x, "features", q_tail=Q, batch_size=BATCH, device="cpu", progress=False)
    _assert_same_dissection(_arrays(one), _arrays(ref))
    assert ref.tail["value"].size and (ref.mask_size > 0).any()
    assert dissect_sharded(net, x, "features", q_tail=Q, batch_size=BATCH, device="cpu",
                           state=tmp_path, stop_after=3, progress=False) is None   # "killed"
    resumed = dissect_sharded(net, x, "features", q_tail=Q, batch_size=BATCH, device="cpu",
                              state=tmp_path, progress=False)
    _assert_same_dissection(_arrays(resumed), _arrays(ref))
    with pytest.raises(StateMismatchError, match="q_tail"):
        dissect_sharded(net, x, "features", q_tail=0.1, batch_size=BATCH, device="cpu",
                        state=tmp_path, progress=False)


def test_shards_are_whole_batches_in_rank_order():
    from vfcore.dissect.sharded import shard_range

    assert [shard_range(37, 4, r, 2) for r in range(2)] == [(0, 20), (20, 37)]
    assert [shard_range(37, 4, r, 3) for r in range(3)] == [(0, 12), (12, 24), (24, 37)]
    with pytest.raises(Exception, match="fewer than the 3 ranks"):
        shard_range(5, 4, 0, 3)


def test_a_ranks_slice_of_a_batch_gets_one_process_augmentation():
    """A rank draws the whole global batch's augmentation and applies its slice of the draw
    (``AugmentDraw.take``): together the whole batch's augmentation (per sample the same
    transform, up to float rounding), and the generator ends where one process's does (so
    the next epoch's order is the same too)."""
    from vfcore.data import apply_augment, augment_batch, draw_augment, get_augment

    hu = torch.from_numpy(np.random.default_rng(0).integers(-1000, 1500, (6, 96, 96, 96),
                                                            dtype=np.int16))
    aug = get_augment("paper")
    one = torch.Generator().manual_seed(5)
    whole = augment_batch(hu, TINY, one, aug)
    parts, states = [], []
    for lo, hi in ((0, 4), (4, 6)):                            # uneven slices too
        g = torch.Generator().manual_seed(5)
        parts.append(apply_augment(hu[lo:hi], TINY, draw_augment(6, TINY, g, aug).take(lo, hi)))
        states.append(g.get_state())
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=1e-5)
    assert all(torch.equal(s, one.get_state()) for s in states)
    assert not torch.allclose(whole[:2], augment_batch(hu[:2], TINY, torch.Generator().manual_seed(5), aug))


# --------------------------------------------------------------------------------------------
# Two gloo processes under torchrun
# --------------------------------------------------------------------------------------------

def _torchrun(mode: str, out: Path, timeout: float, extra_env: dict | None = None):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(PROJECT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **(extra_env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), __file__, mode, str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=PROJECT, capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - t0


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """One 2-rank job: the sharded pass, a killed-and-resumed sharded pass, 2 epochs of
    ``vfcore.train.train_seed`` (DDP)."""
    from store_helpers import write_store

    out = tmp_path_factory.mktemp("job")
    write_store(out / "run", n=30)
    # fp32 on every CPU: the comparison with one process below is within float32 rounding
    # (bf16 autocast rounds to 3 significant digits and 2 epochs amplify it past any tolerance)
    proc, _ = _torchrun("job", out, timeout=600, extra_env={"VFCORE_CPU_BF16": "0"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_sharded_pass_is_bit_identical_to_one_process(job):
    net, x = _case()
    ref = _arrays(D.dissect(net, x, "features", q_tail=Q, batch_size=BATCH, device="cpu",
                            progress=False))
    for name in ("dissect", "resumed"):
        for rank in (0, 1):
            got = dict(np.load(job / f"{name}_rank{rank}.npz"))
            _assert_same_dissection(got, ref)


def test_ddp_training_same_weights_on_both_ranks_history_close_to_one_process(job, tmp_path, monkeypatch):
    monkeypatch.setenv("VFCORE_CPU_BF16", "0")                 # as the job: fp32
    from store_helpers import write_store

    from vfcore.model import FractureNet
    from vfcore.train import train_seed

    w0 = torch.load(job / "weights_rank0.pt", weights_only=True)
    w1 = torch.load(job / "weights_rank1.pt", weights_only=True)
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    torch.manual_seed(0)                                        # train_seed's initial weights
    init = FractureNet(TINY)
    frozen = [k for k, v in init.named_parameters() if torch.equal(w0[k], v.detach())]
    assert not frozen, f"never updated under torchrun: {frozen}"  # batch norm after the optimiser
    last = torch.load(job / "run" / "model" / "seed0" / "last.pt", weights_only=True)
    for k in w0:
        assert torch.equal(last["model"][k], w0[k]), k            # rank 0 wrote what it holds
    one = write_store(tmp_path / "one", n=30)
    folder = train_seed(one, TINY, 0, epochs=2, batch_size=4, augment=None, lr=LR, device="cpu",
                        progress=False)
    model = FractureNet(TINY)
    model.load_state_dict(torch.load(folder / "last.pt", weights_only=True)["model"])
    h1 = last["history"]
    h0 = torch.load(folder / "last.pt", weights_only=True)["history"]
    assert [r["epoch"] for r in h1] == [r["epoch"] for r in h0] == [0, 1]
    # Same init, same global batches, same batch-norm statistics: the runs differ only by the
    # rounding of sums (gradient all-reduce, synchronised batch norm: about 3e-5 relative in
    # float32). Adam's first steps move a weight by about lr whatever its gradient's size, so a
    # gradient within rounding of 0 moves its weight either way: on this tiny net, perturbing
    # the initial weights by 3e-5 (one process) moves epoch 2's loss by 5e-4 at lr 1e-4 (by 3 %
    # at lr 1e-3), hence LR and the tolerances. Wrong shares of the epoch would change the
    # epoch's samples and its loss by far more.
    steps = 2 * (18 // 4)                                       # 18 training draws, batches of 4
    for a, b in zip(h0, h1):
        assert b["loss"] == pytest.approx(a["loss"], rel=3e-3)
    # The validation figures: the untrained net gives the 6 val vertebrae probabilities
    # within 1e-5 of each other, so F1/AUC/AP are decided by rounding (AUC 0.625 vs 0.0 was
    # seen) and cannot be compared; compare the probabilities themselves, and check that the
    # job's history holds rank 0's validation of the weights it ended with.
    from vfcore.data import load_split
    from vfcore.metrics import classification_metrics
    from vfcore.train import predict

    val_x, val_y, _ = load_split(one, "val")
    ranked = FractureNet(TINY)
    ranked.load_state_dict(w0)
    p2, p1 = predict(ranked, val_x, TINY, device="cpu"), predict(model, val_x, TINY, device="cpu")
    assert np.abs(p2 - p1).max() <= 1e-4, (p2, p1)
    val = classification_metrics(val_y, p2)
    assert {k: h1[-1][f"val_{k}"] for k in val} == pytest.approx(val, nan_ok=True)
    diff = {k: float((w0[k].double() - v.detach().double()).abs().max())
            for k, v in model.named_parameters()}
    assert 0 < max(diff.values()) <= 2 * steps * LR, max(diff.items(), key=lambda kv: kv[1])
    for k, v in model.named_buffers():                          # batch norm's running statistics
        if v.is_floating_point():                               # (from the synchronised batches)
            torch.testing.assert_close(w0[k], v, rtol=0, atol=1e-2)
        else:
            assert torch.equal(w0[k], v), k                     # num_batches_tracked
    assert (job / "run" / "model" / "seed0" / "best.pt").is_file()


@pytest.mark.parametrize("mode", ["dead", "stuck"])
def test_a_rank_that_dies_or_hangs_ends_the_job_with_a_message_from_rank_0(tmp_path, mode):
    """Rank 1 exits before the first collective ("dead": the peer's socket closes) or sleeps
    ("stuck": only the collective timeout ends the wait); rank 0 names the collective."""
    proc, seconds = _torchrun(mode, tmp_path, timeout=120, extra_env={"VFCORE_DIST_TIMEOUT": "8"})
    assert proc.returncode != 0
    assert "vfcore: error: rank 0 of 2: all-gathering the threshold buffers failed" in proc.stderr, \
        proc.stderr[-3000:]
    assert "Another rank probably died" in proc.stderr
    assert seconds < 8 + 40, seconds                             # timeout + two start-ups


# --------------------------------------------------------------------------------------------
# The job (run by torchrun, not by pytest)
# --------------------------------------------------------------------------------------------

def _job(mode: str, out: Path) -> int:
    from vfcore import distributed as dd
    from vfcore import train
    from vfcore.dissect.sharded import dissect_sharded
    from vfcore.errors import VfcoreError

    w = dd.init()
    try:
        net, x = _case()
        if mode == "dead" and w.rank == 1:
            os._exit(0)                                          # gone without a word
        if mode == "stuck" and w.rank == 1:
            time.sleep(3600)                                     # alive but never answers
        kw = dict(q_tail=Q, batch_size=BATCH, device="cpu", progress=False)
        d = dissect_sharded(net, x, "features", **kw)
        np.savez(out / f"dissect_rank{w.rank}.npz", **_arrays(d))
        state = out / "state"
        assert dissect_sharded(net, x, "features", state=state, stop_after=2, **kw) is None
        d = dissect_sharded(net, x, "features", state=state, **kw)
        np.savez(out / f"resumed_rank{w.rank}.npz", **_arrays(d))
        held = {}

        def keep(model, device):                                 # this rank's network itself
            held["model"] = model
            return dd.wrap_model(model, device)

        train.wrap_model = keep
        train.train_seed(out / "run", TINY, 0, epochs=2, batch_size=4, augment=None, lr=LR,
                         device="cpu", progress=False)
        torch.save(held["model"].state_dict(), out / f"weights_rank{w.rank}.pt")
    except VfcoreError as err:
        print(f"vfcore: error: {err}", file=sys.stderr, flush=True)
        os._exit(2)                                              # a dead peer: no clean shutdown
    dd.shutdown()
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(_job(sys.argv[1], Path(sys.argv[2])))
