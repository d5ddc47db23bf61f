"""Concept alignment, its controls, the causal check, Grad-CAM and draft findings (issue 12),
each against an independent reference: direct numpy IoU, hand-written trilinear upsampling,
constructed activations with a known answer, and networks whose outputs are compared exactly."""
from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from vfcore.analysis.ablation import ablation_summary, ablation_table, zeroed
from vfcore.analysis.alignment import (NoConceptMasksError, RunConcepts, block_alignment, concept_counts,
                                       concept_counts_grids, control_table, fp_concept_table,
                                       interpolated_alignment, layers_below, mask_entries,
                                       same_class_pairings, unit_table)
from vfcore.analysis.findings import concept_dictionary, draft_findings, student_dictionary
from vfcore.dissect import M_k, UndefinedCorrelationError

from tiny_run import tiny_run  # noqa: F401  (fixture: a small real run folder)

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------
# independent references
# --------------------------------------------------------------------------------------------

def _blocks(M: np.ndarray, b: int) -> np.ndarray:
    """Each cell -> a b^3 block (np.repeat: independent of the package's upsampling)."""
    for ax in (-3, -2, -1):
        M = np.repeat(M, b, axis=ax)
    return M


def _trilinear(a: np.ndarray, size: int) -> np.ndarray:
    """align_corners=False trilinear upsampling of a [g, g, g] map, written out per axis."""
    out = np.asarray(a, dtype=np.float64)
    for ax in range(3):
        g = out.shape[ax]
        src = np.clip((np.arange(size) + 0.5) * g / size - 0.5, 0, g - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, g - 1)
        w = (src - lo).reshape([-1 if i == ax else 1 for i in range(3)])
        out = np.take(out, lo, axis=ax) * (1 - w) + np.take(out, hi, axis=ax) * w
    return out


def _direct_iou(masks_patch: np.ndarray, concepts: list[dict], names: list[str], field) -> np.ndarray:
    """IoU [K, C] summed over samples: masks_patch [N, K, *field shape] on the field."""
    N, K = masks_patch.shape[:2]
    inter = np.zeros((K, len(names)))
    union = np.zeros((K, len(names)))
    for i in range(N):
        for j, c in enumerate(names):
            C = concepts[i][c][tuple(field)]
            for k in range(K):
                inter[k, j] += np.logical_and(masks_patch[i, k], C).sum()
                union[k, j] += np.logical_or(masks_patch[i, k], C).sum()
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def _random_case(seed=0, N=4, K=3, g=2, b=4, pad=2):
    rng = np.random.default_rng(seed)
    P = g * b + 2 * pad
    field = (slice(pad, pad + g * b),) * 3
    names = ["a", "b", "c"]
    concepts = [{n: rng.random((P, P, P)) < q for n, q in zip(names, (0.05, 0.3, 0.6))} for _ in range(N)]
    A = rng.normal(size=(N, K, g, g, g)).astype(np.float32)
    T = np.quantile(A.transpose(1, 0, 2, 3, 4).reshape(K, -1), 0.7, axis=1).astype(np.float32)
    return A, T, concepts, names, field, b


# --------------------------------------------------------------------------------------------
# IoU, both mask kinds
# --------------------------------------------------------------------------------------------

def test_block_iou_matches_direct_numpy():
    A, T, concepts, names, field, b = _random_case()
    M = A > T[None, :, None, None, None]
    counts = concept_counts(concepts, M.shape[2:], field)
    al = block_alignment(mask_entries(M), counts, M.shape[1])
    ref = _direct_iou(_blocks(M, b), concepts, names, field)
    np.testing.assert_allclose(al.iou, ref, rtol=0, atol=1e-12)
    assert al.names == names and al.kind == "block"


def test_block_iou_subset_of_samples():
    A, T, concepts, names, field, b = _random_case(seed=3, N=5)
    M = A > T[None, :, None, None, None]
    keep = np.array([True, False, True, True, False])
    al = block_alignment(mask_entries(M), concept_counts(concepts, M.shape[2:], field), M.shape[1], samples=keep)
    ref = _direct_iou(_blocks(M[keep], b), [c for c, k in zip(concepts, keep) if k], names, field)
    np.testing.assert_allclose(al.iou, ref, atol=1e-12)
    assert al.n_samples == 3


def test_interpolated_iou_matches_direct_numpy():
    A, T, concepts, names, field, b = _random_case(seed=1)
    size = field[0].stop - field[0].start
    up = np.stack([np.stack([_trilinear(a, size) for a in s]) for s in A])
    ref = _direct_iou(up > T[None, :, None, None, None], concepts, names, field)
    al = interpolated_alignment(A, T, concepts, field)
    np.testing.assert_allclose(al.iou, ref, atol=1e-12)
    # batches streamed in pieces give the same
    al2 = interpolated_alignment([A[:1], A[1:3], A[3:]], T, concepts, field, unit_chunk=1)
    np.testing.assert_array_equal(al2.inter, al.inter)
    np.testing.assert_array_equal(al2.union, al.union)


def test_counts_for_several_grids_agree_with_one():
    A, T, concepts, names, field, b = _random_case()
    two = concept_counts_grids(concepts, [(2, 2, 2), (4, 4, 4)], field)
    one = concept_counts(concepts, (4, 4, 4), field)
    np.testing.assert_array_equal(two[1].counts, one.counts)
    assert two[0].cell_volume == 64 and two[1].cell_volume == 8
    np.testing.assert_array_equal(two[0].totals, two[1].totals)


# --------------------------------------------------------------------------------------------
# The shuffle control on constructed activations
# --------------------------------------------------------------------------------------------

def _constructed(seed=0, n=20, g=4, b=4):
    """n fractured + n healthy samples on a g^3 grid of b^3 blocks. Concepts: a "zone" of one
    random cell in each fractured sample (empty otherwise), a "body" of the lower half of the
    field in every sample. Units: 0 copies the zone, 1 fires everywhere in fractured samples,
    2 fires in one random cell of every sample."""
    rng = np.random.default_rng(seed)
    N, P = 2 * n, g * b
    labels = np.array([1] * n + [0] * n)
    field = (slice(0, P),) * 3
    concepts, M = [], np.zeros((N, 3, g, g, g), bool)
    for i in range(N):
        zone_cells = np.zeros((g, g, g), bool)
        if labels[i]:
            zone_cells[tuple(rng.integers(0, g, 3))] = True
            M[i, 1] = True
        M[i, 0] = zone_cells
        M[i, 2][tuple(rng.integers(0, g, 3))] = True
        body = np.zeros((P, P, P), bool)
        body[P // 2:] = True
        concepts.append({"zone": _blocks(zone_cells, b), "body": body})
    return M, labels, concepts, field


def test_copying_unit_is_a_detector_and_everywhere_unit_is_not():
    M, labels, concepts, field = _constructed()
    counts = concept_counts(concepts, M.shape[2:], field)
    al = block_alignment(mask_entries(M), counts, 3, labels, n_perm=200, seed=0)
    t = unit_table(al)
    zone = al.names.index("zone")
    assert al.iou[0, zone] == pytest.approx(1.0)
    assert al.p[0, zone] < 0.01
    assert t.loc[0, "detector"] and t.loc[0, "concept"] == "zone"
    # fires everywhere in fractured samples: IoU with the body is high (> 0.04) but the
    # shuffle pairs it with another fractured sample's body and gets the same: p = 1
    body = al.names.index("body")
    assert al.iou[1, body] > 0.04
    assert al.p[1, body] == pytest.approx(1.0)
    assert not t.loc[1, "detector"]
    assert not t.loc[2, "detector"]


def test_shuffle_p_values_are_valid_under_the_null():
    """Masks independent of the concepts: about 5 % of the p-values fall below 0.05; and a class
    of 3 vertebrae (3! = 6 pairings) can never give p < 0.05, however well a unit matches."""
    rng = np.random.default_rng(7)
    N, K, g, b = 30, 60, 4, 2
    labels = np.array([0, 1] * (N // 2))
    concepts = [{"x": _blocks(rng.random((g, g, g)) < 0.2, b)} for _ in range(N)]
    M = rng.random((N, K, g, g, g)) < 0.1
    al = block_alignment(mask_entries(M), concept_counts(concepts, (g, g, g), (slice(0, g * b),) * 3), K,
                         labels, n_perm=200, seed=1)
    assert 0.0 <= (al.p[:, 0] < 0.05).mean() <= 0.15
    Mc, labels_c, concepts_c, field = _constructed(n=3)
    keep = labels_c == 1
    al3 = block_alignment(mask_entries(Mc), concept_counts(concepts_c, Mc.shape[2:], field), 3, labels_c,
                          n_perm=200, samples=keep)
    assert al3.iou[0, al3.names.index("zone")] == pytest.approx(1.0)
    assert al3.p[0, al3.names.index("zone")] > 0.05


def test_too_few_permutations_warn():
    M, labels, concepts, field = _constructed(n=4)
    al = block_alignment(mask_entries(M), concept_counts(concepts, M.shape[2:], field), 3, labels, n_perm=50)
    with pytest.warns(UserWarning, match="cannot give p < 0.01"):
        t = unit_table(al)
    assert not t["detector"].any()


def test_p_value_is_counted_as_specified():
    """p = (1 + #perm >= observed) / (1 + n_perm), recomputed here from explicit pairings."""
    M, labels, concepts, field = _constructed(seed=2, n=6)
    counts = concept_counts(concepts, M.shape[2:], field)
    n_perm = 30
    al = block_alignment(mask_entries(M), counts, 3, labels, n_perm=n_perm, seed=5)
    P = same_class_pairings(labels, n_perm, seed=5)
    Mb = _blocks(M, 4)
    names = al.names
    obs = np.array([[sum((Mb[i, k] & concepts[i][c]).sum() for i in range(len(M))) for c in names] for k in range(3)])
    exceed = np.zeros_like(obs)
    for row in P:
        assert np.all(labels[row] == labels) and sorted(row) == list(range(len(row)))
        perm = np.array([[sum((Mb[i, k] & concepts[row[i]][c]).sum() for i in range(len(M))) for c in names]
                         for k in range(3)])
        exceed += perm >= obs
    np.testing.assert_allclose(al.p, (1 + exceed) / (1 + n_perm))


def test_control_table_groups():
    M, labels, concepts, field = _constructed()
    al = block_alignment(mask_entries(M), concept_counts(concepts, M.shape[2:], field), 3, labels, n_perm=200)
    t = unit_table(al)
    ctl = control_table(t, top=[0], untrained=t.assign(detector=False), untrained_top=[1], n_draws=30)
    assert list(ctl["group"]) == ["top-1 c_k units", "1 random units", "all units", "untrained: all units",
                                  "untrained: top-1 c_k units"]
    assert ctl.loc[0, "detectors"] == 1 and ctl.loc[2, "detectors"] == 1
    assert ctl.loc[3, "detectors"] == 0
    assert 0 <= ctl.loc[1, "detectors"] <= 1


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

def test_no_concept_masks_says_what_needs_the_phantom(tmp_path):
    rows = pd.DataFrame({"case": ["a"], "label": [20], "ct_path": ["a/L1_ct.npy"], "mask_path": ["a/L1_mask.npy"],
                         "concept_path": [""]})
    with pytest.raises(NoConceptMasksError) as e:
        RunConcepts(rows, tmp_path)
    msg = str(e.value)
    assert "phantom" in msg and "ablation" in msg and "concepts.json" in msg
    with pytest.raises(NoConceptMasksError):
        RunConcepts(rows.drop(columns="concept_path"), tmp_path)


def test_empty_false_positive_set_says_so():
    M, labels, concepts, field = _constructed(n=3)
    al = block_alignment(mask_entries(M), concept_counts(concepts, M.shape[2:], field), 3)
    for empty in (None, pd.DataFrame(columns=["unit", "delta"])):
        with pytest.raises(UndefinedCorrelationError, match="no false positives"):
            fp_concept_table(al, empty, concepts=["zone"])


def test_layers_below():
    assert layers_below("down_tr512") == ["down_tr256", "down_tr128"]
    assert layers_below("down_tr128") == ["down_tr64"]


# --------------------------------------------------------------------------------------------
# The causal check
# --------------------------------------------------------------------------------------------

class _Toy(nn.Module):
    """feat: K channels = the input copied K times; logit = 20 * mean(channel 0) - 5."""

    def __init__(self, K=8):
        super().__init__()
        self.feat = nn.Conv3d(1, K, 1, bias=False)
        nn.init.ones_(self.feat.weight)

    def forward(self, x):
        a = self.feat(x)
        return 20 * a[:, 0].mean(dim=(1, 2, 3)) - 5


def test_zeroed_hooks_change_the_layer_and_leave_the_network_unchanged():
    from vfcore.model import build_model

    torch.manual_seed(0)
    model = build_model("small").eval()
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        before = model(x)
        with zeroed(model, "down_tr512", units=[0, 3]):
            during = model(x)
            A = model.features(x)
        after = model(x)
        with zeroed(model, "down_tr512", keep=[5]):
            A_keep = model.features(x)
    assert torch.equal(before, after)
    assert not torch.equal(before, during)
    assert torch.all(A[:, [0, 3]] == 0) and torch.any(A[:, 5] != 0)
    assert torch.all(A_keep[:, [0, 1, 2, 3, 4, 6]] == 0) and torch.any(A_keep[:, 5] != 0)
    assert not model.down_tr512._forward_hooks


def test_ablation_table_on_a_toy_with_a_known_answer():
    model = _Toy(8)
    x = torch.rand(12, 1, 4, 4, 4) * 0.2 + 0.6      # logit 20 * 0.7 - 5 > 0: all positive
    labels = np.array([1] * 8 + [0] * 4)
    t = ablation_table(model, x, labels, "feat", ranked=[0, 1, 2, 3, 4, 5, 6, 7], ks=(1, 2), n_random=10)
    assert t.attrs["n_fractures"] == 8 and t.attrs["n_tp"] == 8
    top = t[(t["selection"] == "top")].set_index(["mode", "k"])
    assert top.loc[("zero", 1), "recall"] == 0.0        # unit 0 carries the decision
    assert top.loc[("keep", 1), "recall"] == 1.0        # keeping only unit 0 keeps it
    rand = t[(t["mode"] == "zero") & (t["selection"] == "random") & (t["k"] == 1)]
    assert len(rand) == 10 and set(rand["recall"]) <= {0.0, 1.0}
    s = ablation_summary(t).set_index(["mode", "k"])
    assert s.loc[("zero", 1), "lost_top"] == 1.0
    assert s.loc[("zero", 1), "lost_random"] == pytest.approx(1 - rand["recall"].mean())


def test_ablation_with_negatives_reports_fpr_and_auc():
    """Issue 26: recall alone is won by a network that calls everything fractured; with the
    healthy vertebrae run too, each condition has its false-positive rate and AUC."""
    model = _Toy(8)
    x = torch.rand(12, 1, 4, 4, 4) * 0.2 + 0.6      # all called fractured, healthy ones too
    labels = np.array([1] * 8 + [0] * 4)
    t = ablation_table(model, x, labels, "feat", ranked=list(range(8)), ks=(1,), n_random=4, negatives=True)
    assert t.attrs["n_healthy"] == 4 and t.attrs["n_fractures"] == 8
    intact = t[t["mode"] == "none"].iloc[0]
    assert intact["recall"] == 1.0 and intact["fpr"] == 1.0       # recall 1, but every healthy one too
    assert 0.0 <= intact["auc"] <= 1.0
    top = t[t["selection"] == "top"].set_index(["mode", "k"])
    assert top.loc[("zero", 1), "recall"] == 0.0 and top.loc[("zero", 1), "fpr"] == 0.0
    s = ablation_summary(t).set_index(["mode", "k"])
    assert {"auc_intact", "auc_top", "auc_random", "auc_random_sd", "fpr_top"} <= set(s.columns)
    both = ablation_table(model, x, labels, "feat", ranked=list(range(8)), ks=(1,), n_random=2, negatives=True,
                          extra={"other": [3, 0, 1]})
    s2 = ablation_summary(both).set_index(["mode", "k"])
    assert s2.loc[("zero", 1), "recall_other"] == 1.0 and s2.loc[("zero", 1), "recall_top"] == 0.0  # unit 3 is not unit 0
    assert "auc_other" in s2 and "fpr_other" in s2
    few = ablation_table(model, x, labels, "feat", ranked=list(range(8)), ks=(1,), n_random=1, negatives=True,
                         max_negatives=2)
    assert few.attrs["n_healthy"] == 2 and few.attrs["n_healthy_all"] == 4
    plain = ablation_table(model, x, labels, "feat", ranked=list(range(8)), ks=(1,), n_random=2)
    assert "auc" not in plain and "auc_top" not in ablation_summary(plain)


def test_ablation_fast_path_equals_the_hooks():
    """The cached activations + network above give what the hooks on the full network give."""
    from vfcore.model import build_model

    torch.manual_seed(2)
    model = build_model("small").eval()
    x = torch.rand(6, 1, 32, 32, 32)
    labels = np.array([1, 1, 1, 1, 0, 1])
    kw = dict(ks=(1, 5), n_random=3, batch_size=4, threshold=0.0, n_units=128)
    ranked = list(range(127, -1, -1))
    fast = ablation_table(model, x, labels, "down_tr512", ranked, fast=True, **kw)
    hooks = ablation_table(model, x, labels, "down_tr512", ranked, fast=False, **kw)
    assert list(fast["mode"]) == list(hooks["mode"]) and list(fast["k"]) == list(hooks["k"])
    np.testing.assert_allclose(fast["mean_p_tp"], hooks["mean_p_tp"], rtol=0, atol=1e-6)
    assert not model.down_tr512._forward_hooks


# --------------------------------------------------------------------------------------------
# Grad-CAM
# --------------------------------------------------------------------------------------------

def test_occlusion_map_finds_the_block_the_output_depends_on():
    """A toy whose logit is the mean of one 8^3 block of the field: occluding that block (and
    only it) drops P(fracture), so the map is 1 there and 0 elsewhere."""
    from vfcore.analysis.saliency import occlusion_map

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return (x[:, 0, 8:16, 0:8, 0:8].mean(dim=(1, 2, 3)) * 10 - 5 + self.w)[:, None]

    field = (slice(0, 24),) * 3
    hu = np.ones((24, 24, 24), dtype=np.float32)
    m = occlusion_map(Block(), hu, lambda h: h[:, None], field, fill=0.0, cell=8, batch_size=5)
    assert m.shape == hu.shape and m[8:16, 0:8, 0:8].min() == pytest.approx(1.0)
    rest = m.copy()
    rest[8:16, 0:8, 0:8] = 0
    assert np.abs(rest).max() == 0


@pytest.mark.parametrize("preset", ["small", "paper"])
def test_grad_cam_shapes_and_target_layer(preset):
    from vfcore.data import to_network_input
    from vfcore.dissect.artifacts import network_field
    from vfcore.model import build_model, get_preset
    from vfcore.analysis.saliency import grad_cam, patch_grad_cam

    torch.manual_seed(1)            # (seed 0's untrained paper network has an all-zero map)
    p = get_preset(preset)
    model = build_model(preset).eval()
    hu = (np.random.default_rng(0).normal(200, 300, (96, 96, 96))).astype(np.int16)
    x = to_network_input(hu, p)
    cam = grad_cam(model, x, p.dissect_layer)
    assert cam.shape == (p.input_size,) * 3 and cam.min() == 0 and cam.max() == 1
    on_patch = patch_grad_cam(model, hu, p.dissect_layer, lambda h: to_network_input(h, p), network_field(p))
    assert on_patch.shape == (96, 96, 96)
    outside = np.ones((96, 96, 96), bool)
    outside[network_field(p)] = False
    assert np.all(on_patch[outside] == 0)
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    with pytest.raises(Exception, match="no layer named"):
        grad_cam(model, x, "nope")
    # an independent Grad-CAM at the dissected layer, by hand: w_k = mean of d logit / d A_k,
    # ReLU(sum_k w_k A_k), trilinear to the input grid, min-max normalised
    twin = copy.deepcopy(model)
    seen = {}

    def record(_m, _i, out):
        out.retain_grad()
        seen["A"] = out

    handle = getattr(twin, p.dissect_layer).register_forward_hook(record)
    try:
        for m in twin.modules():
            if isinstance(m, (nn.ReLU, nn.LeakyReLU)):
                m.inplace = False
        twin(x).sum().backward()
    finally:
        handle.remove()
    A, grad = seen["A"], seen["A"].grad
    grid = {"small": 8, "paper": 8}[p.name]                 # both dissect an 8^3 grid (issue 11)
    assert A.shape[1] == (16 * p.base) and tuple(A.shape[2:]) == (grid,) * 3
    raw = torch.relu((grad.mean(dim=(2, 3, 4), keepdim=True) * A).sum(dim=1, keepdim=True))
    up = torch.nn.functional.interpolate(raw, size=x.shape[2:], mode="trilinear", align_corners=False)[0, 0]
    ref = ((up - up.min()) / (up.max() - up.min())).detach().numpy()
    np.testing.assert_allclose(cam, ref, atol=1e-4)


def test_saliency_iou_against_numpy():
    from vfcore.analysis.saliency import saliency_iou

    rng = np.random.default_rng(0)
    s = rng.random((8, 8, 8))
    c = {"x": rng.random((8, 8, 8)) < 0.3}
    t = saliency_iou(s, c, threshold=0.6)
    m = s > 0.6
    assert t.loc[0, "iou"] == pytest.approx((m & c["x"]).sum() / (m | c["x"]).sum())


# --------------------------------------------------------------------------------------------
# Draft findings
# --------------------------------------------------------------------------------------------

def test_findings_text_on_a_constructed_case():
    r = np.zeros(120)
    r[[87, 71, 103, 4, 9]] = [9.0, 8.0, 7.0, 6.0, 5.0]
    table = pd.DataFrame({"unit": [87, 71, 103, 4, 9], "detector": [True, True, True, True, False],
                          "concept": ["superior endplate", "superior endplate", "fracture-deformity zone",
                                      "disc above", "lung"]})
    text = draft_findings("T7", 0.98, r, concept_dictionary(table))
    assert text == ("T7: fracture suspected (p = 0.98). Evidence: superior endplate (units 87, 71), "
                    "fracture-deformity zone (unit 103); also uses disc above (unit 4). "
                    "Unit 9 has no significant concept.")
    # units 87 and 71 detect the endplate over the set, but miss it on this vertebra
    away = draft_findings("T7", 0.98, r, concept_dictionary(table), off_target=[87, 71])
    assert away == ("T7: fracture suspected (p = 0.98). Evidence: fracture-deformity zone (unit 103); "
                    "also uses disc above (unit 4); detectors whose masks miss their concept on this "
                    "vertebra: superior endplate (units 87, 71). Unit 9 has no significant concept.")
    low = draft_findings("L1", 0.12, np.zeros(5), {})
    assert low.startswith("L1: no fracture suspected (p = 0.12).") and "No unit" in low


def test_student_dictionary(tmp_path):
    path = tmp_path / "concepts.json"
    path.write_text('{"units": {"17": {"label": "endplate", "note": ""}, "3": {"label": " ", "note": "x"}}}')
    assert student_dictionary(path) == {17: "endplate", 3: None}
    assert student_dictionary(tmp_path / "missing.json") == {}
    r = np.zeros(20)
    r[[17, 3]] = [2.0, 1.0]
    assert "endplate (unit 17)" in draft_findings("L2", 0.7, r, student_dictionary(path), evidence=("endplate",))


def test_M_k_is_the_mask_used():
    """The interpolated masks are M_k of the upsampled map: one unit, a peak just above T."""
    a = np.zeros((1, 2, 2, 2), np.float32)
    a[0, 0, 0, 0] = 1.0
    T = np.array([0.9], np.float32)
    field = (slice(0, 4),) * 3
    al = interpolated_alignment(a[None], T, [{"x": np.ones((4, 4, 4), bool)}], field)
    up = _trilinear(a[0], 4)
    assert al.inter[0, 0] == int(M_k(up[None], T).sum())


# --------------------------------------------------------------------------------------------
# A real (tiny) run: the dissection's tail and the phantom's concept patches
# --------------------------------------------------------------------------------------------

def test_block_alignment_of_a_run_matches_direct_numpy(tiny_run):  # noqa: F811  (the fixture)
    from vfcore.dissect import load_artifacts
    from vfcore.phantom.concepts import CONCEPTS

    art = load_artifacts(tiny_run)
    d, field = art.dissection, art.field
    masks = RunConcepts.from_run(tiny_run, art.samples)
    first = masks[0]
    row = art.samples.iloc[0]
    concept = np.load(tiny_run / "patches" / row["concept_path"])
    vert = np.load(tiny_run / "patches" / row["mask_path"])
    # a concept of the target vertebra is its own voxels of that label
    np.testing.assert_array_equal(first["superior endplate"], (concept == 1) & (vert == int(row["label"])))
    assert CONCEPTS[7] in masks.names and "physiological wedge" in masks.names
    counts = concept_counts(masks, d.spatial_shape, field)
    al = block_alignment(d.tail, counts, d.n_units)
    units = np.argsort(-d.mask_size.sum(axis=0))[:4]
    b = (field[0].stop - field[0].start) // d.spatial_shape[0]
    dense = np.stack([_blocks(d.masks(i, units), b) for i in range(d.n_samples)])
    ref = _direct_iou(dense, [masks[i] for i in range(d.n_samples)], counts.names, field)
    np.testing.assert_allclose(al.iou[units], ref, atol=1e-12)


def test_off_target_names_detectors_whose_mask_misses_their_concept_here():
    from vfcore.analysis.findings import off_target
    concept = np.zeros((4, 4, 4), bool)
    concept[0] = True                                    # this vertebra's endplate: the first slab
    masks = [np.zeros((4, 4, 4), bool) for _ in range(3)]
    masks[0][0, 0, 0] = True                             # unit 10 touches it
    masks[1][3, 3, 3] = True                             # unit 11 fires elsewhere
    masks[2][3, 3, 3] = True                             # unit 12's concept is not on this vertebra
    dictionary = {10: "superior endplate", 11: "superior endplate", 12: "Schmorl node"}
    assert off_target([10, 11, 12], masks, {"superior endplate": concept}, dictionary) == [11]
