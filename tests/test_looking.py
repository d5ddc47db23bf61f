"""vfcore.analysis.looking against constructed cases with a known answer."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from vfcore.analysis.looking import (effective_rf, equal_volume_cells, gradient_on_patch, gradient_share,
                                    mask_gradients, neutral_fill, occlusion, theoretical_rf)
from vfcore.errors import DataValueError


def _shift_net() -> nn.Module:
    """``unit`` 0 of ``layer`` copies the input; unit 1 reads the voxel one step further along axis 0."""
    conv = nn.Conv3d(1, 2, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 1, 1, 1] = 1.0      # A_0(i) = x(i)
        conv.weight[1, 0, 2, 1, 1] = 1.0      # A_1(i) = x(i + 1 along axis 0)
    return nn.Sequential(OrderedDict(layer=conv, head=nn.Sequential(nn.Flatten(), nn.LazyLinear(1))))


def test_theoretical_rf_by_hand():
    net = nn.Sequential(OrderedDict(a=nn.Conv3d(1, 1, 3), b=nn.Conv3d(1, 1, 3), p=nn.MaxPool3d(2),
                                    c=nn.Conv3d(1, 1, 3), d=nn.Conv3d(1, 1, 5)))
    # r: 1 -> 3 -> 5 -> (pool) 6, j 2 -> 6 + 2*2 = 10; layer d not counted
    assert theoretical_rf(net, "c") == {"rf_voxels": 10.0, "jump_voxels": 2.0, "rf_mm": 10.0, "cell_mm": 2.0}
    assert theoretical_rf(net, "c", input_spacing=2.0)["rf_mm"] == 20.0


def test_theoretical_rf_small_preset_down_tr512():
    from vfcore.model import build_model

    # down_tr64: 3,3,pool -> 6 (j 2); down_tr128: +4+4, pool -> 16 (j 4); down_tr256, 512: 4 convs +8 each -> 48
    rf = theoretical_rf(build_model("small"), "down_tr512", input_spacing=2.0)
    assert rf == {"rf_voxels": 48.0, "jump_voxels": 4.0, "rf_mm": 96.0, "cell_mm": 8.0}


def test_gradient_share_is_one_where_the_unit_looks():
    net = _shift_net().eval()
    x = torch.rand(1, 1, 6, 6, 6)
    net(x)                                    # materialise the lazy head
    M = np.zeros((2, 6, 6, 6), dtype=bool)
    M[:, 2:4, 1:3, 1:5] = True                # both units fire on the same cells
    G = mask_gradients(net, x, "layer", [0, 1], masks=M)
    assert G.shape == (2, 6, 6, 6)
    shifted = np.roll(M[0], 1, axis=0)        # where unit 1 reads: one step further along axis 0
    np.testing.assert_array_equal(G[0], M[0].astype(np.float32))
    np.testing.assert_array_equal(G[1], shifted.astype(np.float32))
    assert gradient_share(G[0], {"mask": M[0]})["mask"] == 1.0
    s = gradient_share(G[1], {"mask": M[0], "shifted": shifted, "only shifted": shifted & ~M[0]})
    assert s["shifted"] == 1.0 and s["only shifted"] == pytest.approx(0.5)   # 2 of 4 slices leave the mask


def test_mask_gradients_one_cell_and_batch_independent():
    torch.manual_seed(0)
    net = nn.Sequential(OrderedDict(layer=nn.Sequential(nn.Conv3d(1, 3, 3, padding=1), nn.BatchNorm3d(3)),
                                    head=nn.Conv3d(3, 1, 1))).eval()
    x = torch.randn(1, 1, 5, 5, 5)
    both = mask_gradients(net, x, "layer", [0, 2], cells=[(2, 2, 2), (0, 0, 0)])
    for j, (u, c) in enumerate([(0, (2, 2, 2)), (2, (0, 0, 0))]):
        xi = x.clone().requires_grad_(True)
        a = net.layer(xi)[0, u][c]
        (g,) = torch.autograd.grad(a, xi)
        np.testing.assert_allclose(both[j], g[0, 0].numpy(), rtol=1e-6, atol=1e-7)
    window = np.zeros((5, 5, 5), bool)
    window[:2, :2, :2] = True                 # the 3^3 kernel of cell (0, 0, 0), less the zero padding
    s = gradient_share(both[1], {"window": window, "far": ~window})
    assert s["window"] == pytest.approx(1.0) and s["far"] == 0.0
    with pytest.raises(DataValueError):
        mask_gradients(net, x, "layer", [0], masks=np.ones((1, 5, 5, 5), bool), cells=[(0, 0, 0)])


def test_gradient_on_patch_blocks():
    g = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    field = (slice(2, 6),) * 3
    up = gradient_on_patch(g, field, (8, 8, 8))
    expect = np.zeros((8, 8, 8), np.float32)
    expect[2:6, 2:6, 2:6] = g.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    np.testing.assert_array_equal(up, expect)


def test_effective_rf_point_and_cube():
    G = np.zeros((9, 9, 9))
    G[4, 4, 4] = -3.0
    e = effective_rf(G, spacing=2.0)
    assert e["radius_mm"] == 0.0 and e["extent_mm"] == [2.0, 2.0, 2.0] and e["centre"] == [4.0, 4.0, 4.0]
    G[2:7, 3:6, 4] = 1.0
    assert effective_rf(G, spacing=1.0)["extent_mm"] == [5.0, 3.0, 1.0]
    assert effective_rf(np.zeros((3, 3, 3)))["radius_mm"] == 0.0


def test_neutral_fill_and_equal_volume_cells():
    hu = np.full((8, 8, 8), 1000, np.int16)
    vert = np.zeros((8, 8, 8), np.int16)
    hu[:4] = 30
    hu[:2] = 50
    vert[6:] = 20
    assert neutral_fill(hu, vert) == 40.0     # median of 2 slices of 50 and 2 of 30; bone excluded
    assert neutral_fill(np.full((4, 4, 4), 900), np.zeros((4, 4, 4))) == 40.0
    cand = np.zeros((8, 8, 8), bool)
    cand[:, :4] = True
    r = equal_volume_cells(cand, 100, (slice(0, 8),) * 3, cell=4, rng=np.random.default_rng(1))
    assert r.sum() == 100 and not (r & ~cand).any()
    assert equal_volume_cells(cand, 10_000, (slice(0, 8),) * 3, cell=4).sum() == cand.sum()


class _MeanOfRegion(nn.Module):
    """Logit = 10 * (mean of the input over region A - 0.5): it ignores everything else."""

    def __init__(self, region: np.ndarray):
        super().__init__()
        self.register_buffer("w", torch.as_tensor(region, dtype=torch.float32) / float(region.sum()))

    def forward(self, x):
        return 10.0 * ((x[:, 0] * self.w).sum(dim=(1, 2, 3)) - 0.5)


def test_occlusion_of_an_ignored_region_changes_nothing():
    A = np.zeros((6, 6, 6), bool)
    A[1:3, 1:3, 1:3] = True
    B = np.zeros((6, 6, 6), bool)
    B[4:, 4:, 4:] = True
    model = _MeanOfRegion(A)
    hu = np.ones((6, 6, 6), np.float32)
    p = occlusion(model, lambda h: h[:, None], hu, {"A": A, "B": B}, fill=0.0)
    sig = lambda v: 1 / (1 + np.exp(-v))    # noqa: E731
    assert p["none"] == pytest.approx(sig(5.0)) and p["B"] == p["none"]
    assert p["A"] == pytest.approx(sig(-5.0))


def test_cells_without_a_region():
    from vfcore.analysis.looking import _cells_without

    region = np.zeros((12, 12, 12), bool)
    region[5, 5, 5] = True                    # field 4..12 -> local (1, 1, 1): cell (0, 0, 0) of a 2^3 grid
    region[0, 0, 0] = True                    # outside the field: ignored
    off = _cells_without(region, (slice(4, 12),) * 3, (2, 2, 2))
    expect = np.ones((2, 2, 2), bool)
    expect[0, 0, 0] = False
    np.testing.assert_array_equal(off, expect)
