"""One pass over a split: T_k, per-sample unit statistics, the masks M_k (as the tail), P(fracture).

:func:`dissect` runs the network once over a split and returns a :class:`Dissection`: exact
thresholds from :class:`~vfcore.dissect.quantile.TopQuantile`, and, from the values it kept
above T_k, r_k(x) (Eq. 2), |M_k(x)| and E_x of every sample, without storing the activations.
Its two halves, :class:`PassState` (what each batch adds) and :func:`dissection_from` (the
finished pass -> :class:`Dissection`), are shared with the sharded pass of
:mod:`vfcore.dissect.sharded`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from vfcore.errors import DataValueError, GeometryError

from vfcore.forward import evaluating, find_layer, forward_batches

from .quantile import Q_TAIL_PAPER, TopQuantile, _check_q


@dataclass
class Dissection:
    """The result of :func:`dissect` over N samples and K units (positions = prod(spatial)).

    ``T`` [K] thresholds T_k; ``realised_tail`` [K] P(a_k > T_k) obtained; ``flags`` [K] bool
    per kind of degenerate unit (see :meth:`TopQuantile.flags`); ``unit_min``/``unit_max``/
    ``zero_fraction`` [K]; per sample and unit [N, K]: ``max`` and ``mean`` of A_k(x),
    ``r`` = sum(M_k(x) * A_k(x)) (Eq. 2, float64) and ``mask_size`` = sum M_k(x);
    ``probability`` [N] P(fracture); ``tail``: the masks M_k(x) of every sample as sparse
    (unit, sample, position, value) arrays with value > T_k.
    """

    layer: str
    q_tail: float
    spatial_shape: tuple[int, ...]
    T: np.ndarray
    realised_tail: np.ndarray
    flags: dict[str, np.ndarray]
    unit_min: np.ndarray
    unit_max: np.ndarray
    zero_fraction: np.ndarray
    max: np.ndarray
    mean: np.ndarray
    r: np.ndarray
    mask_size: np.ndarray
    probability: np.ndarray
    tail: dict[str, np.ndarray]
    seconds: float = 0.0
    _by_sample: np.ndarray | None = field(default=None, repr=False)

    @property
    def n_samples(self) -> int:
        return int(self.max.shape[0])

    @property
    def n_units(self) -> int:
        return int(self.T.shape[0])

    @property
    def enabled(self) -> np.ndarray:
        """[N, K] bool: k in E_x, i.e. sum M_k(x) > 0 (equivalently max_k(x) > T_k)."""
        return self.mask_size > 0

    def E(self, i: int) -> np.ndarray:
        """E_x of sample i: the units that fire on it (ascending)."""
        return np.flatnonzero(self.mask_size[i] > 0)

    def masks(self, i: int, units: Sequence[int] | None = None) -> np.ndarray:
        """M_k(x_i) for every unit (or ``units``): bool [len(units), *spatial]."""
        if self._by_sample is None:
            self._by_sample = np.argsort(self.tail["sample"], kind="stable")
        s = self.tail["sample"][self._by_sample]
        lo, hi = np.searchsorted(s, i, "left"), np.searchsorted(s, i, "right")
        rows = self._by_sample[lo:hi]
        units = np.arange(self.n_units) if units is None else np.asarray(units, dtype=int)
        where = {int(k): j for j, k in enumerate(units)}
        out = np.zeros((len(units), int(np.prod(self.spatial_shape))), dtype=bool)
        for u, p in zip(self.tail["unit"][rows], self.tail["position"][rows]):
            j = where.get(int(u))
            if j is not None:
                out[j, p] = True
        return out.reshape(len(units), *self.spatial_shape)


class LayerGridError(GeometryError):
    """A layer whose output has no grid to dissect: no spatial axes (e.g. a linear layer) or an
    axis of one position (e.g. a 1^3 grid, where M_k cannot say where a unit fires)."""


class _Stop(Exception):
    """Raised by the probe hook to end a forward pass at the probed layer."""

    def __init__(self, shape):
        self.shape = shape


def layer_output_shape(model: torch.nn.Module, layer: str, x: torch.Tensor) -> tuple[int, ...]:
    """The shape of ``layer``'s output for the network input ``x`` ([B, ...]); the forward pass
    stops at the layer (eval mode, inference mode), so layers after it never run."""
    module = find_layer(model, layer)

    def hook(_m, _inp, out):
        raise _Stop(tuple((out[0] if isinstance(out, (tuple, list)) else out).shape))

    handle = module.register_forward_hook(hook)
    try:
        with evaluating(model), torch.inference_mode():
            model(x)
    except _Stop as stop:
        return stop.shape
    finally:
        handle.remove()
    raise LayerGridError(None, f"layer {layer!r}: the layer never ran in the forward pass")


def check_layer_grid(layer: str, shape: Sequence[int], where: str = "") -> tuple[int, ...]:
    """The spatial grid of an output shaped [B, K, *spatial], or :class:`LayerGridError` naming
    the layer (and ``where``, e.g. the preset) and its shape: dissection needs every unit's
    activation on a grid of at least 2 positions along each spatial axis."""
    name = f"{where}, layer {layer!r}" if where else f"layer {layer!r}"
    shape = tuple(int(s) for s in shape)
    per_sample = "x".join(str(s) for s in shape[1:]) or "a scalar"
    if len(shape) < 3:
        raise LayerGridError(None, f"{name}: output {per_sample} per sample (shape {list(shape)}) has no spatial "
                             f"grid: dissect a convolutional layer, output [B, K, d, h, w]")
    spatial = shape[2:]
    if min(spatial) < 2:
        grid = "x".join(str(s) for s in spatial)
        raise LayerGridError(None, f"{name}: output {per_sample} per sample (shape {list(shape)}) is a {grid} grid: "
                             f"with one position along an axis, M_k cannot say where a unit fires; "
                             f"dissect an earlier layer or a preset with a larger input")
    return spatial


def check_layer(model: torch.nn.Module, layer: str, sample, transform: Callable | None = None,
                where: str = "") -> tuple[int, ...]:
    """Probe ``layer`` with one sample (``sample`` [1, ...], on the model's device after
    ``transform``) -> its spatial grid; :class:`LayerGridError` when it cannot be dissected."""
    t = sample if isinstance(sample, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(sample))
    device = next(model.parameters(), torch.empty(0)).device
    x = t.to(device)
    x = transform(x) if transform is not None else x
    return check_layer_grid(layer, layer_output_shape(model, layer, x), where)


def dissect(model: torch.nn.Module, data, layer: str, *,
            q_tail: float = Q_TAIL_PAPER, batch_size: int = 64,
            transform: Callable | None = None, device: str | torch.device | None = None,
            amp: bool = False, progress: bool = True) -> Dissection:
    """One forward pass over ``data`` ([N, ...], batched here) -> :class:`Dissection`.

    ``transform`` maps a batch (already on the device) to the network input. The model runs
    in eval mode under ``torch.inference_mode``, in fp32 on every device (``amp=True``: the
    device's autocast, whose rounded activations give other T_k and masks); its
    training flags are restored afterwards. Everything is exact (see the package docstring):
    T_k from :class:`TopQuantile` sized for N, r_k and |M_k| from the kept tail, so the cost
    is one forward pass plus one ``torch.topk`` merge per batch.

    The trade-off behind it: r_k(x) and M_k(x) need T_k, known only after the last sample.
    (a) Two passes (thresholds, then statistics) double the cost. (b) Keeping the layer's
    activations (float16 in RAM or a memmap) costs N x K x positions x 2 bytes: 5 GB for
    10,000 vertebrae with the paper's layer, beyond Colab's RAM and Binder's 2 GB. (c) The
    kept tail (this function) is exact in one pass with K x m x 12 bytes (values + indices),
    m = ceil(q (n - 1)) + 1: 0.6 % of (b) for q = 0.005, independent of the batch size.
    """
    q_tail = _check_q(q_tail)
    n = len(data)
    if n == 0:
        raise DataValueError(None, "data: no samples to dissect")
    check_layer(model, layer, data[:1], transform)           # a clear error before the pass
    part = PassState(TopQuantile(q_tail, n_samples=n))
    start = time.perf_counter()
    for out in forward_batches(model, data, [layer], batch_size=batch_size, transform=transform,
                               device=device, amp=amp, progress=progress, desc=f"dissecting {layer}"):
        part.add(out.activations[layer], out.probability)
    return dissection_from(part.stats, part.arrays(), layer, part.spatial,
                           time.perf_counter() - start)


class PassState:
    """What the pass accumulates, batch by batch: ``stats`` (the T_k buffer, a
    :class:`TopQuantile` sized for the whole split) and, per sample seen, the max and mean of
    every unit's map ([B, K] a batch) and P(fracture) ([B]). A sharded pass
    (:mod:`vfcore.dissect.sharded`) keeps one per rank, saves it and merges them."""

    def __init__(self, stats: TopQuantile):
        self.stats = stats
        self.per_sample: dict[str, list[torch.Tensor]] = {"max": [], "mean": [], "probability": []}
        self.spatial: tuple[int, ...] | None = None

    def add(self, A: torch.Tensor, probability: torch.Tensor) -> None:
        """One batch: activations A [B, K, *spatial] and P(fracture) [B]."""
        self.spatial = self.spatial or tuple(int(s) for s in A.shape[2:])
        flat = A.reshape(A.shape[0], A.shape[1], -1)
        self.per_sample["max"].append(flat.amax(dim=2))
        self.per_sample["mean"].append(flat.mean(dim=2))
        self.per_sample["probability"].append(probability)
        self.stats.update(A)

    def arrays(self) -> dict[str, torch.Tensor]:
        """``max``, ``mean`` [n, K] and ``probability`` [n] of the samples seen, in order."""
        return {k: torch.cat(v) if v else torch.zeros(0) for k, v in self.per_sample.items()}


def dissection_from(stats: TopQuantile, per_sample: dict, layer: str,
                    spatial: tuple[int, ...], seconds: float = 0.0) -> Dissection:
    """The :class:`Dissection` of a finished pass: ``stats`` has seen all N samples,
    ``per_sample`` holds ``max``, ``mean`` [N, K] and ``probability`` [N] (tensors or numpy)."""
    arrays = {k: v.cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
              for k, v in per_sample.items()}
    n = len(arrays["max"])
    T = stats.thresholds()
    tail = stats.tail()
    K = len(T)
    # Eq. 2 for every sample at once: r_k(x) = sum over the tail entries of x and k
    key = tail["sample"].astype(np.int64) * K + tail["unit"]
    r = np.bincount(key, weights=tail["value"].astype(np.float64), minlength=n * K).reshape(n, K)
    size = np.bincount(key, minlength=n * K).reshape(n, K).astype(np.int32)
    summary = stats.summary()
    return Dissection(
        layer=layer, q_tail=stats.q_tail, spatial_shape=tuple(spatial), T=T,
        realised_tail=stats.realised_tail(), flags=stats.flags(),
        unit_min=summary["min"], unit_max=summary["max"], zero_fraction=summary["zero_fraction"],
        max=arrays["max"], mean=arrays["mean"], r=r, mask_size=size,
        probability=arrays["probability"], tail=tail, seconds=seconds)


def example_units(d: Dissection, n: int = 4) -> list[int]:
    """n units to look at closely: spread over the non-degenerate units sorted by T_k (largest,
    ..., smallest), the last replaced by a degenerate unit when there is one."""
    live = np.flatnonzero(~d.flags["degenerate"])
    order = live[np.argsort(-d.T[live].astype(np.float64), kind="stable")]
    picks = [int(order[i]) for i in np.unique(np.linspace(0, len(order) - 1, n).round().astype(int))] \
        if len(order) else []
    dead = np.flatnonzero(d.flags["degenerate"])
    if len(dead) and n > 1:
        picks = picks[:n - 1] + [int(dead[0])]
    return picks[:n]
