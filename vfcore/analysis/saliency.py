"""Where versus what: Grad-CAM (MONAI) on the 3D fracture network, on the patch, and its IoU with concepts.

Saliency says *where* the evidence for "fracture" lies; dissection says *what* the units there
detect (the paper, Sec. 1). Grad-CAM (Selvaraju et al. 2017) weights a layer's maps by the
spatially averaged gradient of the fracture logit and keeps the positive part; MONAI's
``monai.visualize.GradCAM`` does it for 3D networks and upsamples the map to the input grid.
Here the target layer is the dissected one, so the map lives on the same grid as the units'
masks M_k. :func:`occlusion_map` is a "where" that asks the output instead of a gradient: the
drop of P(fracture) when each block of the field is filled with soft tissue. This module draws
nothing; notebook 06 shows the maps beside the units' masks.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from monai.visualize import GradCAM
from torch import nn

from vfcore.dissect.geometry import upsample_to_patch
from vfcore.errors import DataValueError
from vfcore.forward import evaluating, find_layer, probabilities


class _Logits2D(nn.Module):
    """The fracture network with its logits as [B, 1] (MONAI's CAM expects [B, classes])."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x)
        return y.reshape(y.shape[0], -1)


def _no_inplace(model: nn.Module) -> dict[nn.Module, bool]:
    """Switch in-place ReLUs off (backward hooks cannot see through in-place ops); returns the
    previous flags to restore."""
    flags = {}
    for m in model.modules():
        if hasattr(m, "inplace") and isinstance(m, (nn.ReLU, nn.LeakyReLU)):
            flags[m] = m.inplace
            m.inplace = False
    return flags


def _minmax(cam: torch.Tensor) -> torch.Tensor:
    """Each map scaled so that its min -> 0 and max -> 1 (all zero when constant). MONAI's
    default normaliser maps (min, max) to (1, 0), flipping the map: not used."""
    flat = cam.reshape(cam.shape[0], -1)
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    shape = (-1,) + (1,) * (cam.ndim - 1)
    return (cam - lo.reshape(shape)) / span.reshape(shape)


def _hook_keys(module: nn.Module) -> dict[str, set]:
    return {name: set(d) for name, d in vars(module).items()
            if name.startswith(("_forward", "_backward")) and isinstance(d, dict)}


def _remove_new_hooks(module: nn.Module, before: dict[str, set]) -> None:
    for name, d in vars(module).items():
        if name.startswith(("_forward", "_backward")) and isinstance(d, dict):
            for key in [k for k in d if k not in before.get(name, set())]:
                del d[key]


def grad_cam(model: nn.Module, x: torch.Tensor, layer: str) -> np.ndarray:
    """Grad-CAM of the fracture logit at ``layer`` for a network input ``x`` [1, 1, S, S, S]
    -> [S, S, S] float32 in [0, 1] (MONAI: ReLU of the gradient-weighted maps, trilinear
    upsampling to the input grid), scaled so that min -> 0 and max -> 1 (all zero when the map
    is constant).

    Eval mode and the model's flags are restored afterwards; the weights are not changed.
    """
    target = find_layer(model, layer)            # a clear error for a wrong name
    if x.ndim != 5 or x.shape[:2] != (1, 1):
        raise DataValueError(None, f"x: expected one network input [1, 1, S, S, S], got {tuple(x.shape)}")
    wrapped = _Logits2D(model)
    flags = _no_inplace(model)
    hooks = _hook_keys(target)
    try:
        with evaluating(model), torch.enable_grad():
            cam = GradCAM(nn_module=wrapped, target_layers=f"model.{layer}", postprocessing=_minmax)
            device = next(model.parameters()).device
            out = cam(x.to(device).float(), class_idx=0)
    finally:
        for m, flag in flags.items():
            m.inplace = flag
        _remove_new_hooks(target, hooks)         # MONAI keeps no handles to its hooks
        model.zero_grad(set_to_none=True)
    out = out.detach().float().cpu().numpy()[0, 0]
    return np.nan_to_num(out, nan=0.0).astype(np.float32)


def cam_on_patch(cam: np.ndarray, field: Sequence[slice], patch_shape: Sequence[int] = (96, 96, 96)) -> np.ndarray:
    """A map on the network input grid [S, S, S] -> the patch (trilinear onto ``field``, zero
    outside: :func:`vfcore.dissect.upsample_to_patch`)."""
    return upsample_to_patch(cam, field, patch_shape)


def patch_grad_cam(model: nn.Module, hu: np.ndarray, layer: str, transform: Callable,
                   field: Sequence[slice]) -> np.ndarray:
    """Grad-CAM of one HU patch [96^3] on the patch [96^3]: ``transform`` (HU -> network
    input, e.g. ``lambda hu: vfcore.data.to_network_input(hu, preset)``), :func:`grad_cam`,
    :func:`cam_on_patch`."""
    x = transform(torch.as_tensor(np.asarray(hu))[None])
    return cam_on_patch(grad_cam(model, x, layer), field, np.asarray(hu).shape)


def saliency_iou(saliency: np.ndarray, concepts: Mapping[str, np.ndarray], field: Sequence[slice] | None = None,
                 threshold: float = 0.5, names: Sequence[str] | None = None) -> pd.DataFrame:
    """IoU of a map thresholded at ``threshold`` (Grad-CAM: its normalised value; or a bool
    mask, e.g. the union of units' masks) with concept masks, inside ``field``: one row per
    concept (``concept``, ``iou``, ``voxels`` of the map's mask, ``concept_voxels``)."""
    region = (Ellipsis,) if field is None else tuple(field)
    s = np.asarray(saliency)
    m = (s if s.dtype == bool else s > threshold)[region]
    rows = []
    for name in (names if names is not None else list(concepts)):
        c = np.asarray(concepts[name], dtype=bool)[region]
        union = int((m | c).sum())
        rows.append({"concept": name, "iou": int((m & c).sum()) / union if union else 0.0,
                     "voxels": int(m.sum()), "concept_voxels": int(c.sum())})
    return pd.DataFrame(rows)


def occlusion_map(model: nn.Module, hu: np.ndarray, transform: Callable, field: Sequence[slice], fill: float,
                  cell: int = 8, batch_size: int = 16) -> np.ndarray:
    """Where the evidence is, by occlusion: each ``cell``^3 block of ``field`` (patch voxels) of
    the HU patch [96^3] is set to ``fill`` HU (e.g. :func:`vfcore.analysis.looking.neutral_fill`)
    in turn, and the block holds the drop of P(fracture) it causes, divided by the largest drop
    (so 1 = the block that matters most; negative: filling it raised P). Zero outside the field.
    (64 mm / 8 mm: 512 forward passes, batched.)"""
    hu = np.asarray(hu, dtype=np.float32)
    device = next(model.parameters()).device
    starts = [range(sl.start, sl.stop, cell) for sl in field]
    blocks = [(i, j, k) for i in starts[0] for j in starts[1] for k in starts[2]]

    def probs(batch: list[np.ndarray]) -> np.ndarray:
        x = transform(torch.as_tensor(np.stack(batch)).to(device))
        with evaluating(model), torch.no_grad():
            return probabilities(model(x), len(batch)).float().cpu().numpy()

    p0 = float(probs([hu])[0])
    drops = []
    for b in range(0, len(blocks), batch_size):
        batch = []
        for i, j, k in blocks[b:b + batch_size]:
            h = hu.copy()
            h[i:i + cell, j:j + cell, k:k + cell] = fill
            batch.append(h)
        drops.extend(p0 - probs(batch))
    out = np.zeros(hu.shape, dtype=np.float32)
    for (i, j, k), v in zip(blocks, drops):
        out[i:i + cell, j:j + cell, k:k + cell] = v
    top = float(max(drops)) if drops else 0.0
    return out / top if top > 0 else out
