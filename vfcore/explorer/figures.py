"""Static pictures of the explorer (matplotlib, through the one unit renderer), so an executed
notebook shows the explorer where widgets are not live (GitHub, nbviewer, a PDF).

* :func:`snapshot_figure`: what the explorer shows now: the sample's unit at the shown slice
  beside the unit's selected exemplar, with orientation letters and the colour scale;
* :func:`static_figure`: a sample and its most relevant units (top row) and a unit's exemplars
  (bottom row), each at its best slice (the paper's Table 3 with the concepts below it).
"""
from __future__ import annotations

import textwrap

from vfcore.dissect import VIEWS
from vfcore.viz.units import draw_unit, take_slice

from .data import Analysis
from .state import ExplorerState


def _unit_panel(ax, patch, umap, view: str, index: int, mode: str, title: str, colorbar: bool = False,
                fontsize: float = 8) -> None:
    draw_unit(ax, take_slice(patch, view, index), take_slice(umap.mask, view, index),
              take_slice(umap.activation, view, index), umap.low, umap.high, mode, view=view,
              title=title, fontsize=fontsize, colorbar=colorbar)


def snapshot_figure(state: ExplorerState, prediction: str = ""):
    """The explorer's two pictures as a figure: left, the shown sample, unit, view, slice and
    mode; right, the unit's selected exemplar at its best slice (the same unit's general
    concept). ``prediction``: a line of text above them."""
    import matplotlib.pyplot as plt   # heavy: only a static picture loads it, not the widget

    a, k = state.analysis, state.unit
    ex = state.exemplars()
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 5.3), squeeze=False)
    _unit_panel(axes[0, 0], a.patch, a.maps[k], state.view, state.index, state.mode,
                f"{a.name}: unit {k}, {state.view} slice {state.index}", colorbar=state.mode == "overlay",
                fontsize=9)
    if ex:
        pos = min(state.exemplar, len(ex) - 1)
        i, patch, umap = ex[pos]
        s = umap.best_slice(state.view)
        _unit_panel(axes[0, 1], patch, umap, state.view, s, state.mode,
                    f"exemplar {pos + 1} of unit {k}: " + state.exemplar_caption(pos, s).replace("\n", ", "),
                    fontsize=9)
    else:
        axes[0, 1].axis("off")
        axes[0, 1].text(0.5, 0.5, f"unit {k}: no exemplars", ha="center", va="center")
    lines = [*prediction.split("\n"), state.readout()] if prediction else [state.readout()]
    fig.suptitle("\n".join(textwrap.fill(t, 130) for t in lines), fontsize=9)
    fig.tight_layout()
    return fig


def static_figure(state: ExplorerState, a: Analysis, n_units: int = 5, view: str | None = None,
                  unit: int | None = None):
    """Top row: the sample ``a`` and its ``n_units`` most relevant units, each at its best
    slice; bottom row: the exemplars of ``unit`` (default: the shown unit when ``a`` is the
    shown sample, else ``a``'s most relevant unit)."""
    import matplotlib.pyplot as plt   # heavy: only a static picture loads it, not the widget

    data = state.data
    view = view or state.view
    if unit is None:
        unit = state.unit if (a is state.analysis and state.unit is not None) else a.top[0]
    units = a.top[:n_units]
    ex = data.exemplar_maps(unit)
    ncols = max(len(units) + 1, len(ex), 1)
    fig, axes = plt.subplots(2, ncols, figsize=(2.3 * ncols, 6.6), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    mid = a.patch.shape[VIEWS[view]] // 2
    axes[0, 0].axis("on")
    draw_unit(axes[0, 0], take_slice(a.patch, view, mid), view=view, fontsize=8,
              title=f"{a.name}\np(fracture) = {a.probability:.2f}")
    mode = state.mode if state.mode != "off" else "overlay"
    for j, k in enumerate(units, start=1):
        s = a.maps[k].best_slice(view)
        label = data.concepts.get(k)["label"]
        axes[0, j].axis("on")
        _unit_panel(axes[0, j], a.patch, a.maps[k], view, s, mode,
                    f"#{j} unit {k} (c_k rank {data.rank[k]})\n{view} {s}" + (f"\n{label}" if label else ""))
    for j, (i, patch, umap) in enumerate(ex):
        s = umap.best_slice(view)
        row = data.exemplar_pool.table.loc[i]
        truth = "fracture" if int(row.get("fracture", 0) or 0) else "healthy"
        axes[1, j].axis("on")
        _unit_panel(axes[1, j], patch, umap, view, s, "overlay",
                    f"{row['case']} {row['level']}\n{truth}, {view} {s}")
    if not ex:
        axes[1, 0].text(0, 0.5, f"unit {unit}: no exemplars", fontsize=9)
    fig.suptitle(textwrap.fill(
        f"{a.name}, {view} view. Top: the units with the largest r_k (Eq. 2), M_k = A_k > T_k, "
        f"coloured by A_k from red (lowest) to yellow (highest). Bottom: exemplars of unit {unit} "
        f"(among the {data.exemplar_subset(unit)})", 30 * ncols), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.94), h_pad=2.5)
    return fig
