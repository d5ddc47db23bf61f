"""Measurements beyond the paper, one question a module (notebooks 04, 06, 07, 08).

The paper's own method, Sec. 2.2-2.3 (T_k, M_k, E_x, c_k, r_k), is :mod:`vfcore.dissect`; this
package asks what the paper did not, on top of it (it imports :mod:`vfcore.dissect`, never the
reverse):

* :mod:`~vfcore.analysis.alignment`: do the units detect the concepts we think? NetDissect's
  IoU between unit masks M_k and concept masks, with a same-class shuffle and controls;
* :mod:`~vfcore.analysis.directions`: is a concept a linear read-out of many units (Net2Vec
  probes fitted on the training split, scored like units on the held-out set)?
* :mod:`~vfcore.analysis.dictionary`: other bases of the layer (NMF, PCA, random directions),
  each direction dissected like a unit;
* :mod:`~vfcore.analysis.ablation`: does the network *use* the top-c_k units? (zero them);
* :mod:`~vfcore.analysis.looking`: where a unit looks (input gradients of its mask, receptive
  fields) and occlusion;
* :mod:`~vfcore.analysis.saliency`: Grad-CAM of the fracture score, against the unit masks;
* :mod:`~vfcore.analysis.tcav`: does the fracture score move along a concept's direction of the
  layer? TCAV (concept activation vectors) with its test against random directions;
* :mod:`~vfcore.analysis.shortcut`: does P(fracture) follow how much of the patch lies outside
  the scan?
* :mod:`~vfcore.analysis.twins`: healed twins, the same scan with one fracture healed: how
  P(fracture) and each unit change (issue 22);
* :mod:`~vfcore.analysis.findings`: concept dictionaries and draft findings text;
* :mod:`~vfcore.analysis.contrast`: c_TP - c_TN and each unit's AUC beside Eq. 1 (notebook 04);
* :mod:`~vfcore.analysis.story`: the notebooks' run-dependent sentences, for either outcome
  (notebook 08's in :mod:`~vfcore.analysis.concept_story`).

Import the module of the question, e.g. ``from vfcore.analysis import alignment``. Like
:mod:`vfcore.dissect`, it draws nothing (notebooks and :mod:`vfcore.viz` draw).
"""
