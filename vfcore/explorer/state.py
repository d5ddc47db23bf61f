"""The explorer's state, without widgets: which sample, unit, view, slice and mode are shown.

:class:`ExplorerState` holds what the student chose and the precomputed maps of the shown
sample (an :class:`~vfcore.explorer.data.Analysis`). Each action (``select_sample``,
``load_upload``, ``select_unit``, ``set_view``, ``select_exemplar``) checks its input
(raising :class:`~vfcore.errors.InputError` and leaving the state as it was), updates the
state and returns a :class:`Redraw` saying what changed. The pictures come from
:meth:`ExplorerState.image` (the sample's slice) and :meth:`ExplorerState.exemplar_image`
(an exemplar of the same unit at its best slice, shown beside it), drawn by the one unit
renderer (:func:`vfcore.viz.units.unit_rgb`). The widget view (:mod:`.widgets`) only
forwards the controls to these methods and puts the results on screen, so everything here
is testable with numpy alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vfcore.constants import PATCH_SIZE
from vfcore.dissect import VIEWS
from vfcore.errors import InputError
from vfcore.viz.units import ORIENTATION, take_slice

from .data import SCALE, TOP_UNITS, Analysis, RunData, UnitMap
from .upload import read_upload

#: Overlay modes of the explorer: the mask M_k filled (coloured by the activation), its
#: outline, or none (the renderer also draws "both", used by the collages).
MODES = ("overlay", "contour", "off")


@dataclass(frozen=True)
class Redraw:
    """What an action changed, so a view redraws only that."""

    sample: bool = False     # the prediction line, the unit list, the slider's range
    unit: bool = False       # unit info, concept editor
    exemplars: bool = False  # the exemplar row
    partner: bool = False    # the exemplar shown beside the sample
    image: bool = True       # the sample's picture and the readout


class ExplorerState:
    """Sample, unit, view, slice, mode and exemplar of the explorer over one :class:`RunData`.

    >>> state = ExplorerState(data)
    >>> state.select_sample("sub-verse004 L1")   # -> Redraw(sample=True, unit=True, ...)
    >>> rgb = state.image()                     # [96 * SCALE, 96 * SCALE, 3] uint8
    """

    def __init__(self, data: RunData, top: int = TOP_UNITS):
        self.data = data
        self.top_n = top
        self.analysis: Analysis | None = None
        self.sample_index: int | None = None
        self.unit: int | None = None
        self.view = "sagittal"
        self.index = PATCH_SIZE // 2
        self.mode = "overlay"
        self.keep_slice = False  # keep the slice when the unit changes
        self.exemplar = 0        # position of the exemplar shown beside the sample
        self._side_cache: dict[int, Analysis] = {}

    # ---- actions --------------------------------------------------------------------------
    def select_sample(self, key: int | str) -> Redraw:
        """Show a sample of the split (table index or ``"<case> <level>"``)."""
        index = self.data.find(key)
        analysis = self.data.analyse_sample(index, top=self.top_n)
        self.sample_index = index
        return self._show(analysis)

    def load_upload(self, name: str, content: bytes) -> Redraw:
        """Show an uploaded patch (``.nii``, ``.nii.gz``, ``.npy``; see :func:`read_upload`)."""
        patch = read_upload(name, content, self.data.min_input)
        analysis = self.data.analyse(patch, f"upload {name}", top=self.top_n)
        self.sample_index = None
        return self._show(analysis)

    def select_unit(self, unit: int) -> Redraw:
        """Show one of the sample's top units; jump to its best slice unless ``keep_slice``."""
        self._require_analysis()
        unit = int(unit)
        if unit not in self.analysis.maps:
            raise InputError(None, f"unit {unit} is not among this sample's top {self.top_n} units "
                                     f"{self.analysis.top}")
        self.unit = unit
        self.exemplar = 0
        if not self.keep_slice:
            self.index = self.umap.best_slice(self.view)
        return Redraw(unit=True, exemplars=True, partner=True)

    def set_view(self, view: str | None = None, index: int | None = None, mode: str | None = None) -> Redraw:
        """Change the view axis (jumping to the unit's best slice in it), the slice and/or the
        overlay mode. Everything is checked before anything changes."""
        self._require_analysis()
        if view is not None and view not in VIEWS:
            raise InputError(None, f"unknown view {view!r}; choose one of {list(VIEWS)}")
        if mode is not None and mode not in MODES:
            raise InputError(None, f"unknown mode {mode!r}; choose one of {list(MODES)}")
        new_view = view or self.view
        if index is None and new_view != self.view:
            index = self.umap.best_slice(new_view)
        n = self.analysis.patch.shape[VIEWS[new_view]]
        if index is not None and not 0 <= int(index) < n:
            raise InputError(None, f"slice {index} outside 0..{n - 1} of the {new_view} view")
        changed_view = new_view != self.view
        changed_mode = mode is not None and mode != self.mode
        self.view = new_view
        self.mode = mode or self.mode
        if index is not None:
            self.index = int(index)
        return Redraw(exemplars=changed_view, partner=changed_view or changed_mode)

    def select_exemplar(self, position: int) -> Redraw:
        """Show another of the unit's exemplars beside the sample (0 = the strongest)."""
        self._require_analysis()
        n = len(self.exemplars())
        if not 0 <= int(position) < max(n, 1):
            raise InputError(None, f"exemplar {position} outside 0..{n - 1} of unit {self.unit}")
        self.exemplar = int(position)
        return Redraw(image=False, partner=True)

    # ---- what to draw -----------------------------------------------------------------------
    @property
    def umap(self) -> UnitMap:
        """The shown unit's map on the shown sample."""
        return self.analysis.maps[self.unit]

    @property
    def n_slices(self) -> int:
        return self.analysis.patch.shape[VIEWS[self.view]]

    @property
    def letters(self) -> tuple[str, str, str, str]:
        """Patient directions at the (top, bottom, left, right) edges of the pictures."""
        return ORIENTATION[self.view]

    def image(self, unit: int | None = None, view: str | None = None, index: int | None = None,
              mode: str | None = None, scale: int = SCALE) -> np.ndarray:
        """The sample's picture for (unit, view, slice, mode), the shown ones by default."""
        a = self.analysis
        unit = self.unit if unit is None else unit
        index = self.index if index is None else index
        return a.maps[unit].render(a.patch, view or self.view, index, mode or self.mode, scale)

    def mask_on_slice(self) -> int:
        """Voxels of M_k on the shown slice."""
        return int(np.count_nonzero(take_slice(self.umap.mask, self.view, self.index)))

    def readout(self) -> str:
        """One line saying what the sample's picture shows (unit, ranks, view, slice, M_k)."""
        a, k = self.analysis, self.unit
        rank = a.top.index(k) + 1
        return (f"unit {k} (r_k #{rank}, c_k rank {self.data.rank[k]}) · {self.view} slice "
                f"{self.index} of 0-{self.n_slices - 1} · M_k: {self.mask_on_slice()} voxels on "
                f"this slice (T_k = {self.umap.T:.4g})")

    def exemplars(self) -> list[tuple[int, np.ndarray, UnitMap]]:
        """(sample index, patch, unit map) of the shown unit's exemplars, as notebook 04 exported them."""
        return self.data.exemplar_maps(self.unit)

    def exemplar_slices(self) -> list[int]:
        """Each exemplar's best slice in the shown view."""
        return [umap.best_slice(self.view) for _, _, umap in self.exemplars()]

    def exemplar_caption(self, position: int, slice_index: int | None = None) -> str:
        """'<case> <level>' and its label, view and slice (two lines)."""
        i, _, umap = self.exemplars()[position]
        s = umap.best_slice(self.view) if slice_index is None else slice_index
        row = self.data.exemplar_pool.table.loc[i]
        truth = "fracture" if int(row.get("fracture", 0) or 0) else "healthy"
        return f"{row['case']} {row['level']}\n{truth}, {self.view} {s}"

    def exemplar_image(self, scale: int = SCALE) -> np.ndarray | None:
        """The selected exemplar of the unit at its best slice of the shown view, in the shown
        mode (None when the unit has no exemplars)."""
        ex = self.exemplars()
        if not ex:
            return None
        _, patch, umap = ex[min(self.exemplar, len(ex) - 1)]
        return umap.render(patch, self.view, umap.best_slice(self.view), self.mode, scale)

    def analysis_for(self, sample: int | str | None) -> Analysis | None:
        """The shown analysis, or another sample's (cached; the shown state is not changed)."""
        if sample is None:
            return self.analysis
        index = self.data.find(sample)
        if self.analysis is not None and self.analysis.truth is not None and index == self.sample_index:
            return self.analysis
        if index not in self._side_cache:
            self._side_cache.clear()  # one side sample at a time (memory: ~40 MB each)
            self._side_cache[index] = self.data.analyse_sample(index, top=self.top_n)
        return self._side_cache[index]

    # ---- internals ------------------------------------------------------------------------
    def _show(self, analysis: Analysis) -> Redraw:
        self.analysis = analysis
        self.unit = None
        self.select_unit(analysis.top[0])
        return Redraw(sample=True, unit=True, exemplars=True, partner=True)

    def _require_analysis(self) -> None:
        if self.analysis is None:
            raise InputError(None, "choose a sample first")
