"""Figures of notebook 02: augmentation gallery, training curves, confusion matrix, ROC and PR."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.ticker import MaxNLocator

from ..constants import NETWORK_WINDOW_HU
from ..data import Augment, augment_batch, to_network_input
from .slices import hu_colorbar
from .units import orientation_letters


def augmentation_gallery(hu: np.ndarray, preset: str, n: int = 10, seed: int = 0,
                         aug: Augment = Augment()):
    """One patch as the network sees it (first column) and under ``n`` augmentations:
    mid-sagittal (top row, rows I / columns P) and mid-coronal (bottom row, columns L);
    orientation letters on the first column, the grey scale in HU beside the grid."""
    batch = torch.from_numpy(np.repeat(np.asarray(hu)[None], n, axis=0))
    views = [to_network_input(hu, preset)[0, 0]] + list(
        augment_batch(batch, preset, torch.Generator().manual_seed(seed), aug)[:, 0])
    fig, axes = plt.subplots(2, n + 1, figsize=(min(1.5, 10.0 / (n + 1)) * (n + 1) + 1.0, 2.7),
                             squeeze=False, layout="constrained")
    shown = (0.2, 0.9)   # of the network's [0, 1] scale
    for j, v in enumerate(views):
        v = v.detach().cpu().numpy()
        mid = v.shape[0] // 2
        axes[0, j].imshow(v[:, :, mid], cmap="gray", vmin=shown[0], vmax=shown[1])
        axes[1, j].imshow(v[:, mid, :], cmap="gray", vmin=shown[0], vmax=shown[1])
        axes[0, j].set_title("input" if j == 0 else f"aug {j}", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    orientation_letters(axes[0, 0], "sagittal", fontsize=8)
    orientation_letters(axes[1, 0], "coronal", fontsize=8)
    lo, hi = NETWORK_WINDOW_HU
    hu_colorbar(axes, tuple(lo + (hi - lo) * t for t in shown))
    fig.suptitle("network input without and with augmentation (top: sagittal, bottom: coronal)", fontsize=9)
    return fig


def training_curves(history: pd.DataFrame, ax=None):
    """Training loss (left axis) and validation F1 / AUC (right axis) per epoch; the epoch of
    the best checkpoint (highest validation F1, ties broken by AUC, then the earliest: as
    training chooses the best checkpoint) as a dotted line. Epochs are numbered from 1 on the x
    axis and in the legend (``history["epoch"]`` counts from 0), as the notebooks' text counts
    them. The legend sits right of the axes, off the curves. Returns the left axis
    (``ax.figure.axes[1]`` is the right one)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 3.4), layout="constrained")
    epoch = history["epoch"] + 1   # numbered from 1, as the text counts epochs
    ax.plot(epoch, history["loss"], label="training loss (BCE)", color="tab:gray")
    ax.set_xlabel("epoch", fontsize=9)
    ax.set_ylabel("training loss (BCE)", fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    right = ax.twinx()
    right.plot(epoch, history["val_f1"], label="validation F1", color="tab:red")
    right.plot(epoch, history["val_auc"], label="validation AUC", color="tab:blue")
    right.set_ylabel("validation F1 / AUC", fontsize=9)
    # the epoch of the best checkpoint: highest validation F1, ties broken by AUC, then the earliest
    key = history.assign(val_auc=history["val_auc"].fillna(0.0))
    best = int(key.sort_values(["val_f1", "val_auc"], ascending=False, kind="stable")["epoch"].iloc[0]) + 1
    right.axvline(best, color="k", ls=":", lw=1.2, label=f"best checkpoint (epoch {best})")
    right.set_ylim(0, 1.02)
    for a in (ax, right):
        a.tick_params(labelsize=8)
    lines = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(lines, [ln.get_label() for ln in lines], loc="upper left", bbox_to_anchor=(1.1, 1.0),
              borderaxespad=0.0, fontsize=8)
    return ax


def _roc(y, p):
    order = np.argsort(-p, kind="mergesort")
    y = y[order].astype(bool)
    tpr = np.r_[0, np.cumsum(y)] / max(y.sum(), 1)
    fpr = np.r_[0, np.cumsum(~y)] / max((~y).sum(), 1)
    return fpr, tpr


def evaluation_figure(labels, probability, threshold: float = 0.5):
    """Confusion matrix at ``threshold``, ROC curve and precision-recall curve on one figure."""
    y, p = np.asarray(labels).astype(bool), np.asarray(probability, dtype=float)
    pred = p >= threshold
    cm = np.array([[(~pred & ~y).sum(), (pred & ~y).sum()], [(~pred & y).sum(), (pred & y).sum()]])
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    axes[0].imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        axes[0].text(j, i, str(v), ha="center", va="center", fontsize=12)
    axes[0].set_xticks([0, 1], ["healthy", "fractured"])
    axes[0].set_yticks([0, 1], ["healthy", "fractured"])
    axes[0].set_xlabel("predicted")
    axes[0].set_ylabel("true")
    axes[0].set_title(f"confusion matrix (p >= {threshold})")
    fpr, tpr = _roc(y, p)
    axes[1].plot(fpr, tpr)
    axes[1].plot([0, 1], [0, 1], ls=":", color="gray")
    axes[1].set_xlabel("false positive rate")
    axes[1].set_ylabel("true positive rate")
    axes[1].set_title("ROC")
    order = np.argsort(-p, kind="mergesort")
    tp = np.cumsum(y[order])
    axes[2].step(tp / max(y.sum(), 1), tp / np.arange(1, len(p) + 1), where="post")
    axes[2].axhline(y.mean(), ls=":", color="gray", label="prevalence")
    axes[2].set_xlabel("recall")
    axes[2].set_ylabel("precision")
    axes[2].set_ylim(0, 1.02)
    axes[2].set_title("precision-recall")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    return fig
