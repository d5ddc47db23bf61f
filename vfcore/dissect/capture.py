"""Activation capture: a split's activations A_k of a named layer, kept in memory.

:func:`activations` runs :func:`vfcore.forward.forward` (eval mode, one device and precision
policy, forward hooks) for exemplars, histograms and single inferences. The one-pass
statistics of a whole split are :func:`vfcore.dissect.dissect`. The hook helpers
(:func:`capture`, :func:`find_layer`, :func:`layer_names`, :func:`evaluating`) live in
:mod:`vfcore.forward` and are importable from here.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from vfcore.errors import DataValueError
from vfcore.forward import capture, evaluating, find_layer, forward, layer_names

__all__ = ["DEFAULT_LAYER", "layer_names", "find_layer", "capture", "evaluating", "activations"]

#: The paper's dissected layer: the last encoder layer of the 3D U-Net.
DEFAULT_LAYER = "down_tr512"


def activations(model: torch.nn.Module, data, layer: str = DEFAULT_LAYER, *,
                units: Sequence[int] | None = None, batch_size: int = 32,
                transform: Callable | None = None, device: str | torch.device | None = None,
                amp: bool = False, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Layer activations A [N, K, ...] (float32; only ``units`` if given) and P(fracture) [N].

    fp32 on every device, as the dissection (``amp=True``: the device's autocast).
    Everything is kept in memory: for exemplars, single inferences, or a few units over a
    split (histograms); T_k and the statistics of a whole split come from :func:`dissect`.
    ``transform`` maps a batch of ``data`` (on the device) to the network input, e.g.
    ``lambda hu: vfcore.data.to_network_input(hu, preset)``.
    """
    find_layer(model, layer)
    if len(data) == 0:
        raise DataValueError("data", "no samples")
    p, acts = forward(model, data, [layer], units=units, batch_size=batch_size, transform=transform,
                      device=device, amp=amp, progress=progress, desc=f"activations of {layer}")
    return acts[layer], p
