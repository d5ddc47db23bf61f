"""Training the fracture classifier (metrics: :mod:`vfcore.metrics`; checkpoints:
:mod:`vfcore.checkpoint`; predictions: the forward engine :mod:`vfcore.forward`).

The paper (Sec. 3): Adam, learning rate 1e-3, no weight decay, balanced epochs, early stopping
when the validation F1 has not improved for 50 epochs, dropout 0.3; metrics F1, accuracy, AUC
and AP at the vertebra level, mean +- std over several training runs (Table 1).

Checkpoints (:mod:`vfcore.checkpoint`) hold tensors and plain Python values only. Each seed's
``last`` checkpoint carries everything a killed run needs to continue the same history
(optimizer, epoch, history, random states); its ``best`` one the weights of the best
validation F1. Both are written atomically.

Artifacts in the run folder (:class:`vfcore.run.RunFolder`): per seed (``seed_dir(k)``) the
best and last checkpoints and ``history.csv``; the run's checkpoint (``.checkpoint``: the seed
with the best validation F1, what dissection reads); ``.metrics`` (test metrics per seed, mean
and std, and ``test`` of the run's checkpoint).
"""
from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .constants import PATCH_SIZE
from .data import (Augment, apply_augment, balanced_epoch, draw_augment, get_augment, load_split,
                   to_network_input)
from .distributed import (all_reduce_sum, barrier, broadcast, collective, sync_batchnorm, world,
                          wrap_model)
from .errors import CheckpointError, DataValueError, InvalidParameterError
from .forward import forward
from .runtime import Precision, host_memory_available, pick_device, precision
from .io import atomic_write, sha256_file, versions, write_json
from .checks import finite_loss, nonfinite_in_epoch
from .lock import writes
from .metrics import METRICS, classification_metrics, outcome_names
from .model import FractureNet, Preset, get_preset
from .run import RunFolder


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def predict(model: torch.nn.Module, patches, preset: str | Preset, batch_size: int = 32,
            device: str | torch.device | None = None) -> np.ndarray:
    """Fracture probabilities [N] of int16 HU patches [N, 96, 96, 96] (numpy, a lazy
    :class:`~vfcore.data.PatchArray`, or a tensor, e.g. already on the GPU), through the one
    forward engine (:func:`vfcore.forward.forward`: eval mode, the device's precision)."""
    p = get_preset(preset)
    probability, _ = forward(model, patches, batch_size=batch_size, device=device,
                             transform=lambda hu: to_network_input(hu, p))
    return probability


def step_bytes(preset: str | Preset, batch_size: int, dtype: torch.dtype | None = None) -> int:
    """Estimated peak memory (bytes) of one training step at ``batch_size``: the outputs of
    every leaf module (kept for backward; in ``dtype``'s size, fp32 when None) plus the
    weights with their gradients and Adam's two moments (4 x fp32). Counted on the ``meta``
    device, so nothing is allocated. Paper preset: 3.2 GB at batch 8 in fp32 (3.3 GB measured
    on the CPU), 12.5 GB at batch 64 in fp16 (12-13 GB expected on a T4)."""
    p = get_preset(preset)
    with torch.device("meta"):
        net = FractureNet(p)
        x = torch.empty(batch_size, 1, *(p.input_size,) * 3)
    elements = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: elements.append(out.numel()))
             for m in net.modules() if not list(m.children())]
    with torch.no_grad():
        net.train()(x)
    for h in hooks:
        h.remove()
    size = torch.empty(0, dtype=dtype or torch.float32).element_size()
    return size * sum(elements) + 16 * sum(t.numel() for t in net.parameters())


def default_batch_size(preset: str | Preset, device: torch.device, policy: Precision | None = None,
                       available: int | None = None, share: float = 0.5) -> int:
    """The preset's batch size, halved on a CPU until one training step (:func:`step_bytes`)
    needs at most ``share`` of the memory still available (``runtime.host_memory_available``):
    the paper preset's 64 would need about 25 GB in fp32, more than a free Colab runtime's
    12.7 GB or a laptop's. GPUs keep the preset's (the preload plan makes room for the step)."""
    p = get_preset(preset)
    if device.type != "cpu":
        return p.batch_size
    policy = precision(device) if policy is None else policy
    available = host_memory_available() if available is None else available
    batch = p.batch_size
    while available is not None and batch > 1 and step_bytes(p, batch, policy.dtype) > share * available:
        batch //= 2
    if batch < p.batch_size:
        print(f"batch size {batch} instead of the {p.name} preset's {p.batch_size}: one training step at "
              f"{p.batch_size} needs about {step_bytes(p, p.batch_size, policy.dtype) / 2**30:.1f} GB, "
              f"and {available / 2**30:.1f} GB are available (pass batch_size= to choose)")
    return batch


def preload_split(patches, device: torch.device, preload: bool | None = None, *,
                  reserve: int = 0, budget: float = 0.9):
    """The split as training reads it: one int16 tensor on ``device``, or ``patches`` itself
    (batches read from the host, memory-mapped, one at a time).

    ``preload=None`` decides: on CUDA, when the split fits in ``budget`` of the free GPU
    memory after ``reserve`` bytes are set aside (the training step's peak, :func:`step_bytes`,
    and whatever else must stay on the GPU), so batches are indexed on the GPU; otherwise it
    streams from the host. 10,000 patches of 96^3 int16 are 17.7 GB. On a CPU, no (memory-
    mapped batches cost little there, and Binder has 2 GB).
    """
    if preload is None:
        if device.type != "cuda":
            return patches
        free, _ = torch.cuda.mem_get_info(device)
        preload = fits_on_device(len(patches), free, reserve, budget)
    if not preload:
        return patches
    return torch.from_numpy(np.asarray(patches[:])).to(device)


def fits_on_device(n_patches: int, free: int, reserve: int, budget: float = 0.9) -> bool:
    """True when ``n_patches`` int16 patches of 96^3 fit in ``budget`` x (``free`` - ``reserve``)."""
    return n_patches * PATCH_SIZE ** 3 * 2 <= budget * (free - reserve)


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


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor, *, dtype: torch.dtype | None = None,
               scaler: torch.amp.GradScaler | None = None) -> float:
    """One optimiser step on one batch; returns its loss.

    ``x`` [B, 1, S, S, S] network input, ``y`` [B] labels (0/1 float). The loss is the binary
    cross-entropy of the logit f_Theta(x) against y (the paper's objective), computed under
    the device's autocast ``dtype`` (None: fp32), then backward and the optimiser's update
    (through ``scaler`` when fp16 needs one). Notebook 02 writes this step out by hand.
    """
    with torch.autocast(x.device.type, dtype=dtype) if dtype else contextlib.nullcontext():
        loss = F.binary_cross_entropy_with_logits(model(x).float(), y)
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return float(loss.item())


def train_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, patches, labels,
                preset: str | Preset, generator: torch.Generator, *, batch_size: int,
                augment: Augment | None = None, policy: Precision | None = None,
                scaler: torch.amp.GradScaler | None = None, part=None, step=train_step,
                progress=None) -> list[float]:
    """One balanced epoch (paper, Sec. 3): the order from :func:`~vfcore.data.balanced_epoch`,
    then batch by batch the next ``batch_size`` draws (sorted), their augmentation, one
    :func:`train_step`. Returns the batches' losses.

    ``patches`` [N, 96, 96, 96] int16 (lazy or a tensor), ``labels`` [N] 0/1 (a tensor on the
    device); ``generator`` draws the order and then each batch's augmentation; ``policy``: the
    device's :func:`~vfcore.runtime.precision` (autocast dtype, layout). The torchrun shell
    (:func:`train_seed`) passes ``part`` (a global batch's augmentation draw and samples ->
    this rank's rows), ``step`` (the step wrapped in its collective) and ``progress`` (a bar).
    """
    p = get_preset(preset)
    device = labels.device
    policy = precision(device) if policy is None else policy
    model.train()
    order = balanced_epoch(labels.cpu().numpy(), generator)
    losses = []
    for b in progress or range(len(order) // batch_size):        # drop_last: fixed shapes
        ids = np.sort(order[b * batch_size:(b + 1) * batch_size])
        draw = draw_augment(len(ids), p, generator, augment) if augment else None
        if part is not None:                                     # torchrun: this rank's rows
            ids, draw = part(ids, draw)
        hu = torch.as_tensor(patches[ids], device=device)
        x = apply_augment(hu, p, draw) if augment else to_network_input(hu, p)
        if policy.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        losses.append(step(model, optimizer, x, labels[ids].float(), dtype=policy.dtype,
                           scaler=scaler if policy.scaler else None))
        finite_loss(losses[-1], batch=b, ids=ids, patches=patches)   # NaN/inf: stop, name the batch
        if progress is not None:
            progress.set_postfix(loss=f"{np.mean(losses):.3f}")
    return losses


def evaluate(model: torch.nn.Module, patches, labels, preset: str | Preset,
             device: str | torch.device | None = None) -> dict:
    """Table 1's figures of ``model`` on a split: F1, accuracy (at P >= 0.5), ROC AUC and AP of
    P(fracture) [N] against ``labels`` [N] (:func:`vfcore.metrics.classification_metrics`)."""
    return classification_metrics(labels, predict(model, patches, preset, device=device))


def _dropout_seed(seed: int, epoch: int, rank: int) -> int:
    """Several ranks: the global torch seed of ``rank`` in ``epoch`` (its dropout masks),
    fixed by (seed, epoch, rank), so a resumed job draws the same without saved state."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _validate(model: torch.nn.Module, val_x, val_y, p: Preset, dev: torch.device, epoch: int) -> dict:
    """Rank 0's validation figures (F1, accuracy, AUC, AP) on every rank (broadcast), so every
    rank appends the same history row and takes the same early-stopping decision."""
    w = world()
    row = torch.zeros(len(METRICS), dtype=torch.float64, device=dev)
    if w.is_main:
        val = evaluate(model, val_x, val_y, p, dev)
        row[:] = torch.tensor([val[k] for k in METRICS], dtype=torch.float64)
    broadcast(row, f"broadcasting rank 0's validation of epoch {epoch + 1}")
    return dict(zip(METRICS, row.tolist()))


@writes("vfcore train (train_seed)")
def train_seed(run_dir: str | Path, preset: str | Preset = "small", seed: int = 0, *,
               epochs: int | None = None, batch_size: int | None = None,
               patience: int | None = None, lr: float | None = None, augment: Augment | str | None = "paper",
               device: str | None = None, compile: bool = False, preload: bool | None = None,
               progress: bool = True, on_epoch=None) -> Path:
    """Train one seed into ``RunFolder(run_dir).seed_dir(seed)``; resume from its last
    checkpoint if present. One process, or every rank of a ``torchrun`` job
    (:func:`vfcore.distributed.init` called first; ``docs/distributed.md``).

    ``augment``: an :class:`~vfcore.data.Augment`, a name in ``vfcore.data.AUGMENTATIONS``
    (``"paper"``, ``"light"``) or ``None`` (no augmentation). ``preload``: keep the training
    and validation splits on the device (:func:`preload_split`; None: on CUDA when they fit).

    With N ranks: every rank draws the same seeded balanced epoch and trains on its slice
    (``batch_size / N`` samples) of each global batch of ``batch_size`` (which N must divide);
    DistributedDataParallel averages the gradients and batch norm takes the statistics of
    the global batch (:func:`vfcore.distributed.wrap_model`). Every rank draws each global
    batch's augmentation from the shared generator and applies its slice's, so the epochs,
    the batches and the augmentations are one process's; only dropout draws per rank
    (:func:`_dropout_seed`). Rank 0 validates and decides (broadcast), and writes the
    checkpoints and ``history.csv``; a run resumes from its ``last`` checkpoint on any number
    of ranks. With one process all of that is a no-op.

    Returns the folder. ``on_epoch(history_row)`` is called after every epoch (live plots;
    on rank 0).
    """
    from tqdm.auto import tqdm

    w = world()
    p = get_preset(preset)
    dev = w.device if device is None and w.size > 1 else pick_device(device)
    policy = precision(dev)
    epochs = p.max_epochs if epochs is None else epochs
    if batch_size is None:
        batch_size = default_batch_size(p, dev, policy) if w.size == 1 else p.batch_size
    patience = p.patience if patience is None else patience
    lr = p.lr if lr is None else lr                            # small 3e-4, paper 1e-3
    if batch_size % w.size:
        raise InvalidParameterError("batch_size", f"divisible by the {w.size} ranks (every rank "
                                    "trains on an equal slice of each batch)", batch_size)
    local = batch_size // w.size                               # this rank's slice of a batch
    augment = get_augment(augment)
    run = RunFolder(run_dir)
    folder = run.seed_dir(seed)
    if dev.type == "cuda":   # fastest kernels for the fixed shapes; not bit-reproducible on CUDA
        torch.backends.cudnn.benchmark = True

    train_x, train_y, train_rows = load_split(run_dir, "train")
    val_x, val_y, _ = load_split(run_dir, "val")
    # the manifest's checksum: a run folder whose patch store was rebuilt (other scans, other
    # split) must not silently resume or reuse a model trained on the old one
    manifest = sha256_file(run.require("manifest"))
    config = {"preset": p.name, "seed": seed, "batch_size": batch_size, "lr": lr,
              "patience": patience, "augment": asdict(augment) if augment else None,
              "manifest_sha256": manifest}

    # on a GPU, the splits once in GPU memory when they fit beside the training step (the
    # validation split on rank 0 only: it alone validates); otherwise streamed from the host
    reserve = step_bytes(p, local, policy.dtype)
    if w.is_main:
        val_x = preload_split(val_x, dev, preload, reserve=reserve + len(train_x) * PATCH_SIZE ** 3 * 2)
    train_x = preload_split(train_x, dev, preload, reserve=reserve)
    labels = torch.tensor(train_y, dtype=torch.int64, device=dev)

    torch.manual_seed(seed)
    model = FractureNet(p).to(dev)
    if w.size > 1:  # batch norm over the global batch, BEFORE the optimiser takes the parameters
        model = sync_batchnorm(model, dev)
    if policy.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=0.0)
    scaler = torch.amp.GradScaler(dev.type, enabled=policy.scaler)
    generator = torch.Generator().manual_seed(seed)            # the epoch order: same on every rank
    history: list[dict] = []
    best = {"f1": -1.0, "auc": -1.0, "epoch": -1}

    last = run.seed_checkpoint(seed, "last")
    if last.is_file():                                         # every rank reads rank 0's file
        state = read_checkpoint(last)
        if state.get("config") != config:
            raise CheckpointError(last, f"was trained with {state.get('config')}, not {config}: "
                                  "use another run folder or delete it")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(generator, state["rng"])
        if policy.scaler and "scaler" in state:    # fp16: the loss scale goes on, no skipped steps
            scaler.load_state_dict(state["scaler"])
        history, best = state["history"], state["best"]
    net = wrap_model(model, dev)           # several ranks: DistributedDataParallel
    model = getattr(net, "module", net)    # the network itself: validation and checkpoints
    step = torch.compile(net) if compile else net

    def stopped() -> bool:
        return bool(history) and (history[-1]["epoch"] - best["epoch"] >= patience)

    def rank_rows(ids, draw):          # torchrun: this rank's rows of a global batch and its draw
        rows = slice(w.rank * local, (w.rank + 1) * local)
        return ids[rows], (draw.take(rows.start, rows.stop) if draw is not None else None)

    def collective_step(*args, **kwargs):   # DDP's gradient all-reduce notices a dead rank here
        with collective(f"the forward/backward pass of epoch {len(history) + 1}"):
            return train_step(*args, **kwargs)

    while len(history) < epochs and not stopped():
        epoch = len(history)
        net.train()
        if w.size > 1:     # one process: dropout goes on from the seed set before the model
            torch.manual_seed(_dropout_seed(seed, epoch, w.rank))
        n_batches = len(train_y) // 2 * 2 // batch_size          # a balanced epoch's batches
        t0 = time.perf_counter()
        where = "" if w.size == 1 else f" ({w.size} ranks)"
        bar = tqdm(range(n_batches), desc=f"seed {seed} epoch {epoch + 1}/{epochs}{where}",
                   disable=not (progress and w.is_main), leave=False)
        try:
            losses = train_epoch(step, optimizer, train_x, labels, p, generator, batch_size=batch_size,
                                 augment=augment, policy=policy, scaler=scaler,
                                 part=rank_rows if w.size > 1 else None,
                                 step=collective_step if w.size > 1 else train_step, progress=bar)
        except DataValueError as err:    # a non-finite loss: name the epoch, step and files
            if not hasattr(err, "ids"):
                raise
            raise nonfinite_in_epoch(err, epoch, n_batches, train_rows["ct_path"].to_numpy(),
                                     run.manifest) from None
        loss = torch.tensor([np.mean(losses) if losses else float("nan")], dtype=torch.float64,
                            device=dev)
        loss = float(all_reduce_sum(loss, f"summing the losses of epoch {epoch + 1}")) / w.size
        val = _validate(model, val_x, val_y, p, dev, epoch)
        row = {"epoch": epoch, "loss": loss, **{f"val_{k}": float(v) for k, v in val.items()},
               "samples_per_s": n_batches * batch_size / (time.perf_counter() - t0)}
        history.append(row)
        improved = (val["f1"], np.nan_to_num(val["auc"])) > (best["f1"], best["auc"])
        if improved:
            best = {"f1": val["f1"], "auc": float(np.nan_to_num(val["auc"])), "epoch": epoch}
        if w.is_main:                                           # one writer
            if improved:
                save_checkpoint(run.seed_checkpoint(seed), model, config=config, epoch=epoch, val=val)
            save_checkpoint(last, model, config=config, epoch=epoch, history=history, best=best,
                            optimizer=optimizer.state_dict(), rng=_rng_state(generator),
                            **({"scaler": scaler.state_dict()} if policy.scaler else {}))
            with atomic_write(run.history(seed), "w") as f:
                pd.DataFrame(history).to_csv(f, index=False)
            if on_epoch is not None:
                on_epoch(row)
    barrier("waiting for rank 0's checkpoints at the end of training")
    return folder


@writes("vfcore train (fit)")
def fit(run_dir: str | Path, preset: str | Preset = "small", *, seeds=(0,), epochs: int | None = None,
        batch_size: int | None = None, patience: int | None = None, lr: float | None = None,
        augment: Augment | str | None = "paper", device: str | None = None, compile: bool = False,
        preload: bool | None = None, progress: bool = True, on_epoch=None) -> dict:
    """Train every seed, test each best checkpoint, write ``<run>/model/metrics.json``.

    The run's checkpoint (``RunFolder.checkpoint``) becomes the best one of the seed with the
    best validation F1.
    Returns the metrics dictionary (``per_seed``, ``mean``, ``std``, ``test``, ``best_seed``).
    Under torchrun every rank trains each seed (:func:`train_seed`); rank 0 tests and writes,
    and every rank returns the metrics it wrote.
    """
    run = RunFolder(run_dir)
    p = get_preset(preset)
    w = world()
    test_x, test_y, _ = load_split(run_dir, "test")
    per_seed, val_f1 = {}, {}
    for seed in seeds:
        train_seed(run_dir, p, seed, epochs=epochs, batch_size=batch_size,
                   patience=patience, lr=lr, augment=augment, device=device,
                   compile=compile, preload=preload, progress=progress, on_epoch=on_epoch)
        if w.is_main:                                   # rank 0 tests; the others wait below
            model, meta = load_checkpoint(RunFolder(run_dir).seed_checkpoint(seed))
            per_seed[str(seed)] = classification_metrics(test_y, predict(model, test_x, p, device=device))
            val_f1[str(seed)] = meta["val"]["f1"]
    if w.is_main:
        metrics = _write_metrics(run, p, seeds, test_y, per_seed, val_f1)
    barrier("waiting for rank 0's test metrics")
    return metrics if w.is_main else json.loads(run.metrics.read_text())


def _write_metrics(run: RunFolder, p: Preset, seeds, test_y, per_seed: dict, val_f1: dict) -> dict:
    """The run's checkpoint (the seed with the best validation F1) and ``metrics.json``."""
    chosen = max(val_f1, key=val_f1.get)
    best = run.checkpoint
    part = best.with_name(f".{best.name}.part")
    shutil.copyfile(run.seed_checkpoint(int(chosen)), part)
    part.replace(best)
    values = pd.DataFrame(per_seed).T
    clean = lambda d: {k: (None if not np.isfinite(v) else float(v)) for k, v in d.items()}  # noqa: E731
    metrics = {"preset": p.name, "seeds": [int(s) for s in seeds], "best_seed": int(chosen),
               "n_test": int(len(test_y)), "n_test_fractured": int(test_y.sum()),
               "per_seed": {s: clean(m) for s, m in per_seed.items()},
               "mean": clean(values.mean().to_dict()),
               "std": clean(values.std(ddof=1).to_dict() if len(values) > 1 else {k: 0.0 for k in METRICS}),
               "test": clean(per_seed[chosen]), "versions": versions()}
    write_json(run.metrics, metrics)
    return metrics


def predict_split(run_dir: str | Path, checkpoint: str | Path | None = None,
                  device: str | None = None, threshold: float = 0.5) -> pd.DataFrame:
    """The test split's manifest rows with ``probability`` from the run's best checkpoint,
    ``prediction`` (probability >= threshold) and ``outcome`` (TP, FP, TN, FN)."""
    model, meta = load_checkpoint(checkpoint or RunFolder(run_dir).require("checkpoint"))
    x, y, rows = load_split(run_dir, "test")
    rows = rows.copy()
    rows["probability"] = predict(model, x, model.preset, device=device)
    rows["prediction"] = (rows["probability"] >= threshold).astype(int)
    rows["outcome"] = outcome_names(y, rows["probability"], threshold)
    return rows
