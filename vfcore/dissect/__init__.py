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

The sub-package, one step a module (all names are importable from ``vfcore.dissect``):

* :mod:`~vfcore.dissect.capture`: a layer's activations in memory (through the forward
  engine :mod:`vfcore.forward`, which also holds the hooks: ``capture``, ``find_layer``);
* :mod:`~vfcore.dissect.quantile`: T_k, exact (:class:`TopQuantile`) and sketched
  (:class:`SampledQuantile`, for comparison), and :func:`M_k`, the one mask threshold;
* :mod:`~vfcore.dissect.dissection`: the one pass, :func:`dissect` -> :class:`Dissection`
  (and :func:`example_units`);
* :mod:`~vfcore.dissect.sharded`: the same pass over the ranks of a ``torchrun`` job,
  :func:`dissect_sharded` (each rank a contiguous share, the buffers all-gathered and merged
  exactly, checkpointed and resumable; one process without torchrun);
* :mod:`~vfcore.dissect.ranking`: Eq. 1 and Eq. 2, outcomes, rankings, exemplars;
* :mod:`~vfcore.dissect.geometry`: activations on the patch (upsampling, best slice, NIfTI,
  concept overlap);
* :mod:`~vfcore.dissect.looking`: where a unit looks (input gradients of its masked
  activation, receptive fields) and occlusion;
* :mod:`~vfcore.dissect.artifacts`: the run folder (:func:`dissect_run`, :func:`load_artifacts`).

The package is analysis only: it draws nothing and imports no ``train``, ``viz`` or
``explorer``. Notebook 04's collages and NIfTI exports are :func:`vfcore.export.export_units`;
the forward pass is :mod:`vfcore.forward`, checkpoints :mod:`vfcore.checkpoint`.
"""
from .capture import DEFAULT_LAYER, layer_names, find_layer, capture, evaluating, activations
from .quantile import (Q_TAIL_PAPER, Q_TAIL_PUBLISHED, SPARSE_TAIL_FRACTION, tail_size,
                       TopQuantile, SampledQuantile, q_table, tail_fraction,
                       sketch_comparison)
from .dissection import (Dissection, dissect, example_units, LayerGridError, layer_output_shape,
                         check_layer_grid, check_layer)
from .sharded import dissect_sharded, load_pass_state, save_pass_state, shard_range, state_file
from .ranking import (UndefinedCorrelationError, M_k, enabled_sets, relevance, top_units, outcomes,
                      SUBSET_NAMES, correlation, rank_units, rank_false_positives,
                      MIN_RANKING_N, BOOTSTRAP_B, BOOTSTRAP_SEED, bootstrap_c, tie_counts,
                      ranking_note, ranking_summary, EXEMPLAR_SCORES, exemplars)
from .geometry import (VIEWS, AIR_HU, upsample_to_patch, patch_mask, best_slice,
                       canonical_patch_affine, patch_world_affine, write_nifti_exemplar,
                       concept_group, concept_overlap, vertebra_overlap)
from .artifacts import (FORMAT, NOTEBOOK_03, NOTEBOOK_04, IDENTITY, dissection_dir,
                        network_field, save_dissection, load_dissection, DissectionArtifacts,
                        load_artifacts, Network, load_network, write_artifacts, dissect_run,
                        concept_names, DISSECT_SPLIT, split_names, parse_split, split_name,
                        default_split, load_dissection_set)
from .alignment import (IOU_THRESHOLD, ALPHA, N_PERM, FRACTURE_CONCEPTS, CONFOUNDERS, NoConceptMasksError,
                        patch_concepts, RunConcepts, ConceptCounts, concept_counts, concept_counts_grids,
                        mask_entries, Alignment, same_class_pairings, block_alignment, layer_batches,
                        interpolated_alignment, unit_table, random_unit_draws, control_table,
                        fp_concept_table, align_network, layers_below, layer_summary)
from .ablation import KS, N_RANDOM, zeroed, predict, ablation_table, ablation_summary
from .looking import (theoretical_rf, effective_rf, mask_gradients, gradient_on_patch, gradient_share,
                      neutral_fill, equal_volume_cells, occlusion, FRACTURE_SIGNS, run_looking,
                      looking_summary, run_occlusion, occlusion_summary)
from .findings import EVIDENCE, concept_dictionary, student_dictionary, draft_findings

__all__ = [
    'DEFAULT_LAYER', 'layer_names', 'find_layer', 'capture', 'evaluating', 'activations',
    'Q_TAIL_PAPER', 'Q_TAIL_PUBLISHED', 'SPARSE_TAIL_FRACTION', 'tail_size', 'TopQuantile',
    'SampledQuantile', 'example_units', 'q_table', 'tail_fraction', 'sketch_comparison',
    'Dissection', 'dissect', 'dissect_sharded', 'load_pass_state', 'save_pass_state',
    'shard_range', 'state_file', 'UndefinedCorrelationError', 'M_k', 'enabled_sets', 'relevance',
    'top_units', 'outcomes', 'SUBSET_NAMES', 'correlation', 'rank_units',
    'rank_false_positives', 'EXEMPLAR_SCORES', 'exemplars', 'VIEWS', 'AIR_HU',
    'upsample_to_patch', 'patch_mask', 'best_slice', 'canonical_patch_affine',
    'patch_world_affine', 'write_nifti_exemplar', 'concept_group', 'concept_overlap',
    'vertebra_overlap', 'FORMAT', 'NOTEBOOK_03', 'NOTEBOOK_04', 'IDENTITY', 'dissection_dir',
    'network_field', 'save_dissection', 'load_dissection', 'DissectionArtifacts',
    'load_artifacts', 'Network', 'load_network', 'write_artifacts', 'dissect_run',
    'concept_names', 'LayerGridError', 'layer_output_shape', 'check_layer_grid', 'check_layer',
    'MIN_RANKING_N', 'BOOTSTRAP_B', 'BOOTSTRAP_SEED', 'bootstrap_c', 'tie_counts', 'ranking_note',
    'ranking_summary', 'DISSECT_SPLIT', 'split_names', 'parse_split', 'split_name', 'default_split',
    'load_dissection_set',
    'IOU_THRESHOLD', 'ALPHA', 'N_PERM', 'FRACTURE_CONCEPTS', 'CONFOUNDERS', 'NoConceptMasksError',
    'patch_concepts', 'RunConcepts', 'ConceptCounts', 'concept_counts', 'concept_counts_grids',
    'mask_entries', 'Alignment', 'same_class_pairings', 'block_alignment', 'layer_batches',
    'interpolated_alignment', 'unit_table', 'random_unit_draws', 'control_table', 'fp_concept_table',
    'align_network', 'layers_below', 'layer_summary',
    'KS', 'N_RANDOM', 'zeroed', 'predict', 'ablation_table', 'ablation_summary',
    'theoretical_rf', 'effective_rf', 'mask_gradients', 'gradient_on_patch', 'gradient_share',
    'neutral_fill', 'equal_volume_cells', 'occlusion', 'FRACTURE_SIGNS', 'run_looking',
    'looking_summary', 'run_occlusion', 'occlusion_summary',
    'EVIDENCE', 'concept_dictionary', 'student_dictionary', 'draft_findings',
]
