"""Activation capture: a split's activations A_k of a named layer, kept in memory.

:func:`activations` runs :func:`vfcore.forward.forward` (eval mode, one device and precision
policy, forward hooks) for exemplars, histograms and single inferences. The one-pass
statistics of a whole split are :func:`vfcore.dissect.dissect`. The hook helpers
(``capture``, ``find_layer``, ``layer_names``, ``evaluating``) live in :mod:`vfcore.forward`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from vfcore.errors import DataValueError
from vfcore.forward import find_layer, forward


def activations(model: torch.nn.Module, data, layer: str, *,
                units: Sequence[int] | None = None, batch_size: int = 32,
                transform: Callable | None = None, device: str | torch.device | None = None,
                amp: bool = False, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Layer activations A [N, K, *spatial] (float32; only ``units`` if given) and P(fracture) [N]
    of ``layer`` (the paper's: ``down_tr512``, a preset's ``dissect_layer``).

    fp32 on every device, as the dissection (``amp=True``: the device's autocast).
    Everything is kept in memory: for exemplars, single inferences, or a few units over a
    split (histograms); T_k and the statistics of a whole split come from :func:`dissect`.
    ``transform`` maps a batch of ``data`` (on the device) to the network input, e.g.
    ``lambda hu: vfcore.data.to_network_input(hu, preset)``.
    """
    find_layer(model, layer)
    if len(data) == 0:
        raise DataValueError(None, "data: no samples")
    p, acts = forward(model, data, [layer], units=units, batch_size=batch_size, transform=transform,
                      device=device, amp=amp, progress=progress, desc=f"activations of {layer}")
    return acts[layer], p
