"""Network dissection, exactly: thresholds T_k, masks M_k, enabled sets E_x, c_k (Eq. 1), r_k (Eq. 2).

The paper (Engstler, Keicher et al. 2022, Sec. 2.2-2.3 and 4.1) dissects the last encoder layer
(``down_tr512``: K = 512 units on an 8^3 grid) of the fracture classifier:

* T_k, per unit k, such that P(a_k > T_k) = q_tail over every position of every sample of a
  split (q_tail = 0.005 in the paper; the published code used 0.01);
* M_k(x) = A_k(x) > T_k (a binary map), E_x = {k | sum M_k(x) > 0} (the units that fire on x);
* c_k = |{x in P : k in E_x}| / |P| (Eq. 1), P = the true-positive predictions;
* r_k(x) = sum(M_k(x) * A_k(x)) (Eq. 2), the relevance of unit k for one inference.

What this module does differently from the published code (``../shared/research/
upstream_review.md``): T_k is *exact* (equal to ``numpy.quantile(values, 1 - q_tail)`` for
every unit) instead of a sampled sketch over the first 500 samples; the model is in eval mode
(no batch statistics, so a sample's activations do not depend on its batch); P is the set of
true-positive *predictions* (ground-truth positives as an option); the false-positive variant
divides by the number of false positives; exemplars come only from the requested subset.

How one pass gives everything (:func:`dissect`): T_k is known only after the whole split has
been seen, yet r_k(x) and M_k(x) need it. Every value above T_k is among the m largest values
of unit k (m = ceil(q_tail (n - 1)) + 1, n = N x positions), and :class:`TopQuantile` keeps
exactly those m values *with their sample and position*. After the pass, the kept values
above T_k are the masks M_k of every sample (the "tail"), so r_k(x), |M_k(x)| and E_x follow
exactly, with no second forward pass and without storing the layer's activations (which
for 10,000 vertebrae x 512 units x 8^3 would be 10 GB in float32; the buffer is 0.5 % of it).
The per-sample maximum and mean of every unit are accumulated on the way ([N, K] arrays).

The sub-package, one step a module. The teaching core (what notebooks 03 and 04 run with one
process; no distributed code on its path):

* :mod:`~vfcore.dissect.capture`: a layer's activations in memory (:func:`activations`,
  through the forward engine :mod:`vfcore.forward`, which also holds the hooks);
* :mod:`~vfcore.dissect.quantile`: T_k, exact (:class:`TopQuantile`) and sketched
  (``SampledQuantile``, for comparison), and :func:`M_k`, the one mask threshold;
* :mod:`~vfcore.dissect.dissection`: the one pass, :func:`dissect` -> :class:`Dissection`;
* :mod:`~vfcore.dissect.ranking`: Eq. 1 and Eq. 2, outcomes, rankings, exemplars;
* :mod:`~vfcore.dissect.geometry`: activations on the patch (upsampling, best slice, NIfTI,
  concept overlap).

The shell around it (run folder and torchrun):

* :mod:`~vfcore.dissect.artifacts`: the run folder (:func:`dissect_run`, :func:`load_artifacts`);
  in one process :func:`dissect_run` runs :func:`dissect`;
* :mod:`~vfcore.dissect.sharded`: the same pass over the ranks of a ``torchrun`` job
  (:func:`~vfcore.dissect.sharded.dissect_sharded`: the core pass on each rank's share, then an
  exact merge; checkpointed and resumable).

This namespace holds what the notebooks use (``__all__``, at most 30 names); the rest is
imported from its module, e.g. ``from vfcore.dissect.ranking import bootstrap_c``. The
measurements beyond the paper (alignment, ablation, where units look, saliency, findings) are
:mod:`vfcore.analysis`, which imports this package, never the reverse.

The package draws nothing and imports no ``train``, ``viz``, ``explorer``, ``export`` or
``analysis``. Notebook 04's collages and NIfTI exports are :func:`vfcore.export.export_units`;
the forward pass is :mod:`vfcore.forward`, checkpoints :mod:`vfcore.checkpoint`.
"""
from .capture import activations
from .quantile import Q_TAIL_PAPER, TopQuantile, M_k, q_table, sketch_comparison
from .dissection import Dissection, dissect, example_units
from .ranking import (UndefinedCorrelationError, SUBSET_NAMES, enabled_sets, relevance, correlation,
                      top_units, outcomes, rank_units, rank_false_positives, exemplars)
from .geometry import VIEWS, upsample_to_patch, patch_mask, best_slice
from .artifacts import (DissectionArtifacts, Network, load_network, load_artifacts, dissect_run,
                        load_dissection_set)

__all__ = [
    "activations", "Q_TAIL_PAPER", "TopQuantile", "M_k", "q_table", "sketch_comparison",
    "Dissection", "dissect", "example_units",
    "UndefinedCorrelationError", "SUBSET_NAMES", "enabled_sets", "relevance", "correlation",
    "top_units", "outcomes", "rank_units", "rank_false_positives", "exemplars",
    "VIEWS", "upsample_to_patch", "patch_mask", "best_slice",
    "DissectionArtifacts", "Network", "load_network", "load_artifacts", "dissect_run",
    "load_dissection_set",
]
