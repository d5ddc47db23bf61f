"""Figures for notebooks 03 and 04 (network dissection): histograms with T_k, masks for several
q, exact vs sampled thresholds, c_k over units, collages, the Table-2 gallery and the Table-3
view of one inference.

Slices of a patch (axes I, P, L) are shown without transposing, as the explorer does: a
sagittal slice has the head up and anterior on the left (orientation letters on the slices; a
grey HU colourbar beside a plain CT slice, the red-to-yellow A_k colourbar beside a unit's map).
Figures stay at most about 11 inches wide with text of at least 8 pt, so they are readable at
the size a notebook shows them. Every function returns its figure.
"""
from __future__ import annotations

import textwrap
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from vfcore.dissect import VIEWS, M_k, best_slice, patch_mask, upsample_to_patch

from vfcore.constants import DISPLAY_WINDOW_HU

from .slices import hu_colorbar
from .units import OVERLAY_TARGET_COLOUR, colour_range, draw_unit, orientation_letters, take_slice, unit_colorbar

#: The smallest font of the notebook-03 panels (pt).
FONT = 8


def draw_overlay(ax, ct2d: np.ndarray, act2d: np.ndarray | None = None, T: float | None = None,
                 mode: str = "overlay", title: str | None = None, fontsize: int = 7,
                 mask2d: np.ndarray | None = None, view: str | None = None,
                 colorbar: bool = False, low: float | None = None, high: float | None = None) -> None:
    """A CT slice with a unit's thresholded activation, drawn by the one unit renderer
    (:func:`vfcore.viz.units.draw_unit`): filled (``overlay``: red to yellow by A_k inside the
    mask), outlined (``contour``) or both. The mask is ``mask2d`` (the upsampled M_k,
    :func:`vfcore.dissect.patch_mask`) or else M_k of ``act2d`` at ``T``. ``view``: orientation
    letters; ``colorbar``: the colour scale; ``low`` / ``high``: its ends (default: the range
    of ``act2d`` inside the mask, :func:`vfcore.viz.units.colour_range`)."""
    mask = None
    if act2d is not None and T is not None:
        mask = M_k(np.asarray(act2d)[None], [T])[0] if mask2d is None else np.asarray(mask2d, dtype=bool)
    lo, hi = colour_range(act2d, mask)
    low = lo if low is None else low
    high = hi if high is None else high
    draw_unit(ax, ct2d, mask, act2d, low, high, mode, view=view, title=title, fontsize=fontsize,
              colorbar=colorbar)


# --------------------------------------------------------------------------------------------
# Notebook 03: thresholds
# --------------------------------------------------------------------------------------------

def threshold_overview(d, q_tail: float):
    """Left, per unit: T_k and the largest activation over the split (sorted by T_k, log
    scale): how far apart the units' scales are decides whether one global threshold could
    serve every unit (notebook 03 prints the spread). Right: the realised tail P(a_k > T_k) of every unit, sorted, against the
    target q (ties at T_k fall short of q, degenerate units reach 0)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), layout="constrained")
    order = np.argsort(-d.T.astype(np.float64), kind="stable")
    x = np.arange(1, d.n_units + 1)
    pos = lambda v: np.where(v > 0, v, np.nan)  # noqa: E731 (log axes: hide zeros)
    axes[0].plot(x, pos(d.unit_max[order]), ".", ms=3, color="0.5", label="max over the split")
    axes[0].plot(x, pos(d.T[order].astype(np.float64)), "-", color="tab:red", label="T_k")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("units, sorted by T_k", fontsize=9)
    axes[0].set_ylabel("activation", fontsize=9)
    axes[0].set_title(f"T_k and the maximum per unit (K = {d.n_units})", fontsize=9)
    axes[0].legend(fontsize=FONT, loc="lower left")
    tail = np.asarray(d.realised_tail, dtype=np.float64)
    by_tail = np.argsort(-tail, kind="stable")
    dead = np.asarray(d.flags["degenerate"], dtype=bool)[by_tail]
    axes[1].plot(x, tail[by_tail], "-", color="tab:blue", lw=1.5, label="realised, one unit per x")
    if dead.any():
        axes[1].plot(x[dead], tail[by_tail][dead], "o", ms=3, color="tab:gray",
                     label=f"degenerate units ({int(dead.sum())})")
    axes[1].axhline(q_tail, color="tab:red", ls="--", lw=1, label=f"target q = {q_tail}")
    axes[1].set_ylim(0, 1.25 * max(q_tail, float(np.nanmax(tail)) if tail.size else q_tail))
    axes[1].set_xlabel("units, sorted by their realised tail", fontsize=9)
    axes[1].set_ylabel("P(a_k > T_k) realised", fontsize=9)
    axes[1].set_title("the fraction of positions above T_k", fontsize=9)
    axes[1].legend(fontsize=FONT, loc="lower left")
    for ax in axes:
        ax.tick_params(labelsize=FONT)
    return fig


def unit_histograms(values: np.ndarray, units: Sequence[int], T: Sequence[float], q_tail: float,
                    bins: int = 80):
    """One histogram per unit of all its activations (``values`` [U, n], log counts) with T_k
    marked and the tail above it shaded; the title gives P(a_k > T_k) as realised."""
    U = len(units)
    cols = min(U, 4)
    rows = int(np.ceil(U / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.75 * cols, 2.9 * rows), squeeze=False,
                             layout="constrained")
    for ax in axes.ravel()[U:]:
        ax.set_axis_off()
    for ax, v, k, t in zip(axes.ravel(), values, units, T):
        v = np.asarray(v, dtype=np.float64).ravel()
        hi = v.max() if v.max() > v.min() else v.min() + 1.0
        ax.hist(v, bins=np.linspace(v.min(), hi, bins), color="0.55", log=True)
        ax.axvspan(t, hi, color="tab:red", alpha=0.15, lw=0)
        ax.axvline(t, color="tab:red", lw=1.2)
        ax.set_title(f"unit {k}: T_k = {t:.3g}\nP(a > T_k) = {(v > t).mean():.4f} (q = {q_tail})",
                     fontsize=FONT)
        ax.set_xlabel("activation", fontsize=FONT)
        ax.tick_params(labelsize=FONT)
    for row in axes:
        row[0].set_ylabel("positions (log)", fontsize=FONT)
    return fig


def masks_for_q(ct: np.ndarray, feature_map: np.ndarray, thresholds: Mapping[float, float],
                field: Sequence[slice], view: str = "sagittal", title: str = "", target: np.ndarray | None = None):
    """What q does to the mask: one slice of one sample; the unit's activation (feature grid
    ``feature_map`` [d, h, w]) thresholded at T_k(q) for several q (smaller q: higher T_k,
    smaller mask), each mask upsampled onto the patch (:func:`vfcore.dissect.patch_mask`).
    The CT alone (left, HU colourbar), then one panel per q on one shared A_k colour scale
    (its colourbar right of the last panel); orientation letters on every panel; ``target``
    (bool, the patch's shape): the target vertebra, outlined in lime on every panel."""
    qs = sorted(thresholds, reverse=True)
    up = upsample_to_patch(feature_map, field, ct.shape)
    masks = {q: patch_mask(M_k(feature_map[None], [thresholds[q]])[0], field, ct.shape) for q in qs}
    index = best_slice(up, thresholds[min(qs)], view, masks[min(qs)])
    ct2d, up2d = take_slice(ct, view, index), take_slice(up, view, index)
    # one colour scale for every q: the range of A_k inside the largest mask (largest q)
    low, high = colour_range(up2d, take_slice(masks[max(qs)], view, index))
    fig, axes = plt.subplots(1, len(qs) + 1, figsize=(2.15 * (len(qs) + 1) + 0.9, 3.0),
                             layout="constrained")
    draw_overlay(axes[0], ct2d, title=f"CT, {view} slice {index}", fontsize=9)
    hu_colorbar(axes[0], DISPLAY_WINDOW_HU, fontsize=FONT)
    for ax, q in zip(axes[1:], qs):
        T = thresholds[q]
        n_feat = int(M_k(feature_map[None], [T]).sum())
        draw_overlay(ax, ct2d, up2d, T, "both", fontsize=9, mask2d=take_slice(masks[q], view, index),
                     title=f"q = {q}: T_k = {T:.3g}\nM_k: {n_feat} of {feature_map.size} positions",
                     low=low, high=high)
    for ax in axes:
        orientation_letters(ax, view, fontsize=FONT)
        if target is not None:
            ax.contour(take_slice(np.asarray(target, dtype=float), view, index), [0.5], colors=OVERLAY_TARGET_COLOUR,
                       linewidths=0.7)
    if high > low:
        unit_colorbar(axes[-1], low, high, label="A_k (upsampled)", fontsize=FONT + 1)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def exact_vs_sampled(q_tail: float, realised: Mapping[str, np.ndarray]):
    """How close the realised tail P(a_k > T_k) comes to q for exact thresholds and for
    estimates (``realised``: method name -> [K] realised tails). Left: each method's tails,
    sorted, one line per method (a flat line at q is a perfect threshold); right: how many
    units miss q by how much (relative error P / q - 1 in %, outlined histograms so the
    methods do not hide each other). The legend sits below the panels."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    names = list(realised)
    tails = {n: np.asarray(realised[n], dtype=np.float64) for n in names}
    errors = {n: (t / q_tail - 1.0) * 100 for n, t in tails.items()}
    lim = max(1.0, max(float(np.nanmax(np.abs(e))) if e.size else 0.0 for e in errors.values()))
    bins = np.linspace(-lim, lim, 31)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ("-", "--", ":", "-.")   # methods that agree stay visible one on top of the other
    for i, n in enumerate(names):
        t = np.sort(tails[n][np.isfinite(tails[n])])[::-1]
        style = dict(color=colours[i % len(colours)], ls=styles[i % len(styles)], lw=2.2 - 0.4 * (i % 3))
        axes[0].plot(np.linspace(0, 1, len(t)) if len(t) > 1 else [0.5] * len(t), t,
                     label=f"{n} (n = {len(t)} units)", **style)
        axes[1].hist(errors[n][np.isfinite(errors[n])], bins=bins, histtype="step", **style)
    axes[0].axhline(q_tail, color="k", ls=(0, (1, 1)), lw=1, label=f"target q = {q_tail}")
    axes[1].axvline(0.0, color="k", ls=(0, (1, 1)), lw=1)
    low = min([q_tail] + [float(np.nanmin(t)) for t in tails.values() if t.size])
    axes[0].set_ylim(bottom=min(0.0, low) if low <= 0.5 * q_tail else 0.9 * low)
    axes[0].set_xlabel("units, sorted by their realised tail (fraction)", fontsize=9)
    axes[0].set_ylabel("P(a_k > T_k) realised", fontsize=9)
    axes[0].set_title("realised tail per unit", fontsize=9)
    axes[1].set_xlabel("P(a_k > T_k) / q - 1 (%)", fontsize=9)
    axes[1].set_ylabel("units", fontsize=9)
    axes[1].set_title("relative error of the realised tail", fontsize=9)
    for ax in axes:
        ax.tick_params(labelsize=FONT)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center",
               ncol=min(len(names) + 1, 2), fontsize=FONT)
    fig.suptitle(f"How close is P(a_k > T_k) to q = {q_tail}? (one value per unit)", fontsize=10)
    return fig


# --------------------------------------------------------------------------------------------
# Notebook 04: rankings, collages, gallery, one inference
# --------------------------------------------------------------------------------------------

def correlation_curve(ranking: pd.DataFrame, top: int = 10):
    """c_k over all units, sorted (the ranking's ``c_k``), with the ground-truth-positive
    variant (the published code's) in the same order; the top units highlighted."""
    fig, ax = plt.subplots(figsize=(8, 3.6), layout="constrained")
    x = np.arange(1, len(ranking) + 1)
    ax.plot(x, ranking["c_k"], color="tab:blue", lw=1.5, label="c_k over true-positive predictions (paper)")
    if "c_positive" in ranking:
        ax.plot(x, ranking["c_positive"], ".", ms=2.5, color="tab:orange",
                label="c_k over ground-truth positives (published code)")
    if "c_fp" in ranking and ranking["c_fp"].notna().any():
        ax.plot(x, ranking["c_fp"], ".", ms=2.5, color="tab:red", alpha=0.6, label="c_k over false positives")
    ax.axvspan(0.5, top + 0.5, color="tab:green", alpha=0.12, lw=0, label=f"top {top}")
    ax.set_xlabel("unit rank", fontsize=9)
    ax.set_ylabel("c_k", fontsize=9)
    ax.set_ylim(-0.02, 1.02)
    ax.tick_params(labelsize=FONT)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize=FONT)
    return fig


def collage_grid(n: int, cols: int = 5, rows: int | None = None) -> tuple[int, int]:
    """(rows, cols) of a collage of ``n`` tiles: at most ``cols`` columns, as many rows as the
    tiles fill (7 exemplars: 2 x 5, not the paper's 5 x 5 with 18 empty cells)."""
    if rows is not None:
        return rows, max(1, min(cols, int(np.ceil(n / rows)) if n else 1))
    cols = max(1, min(cols, n))
    return max(1, int(np.ceil(n / cols))), cols


def collage(tiles: Sequence[tuple], T: float, title: str = "", cols: int = 5, rows: int | None = None,
            mode: str = "both", tile_size: float = 2.0, view: str = "sagittal", fontsize: float = 8):
    """A grid of single slices, sized to the tiles (at most ``cols`` per row; ``rows`` fixes the
    number of rows): ``tiles`` = (CT slice, activation slice, caption[, mask slice]), each the
    slice of ``view`` where this unit's thresholded activation is largest, drawn by the unit
    renderer (orientation letters on the first tile)."""
    n_rows, n_cols = collage_grid(len(tiles), cols, rows)
    head = 0.45 * len(textwrap.wrap(title, max(30, int(14 * tile_size * n_cols)))) if title else 0.0
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(tile_size * n_cols, (tile_size + 0.4) * n_rows + head),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for j, (ax, tile) in enumerate(zip(axes.ravel(), tiles)):
        ct2d, a2d, caption = tile[:3]
        ax.axis("on")
        draw_overlay(ax, ct2d, a2d, T, mode, title=caption, fontsize=fontsize,
                     mask2d=tile[3] if len(tile) > 3 else None, view=view if j == 0 else None)
    if not tiles:
        axes[0, 0].text(0.5, 0.5, "no exemplars", ha="center", va="center", fontsize=fontsize)
    if title:
        fig.suptitle(textwrap.fill(title, max(30, int(14 * tile_size * n_cols))), fontsize=fontsize + 1)
    fig.tight_layout()
    return fig


def gallery(rows: Sequence[Mapping], images: Mapping[int, np.ndarray]):
    """Table 2 of the paper as a figure, one row per unit: rank, unit and c_k; its strongest
    exemplars (``images[unit]``: the strip PNG of :func:`vfcore.export.export_units`); the
    measured concept (phantom); and the "clinical explanation" column, empty until filled."""
    n = len(rows)
    fig = plt.figure(figsize=(11, 1.6 * n + 0.5))
    grid = fig.add_gridspec(n + 1, 4, width_ratios=[0.9, 4.6, 2.7, 1.6], height_ratios=[0.22] + [1] * n,
                            wspace=0.05, hspace=0.12)
    heads = ["unit", "strongest exemplars, each at its best slice", "mask share (phantom)",
             "clinical explanation"]
    for j, head in enumerate(heads):
        ax = fig.add_subplot(grid[0, j])
        ax.axis("off")
        ax.text(0.0, 0.2, head, fontsize=9.5, weight="bold")
    for i, row in enumerate(rows, start=1):
        ax = fig.add_subplot(grid[i, 0])
        ax.axis("off")
        ax.text(0.0, 0.5, f"rank {row['rank']}\nunit {row['unit']}\nc_k = {row['c_k']:.2f}", fontsize=10,
                va="center")
        ax = fig.add_subplot(grid[i, 1])
        ax.axis("off")
        if row["unit"] in images:
            ax.imshow(images[row["unit"]])
        ax = fig.add_subplot(grid[i, 2])
        ax.axis("off")
        concept = (row.get("measured_concept") or "-").replace(", ", "\n")
        ax.text(0.02, 0.5, concept, fontsize=9, va="center")
        ax = fig.add_subplot(grid[i, 3])
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.04, 0.5, textwrap.fill(row.get("clinical_explanation") or "", 34), fontsize=8, va="center")
    return fig


def relevance_row(ct: np.ndarray, feature_maps: Mapping[int, np.ndarray], T: Mapping[int, float],
                  units: Sequence[int], c_rank: Mapping[int, int], r: Mapping[int, float],
                  field: Sequence[slice], title: str = "", view: str = "sagittal", cols: int = 4,
                  target: np.ndarray | None = None):
    """Table 3 of the paper: the sample (first tile) and, for its most relevant units (descending
    r_k), the slice where each unit's thresholded activation is largest, with its c_k rank.
    ``feature_maps[k]``: unit k's activation on the feature grid for this sample. At most
    ``cols`` tiles a row (2.4 inches each), so 9-pt captions stay readable at notebook width;
    ``target`` (bool, the patch's shape): the target vertebra, outlined in lime on every tile.
    One colour scale for all units (their activation inside M_k, from the smallest T_k shown to
    the largest activation shown), so colours compare across tiles as r_k does; each tile names
    its slice."""
    n = len(units)
    n_rows, n_cols = collage_grid(n + 1, cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.4 * n_cols + 1.2, 3.1 * n_rows), squeeze=False,
                             layout="constrained")
    for ax in axes.ravel():
        ax.axis("off")
    flat = axes.ravel()
    mid = ct.shape[VIEWS[view]] // 2
    flat[0].axis("on")
    draw_overlay(flat[0], take_slice(ct, view, mid), title=f"{title or 'sample'}\n{view} slice {mid}", view=view,
                 fontsize=9)
    tiles = []
    for k in units:
        up = upsample_to_patch(feature_maps[k], field, ct.shape)
        mask = patch_mask(M_k(feature_maps[k][None], [T[k]])[0], field, ct.shape)
        tiles.append((k, up, mask, best_slice(up, T[k], view, mask)))
    inside = [up[mask] for _, up, mask, _ in tiles if mask.any()]
    low = min((float(T[k]) for k, *_ in tiles), default=0.0)
    high = max((float(v.max()) for v in inside), default=low)
    for j, (ax, (k, up, mask, s)) in enumerate(zip(flat[1:], tiles), start=1):
        ax.axis("on")
        draw_overlay(ax, take_slice(ct, view, s), take_slice(up, view, s), T[k], "both",
                     title=f"relevance {j}: unit {k}\nc_k rank {c_rank[k]}, r_k = {r[k]:.3g}\n{view} slice {s}",
                     mask2d=take_slice(mask, view, s), view=view if j == 1 else None, fontsize=9,
                     low=low, high=high)
        if target is not None:
            ax.contour(take_slice(np.asarray(target, dtype=float), view, s), [0.5], colors=OVERLAY_TARGET_COLOUR,
                       linewidths=0.7)
    if target is not None:
        flat[0].contour(take_slice(np.asarray(target, dtype=float), view, mid), [0.5], colors=OVERLAY_TARGET_COLOUR,
                        linewidths=0.7)
    if tiles:
        unit_colorbar(list(axes.ravel()), low, high, label="A_k inside M_k (all units)", fontsize=9)
    hu_colorbar(list(axes.ravel()), DISPLAY_WINDOW_HU)
    return fig


def concept_heatmap(unit_concepts: pd.DataFrame, units: Sequence[int], role: str = "tp", top: int = 8):
    """Which ground-truth concepts (phantom) the masks of the top units cover: mean fraction
    of a unit's mask in each concept, for the ``top`` most covered concepts."""
    t = unit_concepts[unit_concepts["role"] == role]
    table = t.pivot_table(index="unit", columns="concept", values="fraction", fill_value=0.0)
    table = table.reindex([u for u in units if u in table.index])
    cols = table.mean(axis=0).sort_values(ascending=False).index[:top]
    table = table[cols]
    fig, ax = plt.subplots(figsize=(1.0 * len(cols) + 2.5, 0.42 * len(table) + 1.6))
    im = ax.imshow(table.to_numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(table)))
    ax.set_yticklabels([f"unit {u}" for u in table.index], fontsize=8)
    for (i, j), v in np.ndenumerate(table.to_numpy()):
        if v >= 0.05:
            ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
    fig.colorbar(im, ax=ax, label="fraction of the unit's mask")
    fig.tight_layout()
    return fig
