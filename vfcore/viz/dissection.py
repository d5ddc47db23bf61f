"""Figures for notebooks 03 and 04 (network dissection): histograms with T_k, masks for several
q, exact vs sampled thresholds, c_k over units, collages, the Table-2 gallery and the Table-3
view of one inference.

Slices of a patch (axes I, P, L) are shown without transposing, as the explorer does: a
sagittal slice has the head up and anterior on the left. Every function returns its figure.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from vfcore.dissect import VIEWS

#: CT display window (HU): a bone window, as the explorer.
WINDOW = (-250.0, 1250.0)
OVERLAY_CMAP = "autumn"
CONTOUR_COLOUR = "yellow"


def take(volume: np.ndarray, view: str, index: int) -> np.ndarray:
    """The 2-D slice ``index`` of a (I, P, L) volume in ``view``."""
    return np.take(volume, int(index), axis=VIEWS[view])


def draw_overlay(ax, ct2d: np.ndarray, act2d: np.ndarray | None = None, T: float | None = None,
                 mode: str = "overlay", title: str | None = None, fontsize: int = 7,
                 mask2d: np.ndarray | None = None) -> None:
    """A CT slice with a unit's thresholded activation: filled (``overlay``: colour = A_k
    inside the mask) and/or outlined (``contour``, ``both``). The mask is ``mask2d`` (the
    upsampled M_k, :func:`vfcore.dissect.patch_mask`) or else ``act2d > T``. An empty mask
    draws no colour."""
    ax.imshow(ct2d, cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], interpolation="bilinear")
    if act2d is not None and T is not None:
        mask = act2d > T if mask2d is None else np.asarray(mask2d, dtype=bool)
        if mask.any():
            if mode in ("overlay", "both"):
                lo, hi = float(act2d[mask].min()), float(act2d[mask].max())
                shown = np.ma.masked_where(~mask, act2d)
                ax.imshow(shown, cmap=OVERLAY_CMAP, alpha=0.55, vmin=min(lo, float(T)),
                          vmax=hi if hi > min(lo, T) else min(lo, T) + 1e-6, interpolation="nearest")
            if mode in ("contour", "both"):
                ax.contour(mask.astype(np.float32), levels=[0.5], colors=[CONTOUR_COLOUR], linewidths=0.7)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=fontsize)


# --------------------------------------------------------------------------------------------
# Notebook 03: thresholds
# --------------------------------------------------------------------------------------------

def unit_histograms(values: np.ndarray, units: Sequence[int], T: Sequence[float], q_tail: float,
                    bins: int = 80):
    """One histogram per unit of all its activations (``values`` [U, n], log counts) with T_k
    marked and the tail above it shaded; the title gives P(a_k > T_k) as realised."""
    U = len(units)
    fig, axes = plt.subplots(1, U, figsize=(3.2 * U, 2.8), squeeze=False)
    for ax, v, k, t in zip(axes[0], values, units, T):
        v = np.asarray(v, dtype=np.float64).ravel()
        hi = v.max() if v.max() > v.min() else v.min() + 1.0
        ax.hist(v, bins=np.linspace(v.min(), hi, bins), color="0.55", log=True)
        ax.axvspan(t, hi, color="tab:red", alpha=0.15, lw=0)
        ax.axvline(t, color="tab:red", lw=1.2)
        ax.set_title(f"unit {k}: T_k = {t:.3g}\nP(a > T_k) = {(v > t).mean():.4f} (q = {q_tail})",
                     fontsize=8)
        ax.set_xlabel("activation", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0, 0].set_ylabel("positions (log)", fontsize=8)
    fig.tight_layout()
    return fig


def masks_for_q(ct: np.ndarray, feature_map: np.ndarray, thresholds: Mapping[float, float],
                field: Sequence[slice], view: str = "sagittal", title: str = ""):
    """What q does to the mask: one slice of one sample; the unit's activation (feature grid
    ``feature_map`` [d, h, w]) thresholded at T_k(q) for several q (smaller q: higher T_k,
    smaller mask), each mask upsampled onto the patch (:func:`vfcore.dissect.patch_mask`)."""
    from vfcore.dissect import best_slice, patch_mask, upsample_to_patch

    qs = sorted(thresholds, reverse=True)
    up = upsample_to_patch(feature_map, field, ct.shape)
    masks = {q: patch_mask(feature_map > thresholds[q], field, ct.shape) for q in qs}
    index = best_slice(up, thresholds[min(qs)], view, masks[min(qs)])
    fig, axes = plt.subplots(1, len(qs) + 1, figsize=(2.4 * (len(qs) + 1), 2.9))
    draw_overlay(axes[0], take(ct, view, index), title=f"{title}\n{view} slice {index}")
    for ax, q in zip(axes[1:], qs):
        T = thresholds[q]
        n_feat = int((feature_map > T).sum())
        draw_overlay(ax, take(ct, view, index), take(up, view, index), T, "both",
                     title=f"q = {q}: T_k = {T:.3g}\nM_k: {n_feat} of {feature_map.size} positions",
                     mask2d=take(masks[q], view, index))
    fig.tight_layout()
    return fig


def exact_vs_sampled(q_tail: float, realised: Mapping[str, np.ndarray]):
    """Relative error of the realised tail P(a_k > T_k) / q - 1 per unit, for exact thresholds
    and for estimates (``realised``: method name -> [K] realised tails)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    names = list(realised)
    errors = {n: (np.asarray(realised[n]) / q_tail - 1.0) * 100 for n in names}
    lim = max(1.0, max(float(np.nanmax(np.abs(e))) for e in errors.values()))
    for n in names:
        axes[0].hist(errors[n], bins=np.linspace(-lim, lim, 41), alpha=0.55, label=n)
    axes[0].set_xlabel("realised tail vs q (%)")
    axes[0].set_ylabel("units")
    axes[0].legend(fontsize=7)
    for i, n in enumerate(names):
        e = np.abs(errors[n])
        axes[1].boxplot(e[np.isfinite(e)], positions=[i], widths=0.6)
    axes[1].set_xticks(range(len(names)))
    axes[1].set_xticklabels(names, fontsize=7, rotation=10)
    axes[1].set_ylabel("|relative error| (%)")
    fig.suptitle(f"How close is P(a_k > T_k) to q = {q_tail}? (one value per unit)", fontsize=9)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# Notebook 04: rankings, collages, gallery, one inference
# --------------------------------------------------------------------------------------------

def correlation_curve(ranking: pd.DataFrame, top: int = 10):
    """c_k over all units, sorted (the ranking's ``c_k``), with the ground-truth-positive
    variant (the published code's) in the same order; the top units highlighted."""
    fig, ax = plt.subplots(figsize=(8, 3))
    x = np.arange(1, len(ranking) + 1)
    ax.plot(x, ranking["c_k"], color="tab:blue", lw=1.5, label="c_k over true-positive predictions (paper)")
    if "c_positive" in ranking:
        ax.plot(x, ranking["c_positive"], ".", ms=2.5, color="tab:orange",
                label="c_k over ground-truth positives (published code)")
    if "c_fp" in ranking and ranking["c_fp"].notna().any():
        ax.plot(x, ranking["c_fp"], ".", ms=2.5, color="tab:red", alpha=0.6, label="c_k over false positives")
    ax.axvspan(0.5, top + 0.5, color="tab:green", alpha=0.12, lw=0, label=f"top {top}")
    ax.set_xlabel("unit rank")
    ax.set_ylabel("c_k")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig


def collage(tiles: Sequence[tuple], T: float, title: str = "", cols: int = 5, mode: str = "both"):
    """A 5x5 collage of single slices: ``tiles`` = (CT slice, activation slice, caption[, mask
    slice]), each the slice where this unit's thresholded activation is largest. Empty cells
    stay blank."""
    rows = max(1, int(np.ceil(max(len(tiles), 1) / cols)))
    rows = max(rows, 5) if cols == 5 else rows
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.7 * rows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, tile in zip(axes.ravel(), tiles):
        ct2d, a2d, caption = tile[:3]
        ax.axis("on")
        draw_overlay(ax, ct2d, a2d, T, mode, title=caption, fontsize=5.5,
                     mask2d=tile[3] if len(tile) > 3 else None)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def gallery(rows: Sequence[Mapping], images: Mapping[int, np.ndarray]):
    """Table 2 of the paper as a figure: rank, unit, c_k, the collage, the measured concept (when
    a concept mask exists) and an empty "clinical explanation" column for the student."""
    n = len(rows)
    fig = plt.figure(figsize=(12, 2.3 * n + 0.5))
    grid = fig.add_gridspec(n + 1, 4, width_ratios=[1.1, 2.2, 2.2, 2.6], height_ratios=[0.25] + [1] * n)
    for j, head in enumerate(["rank / unit / c_k", "activations (collage)", "measured concept",
                              "clinical explanation"]):
        ax = fig.add_subplot(grid[0, j])
        ax.axis("off")
        ax.text(0.0, 0.3, head, fontsize=10, weight="bold")
    for i, row in enumerate(rows, start=1):
        ax = fig.add_subplot(grid[i, 0])
        ax.axis("off")
        ax.text(0.0, 0.5, f"rank {row['rank']}\nunit {row['unit']}\nc_k = {row['c_k']:.2f}", fontsize=9,
                va="center")
        ax = fig.add_subplot(grid[i, 1])
        ax.axis("off")
        if row["unit"] in images:
            ax.imshow(images[row["unit"]])
        ax = fig.add_subplot(grid[i, 2])
        ax.axis("off")
        ax.text(0.0, 0.5, row.get("measured_concept") or "-", fontsize=8, va="center", wrap=True)
        ax = fig.add_subplot(grid[i, 3])
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.03, 0.5, row.get("clinical_explanation") or "", fontsize=8, va="center", wrap=True)
    fig.tight_layout()
    return fig


def relevance_row(ct: np.ndarray, feature_maps: Mapping[int, np.ndarray], T: Mapping[int, float],
                  units: Sequence[int], c_rank: Mapping[int, int], r: Mapping[int, float],
                  field: Sequence[slice], title: str = "", view: str = "sagittal"):
    """Table 3 of the paper: the sample (left) and, for its most relevant units (descending
    r_k), the slice where each unit's thresholded activation is largest, with its c_k rank.
    ``feature_maps[k]``: unit k's activation on the feature grid for this sample."""
    from vfcore.dissect import best_slice, patch_mask, upsample_to_patch

    n = len(units)
    fig, axes = plt.subplots(1, n + 1, figsize=(1.9 * (n + 1), 2.8), squeeze=False)
    mid = ct.shape[VIEWS[view]] // 2
    draw_overlay(axes[0, 0], take(ct, view, mid), title=title or "sample")
    for j, (ax, k) in enumerate(zip(axes[0, 1:], units), start=1):
        up = upsample_to_patch(feature_maps[k], field, ct.shape)
        mask = patch_mask(feature_maps[k] > T[k], field, ct.shape)
        s = best_slice(up, T[k], view, mask)
        draw_overlay(ax, take(ct, view, s), take(up, view, s), T[k], "both",
                     title=f"relevance {j}\nunit {k} (c_k rank {c_rank[k]})\nr_k = {r[k]:.3g}",
                     mask2d=take(mask, view, s))
    fig.tight_layout()
    return fig
