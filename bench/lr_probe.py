"""Does a preset learn at a learning rate? A resumable probe counted in optimiser steps.

Trains a preset on a run's patch store for ``steps`` Adam steps of ``batch`` samples with the
preset's augmentation (``Preset.augment``: ``paper`` for the paper preset), the training core
of :mod:`vfcore.train` (balanced epochs, :func:`~vfcore.data.draw_augment` /
:func:`~vfcore.data.apply_augment`, :func:`~vfcore.train.train_step`, the device's precision
policy :func:`~vfcore.runtime.precision`). Every ``every`` steps it records one history row:
the training loss (mean of the last ``every`` steps, train mode) and the validation F1,
accuracy, AUC and AP (:func:`~vfcore.train.evaluate`, eval mode), and writes a checkpoint
(``last.pt``: model, optimiser, random states, the current epoch's order and position, every
step's loss; weights-only loadable, written atomically by :func:`vfcore.checkpoint.save_checkpoint`)
with ``history.csv`` and ``timing.csv`` into the output folder. Run again with the same
settings it resumes where the checkpoint left off (also mid-epoch), and a larger ``--steps``
extends it; a folder made with other settings is refused (:class:`~vfcore.errors.CheckpointError`
naming its ``last.pt``).

    python bench/lr_probe.py --out /work/runs/lrprobe/paper_lr1e-3 --lr 1e-3 --threads 2
    python bench/lr_probe.py --run runs/phantom --out OUT --preset small --steps 300 --batch 16

Prints the device, the precision line, and per row: step, training loss, validation AUC and
F1, training samples/s (steps only) and seconds of the evaluation. Figures, no pass/fail
(docs/training_dynamics.md, section 8, has the paper preset's curves).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from vfcore.checkpoint import read_checkpoint, save_checkpoint
from vfcore.checks import finite_loss
from vfcore.data import AUGMENTATIONS, apply_augment, balanced_epoch, draw_augment, get_augment, load_split, to_network_input
from vfcore.errors import CheckpointError, InvalidParameterError
from vfcore.io import atomic_write, sha256_file
from vfcore.model import FractureNet, Preset, get_preset
from vfcore.run import RunFolder
from vfcore.runtime import device_name, pick_device, precision, precision_line
from vfcore.train import _rng_state, _set_rng_state, evaluate, train_step  # train_seed's resume state

#: The quick run's patch store (read only).
DEFAULT_RUN = "/work/main/runs/phantom"
#: Columns of a history row (one every ``every`` steps).
HISTORY_COLUMNS = ("step", "loss", "val_f1", "val_accuracy", "val_auc", "val_ap")


def probe_config(run_dir: str | Path, p: Preset, *, lr: float, batch_size: int, every: int,
                 seed: int, augment, val_samples: int | None, policy_name: str) -> dict:
    """The settings a probe folder belongs to (its checkpoint refuses any other); ``steps`` is
    not one of them, so a finished probe can be extended."""
    return {"preset": p.to_dict(), "lr": float(lr), "batch_size": int(batch_size), "every": int(every),
            "seed": int(seed), "augment": asdict(augment) if augment else None,
            "val_samples": val_samples, "precision": policy_name,
            "manifest_sha256": sha256_file(RunFolder(run_dir).require("manifest"))}


def val_subset(n: int, val_samples: int | None, seed: int) -> np.ndarray:
    """Indices [n'] of the validation vertebrae evaluated: all, or ``val_samples`` of them
    drawn without replacement with ``seed`` (sorted)."""
    if val_samples is None or val_samples >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, val_samples, replace=False))


def probe(run_dir: str | Path, out_dir: str | Path, preset: str | Preset = "paper", *,
          lr: float | None = None, steps: int = 200, batch_size: int = 8, every: int = 25,
          seed: int = 0, augment: str | None = "preset", val_samples: int | None = None,
          device: str | None = None, log=print) -> list[dict]:
    """Train ``preset`` for ``steps`` optimiser steps (resuming ``out_dir/last.pt`` if there);
    returns the history, one dict per ``every`` steps with :data:`HISTORY_COLUMNS`.

    ``lr``: None takes ``Preset.lr``; ``augment``: ``"preset"`` takes ``Preset.augment``, else a
    name of ``vfcore.data.AUGMENTATIONS`` or None. Every step's draws come from one CPU generator
    seeded with ``seed`` (epoch order, then each batch's augmentation) and dropout from torch's
    global generator seeded with ``seed`` before the network is built, as in ``train_seed``.
    """
    p = get_preset(preset)
    for name, value in (("steps", steps), ("batch_size", batch_size), ("every", every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidParameterError(name, "a whole number >= 1", value)
    lr = p.lr if lr is None else lr
    augment = get_augment(p.augment if augment == "preset" else augment)
    dev = pick_device(device)
    policy = precision(dev)
    out = Path(out_dir)
    last = out / "last.pt"

    train_x, train_y, _ = load_split(run_dir, "train")
    val_x, val_y, _ = load_split(run_dir, "val")
    keep = val_subset(len(val_y), val_samples, seed)
    val_x, val_y = val_x[keep], val_y[keep]                    # [n', 96, 96, 96] in memory
    labels = torch.tensor(train_y, dtype=torch.int64, device=dev)
    config = probe_config(run_dir, p, lr=lr, batch_size=batch_size, every=every, seed=seed,
                          augment=augment, val_samples=val_samples, policy_name=policy.name)

    torch.manual_seed(seed)
    model = FractureNet(p).to(dev)
    if policy.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=0.0)
    scaler = torch.amp.GradScaler(dev.type, enabled=policy.scaler)
    generator = torch.Generator().manual_seed(seed)
    step, order, position = 0, None, 0        # the current balanced epoch and its next batch
    losses: list[float] = []                  # every step's training loss
    history: list[dict] = []
    timing: list[dict] = []                   # wall-clock figures (not part of the result)

    if last.is_file():
        state = read_checkpoint(last)
        if state.get("config") != config:
            theirs = state.get("config") or {}
            differ = sorted(k for k in set(config) | set(theirs) if config.get(k) != theirs.get(k))
            raise CheckpointError(last, f"this probe folder was made with other settings "
                                  f"({', '.join(differ)}: {[theirs.get(k) for k in differ]}, not "
                                  f"{[config.get(k) for k in differ]}): use another --out folder")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(generator, state["rng"])
        if policy.scaler and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        step, position = state["step"], state["position"]
        order = None if state["order"] is None else state["order"].numpy()
        losses, history, timing = list(state["losses"]), state["history"], state["timing"]
        log(f"resumed {last} at step {step}")

    aug_name = next((k for k, v in AUGMENTATIONS.items() if v == augment), augment)
    log(f"{p.name} preset, lr {lr:g}, batch {batch_size}, augmentation {aug_name}")
    log(f"device: {device_name(dev)}; {precision_line(dev)}")
    log(f"train {len(train_y)} vertebrae ({int(train_y.sum())} fractured), validation "
        f"{len(val_y)} ({int(val_y.sum())} fractured), {steps} steps, a row every {every}")

    def save() -> None:
        save_checkpoint(last, model, config=config, step=step, position=position,
                        order=None if order is None else torch.as_tensor(order),
                        losses=losses, history=history, timing=timing,
                        optimizer=optimizer.state_dict(), rng=_rng_state(generator),
                        **({"scaler": scaler.state_dict()} if policy.scaler else {}))
        for name, rows in (("history.csv", history), ("timing.csv", timing)):
            with atomic_write(out / name, "w") as f:
                pd.DataFrame(rows).to_csv(f, index=False)

    model.train()
    t_steps, n_timed = 0.0, 0                 # this process's steps since the last row
    while step < steps:
        t0 = time.perf_counter()
        if order is None or (position + 1) * batch_size > len(order):   # drop_last, as train_epoch
            order, position = balanced_epoch(train_y, generator), 0
        ids = np.sort(order[position * batch_size:(position + 1) * batch_size])
        draw = draw_augment(len(ids), p, generator, augment) if augment else None
        hu = torch.as_tensor(train_x[ids], device=dev)
        x = apply_augment(hu, p, draw) if augment else to_network_input(hu, p)
        if policy.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        loss = train_step(model, optimizer, x, labels[ids].float(), dtype=policy.dtype,
                          scaler=scaler if policy.scaler else None)
        finite_loss(loss, batch=step, ids=ids, patches=train_x)
        losses.append(loss)
        step, position = step + 1, position + 1
        t_steps, n_timed = t_steps + time.perf_counter() - t0, n_timed + 1
        if step % every == 0:
            t1 = time.perf_counter()
            val = evaluate(model, val_x, val_y, p, dev)
            model.train()
            history.append({"step": step, "loss": float(np.mean(losses[-every:])),
                            **{f"val_{k}": float(val[k]) for k in ("f1", "accuracy", "auc", "ap")}})
            timing.append({"step": step, "timed_steps": n_timed, "train_seconds": t_steps,
                           "samples_per_s": n_timed * batch_size / t_steps,
                           "eval_seconds": time.perf_counter() - t1})
            t_steps, n_timed = 0.0, 0
            row, t = history[-1], timing[-1]
            log(f"step {step:4d}  loss {row['loss']:.3f}  val AUC {row['val_auc']:.3f}  F1 "
                f"{row['val_f1']:.3f}  {t['samples_per_s']:.2f} samples/s  eval {t['eval_seconds']:.0f} s")
        if step % every == 0 or step == steps:
            save()
    return history


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=DEFAULT_RUN, help="run folder with a patch store (read only)")
    parser.add_argument("--out", required=True, help="probe folder (checkpoint, history.csv)")
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--lr", type=float, default=None, help="default: the preset's")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--augment", default="preset", help="'preset', a name, or 'none'")
    parser.add_argument("--val-samples", type=int, default=None, help="default: the whole split")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    probe(args.run, args.out, args.preset, lr=args.lr, steps=args.steps, batch_size=args.batch,
          every=args.every, seed=args.seed, augment=None if args.augment == "none" else args.augment,
          val_samples=args.val_samples, device=args.device,
          log=lambda line: print(line, flush=True))
    print(f"wall {time.perf_counter() - t0:.0f} s (this call)", flush=True)


if __name__ == "__main__":
    main()
