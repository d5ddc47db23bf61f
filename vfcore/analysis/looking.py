"""Where a unit *looks*, not where it *is*: input gradients of M_k, receptive fields, occlusion.

A unit's mask M_k(x) = A_k(x) > T_k says where on the dissected grid the unit's activation
is high. Every grid cell, though, is computed from a whole block of the input, its
receptive field, and for a deep layer that block can be as large as the network's field of
view. So the mask's cells need not be where the evidence is. This module measures three things:

* :func:`theoretical_rf`: the receptive field of one cell of a layer (mm), from the
  convolutions and pools below it (r_out = r_in + (kernel - 1) j_in, j_out = j_in stride;
  Araujo et al. 2019); :func:`effective_rf`: how far the input gradient of one cell
  actually reaches (Luo et al. 2016);
* :func:`mask_gradients`: G_k(x) = d/dx sum_{cells in M_k(x)} A_k(x, cell), the input
  gradient of the unit's activation summed over its own mask cells, in one backward pass for
  several units; :func:`gradient_share`: the share of |G_k| on a region (e.g. the target
  vertebra), to compare with the mask's share there and with chance (the region's share of
  the field);
* :func:`occlusion`: P(fracture) when a region of the HU patch is filled with a neutral value
  (soft tissue), against an equal-volume region elsewhere (:func:`equal_volume_cells`): a
  model-level check of where the evidence lies.

Why |gradient| and not gradient x input: the input is HU scaled to [0, 1], so gradient x input
is larger in bone than in soft tissue for the same sensitivity and would credit the vertebra
for being bright; |G| weighs every voxel by how much a change there moves the unit.

Analysis only: no drawing (notebook 06 shows the maps).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from vfcore.analysis.alignment import NoConceptMasksError, RunConcepts
from vfcore.data import read_patch
from vfcore.dissect.geometry import blocks_on_patch, patch_mask
from vfcore.dissect.ranking import outcomes
from vfcore.errors import DataValueError
from vfcore.forward import capture, evaluating, find_layer, model_device, probabilities
from vfcore.run import RunFolder

__all__ = ["theoretical_rf", "effective_rf", "layer_output", "mask_gradients", "gradient_on_patch",
           "gradient_share", "neutral_fill", "equal_volume_cells", "occlusion", "FRACTURE_SIGNS",
           "run_looking", "run_occlusion", "looking_summary", "occlusion_summary"]

#: The fracture concepts whose share of |G| is measured (the phantom's 7, 1, 2, 8).
FRACTURE_SIGNS = ("fracture-deformity zone", "superior endplate", "inferior endplate",
                  "sclerotic condensation band")


# --------------------------------------------------------------------------------------------
# Receptive fields
# --------------------------------------------------------------------------------------------

def _pair(v) -> int:
    return int(v[0] if isinstance(v, (tuple, list)) else v)


def theoretical_rf(model: nn.Module, layer: str, input_spacing: float = 1.0) -> dict[str, float]:
    """Receptive field of one cell of ``layer`` (its output), from the layers registered before it.

    Walks ``model.modules()`` in registration order up to the end of ``layer`` (for
    ``vfcore.model.FractureNet`` the encoder's order) and applies, per Conv / MaxPool / AvgPool
    (cubic kernels, dilation 1), r <- r + (kernel - 1) j and j <- j stride (r, j in input
    voxels; r = 1, j = 1 at the input). Returns ``rf_voxels`` r, ``jump_voxels`` j (the grid's
    cell size), and both in mm (``input_spacing`` mm per input voxel). Padding does not change
    r; at the field's edge part of the window lies in the zero padding.
    """
    target = find_layer(model, layer)
    inside = {id(m) for m in target.modules()}
    r, j, seen = 1, 1, False
    for m in model.modules():
        if id(m) in inside:
            seen = True
        elif seen:
            break                                  # past the end of ``layer``
        if isinstance(m, (nn.Conv3d, nn.Conv2d, nn.Conv1d, nn.MaxPool3d, nn.AvgPool3d)):
            k, s = _pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size)
            if getattr(m, "dilation", 1) not in (1, (1, 1, 1), (1, 1), (1,)):
                raise DataValueError(layer, "dilated convolutions are not handled")
            r, j = r + (k - 1) * j, j * s
    return {"rf_voxels": float(r), "jump_voxels": float(j), "rf_mm": r * input_spacing, "cell_mm": j * input_spacing}


def effective_rf(G: np.ndarray, spacing: float = 1.0, mass: float = 0.9, rel: float = 0.01) -> dict[str, object]:
    """How far a gradient map reaches. ``G`` [S, S, S] (input gradient of one cell).

    ``radius_mm``: the smallest radius (mm, about the |G|-weighted centre) holding ``mass`` of
    sum |G|; ``extent_mm`` [3]: per axis, the span of the voxels with |G| > ``rel`` max |G|;
    ``centre`` [3] the |G|-weighted centre (voxels). All zero for an all-zero map.
    """
    a = np.abs(np.asarray(G, dtype=np.float64))
    total = a.sum()
    if total <= 0:
        return {"radius_mm": 0.0, "extent_mm": [0.0] * a.ndim, "centre": [0.0] * a.ndim}
    idx = np.indices(a.shape).reshape(a.ndim, -1).astype(np.float64)
    w = a.reshape(-1) / total
    centre = idx @ w
    dist = np.sqrt(((idx - centre[:, None]) ** 2).sum(axis=0))
    order = np.argsort(dist)
    cum = np.cumsum(w[order])
    radius = dist[order][min(int(np.searchsorted(cum, mass)), len(cum) - 1)] * spacing
    big = np.nonzero(a > rel * a.max())
    extent = [float((b.max() - b.min() + 1) * spacing) for b in big]
    return {"radius_mm": float(radius), "extent_mm": extent, "centre": centre.tolist()}


# --------------------------------------------------------------------------------------------
# Input gradients of a unit's masked activation
# --------------------------------------------------------------------------------------------

class _Stop(Exception):
    pass


def layer_output(model: nn.Module, x: torch.Tensor, layer: str) -> torch.Tensor:
    """``layer``'s output for input ``x``, with the graph kept (nothing above the layer runs)."""
    out: list = []

    def hook(_m, _i, output):
        out.append(output[0] if isinstance(output, (tuple, list)) else output)
        raise _Stop

    handle = find_layer(model, layer).register_forward_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not out:
        raise DataValueError(layer, "the layer did not run in the forward pass")
    return out[0]


def mask_gradients(model: nn.Module, x: torch.Tensor, layer: str, units: Sequence[int],
                   masks: np.ndarray | None = None, cells: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """G_k = d/dx sum_{cell in M_k} A_k(cell) for several units of one input: [U, *x.shape[2:]].

    ``x`` [1, C, S, S, S] one network input; ``units`` [U]; ``masks`` bool [U, *grid] the
    cells to sum per unit (e.g. M_k(x) from :meth:`Dissection.masks`), or ``cells``: one grid
    index (i, j, l) per unit (the effective receptive field of that cell). Eval mode (batch
    norm uses its running statistics, so the U copies of x are independent: one batched
    backward gives every unit's gradient); C summed when the input has several channels.
    """
    if x.ndim != 5 or x.shape[0] != 1:
        raise DataValueError(None, f"x: expected one network input [1, C, S, S, S], got {tuple(x.shape)}")
    units = [int(u) for u in units]
    if (masks is None) == (cells is None):
        raise DataValueError(None, "give exactly one of masks= or cells=")
    device = model_device(model)                # wherever the caller keeps the model
    xs = x.detach().float().to(device).repeat(len(units), 1, 1, 1, 1).requires_grad_(True)
    with evaluating(model), torch.enable_grad():
        A = layer_output(model, xs, layer)                    # [U, K, *grid]
        a = A[torch.arange(len(units)), torch.as_tensor(units)]   # [U, *grid]
        if masks is not None:
            w = torch.as_tensor(np.asarray(masks, dtype=np.float32), device=a.device)
            if w.shape != a.shape:
                raise DataValueError(None, f"masks: expected {tuple(a.shape)}, got {tuple(w.shape)}")
        else:
            w = torch.zeros_like(a)
            for n, c in enumerate(cells):
                w[(n, *[int(v) for v in c])] = 1.0
        (g,) = torch.autograd.grad((a * w).sum(), xs)
    return g.sum(dim=1).detach().cpu().numpy().astype(np.float32)


def gradient_on_patch(G: np.ndarray, field: Sequence[slice], patch_shape: Sequence[int] = (96, 96, 96)) -> np.ndarray:
    """A map on the network input [..., s, s, s] -> the patch [..., *patch_shape]: each input
    voxel becomes the block of the field it averages (small preset: 2 mm -> 2^3 voxels of
    1 mm), zero outside the field (:func:`vfcore.dissect.geometry.blocks_on_patch`)."""
    return blocks_on_patch(G, field, patch_shape)


def gradient_share(G: np.ndarray, regions: Mapping[str, np.ndarray], field: Sequence[slice] | None = None) -> dict[str, float]:
    """Share of sum |G| that lies on each region: {name: sum_{region} |G| / sum |G|} (NaN when
    G is all zero). ``G`` and the bool ``regions`` on one grid (the patch:
    :func:`gradient_on_patch`), both cropped to ``field`` when given."""
    crop = (Ellipsis,) if field is None else tuple(field)
    a = np.abs(np.asarray(G, dtype=np.float64))[crop]
    total = a.sum()
    return {name: float(a[np.asarray(r, dtype=bool)[crop]].sum() / total) if total > 0 else float("nan")
            for name, r in regions.items()}


# --------------------------------------------------------------------------------------------
# Occlusion: the model-level check
# --------------------------------------------------------------------------------------------

def neutral_fill(hu: np.ndarray, vertebrae: np.ndarray, field: Sequence[slice] | None = None,
                 window: tuple[float, float] = (-100.0, 150.0), default: float = 40.0) -> float:
    """The median HU of the patch's soft tissue (no vertebra label, HU in ``window``) inside
    ``field``; ``default`` (40 HU, muscle) when there is none."""
    crop = (Ellipsis,) if field is None else tuple(field)
    h, v = np.asarray(hu)[crop], np.asarray(vertebrae)[crop]
    soft = h[(v == 0) & (h >= window[0]) & (h <= window[1])]
    return float(np.median(soft)) if soft.size else float(default)


def equal_volume_cells(candidates: np.ndarray, n_voxels: int, field: Sequence[slice], cell: int = 8,
                       rng: np.random.Generator | None = None) -> np.ndarray:
    """A region of ``n_voxels`` voxels of ``candidates`` (bool [patch]) made of whole ``cell``^3
    blocks of the field taken in random order (the last one partly, in C order), so it is
    compact, elsewhere, and of the same volume; fewer when the candidates run out."""
    rng = np.random.default_rng(0) if rng is None else rng
    cand = np.asarray(candidates, dtype=bool)
    out = np.zeros(cand.shape, dtype=bool)
    starts = [range(s.start, s.stop, cell) for s in field]
    blocks = [(i, j, k) for i in starts[0] for j in starts[1] for k in starts[2]]
    left = int(n_voxels)
    for b in rng.permutation(len(blocks)):
        if left <= 0:
            break
        i, j, k = blocks[b]
        sl = (slice(i, i + cell), slice(j, j + cell), slice(k, k + cell))
        inside = cand[sl]
        take = int(inside.sum())
        if take == 0:
            continue
        if take > left:
            flat = np.flatnonzero(inside)[:left]
            inside = np.zeros(inside.shape, dtype=bool)
            inside.flat[flat] = True
            take = left
        out[sl] |= inside
        left -= take
    return out


def occlusion(model: nn.Module, transform: Callable, hu: np.ndarray, regions: Mapping[str, np.ndarray],
              fill: float | Mapping[str, float], device: str | torch.device | None = None) -> dict[str, float]:
    """P(fracture) of one HU patch [96^3] unchanged (``"none"``) and with each region (bool
    [96^3]) set to ``fill`` HU (one value or one per region); eval mode, one batch.
    ``transform``: HU batch -> network input (e.g. ``Network.transform``); ``device``: where
    the model is (None: the device of its parameters)."""
    device = model_device(model) if device is None else device
    hu = np.asarray(hu)
    batch = [hu]
    for name, r in regions.items():
        h = hu.astype(np.float32).copy()
        h[np.asarray(r, dtype=bool)] = fill[name] if isinstance(fill, Mapping) else fill
        batch.append(h)
    x = transform(torch.as_tensor(np.stack(batch).astype(np.float32)).to(device))
    with evaluating(model), torch.no_grad():
        p = probabilities(model(x), len(batch)).cpu().numpy()
    return dict(zip(["none", *regions], (float(v) for v in p)))


# --------------------------------------------------------------------------------------------
# A run: the top units' gradients on the true positives, and occlusion
# --------------------------------------------------------------------------------------------

def _tp_samples(art, max_samples: int | None) -> np.ndarray:
    tp = np.flatnonzero(outcomes(art.labels, art.dissection.probability, art.meta["threshold"])["tp"])
    return tp if max_samples is None else tp[:int(max_samples)]


def _patches(run_dir, row) -> tuple[np.ndarray, np.ndarray, int]:
    run = RunFolder(run_dir)
    return read_patch(run.patch(row["ct_path"])), read_patch(run.patch(row["mask_path"])), int(row["label"])


def _fracture_signs(run_dir, art, samples: np.ndarray) -> dict[int, np.ndarray] | None:
    """{sample: bool [patch] union of :data:`FRACTURE_SIGNS`}, None without concept masks."""
    try:
        concepts = RunConcepts.from_run(run_dir, art.samples)
    except NoConceptMasksError:
        return None
    out = {}
    for i in samples:
        m = concepts[int(i)]
        out[int(i)] = np.any([m[c] for c in FRACTURE_SIGNS if c in m], axis=0)
    return out


def run_looking(run_dir, art, net, units: Sequence[int], max_samples: int | None = None,
                control: nn.Module | None = None) -> pd.DataFrame:
    """Per (unit, TP sample) pair where the unit fires: where its mask is and where it looks.

    ``art``: :func:`~vfcore.dissect.load_artifacts` of ``run_dir``; ``net``:
    :func:`~vfcore.dissect.load_network`; ``units``: e.g. the top-10 by c_k; the first
    ``max_samples`` true positives (default all). Columns: ``unit``, ``sample``,
    ``mask_target`` (share of the block mask M_k on the target vertebra), ``grad_target``
    (share of |G_k| there, :func:`mask_gradients`), ``grad_adjacent``, ``grad_outside``
    (no vertebra label), ``chance_target`` (the target's share of the field), and with
    ``control`` (e.g. an untrained network of the same preset) ``control_target``: its |G| for
    the same unit and cells. With concept masks (the phantom) ``grad_fracture`` (share on
    :data:`FRACTURE_SIGNS`), ``grad_fracture_other`` (the same map against the signs of the
    next TP sample, the pairing control) and ``chance_fracture``.
    """
    d, field = art.dissection, art.field
    samples = _tp_samples(art, max_samples)
    signs = _fracture_signs(run_dir, art, samples)
    units = [int(u) for u in units]
    rows = []
    for n, i in enumerate(samples):
        M = d.masks(int(i), units)
        fire = [k for k in range(len(units)) if M[k].any()]
        if not fire:
            continue
        hu, vert, label = _patches(run_dir, art.samples.loc[i])
        x = net.transform(torch.as_tensor(hu[None].astype(np.float32)))
        regions = {"target": vert == label, "adjacent": (vert > 0) & (vert != label), "outside": vert == 0}
        if signs is not None:
            regions["fracture"] = signs[int(i)]
            regions["fracture_other"] = signs[int(samples[(n + 1) % len(samples)])]
        us = [units[k] for k in fire]
        G = mask_gradients(net.model, x, net.layer, us, masks=M[fire])
        Gc = None if control is None else mask_gradients(control, x, net.layer, us, masks=M[fire])
        for j, u in enumerate(us):
            share = gradient_share(gradient_on_patch(G[j], field, vert.shape), regions, field)
            row = {"unit": u, "sample": int(i),
                   "mask_target": float(regions["target"][patch_mask(M[fire[j]], field, vert.shape)].mean()),
                   **{f"grad_{k}": v for k, v in share.items()},
                   "chance_target": float(regions["target"][field].mean())}
            if signs is not None:
                row["chance_fracture"] = float(regions["fracture"][field].mean())
            if Gc is not None:
                row["control_target"] = gradient_share(gradient_on_patch(Gc[j], field, vert.shape),
                                                       {"t": regions["target"]}, field)["t"]
            rows.append(row)
    return pd.DataFrame(rows)


def looking_summary(pairs: pd.DataFrame) -> dict[str, float]:
    """Means over the pairs of :func:`run_looking` (``n_pairs``, ``n_samples`` and the mean of
    every share column, NaN entries left out: a unit dead on all its cells has no gradient;
    ``n_control``: the pairs where the control has one)."""
    out = {"n_pairs": int(len(pairs)), "n_samples": int(pairs["sample"].nunique()) if len(pairs) else 0}
    if "control_target" in pairs:
        out["n_control"] = int(pairs["control_target"].notna().sum())
    for c in pairs.columns:
        if c not in ("unit", "sample"):
            out[c] = float(pairs[c].mean()) if len(pairs) else float("nan")
    return out


def _cells_without(region: np.ndarray, field: Sequence[slice], grid: Sequence[int]) -> np.ndarray:
    """bool [*grid]: the grid cells whose block of the field holds no voxel of ``region``."""
    r = np.asarray(region, dtype=bool)[tuple(field)]
    b = [n // g for n, g in zip(r.shape, grid)]
    return ~r.reshape(grid[0], b[0], grid[1], b[1], grid[2], b[2]).any(axis=(1, 3, 5))


def _mean_ratio(r: np.ndarray, r0: np.ndarray) -> float:
    """Mean of r / r0 over the entries with r0 > 0 (NaN when there are none)."""
    ok = r0 > 0
    return float(np.mean(r[ok] / r0[ok])) if ok.any() else float("nan")


def run_occlusion(run_dir, art, net, units: Sequence[int] = (), max_samples: int | None = None,
                  seed: int = 0) -> pd.DataFrame:
    """Occlusion on the true positives: one row per TP sample with P(fracture) unchanged
    (``p_none``), with the target vertebra (inside the field) set to :func:`neutral_fill`
    (``p_target``), and with an equal-volume region of 8 mm cells of soft tissue elsewhere
    (``p_elsewhere``, :func:`equal_volume_cells`); with concept masks also the fracture signs
    (``p_fracture``) against an equal volume of the target's other voxels in 4 mm cells
    (``p_body``). For ``units`` (e.g. the top-10) ``r_target`` / ``r_elsewhere``: the mean
    over the firing units of sum(M_k A_k) occluded / unoccluded (Eq. 2's r_k on the same
    cells M_k of the unoccluded sample), and ``r_off_target`` / ``r_off_elsewhere``: the same
    over the mask cells whose block holds no voxel of the target (does a cell off the vertebra
    depend on the vertebra?)."""
    d, field = art.dissection, art.field
    samples = _tp_samples(art, max_samples)
    signs = _fracture_signs(run_dir, art, samples)
    rng = np.random.default_rng(seed)
    units = [int(u) for u in units]
    rows = []
    for i in samples:
        hu, vert, label = _patches(run_dir, art.samples.loc[i])
        inf = np.zeros(vert.shape, dtype=bool)
        inf[tuple(field)] = True
        target = (vert == label) & inf
        regions = {"target": target,
                   "elsewhere": equal_volume_cells(inf & (vert == 0), int(target.sum()), field, 8, rng)}
        if signs is not None:
            fr = signs[int(i)] & inf
            regions["fracture"] = fr
            regions["body"] = equal_volume_cells(target & ~fr, int(fr.sum()), field, 4, rng)
        fill = neutral_fill(hu, vert, field)
        batch = [hu.astype(np.float32)]
        for r in regions.values():
            h = batch[0].copy()
            h[r] = fill
            batch.append(h)
        x = net.transform(torch.as_tensor(np.stack(batch)).to(model_device(net.model)))
        with evaluating(net.model), torch.no_grad(), capture(net.model, net.layer) as out:
            p = probabilities(net.model(x), len(batch)).cpu().numpy()
        row = {"sample": int(i), "fill_hu": fill, **{f"voxels_{k}": int(r.sum()) for k, r in regions.items()},
               "p_none": float(p[0]), **{f"p_{k}": float(v) for k, v in zip(regions, p[1:])}}
        if units:
            A = out[-1][:, units].float().cpu().numpy()
            M = d.masks(int(i), units)
            fire = [k for k in range(len(units)) if M[k].any()]
            r0 = np.array([(A[0, k] * M[k]).sum() for k in fire])
            off = _cells_without(target, field, M.shape[1:])       # cells with no target voxel
            Mo = [M[k] & off for k in fire]
            r0o = np.array([(A[0, k] * m).sum() for k, m in zip(fire, Mo)])
            for j, name in enumerate(regions, start=1):
                if name in ("target", "elsewhere"):
                    r = np.array([(A[j, k] * M[k]).sum() for k in fire])
                    row[f"r_{name}"] = _mean_ratio(r, r0)
                    ro = np.array([(A[j, k] * m).sum() for k, m in zip(fire, Mo)])
                    row[f"r_off_{name}"] = _mean_ratio(ro, r0o)
        rows.append(row)
    return pd.DataFrame(rows)


def occlusion_summary(table: pd.DataFrame, threshold: float = 0.5) -> pd.DataFrame:
    """Per occluded region of :func:`run_occlusion`: ``n`` samples, mean ``voxels``, mean
    ``drop`` of P(fracture) (p_none - p_region), its ``sd``, and ``flips``: how many fall below
    ``threshold`` (the run's decision threshold)."""

    rows = []
    for c in [c for c in table.columns if c.startswith("p_") and c != "p_none"]:
        name = c[2:]
        drop = table["p_none"] - table[c]
        rows.append({"region": name, "n": int(len(table)), "voxels": float(table[f"voxels_{name}"].mean()),
                     "drop": float(drop.mean()), "sd": float(drop.std(ddof=1)) if len(table) > 1 else float("nan"),
                     "flips": int((table[c] < threshold).sum())})
    return pd.DataFrame(rows)
