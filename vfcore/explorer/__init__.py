"""The concept explorer of notebook 05: one vertebra, the units that carried its prediction.

The paper's single-inference system (Engstler, Keicher et al. 2022, Sec. 2.3 and 4.3,
Table 3): for an input x, rank the units k of the dissected layer by their relevance
r_k(x) = sum(M_k(x) * A_k(x)) (Eq. 2, with M_k(x) = A_k(x) > T_k), and show for each of the
most relevant units (i) its response on x and (ii) its general concept: its top-activating
samples (exemplars), the ones notebook 04 exported for its collages. We add what a student
needs to *read* it: a slice slider over the 96^3 patch in three views, an exemplar beside the
sample, the unit's rank by c_k (Eq. 1, true positives), and a concept dictionary
(unit -> label, note) saved in the run folder.

One module a layer, each usable alone:

* :mod:`.data`: :class:`RunData` (what the explorer needs from a run) and :class:`Analysis`
  (one sample, its r_k and top units' maps, upsampled once);
* :mod:`.concepts`: :class:`ConceptBook`, the concept dictionary;
* :mod:`.upload`: :func:`read_upload`, a student's own patch;
* :mod:`.state`: :class:`ExplorerState`, sample / unit / view / slice / mode and the pictures
  to draw, without widgets;
* :mod:`.figures`: static pictures (so executed notebooks show the explorer on GitHub);
* :mod:`.widgets`: :class:`Explorer`, the ipywidgets view over the state, and :func:`explore`.

Drawing is :mod:`vfcore.viz.units` (the one unit renderer), the geometry and r_k
:mod:`vfcore.dissect`, so the explorer shows the masks notebook 04 shows.
"""
from .concepts import ConceptBook, load_concepts
from .data import (N_EXEMPLARS, SCALE, TOP_UNITS, Analysis, Pool, RunData, UnitMap, damaged_artifact,
                   exported_exemplars, load_run_data, outcome)
from .figures import snapshot_figure, static_figure
from .state import MODES, ExplorerState, Redraw
from .upload import PATCH_SHAPE, UPLOAD_SUFFIXES, fit_to_patch, read_upload
from .widgets import CSS_CLASSES, OUTCOMES, Explorer, explore

__all__ = [
    "ConceptBook",
    "load_concepts", "N_EXEMPLARS", "SCALE", "TOP_UNITS", "Analysis", "Pool", "RunData", "UnitMap",
    "damaged_artifact", "exported_exemplars", "load_run_data", "outcome", "snapshot_figure",
    "static_figure", "MODES", "ExplorerState", "Redraw", "PATCH_SHAPE", "UPLOAD_SUFFIXES",
    "fit_to_patch", "read_upload", "CSS_CLASSES", "OUTCOMES", "Explorer", "explore",
]
