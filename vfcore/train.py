"""Training the fracture classifier, metrics, and checkpoints that are safe to share.

The paper (Sec. 3): Adam, learning rate 1e-3, no weight decay, balanced epochs, early stopping
when the validation F1 has not improved for 50 epochs, dropout 0.3; metrics F1, accuracy, AUC
and AP at the vertebra level, mean +- std over several training runs (Table 1).

Checkpoints hold tensors and plain Python values only, so ``torch.load(weights_only=True)``
reads them and never unpickles arbitrary objects. ``last.pt`` carries everything a killed run
needs to continue the same history (optimizer, epoch, history, random states); ``best.pt`` the
weights of the best validation F1. Both are written atomically.

Artifacts in ``<run>/model/``: ``seed<k>/{best.pt,last.pt,history.csv}`` per seed,
``best.pt`` (the checkpoint of the seed with the best validation F1: what dissection reads),
``metrics.json`` (test metrics per seed, mean and std, and ``test`` of ``best.pt``).
"""
from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .data import Augment, augment_batch, balanced_epoch, get_augment, load_split, to_network_input
from .errors import CheckpointError
from .io import atomic_save, sha256_file, versions, write_json
from .model import PATCH_SIZE, FractureNet, Preset, get_preset
from .runtime import pick_device

FORMAT = "vfcore-checkpoint-1"
METRICS = ("f1", "accuracy", "auc", "ap")


# --------------------------------------------------------------------------------------------
# Metrics (vertebra level)
# --------------------------------------------------------------------------------------------

def auc_score(labels, scores) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count 1/2."""
    y, s = np.asarray(labels).astype(bool), np.asarray(scores, dtype=float)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    ranks = pd.Series(s).rank().to_numpy()          # average ranks handle ties
    return float((ranks[y].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def average_precision(labels, scores) -> float:
    """AP = sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds (as scikit-learn)."""
    y, s = np.asarray(labels).astype(bool), np.asarray(scores, dtype=float)
    if y.sum() == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]   # end of each group of equal scores
    tp = np.cumsum(y)[last]
    precision, recall = tp / (last + 1), tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def outcome_names(labels, probability, threshold: float = 0.5) -> np.ndarray:
    """"TP", "FP", "TN" or "FN" per vertebra (predicted fractured: probability >= threshold)."""
    y = np.asarray(labels).astype(int) == 1
    pred = np.asarray(probability) >= threshold
    return np.where(y, np.where(pred, "TP", "FN"), np.where(pred, "FP", "TN"))


def classification_metrics(labels, probability, threshold: float = 0.5) -> dict[str, float]:
    """F1, accuracy (at ``threshold``), AUC and AP of fracture probabilities."""
    y = np.asarray(labels).astype(bool)
    pred = np.asarray(probability) >= threshold
    tp, fp, fn = int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum())
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return {"f1": f1, "accuracy": float((pred == y).mean()) if len(y) else float("nan"),
            "auc": auc_score(y, probability), "ap": average_precision(y, probability)}


def table1(per_seed: dict, training: str = "phantom", testing: str = "phantom") -> pd.DataFrame:
    """Mean +- std over seeds in the layout of the paper's Table 1 (values in %)."""
    values = pd.DataFrame(per_seed).T[list(METRICS)] * 100
    row = {"Training": training, "Testing": testing}
    for m, name in zip(METRICS, ("F1 (%)", "Acc. (%)", "AUC (%)", "AP (%)")):
        std = values[m].std(ddof=1) if len(values) > 1 else 0.0
        row[name] = f"{values[m].mean():.1f} ± {std:.1f}"
    return pd.DataFrame([row])


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

def _preset_from_dict(d: dict) -> Preset:
    d = dict(d)
    d["head"], d["mlp"] = tuple(d["head"]), tuple(d["mlp"])
    return Preset(**d)


def save_checkpoint(path: str | Path, model: FractureNet, **extra) -> Path:
    """Weights + plain metadata (preset, versions, anything in ``extra``), atomically."""
    state = {"format": FORMAT, "preset": model.preset.to_dict(), "versions": versions(),
             "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **extra}
    return atomic_save(path, lambda tmp: torch.save(state, tmp), suffix=".pt")


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint's dictionary, read weights-only (no arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such checkpoint: train a model first (notebooks/02_training.ipynb)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, zip errors, truncation
        raise CheckpointError(path, f"not a readable weights-only checkpoint ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(path, f"not a vfcore checkpoint (expected format {FORMAT!r})")
    return state


def load_checkpoint(path: str | Path, preset: str | Preset | None = None,
                    device: str | torch.device = "cpu") -> tuple[FractureNet, dict]:
    """(model in eval mode, metadata) from a checkpoint; ``preset`` asserts which one it is."""
    state = read_checkpoint(path)
    stored = _preset_from_dict(state["preset"])
    if preset is not None and get_preset(preset) != stored:
        want = get_preset(preset)
        raise CheckpointError(path, f"holds the {stored.name!r} network ({stored}), not the requested "
                              f"{want.name!r} one ({want})")
    model = FractureNet(stored)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(path, f"weights do not fit the {stored.name!r} architecture: "
                              f"{str(err).splitlines()[1:2] or err}") from None
    meta = {k: v for k, v in state.items() if k not in ("model", "optimizer", "rng")}
    return model.to(device).eval(), meta


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def _precision(device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype, use GradScaler): bf16 where supported, fp16 + scaler on older GPUs
    (e.g. the T4 of free Colab), plain fp32 on CPU."""
    if device.type != "cuda":
        return None, False
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, False
    return torch.float16, True


@torch.no_grad()
def predict(model: torch.nn.Module, patches, preset: str | Preset, batch_size: int = 32,
            device: str | torch.device | None = None) -> np.ndarray:
    """Fracture probabilities of int16 HU patches [N, 96, 96, 96] (numpy, memory-mapped, or a
    tensor, e.g. already on the GPU), model in eval mode."""
    device = pick_device(device) if not isinstance(device, torch.device) else device
    dtype, _ = _precision(device)
    model.eval().to(device)
    out = []
    for start in range(0, len(patches), batch_size):
        batch = patches[start:start + batch_size]
        batch = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(np.asarray(batch))
        x = to_network_input(batch.to(device), preset)
        with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            out.append(torch.sigmoid(model(x).float()).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def preload_split(patches, device: torch.device, preload: bool | None = None,
                  budget: float = 0.5):
    """The split as training reads it: one int16 tensor on ``device``, or ``patches`` itself
    (batches read from disk).

    ``preload=None`` decides: on CUDA, when the split takes at most ``budget`` of the free GPU
    memory (10,000 patches of 96^3 int16 are 17.7 GB), so batches are indexed on the GPU and
    the host does no work per batch; on a CPU, no (memory-mapped batches cost little there,
    and Binder has 2 GB).
    """
    if preload is None:
        if device.type != "cuda":
            return patches
        free, _ = torch.cuda.mem_get_info(device)
        preload = len(patches) * PATCH_SIZE ** 3 * 2 <= budget * free
    if not preload:
        return patches
    return torch.from_numpy(np.asarray(patches[:])).to(device)


def _rng_state(generator: torch.Generator) -> dict:
    state = {"sampler": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(generator: torch.Generator, state: dict) -> None:
    generator.set_state(state["sampler"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train_seed(run_dir: str | Path, preset: str | Preset = "small", seed: int = 0, *,
               epochs: int | None = None, batch_size: int | None = None,
               patience: int | None = None, lr: float | None = None, augment: Augment | str | None = "paper",
               device: str | None = None, compile: bool = False, preload: bool | None = None,
               progress: bool = True, on_epoch=None) -> Path:
    """Train one seed into ``<run>/model/seed<seed>/``; resume from its ``last.pt`` if present.

    ``augment``: an :class:`~vfcore.data.Augment`, a name in ``vfcore.data.AUGMENTATIONS``
    (``"paper"``, ``"light"``) or ``None`` (no augmentation). ``preload``: keep the training
    and validation splits on the device (:func:`preload_split`; None: on CUDA when they fit).

    Returns the folder. ``on_epoch(history_row)`` is called after every epoch (live plots).
    """
    from tqdm.auto import tqdm

    p = get_preset(preset)
    epochs = p.max_epochs if epochs is None else epochs
    batch_size = p.batch_size if batch_size is None else batch_size
    patience = p.patience if patience is None else patience
    lr = p.lr if lr is None else lr                            # small 3e-4, paper 1e-3
    augment = get_augment(augment)
    folder = Path(run_dir) / "model" / f"seed{seed}"
    dev = pick_device(device)
    dtype, use_scaler = _precision(dev)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True

    train_x, train_y, _ = load_split(run_dir, "train")
    val_x, val_y, _ = load_split(run_dir, "val")
    # the manifest's checksum: a run folder whose patch store was rebuilt (other scans, other
    # split) must not silently resume or reuse a model trained on the old one
    manifest = sha256_file(Path(run_dir) / "patches" / "manifest.csv")
    config = {"preset": p.name, "seed": seed, "batch_size": batch_size, "lr": lr,
              "patience": patience, "augment": asdict(augment) if augment else None,
              "manifest_sha256": manifest}

    # on a GPU, the splits once in GPU memory: no host work and no copy per batch
    train_x, val_x = preload_split(train_x, dev, preload), preload_split(val_x, dev, preload)
    labels = torch.tensor(train_y, dtype=torch.float32, device=dev)

    torch.manual_seed(seed)
    model = FractureNet(p).to(dev)
    if dev.type == "cuda":  # on CPUs oneDNN spends tens of seconds compiling each new shape
        model = model.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=0.0)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    generator = torch.Generator().manual_seed(seed)
    history: list[dict] = []
    best = {"f1": -1.0, "auc": -1.0, "epoch": -1}

    last = folder / "last.pt"
    if last.is_file():
        state = read_checkpoint(last)
        if state.get("config") != config:
            raise CheckpointError(last, f"was trained with {state.get('config')}, not {config}: "
                                  "use another run folder or delete it")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(generator, state["rng"])
        history, best = state["history"], state["best"]
    step = torch.compile(model) if compile else model

    def stopped() -> bool:
        return bool(history) and (history[-1]["epoch"] - best["epoch"] >= patience)

    while len(history) < epochs and not stopped():
        epoch = len(history)
        model.train()
        order = balanced_epoch(train_y, generator)
        n_batches = len(order) // batch_size                   # drop_last: fixed shapes
        losses, t0 = [], time.perf_counter()
        bar = tqdm(range(n_batches), desc=f"seed {seed} epoch {epoch + 1}/{epochs}",
                   disable=not progress, leave=False)
        for b in bar:
            ids = np.sort(order[b * batch_size:(b + 1) * batch_size])
            hu, y = torch.as_tensor(train_x[ids], device=dev), labels[ids]
            x = augment_batch(hu, p, generator, augment) if augment else to_network_input(hu, p)
            if dev.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last_3d)
            with torch.autocast(dev.type, dtype=dtype) if dtype else contextlib.nullcontext():
                loss = F.binary_cross_entropy_with_logits(step(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses):.3f}",
                            samples_s=f"{(b + 1) * batch_size / (time.perf_counter() - t0):.0f}")
        val = classification_metrics(val_y, predict(model, val_x, p, device=dev))
        row = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else float("nan"),
               **{f"val_{k}": float(v) for k, v in val.items()},
               "samples_per_s": n_batches * batch_size / (time.perf_counter() - t0)}
        history.append(row)
        improved = (val["f1"], np.nan_to_num(val["auc"])) > (best["f1"], best["auc"])
        if improved:
            best = {"f1": val["f1"], "auc": float(np.nan_to_num(val["auc"])), "epoch": epoch}
            save_checkpoint(folder / "best.pt", model, config=config, epoch=epoch, val=val)
        save_checkpoint(last, model, config=config, epoch=epoch, history=history, best=best,
                        optimizer=optimizer.state_dict(), rng=_rng_state(generator))
        pd.DataFrame(history).to_csv(folder / "history.csv", index=False)
        if on_epoch is not None:
            on_epoch(row)
    return folder


def fit(run_dir: str | Path, preset: str | Preset = "small", *, seeds=(0,), epochs: int | None = None,
        batch_size: int | None = None, patience: int | None = None, lr: float | None = None,
        augment: Augment | str | None = "paper", device: str | None = None, compile: bool = False,
        preload: bool | None = None, progress: bool = True, on_epoch=None) -> dict:
    """Train every seed, test each best checkpoint, write ``<run>/model/metrics.json``.

    ``<run>/model/best.pt`` becomes the checkpoint of the seed with the best validation F1.
    Returns the metrics dictionary (``per_seed``, ``mean``, ``std``, ``test``, ``best_seed``).
    """
    run_dir = Path(run_dir)
    p = get_preset(preset)
    test_x, test_y, _ = load_split(run_dir, "test")
    per_seed, val_f1 = {}, {}
    for seed in seeds:
        folder = train_seed(run_dir, p, seed, epochs=epochs, batch_size=batch_size,
                            patience=patience, lr=lr, augment=augment, device=device,
                            compile=compile, preload=preload, progress=progress, on_epoch=on_epoch)
        model, meta = load_checkpoint(folder / "best.pt")
        per_seed[str(seed)] = classification_metrics(test_y, predict(model, test_x, p, device=device))
        val_f1[str(seed)] = meta["val"]["f1"]
    chosen = max(val_f1, key=val_f1.get)
    shutil.copyfile(run_dir / "model" / f"seed{chosen}" / "best.pt", run_dir / "model" / ".best.pt.part")
    (run_dir / "model" / ".best.pt.part").replace(run_dir / "model" / "best.pt")
    values = pd.DataFrame(per_seed).T
    clean = lambda d: {k: (None if not np.isfinite(v) else float(v)) for k, v in d.items()}  # noqa: E731
    metrics = {"preset": p.name, "seeds": [int(s) for s in seeds], "best_seed": int(chosen),
               "n_test": int(len(test_y)), "n_test_fractured": int(test_y.sum()),
               "per_seed": {s: clean(m) for s, m in per_seed.items()},
               "mean": clean(values.mean().to_dict()),
               "std": clean(values.std(ddof=1).to_dict() if len(values) > 1 else {k: 0.0 for k in METRICS}),
               "test": clean(per_seed[chosen]), "versions": versions()}
    write_json(run_dir / "model" / "metrics.json", metrics)
    return metrics


def predict_split(run_dir: str | Path, checkpoint: str | Path | None = None,
                  device: str | None = None, threshold: float = 0.5) -> pd.DataFrame:
    """The test split's manifest rows with ``probability`` from the run's best checkpoint,
    ``prediction`` (probability >= threshold) and ``outcome`` (TP, FP, TN, FN)."""
    run_dir = Path(run_dir)
    model, meta = load_checkpoint(checkpoint or run_dir / "model" / "best.pt")
    x, y, rows = load_split(run_dir, "test")
    rows = rows.copy()
    rows["probability"] = predict(model, x, model.preset, device=device)
    rows["prediction"] = (rows["probability"] >= threshold).astype(int)
    rows["outcome"] = outcome_names(y, rows["probability"], threshold)
    return rows
