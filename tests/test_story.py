"""The notebooks' computed sentences (vfcore.analysis.story), each on constructed inputs for both
outcomes, and the contrastive ranking beside Eq. 1 (vfcore.analysis.contrast)."""
from __future__ import annotations

import numpy as np
import pytest

from vfcore.analysis import concept_story, contrast, story


# ---- formatting -------------------------------------------------------------------------------

@pytest.mark.parametrize("p, text", [(0.0066, "0.007"), (0.010, "0.010"), (0.0104, "0.010"), (0.0099, "0.0099"),
                                     (0.009996, "0.009996"), (0.2, "0.200"), (0.0004, "< 0.001")])
def test_p_has_the_rules_precision_and_never_prints_a_pass_as_a_fail(p, text):
    assert story.format_p(p, 0.01) == text


def test_p_that_fails_is_never_printed_below_alpha():
    for p in np.linspace(0.01, 0.011, 21):
        assert float(story.format_p(p, 0.01)) >= 0.01
    for p in np.linspace(0.0095, 0.00999999, 21):
        assert float(story.format_p(p, 0.01)) < 0.01
    assert story.format_p(0.04, 0.05) == "0.040" and story.format_p(float("nan")) == "n/a"


def test_small_n_says_so():
    assert "handful" in story.small(4) and story.small(100) == ""


# ---- 01 ---------------------------------------------------------------------------------------

def test_fracture_levels_clustered_or_not():
    levels = ["T7", "T8", "T11", "T12", "L1", "L2"] * 10
    at_junction = [0, 0, 1, 1, 1, 1] * 10
    s = story.fracture_levels(levels, at_junction)
    assert "reproduces that clustering" in s and "40 of 60" in s
    elsewhere = [1, 1, 0, 0, 0, 0] * 10
    s = story.fracture_levels(levels, elsewhere)
    assert "does not reproduce" in s and "T7, T8 (10 each)" in s and "We expect" in s and "here," in s
    assert "T7 (10)," in story.fracture_levels(levels, [1, 0, 0, 0, 0, 0] * 10)
    assert "no fractured vertebra" in story.fracture_levels(levels, [0] * 60)


# ---- 02 ---------------------------------------------------------------------------------------

def test_pooling_names_the_levels_that_pool():
    names = ["down_tr64", "down_tr128", "down_tr256", "down_tr512"]
    s = story.pooling(names, [True, True, False, False], "small")
    assert "down_tr64, down_tr128 end in a 2x2x2 max-pool" in s and "down_tr256, down_tr512 do not" in s
    assert "every encoder level" in story.pooling(names, [True] * 4)
    assert "no encoder level" in story.pooling(names, [False] * 4)


def test_early_stopping_triggered_or_not():
    s = story.early_stopping(25, 23, 25, 25)
    assert "did not trigger" in s and "epoch 23" in s and "might still help" in s
    s = story.early_stopping(14, 4, 25, 10)
    assert s.startswith("Early stopping triggered") and "14 of 25" in s and "10 epochs after" in s


def test_grade_1_hardest_or_not():
    s = story.grade_difficulty({1: 1, 2: 3}, {1: 4, 2: 10})
    assert "We expect" in s and "grade 1 missed 1 of 4" in s and "grade 2 is missed most often, not grade 1" in s
    assert "handful" in s
    s = story.grade_difficulty({1: 3, 2: 1, 3: 0}, {1: 10, 2: 10, 3: 10})
    assert "grade 1 is the hardest, as expected" in s and "handful" not in s
    assert "no fracture was missed" in story.grade_difficulty({}, {1: 5, 2: 5})


def test_wedge_false_positives():
    conf = ["physiological wedging"] * 9 + ["physiological wedging", "Schmorl node", ""]
    hl = [0.17] * 9 + [0.05, 0.0, 0.0]
    s = story.wedge_false_positives(conf, hl)
    assert "10 of 12" in s and "9 of them at 17-17 %" in s and "near-threshold" in s
    s = story.wedge_false_positives(["Schmorl node", ""], [0.0, 0.0])
    assert s.startswith("None of the 2")
    assert "no false positive" in story.wedge_false_positives([], [])
    assert "none of them within" in story.wedge_false_positives(["physiological wedging"], [0.05])


# ---- 03 ---------------------------------------------------------------------------------------

def test_threshold_spread_few_fold_or_order_of_magnitude():
    assert "a few-fold apart" in story.threshold_spread(np.linspace(1, 4, 50))
    assert "an order of magnitude" in story.threshold_spread(np.geomspace(0.01, 10, 50))
    assert "Fewer than two" in story.threshold_spread([0, 0, 1])


def test_receptive_field_whole_field_or_not():
    s = story.receptive_field(8, 96, 64, 12)
    assert "every cell can see the whole field" in s and "radius of 12 mm" in s and "local neighbourhood" in s
    assert "reads the whole patch" in story.receptive_field(8, 96, 64, 36)
    s = story.receptive_field(8, 40, 64)
    assert "sees 62 % of the field" in s


def test_mask_example_truncated_or_not():
    assert "truncated" in story.mask_example(0.3)
    s = story.mask_example(0.0, 0.4)
    assert "inside the scan" in s and "40 %" in s


# ---- 04 ---------------------------------------------------------------------------------------

def test_saturation_or_not():
    s = story.saturation(101, 128, 34, 0.005, 512, 200)
    assert "2.6 cells" in s and "101 of 128" in s and "ubiquitous" in s
    s = story.saturation(20, 128, 0, 0.005, 512, 200)
    assert "still separates" in s


def test_ubiquity_or_selectivity():
    assert "fire on most vertebrae, fractured or not" in story.ubiquity([1, 1, 1, 1], [0.9, 0.8, 0.95, 0.1], 4)
    assert "selective" in story.ubiquity([1, 1, 1, 1], [0.1, 0.2, 0.3, 0.9], 4)


def test_ranking_detectors_fewer_more_or_as_many_as_random():
    s = story.ranking_detectors(1, 4, 2.2, 10, 31, 128, 3)
    assert "fewer detectors than 10 random units" in s and "more than Eq. 1" in s and "training made" in s
    s = story.ranking_detectors(6, 4, 2.2, 10, 31, 128, 20)
    assert "more detectors than 10 random" in s and "fewer than Eq. 1" in s and "did not make many" in s
    assert "about as many" in story.ranking_detectors(2, 2, 2.2, 10, 31, 128)
    # 0 vs 2 among 10 of 128 units with 26 detectors (2.0 expected, sd 1.4): within chance
    assert "fewer than Eq. 1 (within chance for 10 units)" in story.ranking_detectors(2, 0, 2.1, 10, 26, 128)
    assert "within chance" not in story.ranking_detectors(0, 6, 2.1, 10, 26, 128)
    assert "; by AUC: 5." in story.ranking_detectors(2, 0, 2.2, 10, 31, 128, more={"by AUC": 5})


# ---- 05/06 ------------------------------------------------------------------------------------

def test_relevant_and_ranked():
    assert "does not make a unit" in story.relevant_and_ranked(1, 2.2, 10)
    assert "points at a concept" in story.relevant_and_ranked(6, 2.2, 10)


def test_ablation_by_auc_three_ways():
    assert "matter more" in story.ablation_verdict(0.95, 0.70, 0.94, 0.01, 10, 70, 200)
    assert "matter less" in story.ablation_verdict(0.95, 0.94, 0.70, 0.01, 10, 70, 200)
    assert "no clearer effect" in story.ablation_verdict(0.95, 0.93, 0.935, 0.02, 10, 70, 200)


def test_occlusion_verdict():
    s = story.occlusion_verdict(0.61, 64, 0.0, 0.64, 67)
    assert "64 of 67" in s and "the evidence is the vertebra, and within it the fracture signs" in s
    assert "no more than occluding elsewhere" in story.occlusion_verdict(0.02, 0, 0.01, None, 67)


def test_where_method_near_zero_or_not():
    s = story.where_method("Grad-CAM", {"superior endplate": 0.0, "fracture-deformity zone": 0.001})
    assert "does not locate" in s
    s = story.where_method("Occlusion", {"superior endplate": 0.02, "fracture-deformity zone": 0.31})
    assert "overlaps" in s and "0.310" in s
    assert "no fracture sign" in story.where_method("X", {})
    assert "weakly" in story.where_method("Occlusion", {"superior endplate": 0.053})   # the run's 0.053
    assert "clearly" in story.where_method("Occlusion", {"superior endplate": 0.114})
    assert "mostly on soft tissue" in story.gradcam_hotspot({"soft tissue": 0.7, "vertebral body": 0.3})
    assert "mostly off the labelled" in story.gradcam_hotspot({"adjacent vertebrae": 0.03, "disc above": 0.01})


def test_correlation_significant_or_not_with_the_rules_precision():
    s = story.correlation(0.18, 0.0066, 210, "healthy vertebrae")
    assert "We expect no correlation; here," in s and "p = 0.007" in s and "correlated (p < 0.01)" in s
    s = story.correlation(0.18, 0.0100, 210, "healthy vertebrae")
    assert "p = 0.010" in s and "no correlation at p < 0.01" in s
    assert "undefined" in story.correlation(float("nan"), float("nan"), 3, "x")
    assert "not significant" in story.correlation(0.1, 0.3, 50, "x", expect_none=False)


def test_layer_grids_same_or_finer():
    assert "same grid" in story.layer_grids({"a": (8, 8, 8), "b": (8, 8, 8), "c": (8, 8, 8)})
    s = story.layer_grids({"a": (8, 8, 8), "b": (16, 16, 16)})
    assert "same grid" not in s and "b 16x16x16" in s


def test_detector_count_prints_the_smallest_p_at_the_rules_precision():
    s = story.detector_count(31, 128, 0.04, 0.01, 200)
    assert "31 of 128" in s and "0.005" in s
    assert "0.0196" not in story.detector_count(0, 128, 0.04, 0.01, 50) and "0.020" in story.detector_count(0, 128, 0.04, 0.01, 50)


def test_bullets():
    assert story.bullets(["a", "", "b"]) == "* a\n* b"
    assert story.bullets(["a"], "Computed").startswith("**Computed**")


# ---- the contrastive ranking ------------------------------------------------------------------

def test_contrast_ranks_a_selective_unit_above_a_ubiquitous_one():
    rng = np.random.default_rng(0)
    n = 200
    labels = np.r_[np.ones(50, int), np.zeros(150, int)]
    outcome = np.where(labels == 1, "TP", "TN")
    E = np.zeros((n, 3), bool)
    E[:, 0] = True                                  # fires everywhere: c_tp = 1
    E[:50, 1] = rng.random(50) < 0.8                # fires on fractures only
    E[:, 2] = rng.random(n) < 0.3                   # noise
    mx = E.astype(float) + rng.random((n, 3)) * 0.1
    t = contrast.contrast_table(E, mx, outcome, labels)
    assert t.attrs == {"n_tp": 50, "n_tn": 150}
    assert contrast.top(t, "c", 1) == [0]           # Eq. 1 ranks the ubiquitous unit first
    assert contrast.top(t, "delta", 1) == [1]       # the contrast ranks the selective unit first
    assert contrast.top(t, "auc", 1) == [1]
    row = t.set_index("unit")
    assert row.loc[0, "delta"] == 0 and row.loc[1, "auc"] > 0.85


def test_unit_auc_matches_a_direct_count_and_is_nan_without_a_class():
    rng = np.random.default_rng(1)
    v, y = rng.random((30, 2)), rng.random(30) < 0.4
    pos, neg = v[y, 0], v[~y, 0]
    direct = np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])
    assert contrast.unit_auc(v, y)[0] == pytest.approx(direct)
    assert np.isnan(contrast.unit_auc(v, np.zeros(30))).all()


def test_call_caption():
    s = story.call_caption("FP", 0.613, 0, 0.17, "physiological wedging; degenerated disc above", "T8",
                           "sub-phantom012")
    assert s == "sub-phantom012 T8\nFP P=0.61\nG0, 17 % loss\nwedge, degen.\u00a0disc"
    assert story.call_caption("FP", 0.613, 0, 0.17, "", "T8").startswith("T8\nFP P=0.61\n")
    assert story.call_caption("FN", 0.2, 1, None, "").endswith("no confounder")
    long = story.call_caption("FP", 0.8, 0, 0.18, "physiological wedging; Schmorl node; degenerated disc; "
                                                   "degenerative endplate sclerosis", "T6")
    assert all(len(line) <= 26 for line in long.splitlines()[3:]) and long.count("\n") >= 4


def test_fp_units_on_mimics_or_not():
    s = story.fp_units_where({3: "paraspinal muscle 40% (x2.0), lamina 20% (x1.1)", 5: "lamina 30% (x1.5)"}, 12)
    assert "none of the 2 sits mostly on a mimic" in s and "unit 3: paraspinal muscle" in s and "handful" in s
    s = story.fp_units_where({3: "Schmorl node 40% (x9.0)", 5: "lamina 30% (x1.5)"}, 40)
    assert "1 of 2 sit mostly on a mimic" in s and "handful" not in s
    assert "no unit could be measured" in story.fp_units_where({3: ""}, 0)


def test_ablation_verdict_names_the_ranking():
    s = story.ablation_verdict(0.95, 0.70, 0.94, 0.01, 10, 70, 200, what="keeping only", ranking="c_TP - c_TN")
    assert s.startswith("Keeping only the top 10 units by c_TP - c_TN: AUC 0.950 -> 0.700")


def test_confounder_detectors_wedge_or_not():
    s = story.confounder_detectors({}, 5, 0, 128)
    assert s.startswith("0 of the top 5") and "no unit of this layer detects the wedge" in s
    s = story.confounder_detectors({7: "Schmorl node"}, 5, 2, 128)
    assert "unit 7 (Schmorl node)" in s and "2 of all 128 units detect" in s and "no unit of this" not in s
    assert "No false positive" in story.confounder_detectors({}, 0, 0, 128)


def test_redundancy_or_not():
    assert "spread over many units" in story.redundancy(0.91, 0.906, 10, 128, 10)
    assert "suffices" in story.redundancy(0.91, 0.906, 10, 128, 10)
    assert "necessary." not in story.redundancy(0.91, 0.906, 10, 128, 10)
    assert "needs more units" in story.redundancy(0.91, 0.70, 10, 128, 10)


# ---- 08 · where the concepts live ---------------------------------------------------------------

def test_direction_vs_unit_both_ways():
    good = concept_story.direction_vs_unit("fracture-deformity zone", 0.30, 0.10, 0.09, 0.15, 0.004, 316)
    assert "3.0x the best single unit" in good and "3.3x the same read-out of an untrained" in good
    assert "marks this vertebra's" in good and "keeps only 50% of its IoU" in good and "p = 0.004" in good and "n = 316" in good
    # this run's case: p at the floor of 200 shuffles, but 91 % of the IoU survives the shuffle
    run = concept_story.direction_vs_unit("zone", 0.173, 0.041, 0.081, 0.157, 1 / 201, 316)
    assert "the smallest 200 shuffles allow" in run and "91% of its IoU survives" in run and "specific to this vertebra is 0.016" in run
    bad = concept_story.direction_vs_unit("fracture-deformity zone", 0.10, 0.12, 0.11, 0.10, 0.4, 316)
    assert "no more than the best single unit" in bad and "untrained network's read-out gets as much" in bad
    assert "does not beat the same-class shuffle" in bad and "p = 0.400" in bad
    # a p exactly at the rule fails and is printed so
    assert "does not beat" in concept_story.direction_vs_unit("x", 0.3, 0.1, 0.1, 0.1, 0.010, 10)


def test_units_needed_spread_single_or_none():
    ks, curve = [1, 10, 30, 128], [0.01, 0.05, 0.15, 0.20]
    text = concept_story.units_needed("zone", ks, curve, 0.02)
    assert "Half of the full direction's IoU takes 30 units, 90 % takes 128" in text and "spread over many" in text
    one = concept_story.units_needed("zone", ks, [0.15, 0.18, 0.19, 0.2], 0.15)
    assert "takes 1 unit," in one and "one unit carries most" in one
    assert "No read-out" in concept_story.units_needed("zone", ks, [0, 0, 0, 0], 0.0)


def test_basis_detectors_units_best_or_another():
    sizes = {"units, trained": 128, "NMF (128 atoms), trained": 128, "random (128), trained": 128,
             "units, untrained": 128, "NMF (128 atoms), untrained": 128, "random (128), untrained": 128}
    units_best = {"units, trained": 26, "NMF (128 atoms), trained": 10, "random (128), trained": 5,
                  "units, untrained": 3, "NMF (128 atoms), untrained": 2, "random (128), untrained": 1}
    text = concept_story.basis_detectors(units_best, sizes)
    assert "units: 26 of 128 (untrained 3)" in text and "No other basis finds clearly more" in text
    assert "Random directions" not in text            # 4 % against 20 %: random directions are no match here
    nmf_best = dict(units_best, **{"NMF (128 atoms), trained": 40})
    assert "NMF (128 atoms) finds clearly more per direction (31% against 20% of the units)" in concept_story.basis_detectors(nmf_best, sizes)
    # this run's case: 7 of 32 atoms (22 %) is not clearly more than 26 of 128 units (20 %); random finds 25 of 128
    run = dict(units_best, **{"NMF (128 atoms), trained": 7, "random (128), trained": 25})
    text = concept_story.basis_detectors(run, dict(sizes, **{"NMF (128 atoms), trained": 32}))
    assert "No other basis finds clearly more" in text and "training, not the basis (the untrained network's bases: 3 at most)" in text


def _tcav_table(rows, rule="two-sided t-test, Bonferroni over 3 concepts, significant if p < 0.05"):
    import pandas as pd
    t = pd.DataFrame(rows, columns=["concept", "n", "mean", "random_mean", "significant", "significant_untrained", "reason"])
    t["mean_untrained"], t["random_mean_untrained"] = t["mean"], t["random_mean"]   # same sign as trained
    t.attrs["rule"] = rule
    return t


def test_tcav_verdict_expected_or_not():
    t = _tcav_table([("fracture-deformity zone", 82, 0.98, 0.52, True, False, ""),
                     ("sclerotic condensation band", 69, 0.97, 0.53, True, False, ""),
                     ("outside the scan", 16, 0.55, 0.52, False, False, ""),
                     ("Schmorl node", 0, float("nan"), float("nan"), False, False, "too few examples")])
    text = concept_story.tcav_verdict(t, ["fracture-deformity zone", "sclerotic condensation band"])
    assert "raising the fracture logit: fracture-deformity zone, sclerotic condensation band" in text
    assert "2 of 2 fracture signs do, and 'outside the scan' is not significant" in text
    assert "In the untrained network 0 of 3 are significant (0 raising the logit, 0 lowering it)" in text and "Schmorl" not in text
    assert "not in the untrained one (the evidence that training made the network use a concept): fracture-deformity zone, sclerotic" in text
    t2 = _tcav_table([("fracture-deformity zone", 82, 0.10, 0.52, True, True, ""),
                      ("outside the scan", 16, 0.70, 0.50, True, True, "")])
    text = concept_story.tcav_verdict(t2, ["fracture-deformity zone", "sclerotic condensation band"])
    assert "lowering it: fracture-deformity zone" in text and "0 of 1 fracture signs do" in text
    assert "'outside the scan' is significant too" in text and "(1 raising the logit, 1 lowering it)" in text
    assert "training made the network use a concept): none." in text and "local sensitivity over the 16 true positives" in text
    t2.loc[1, "mean_untrained"] = 0.2       # significant in the untrained network, but lowering: evidence again
    assert "use a concept): outside the scan." in concept_story.tcav_verdict(t2, ["fracture-deformity zone"])


def test_twin_drop_all_most_or_few():
    assert "the network's evidence is the fracture" in concept_story.twin_drop([-0.5] * 30, 30)
    most = concept_story.twin_drop([-0.5] * 28 + [0.05, 0.02], 20)
    assert "28 of 30 (93 %)" in most and "most of the evidence" in most and "range -0.50 to +0.05" in most
    few = concept_story.twin_drop([-0.5] * 5 + [0.1] * 5, 3)
    assert "not (only) the fracture" in few and "a handful" in few
    assert "not measured" in concept_story.twin_drop([], 0)


def test_ranking_grades_names_the_costliest_or_none():
    import pandas as pd
    g = pd.DataFrame([{"ranking": "Eq. 1 (c_k)", "top units": "1, 2", "detectors": 2, "AUC, zeroed": 0.95},
                      {"ranking": "healed twins", "top units": "3, 4", "detectors": 3, "AUC, zeroed": 0.80},
                      {"ranking": "random 10 units", "top units": "", "detectors": 2.0, "AUC, zeroed": 0.96}])
    text = concept_story.ranking_grades(g, 10, 2.0, 0.97)
    assert "Eq. 1 (c_k) 2, healed twins 3" in text and "Removing the healed twins units costs the most AUC (0.170)" in text
    g.loc[1, "AUC, zeroed"] = 0.955
    assert "No ranking's top 10 costs clearly more" in concept_story.ranking_grades(g, 10, 2.0, 0.97)
    g["AUC, zeroed"] = [0.926, 0.927, 0.926]      # this run: nothing moves the AUC, random units neither
    text = concept_story.ranking_grades(g, 10, 2.0, 0.926, overlap={"Eq. 1 (c_k)": [75]})
    assert "cannot tell the rankings apart" in text and "Units shared with the healed twins top 10: Eq. 1 (c_k) 1 (75)." in text


def test_directions_untrained_some_or_none():
    text = concept_story.directions_untrained(["zone", "vertebral body"], [0.17, 0.45], [0.08, 0.52])
    assert "For 1 of 2 concepts an untrained network's direction reads as well or better (vertebral body)" in text
    assert "For all 2 concepts" in concept_story.directions_untrained(["zone", "body"], [0.17, 0.5], [0.08, 0.4])


def test_tcav_verdict_reads_an_object_column_with_untested_rows():
    # after a merge, 'significant' holds True/False objects and NaN for untested rows: ~ on it would give -2/-1
    t = _tcav_table([("fracture-deformity zone", 82, 0.98, 0.52, True, False, ""),
                     ("outside the scan", 16, 0.50, 0.50, False, float("nan"), ""),
                     ("Schmorl node", None, None, None, float("nan"), float("nan"), "too few examples")])
    t["significant"] = t["significant"].astype(object)
    text = concept_story.tcav_verdict(t, ["fracture-deformity zone"])
    assert "raising the fracture logit: fracture-deformity zone;" in text and "not significant: outside the scan." in text


def test_direction_layers_dissected_or_below():
    text = concept_story.direction_layers("zone", {"down_tr512": 0.17, "down_tr256": 0.12}, {"down_tr512": 0.08, "down_tr256": 0.07})
    assert "down_tr512 0.170 / 0.080, down_tr256 0.120 / 0.070" in text and "the most at the dissected layer down_tr512" in text
    text = concept_story.direction_layers("zone", {"down_tr512": 0.17, "down_tr256": 0.20}, {"down_tr512": 0.08, "down_tr256": 0.05})
    assert "more at down_tr256 than at the dissected layer" in text


def test_where_method_names_no_best_when_all_are_zero():
    text = story.where_method("Grad-CAM", {"anterior cortex": 0.0, "superior endplate": 0.0})
    assert "(all 0.000)" in text and "best" not in text
