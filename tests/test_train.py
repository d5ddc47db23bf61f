"""Metrics against hand-computed cases; checkpoints that are weights-only; resume = same history."""
from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from store_helpers import write_store
from vfcore import checkpoint, metrics, runtime, train
from vfcore.errors import CheckpointError
from vfcore.model import build_model


def test_metrics_by_hand():
    y = [1, 1, 0, 0, 0]
    p = [0.9, 0.4, 0.6, 0.2, 0.1]
    m = metrics.classification_metrics(y, p)
    # at 0.5: TP = 1, FP = 1, FN = 1, TN = 2
    assert m["f1"] == pytest.approx(2 / 4) and m["accuracy"] == pytest.approx(3 / 5)
    # pairs (pos, neg): 0.9 beats all 3; 0.4 beats 0.2 and 0.1 -> 5 of 6
    assert m["auc"] == pytest.approx(5 / 6)
    # ranking 0.9(+) 0.6(-) 0.4(+): AP = 0.5 * 1 + 0.5 * 2/3
    assert m["ap"] == pytest.approx(0.5 + 1 / 3)


def test_metrics_with_ties():
    assert metrics.auc_score([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    # one group of equal scores holding everything: precision 1/2 at recall 1
    assert metrics.average_precision([1, 0], [0.3, 0.3]) == pytest.approx(0.5)
    assert np.isnan(metrics.auc_score([0, 0], [0.1, 0.2]))


def test_table1_layout():
    per_seed = {"0": {"f1": 0.8, "accuracy": 0.9, "auc": 0.95, "ap": 0.9},
                "1": {"f1": 0.6, "accuracy": 0.7, "auc": 0.85, "ap": 0.8}}
    row = metrics.table1(per_seed).iloc[0]
    assert row["F1 (%)"] == "70.0 ± 14.1" and row["AUC (%)"] == "90.0 ± 7.1"


def test_table1_one_seed_gives_a_bootstrap_interval_not_zero_std():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.3, 0.6, 0.2, 0.1, 0.1, 0.2, 0.3, 0.4])
    per_seed = {"0": metrics.classification_metrics(y, p)}
    row = metrics.table1(per_seed, labels=y, probability=p).iloc[0]
    assert "±" not in row["F1 (%)"] and row["n (fractured)"] == "10 (3)"
    # an independent bootstrap: numpy resampling stratified by class (the fractured, then the
    # healthy vertebrae, drawn as scipy.stats.bootstrap draws them), hand-written accuracy
    rng = np.random.default_rng(0)
    pos, neg = p[y == 1], p[y == 0]
    draws = rng.integers(0, len(pos), (1000, len(pos))), rng.integers(0, len(neg), (1000, len(neg)))
    acc = [(np.sum(pos[a] >= 0.5) + np.sum(neg[b] < 0.5)) / len(p) for a, b in zip(*draws)]
    lo, hi = np.quantile(acc, [0.025, 0.975])
    assert row["Acc. (%)"] == f"80.0 ({100 * lo:.1f}-{100 * hi:.1f})"
    assert list(metrics.PAPER_TABLE1["AUC (%)"]) == ["84.5 ± 9.1", "96.2 ± 0.9", "94.7 ± 0.5"]


def test_bootstrap_intervals_are_scipys_stratified_percentile_bootstrap():
    """Issue 20: scipy.stats.bootstrap (percentile, seeded) over the two classes; the interval
    holds the estimate, narrows with more vertebrae, and equals scipy called directly."""
    from scipy.stats import bootstrap

    rng = np.random.default_rng(3)
    y = np.r_[np.ones(12, int), np.zeros(28, int)]
    p = np.clip(0.35 * y + rng.random(40) * 0.65, 0, 1)
    ci = metrics.bootstrap_intervals(y, p, n_boot=400, seed=7)
    point = metrics.classification_metrics(y, p)
    for m in metrics.METRICS:
        assert ci[m][0] <= point[m] <= ci[m][1], m

    def accuracy(pos, neg, axis=-1):
        return ((pos >= 0.5).sum(axis=axis) + (neg < 0.5).sum(axis=axis)) / (pos.shape[axis] + neg.shape[axis])

    direct = bootstrap((p[y == 1], p[y == 0]), accuracy, n_resamples=400, method="percentile",
                       random_state=np.random.default_rng(7)).confidence_interval
    assert ci["accuracy"] == (direct.low, direct.high)
    wide = metrics.bootstrap_intervals(y, p, n_boot=400, seed=7)
    narrow = metrics.bootstrap_intervals(np.tile(y, 9), np.tile(p, 9), n_boot=400, seed=7)
    for m in metrics.METRICS:
        assert narrow[m][1] - narrow[m][0] < wide[m][1] - wide[m][0], m
    # a class of one vertebra stays as it is; a missing class leaves AUC undefined
    one = metrics.bootstrap_intervals([1, 0, 0, 0], [0.9, 0.2, 0.6, 0.1], n_boot=50)
    assert one["auc"] == (1.0, 1.0)
    assert np.isnan(metrics.bootstrap_intervals([0, 0, 0], [0.1, 0.7, 0.3], n_boot=50)["auc"]).all()


def test_checkpoint_is_weights_only_and_checked(tmp_path):
    model = build_model("small")
    path = checkpoint.save_checkpoint(tmp_path / "m.pt", model, epoch=3)
    state = torch.load(path, weights_only=True)                 # plain tensors and values only
    assert state["epoch"] == 3 and state["preset"]["name"] == "small"
    loaded, meta = checkpoint.load_checkpoint(path)
    assert not loaded.training and meta["epoch"] == 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    with pytest.raises(CheckpointError, match="holds the 'small' network"):
        checkpoint.load_checkpoint(path, preset="paper")
    # a paper-preset dict claiming to be small: the weights do not fit
    bad = torch.load(path, weights_only=True)
    bad["model"] = build_model("paper").state_dict()
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        checkpoint.load_checkpoint(tmp_path / "bad.pt")


def test_pickled_objects_and_truncated_files_are_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "payload": pd.DataFrame({"a": [1]})}, evil)  # needs unpickling
    with pytest.raises(CheckpointError, match="weights-only"):
        checkpoint.load_checkpoint(evil)
    good = checkpoint.save_checkpoint(tmp_path / "m.pt", build_model("small"))
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="cut.pt"):
        checkpoint.load_checkpoint(tmp_path / "cut.pt")
    assert pickle  # noqa: the module is there for readers: torch.save pickles, weights_only refuses


def assert_same_training(run_a, run_b, seed: int = 0) -> None:
    """Two runs of one seed wrote the same history (but for the speed) and the same weights."""
    folder_a, folder_b = run_a / "model" / f"seed{seed}", run_b / "model" / f"seed{seed}"
    a = pd.read_csv(folder_a / "history.csv").drop(columns="samples_per_s")
    b = pd.read_csv(folder_b / "history.csv").drop(columns="samples_per_s")
    pd.testing.assert_frame_equal(a, b)
    wa = torch.load(folder_a / "last.pt", weights_only=True)["model"]
    wb = torch.load(folder_b / "last.pt", weights_only=True)["model"]
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture
def store(tmp_path):
    torch.set_num_threads(1)
    return write_store(tmp_path / "run", n=30)


def test_resume_continues_the_same_history(store, tmp_path):
    kwargs = dict(preset="small", seed=0, batch_size=4, patience=50, progress=False)
    straight = tmp_path / "straight"
    write_store(straight, n=30)
    train.train_seed(straight, epochs=3, **kwargs)
    train.train_seed(store, epochs=2, **kwargs)                  # "killed" after two epochs
    train.train_seed(store, epochs=3, **kwargs)                  # resumed from last.pt
    assert_same_training(straight, store)


def test_one_process_train_seed_is_the_hand_written_loop(store):
    """Without torchrun, train_seed is the plain loop (the paper's Sec. 3 written out here):
    one generator seeded by the seed draws each balanced epoch and then, batch by batch, its
    augmentation; dropout draws from the global seed set before the network is built; each
    batch is the sorted next ``batch_size`` draws of the order. Same losses, same validation
    figures and the same weights, bit for bit (the rank-share, broadcast and all-reduce steps
    of a torchrun job are no-ops in a world of one)."""
    from vfcore.data import augment_batch, balanced_epoch, get_augment, load_split
    from vfcore.runtime import precision
    from vfcore.model import FractureNet, Preset

    tiny = Preset("tiny", zoom=2, base=2, head=(4, 4, 2, 2), mlp=(8, 4), dropout=0.3,
                  batch_size=4, patience=50, max_epochs=2)
    folder = train.train_seed(store, tiny, 3, epochs=2, lr=1e-3, augment="light", device="cpu",
                              progress=False)
    history = torch.load(folder / "last.pt", weights_only=True)["history"]

    train_x, train_y, _ = load_split(store, "train")
    val_x, val_y, _ = load_split(store, "val")
    aug = get_augment("light")
    policy = precision(torch.device("cpu"))          # this CPU's: bf16 where native, channels-last
    torch.manual_seed(3)
    model = FractureNet(tiny).to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(3)
    for epoch in range(2):
        model.train()
        order = balanced_epoch(train_y, generator)
        losses = []
        for b in range(len(order) // 4):
            ids = np.sort(order[b * 4:(b + 1) * 4])
            x = augment_batch(torch.as_tensor(train_x[ids]), tiny, generator, aug)
            x = x.contiguous(memory_format=torch.channels_last_3d)
            y = torch.tensor(train_y[ids], dtype=torch.float32)
            losses.append(train.train_step(model, optimizer, x, y, dtype=policy.dtype))
        val = metrics.classification_metrics(val_y, train.predict(model, val_x, tiny, device="cpu"))
        assert history[epoch]["loss"] == np.mean(losses), epoch
        assert {k: history[epoch][f"val_{k}"] for k in val} == pytest.approx(val, nan_ok=True, abs=0)
    weights = torch.load(folder / "last.pt", weights_only=True)["model"]
    for k, v in model.state_dict().items():
        assert torch.equal(weights[k], v), k


def test_fit_writes_metrics_and_best_checkpoint(store):
    metrics = train.fit(store, "small", seeds=[0, 1], epochs=2, batch_size=4, progress=False)
    assert (store / "model" / "best.pt").is_file()
    assert set(metrics["per_seed"]) == {"0", "1"} and metrics["best_seed"] in (0, 1)
    assert metrics["n_test"] == 6 and metrics["n_test_fractured"] == 2
    assert metrics["test"] == metrics["per_seed"][str(metrics["best_seed"])]
    with pytest.raises(CheckpointError, match="was trained with"):
        train.train_seed(store, "small", 0, epochs=3, batch_size=8, progress=False)


def test_a_rebuilt_patch_store_is_not_resumed(store):
    """A model trained on an older patch store (other scans, other split) is detected."""
    train.train_seed(store, "small", 0, epochs=1, batch_size=4, progress=False)
    write_store(store, n=33, seed=1)                             # notebook 01 run again, other data
    with pytest.raises(CheckpointError, match="manifest_sha256"):
        train.train_seed(store, "small", 0, epochs=2, batch_size=4, progress=False)


def test_the_augmentation_is_part_of_the_config(store):
    """A run trained with one augmentation is not silently continued with another."""
    train.train_seed(store, "small", 0, epochs=1, batch_size=4, augment="light", progress=False)
    state = torch.load(store / "model" / "seed0" / "last.pt", weights_only=True)
    assert state["config"]["augment"]["rotate"] == 5.0 and state["config"]["augment"]["elastic"] == 0.5
    with pytest.raises(CheckpointError, match="was trained with"):
        train.train_seed(store, "small", 0, epochs=2, batch_size=4, augment="paper", progress=False)
    train.train_seed(store, "small", 0, epochs=2, batch_size=4, augment="light", progress=False)
    assert len(pd.read_csv(store / "model" / "seed0" / "history.csv")) == 2


def test_a_preloaded_split_trains_the_same(store, tmp_path):
    """preload=True (the GPU path: the splits as one tensor on the device, indexed per batch)
    gives the same history and weights as reading memory-mapped batches."""
    kwargs = dict(preset="small", seed=0, epochs=2, batch_size=4, augment="light", progress=False)
    other = write_store(tmp_path / "other", n=30)
    train.train_seed(store, preload=False, **kwargs)
    train.train_seed(other, preload=True, **kwargs)
    assert_same_training(store, other)


def test_preload_decision():
    patches = np.zeros((3, 96, 96, 96), np.int16)
    patches[1, 0, 0, 0] = 7
    assert train.preload_split(patches, torch.device("cpu")) is patches    # CPU: not by default
    t = train.preload_split(patches, torch.device("cpu"), preload=True)
    assert t.dtype == torch.int16 and t.shape == (3, 96, 96, 96) and int(t[1, 0, 0, 0]) == 7


def test_outcome_names_by_hand():
    labels = [1, 1, 0, 0, 1]
    probability = [0.9, 0.2, 0.7, 0.1, 0.5]          # 0.5 counts as "fractured"
    assert list(metrics.outcome_names(labels, probability)) == ["TP", "FN", "FP", "TN", "TP"]
    assert list(metrics.outcome_names(labels, probability, threshold=0.8)) == ["TP", "FN", "TN", "TN", "FN"]


def test_training_curves_mark_the_epoch_of_best_pt(store):
    from vfcore.viz import training as vt

    folder = train.train_seed(store, "small", 0, epochs=4, batch_size=4, augment=None, progress=False)
    _, meta = checkpoint.load_checkpoint(folder / "best.pt")
    ax = vt.training_curves(pd.read_csv(folder / "history.csv"))
    marks = [line.get_xdata()[0] for line in ax.figure.axes[1].lines if line.get_linestyle() == ":"]
    assert marks == [meta["epoch"] + 1]   # the figure counts epochs from 1
    # ties in F1 are broken by AUC, as training does
    h = pd.DataFrame({"epoch": [0, 1, 2], "loss": [1.0] * 3, "val_f1": [0.8, 0.8, 0.1], "val_auc": [0.6, 0.9, 1.0]})
    ax = vt.training_curves(h)
    assert [line.get_xdata()[0] for line in ax.figure.axes[1].lines if line.get_linestyle() == ":"] == [2]


# --------------------------------------------------------------------------------------------
# vfcore.checkpoint: every bad file is a CheckpointError naming it (issue 13, item 4)
# --------------------------------------------------------------------------------------------

class _Marker:
    """Unpickling this object would create a file (what a malicious checkpoint could do)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _good_state() -> dict:
    model = build_model("small")
    return {"format": checkpoint.FORMAT, "preset": model.preset.to_dict(),
            "model": model.state_dict()}


def _bad_file(kind: str, tmp_path):
    path = tmp_path / f"{kind}.pt"
    marker = tmp_path / "marker"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        good = checkpoint.save_checkpoint(tmp_path / "good.pt", build_model("small"))
        path.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
    elif kind == "not_zip":
        path.write_bytes(b"\x80\x04 this is not a torch checkpoint" * 10)
    elif kind == "pickle_reduce":                       # a plain pickle (not a zip archive)
        path.write_bytes(pickle.dumps({"format": checkpoint.FORMAT, "x": _Marker(marker)}))
    elif kind == "torch_reduce":                        # a torch zip archive holding the object
        torch.save({**_good_state(), "x": _Marker(marker)}, path)
    elif kind == "no_preset":
        state = _good_state()
        del state["preset"]
        torch.save(state, path)
    elif kind == "no_model":
        state = _good_state()
        del state["model"]
        torch.save(state, path)
    elif kind == "wrong_architecture":
        state = _good_state()
        state["model"] = build_model("paper").state_dict()
        torch.save(state, path)
    elif kind == "unknown_preset_fields":
        state = _good_state()
        state["preset"] = {**state["preset"], "wings": 2}
        torch.save(state, path)
    return path, marker


BAD = {"empty": "0 bytes", "truncated": "not a torch zip archive", "not_zip": "not a torch zip archive",
       "pickle_reduce": "not a torch zip archive", "torch_reduce": "could run code",
       "no_preset": "no 'preset'", "no_model": "no 'model'", "wrong_architecture": "do not fit",
       "unknown_preset_fields": "not a vfcore architecture"}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_checkpoints_are_refused_with_the_file_and_the_reason(kind, tmp_path):
    path, marker = _bad_file(kind, tmp_path)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load_checkpoint(path)
    message = str(err.value)
    assert str(path) in message and BAD[kind] in message
    assert "weights_only=False" not in message and "Weights only load failed" not in message
    assert not marker.exists()                          # nothing was unpickled


def test_refusal_says_what_and_why():
    path = "x.pt"
    message = str(checkpoint._refused(path))
    assert "refused" in message and "pickled Python objects" in message and "could run code" in message
    assert "weights-only" in message and "weights_only=False" not in message


# --------------------------------------------------------------------------------------------
# vfcore.forward: the one forward engine against a plain model(x)
# --------------------------------------------------------------------------------------------

def _plain(model, x, layer):
    """Reference: eval mode, no_grad, one call, a hand-registered hook."""
    out = []
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: out.append(o.clone()))
    model.eval()
    with torch.no_grad():
        p = torch.sigmoid(model(x).float().reshape(len(x)))
    handle.remove()
    return p.numpy(), out[0].numpy()


@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_forward_engine_equals_a_plain_model_call(batch_size):
    from vfcore import forward as fw
    from vfcore.data import to_network_input

    torch.manual_seed(0)
    model = build_model("small")
    model.train()                                       # the engine must switch to eval and back
    hu = torch.randint(-1000, 1500, (7, 96, 96, 96), dtype=torch.int16)
    layer = model.preset.dissect_layer
    p_ref, A_ref = _plain(model, to_network_input(hu, "small"), layer)
    model.train()
    p, acts = fw.forward(model, hu.numpy(), [layer], batch_size=batch_size, device="cpu",
                         transform=lambda x: to_network_input(x, "small"), amp=False)
    assert model.training                               # previous mode restored
    np.testing.assert_allclose(p, p_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(acts[layer], A_ref, rtol=1e-4, atol=1e-5)
    # train.predict is the same engine, under the device's precision policy (bf16 where the
    # CPU has it natively: its activations carry about 3 significant digits)
    policy = runtime.precision(torch.device("cpu"))
    tol = dict(rtol=1e-5, atol=1e-6) if policy.dtype is None else dict(rtol=0, atol=5e-3)
    got = train.predict(model, hu, "small", batch_size=batch_size, device="cpu")
    np.testing.assert_allclose(got, p_ref, **tol)
    assert len(np.unique(got)) == len(np.unique(p_ref))  # the logit in fp32: no ties made by rounding


def test_precision_policy_on_cpu(monkeypatch):
    """fp32 on a CPU without native bf16; the whole policy: tests/test_gpu_path.py."""
    from vfcore import forward as fw

    monkeypatch.setenv("VFCORE_CPU_BF16", "0")
    policy = runtime.precision(torch.device("cpu"))
    assert (policy.dtype, policy.scaler) == (None, False)
    assert isinstance(fw.autocast(torch.device("cpu")), type(__import__("contextlib").nullcontext()))


def test_one_hand_written_step_equals_the_package_step():
    """Notebook 02 writes the training step out by hand; it must be the step train_seed runs."""
    import torch.nn.functional as F

    from vfcore.train import train_step
    torch.manual_seed(0)
    x = torch.rand(4, 1, 32, 32, 32)
    y = torch.tensor([1.0, 0.0, 1.0, 0.0])
    nets = []
    for _ in range(2):
        torch.manual_seed(1)
        nets.append(build_model("small"))
    mine, theirs = nets
    opt_a = torch.optim.Adam(mine.parameters(), lr=3e-4)
    opt_b = torch.optim.Adam(theirs.parameters(), lr=3e-4)
    mine.train(), theirs.train()
    torch.manual_seed(2)                                 # dropout draws
    logits = mine(x).float()
    loss = F.binary_cross_entropy_with_logits(logits, y)
    opt_a.zero_grad()
    loss.backward()
    opt_a.step()
    torch.manual_seed(2)
    loss_b = train_step(theirs, opt_b, x, y)
    assert loss_b == pytest.approx(float(loss.detach()), rel=1e-6)
    for (name, a), b in zip(mine.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), name
    before = build_model("small").state_dict()
    assert any(not torch.equal(before[k], v) for k, v in theirs.state_dict().items())
