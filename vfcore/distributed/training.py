"""Training one seed under torchrun: DistributedDataParallel over the ranks of one job.

:func:`train_seed_distributed` is :func:`vfcore.train.train_seed` for N processes:

* one seeded order: every rank draws the same balanced epoch (:func:`vfcore.data.balanced_epoch`
  from the shared ``order`` generator, seeded by ``seed``), so the epoch is the same set of
  draws as one process makes; global batch b (``batch_size`` samples, as one process) is cut
  into ``world`` equal slices and rank r trains on slice r;
* DDP averages the gradients over the ranks, so a step sees the gradient of the whole global
  batch; batch norm is synchronised (statistics of the global batch: ``torch.nn.SyncBatchNorm``
  on GPUs, :class:`~vfcore.distributed.ddp.GlooSyncBatchNorm` on CPUs, where torch's runs on
  GPUs only; :func:`~vfcore.distributed.ddp.wrap_model`);
* augmentation and dropout draw from per-rank streams seeded, each epoch, from the shared
  generator (so a checkpoint holds only shared state);
* validation, the best epoch and early stopping are decided on rank 0 and broadcast; rank 0
  alone writes the seed's best and last checkpoints and its history
  (:meth:`~vfcore.run.RunFolder.seed_checkpoint`, :meth:`~vfcore.run.RunFolder.history`,
  atomically), and a run resumes from its last checkpoint on any number of ranks.

What is still separate from :func:`vfcore.train.train_seed` (its epoch loop is repeated here
with the collectives in between; ``docs/distributed.md`` lists what ``train.py`` must expose to
merge the two): the config, the resume check and the history row are the same as there.

Without torchrun (one process) the same code runs with no DDP and plain batch norm.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from vfcore.data import augment_batch, balanced_epoch, get_augment, load_split, to_network_input
from vfcore.errors import CheckpointError, DataValueError
from vfcore.io import atomic_write, sha256_file
from vfcore.model import FractureNet, Preset, get_preset
from vfcore.run import RunFolder
from vfcore.forward import precision
from vfcore.train import (classification_metrics, predict, preload_split, read_checkpoint, train_step,
                          save_checkpoint)

from .ddp import wrap_model
from .world import all_reduce_sum, barrier, broadcast, collective, world


def _stream_seed(order: torch.Generator) -> int:
    """A seed for this epoch's per-rank random streams, drawn from the shared generator."""
    return int(torch.randint(2 ** 62, (1,), generator=order))


def train_seed_distributed(run_dir: str | Path, preset: str | Preset = "small", seed: int = 0,
                           **kwargs) -> Path:
    """Train one seed into ``<run>/model/seed<seed>/`` on every rank of the job (see the module
    docstring); resume from its last checkpoint. Arguments as :func:`vfcore.train.train_seed`
    (``batch_size`` is the global batch, divisible by the world size). Returns the folder."""
    return train_ranks(run_dir, preset, seed, **kwargs)[0]


def train_ranks(run_dir: str | Path, preset: str | Preset = "small", seed: int = 0, *,
                epochs: int | None = None, batch_size: int | None = None,
                patience: int | None = None, lr: float = 1e-3, augment="paper",
                device: str | None = None, preload: bool | None = None,
                progress: bool = True, on_epoch=None) -> tuple[Path, FractureNet]:
    """:func:`train_seed_distributed`, returning also this rank's trained model (the weights
    are the same on every rank)."""
    from tqdm.auto import tqdm

    w = world()
    p = get_preset(preset)
    epochs = p.max_epochs if epochs is None else epochs
    batch_size = p.batch_size if batch_size is None else batch_size
    patience = p.patience if patience is None else patience
    if batch_size % w.size:
        raise DataValueError("batch_size", f"{batch_size} is not divisible by the {w.size} ranks: "
                             "every rank must train on an equal slice of each batch")
    local = batch_size // w.size
    augment = get_augment(augment)
    run = RunFolder(run_dir)
    folder = run.seed_dir(seed)
    dev = w.device if device is None else torch.device(device)
    dtype, use_scaler = precision(dev)

    train_x, train_y, _ = load_split(run.root, "train")
    val_x, val_y, _ = load_split(run.root, "val")
    config = {"preset": p.name, "seed": seed, "batch_size": batch_size, "lr": lr,
              "patience": patience, "augment": asdict(augment) if augment else None,
              "manifest_sha256": sha256_file(run.require("manifest"))}
    train_x = preload_split(train_x, dev, preload)
    val_x = preload_split(val_x, dev, preload) if w.is_main else val_x
    labels = torch.tensor(train_y, dtype=torch.float32, device=dev)

    torch.manual_seed(seed)
    model = FractureNet(p).to(dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=0.0)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    order = torch.Generator().manual_seed(seed)         # the shared order: same on every rank
    history: list[dict] = []
    best = {"f1": -1.0, "auc": -1.0, "epoch": -1}
    last = run.seed_checkpoint(seed, "last")
    if last.is_file():                                   # every rank reads rank 0's file
        state = read_checkpoint(last)
        if state.get("config") != config:
            raise CheckpointError(last, f"was trained with {state.get('config')}, not {config}: "
                                  "use another run folder or delete it")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        order.set_state(state["rng"]["sampler"])
        history, best = state["history"], state["best"]
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last_3d)
    net = wrap_model(model, dev)
    model = net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net

    def stopped() -> bool:
        return bool(history) and (history[-1]["epoch"] - best["epoch"] >= patience)

    while len(history) < epochs and not stopped():
        epoch = len(history)
        net.train()
        ids_epoch = balanced_epoch(train_y, order)
        stream = _stream_seed(order) + w.rank               # per-rank augmentation and dropout
        torch.manual_seed(stream)
        aug = torch.Generator().manual_seed(stream)
        n_batches = len(ids_epoch) // batch_size             # drop_last: fixed shapes
        losses, t0 = [], time.perf_counter()
        bar = tqdm(range(n_batches), desc=f"seed {seed} epoch {epoch + 1}/{epochs} ({w.where})",
                   disable=not (progress and w.is_main), leave=False)
        for b in bar:
            start = b * batch_size + w.rank * local
            ids = np.sort(ids_epoch[start:start + local])
            hu, y = torch.as_tensor(train_x[ids], device=dev), labels[ids]
            x = augment_batch(hu, p, aug, augment) if augment else to_network_input(hu, p)
            if dev.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last_3d)
            # the one-process step (train.train_step); DDP averages the gradients in backward()
            with collective(f"the forward/backward pass of epoch {epoch + 1}, batch {b + 1}"):
                losses.append(train_step(net, optimizer, x, y, dtype=dtype, scaler=scaler))
        loss = all_reduce_sum(torch.tensor(losses, dtype=torch.float64, device=dev),
                              f"summing the losses of epoch {epoch + 1}") / w.size
        seconds = time.perf_counter() - t0
        # rank 0 validates and decides; the others receive its figures (same history, same stop)
        row = torch.zeros(4, dtype=torch.float64, device=dev)
        if w.is_main:
            val = classification_metrics(val_y, predict(model, val_x, p, device=dev))
            row[:] = torch.tensor([val[k] for k in ("f1", "accuracy", "auc", "ap")], dtype=torch.float64)
        broadcast(row, f"broadcasting rank 0's validation of epoch {epoch + 1}")
        val = dict(zip(("f1", "accuracy", "auc", "ap"), row.tolist()))
        history.append({"epoch": epoch, "loss": float(loss.mean()) if len(loss) else float("nan"),
                        **{f"val_{k}": float(v) for k, v in val.items()},
                        "samples_per_s": n_batches * batch_size / seconds})
        improved = (val["f1"], np.nan_to_num(val["auc"])) > (best["f1"], best["auc"])
        if improved:
            best = {"f1": val["f1"], "auc": float(np.nan_to_num(val["auc"])), "epoch": epoch}
        if w.is_main:
            if improved:
                save_checkpoint(run.seed_checkpoint(seed), model, config=config, epoch=epoch, val=val)
            save_checkpoint(last, model, config=config, epoch=epoch, history=history, best=best,
                            optimizer=optimizer.state_dict(),
                            rng={"sampler": order.get_state(), "torch": torch.get_rng_state()})
            with atomic_write(run.history(seed), "w") as f:
                pd.DataFrame(history).to_csv(f, index=False)
            if on_epoch is not None:
                on_epoch(history[-1])
    barrier("waiting for rank 0's checkpoints at the end of training")
    return folder, model
