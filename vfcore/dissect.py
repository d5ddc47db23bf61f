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

Layout of the file: activation capture; :class:`TopQuantile` (exact) and
:class:`SampledQuantile` (the sketch, for comparison); :func:`dissect`; Eq. 1 and 2 and the
rankings; exemplars; patch geometry (upsampling, best slice, NIfTI, concept overlap); the run
folder's artifacts (:func:`dissect_run`, :func:`export_units`, :func:`load_artifacts`).
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from vfcore.errors import (DataValueError, LayerNotFoundError, MissingArtifactError,
                           StaleArtifactError, VfcoreError)

#: The paper's tail probability: P(a_k > T_k) = 0.005 (Sec. 2.2).
Q_TAIL_PAPER = 0.005
#: What the published code used (the 0.99 quantile).
Q_TAIL_PUBLISHED = 0.01
#: The paper's dissected layer: the last encoder layer of the 3D U-Net.
DEFAULT_LAYER = "down_tr512"
#: Units whose realised tail is below this fraction of q_tail are flagged (ties at T_k).
SPARSE_TAIL_FRACTION = 0.5


class UndefinedCorrelationError(DataValueError):
    """c_k (Eq. 1) over an empty set (no true positives, no false positives): undefined."""


# --------------------------------------------------------------------------------------------
# Activation capture (forward hooks)
# --------------------------------------------------------------------------------------------

def layer_names(model: torch.nn.Module) -> list[str]:
    """Names of every sub-module, as ``model.named_modules()`` gives them (root excluded)."""
    return [name for name, _ in model.named_modules() if name]


def find_layer(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The sub-module called ``name``; :class:`LayerNotFoundError` lists the available names."""
    modules = dict(model.named_modules())
    if not name or name not in modules:
        names = layer_names(model)
        shown = ", ".join(names[:60]) + (f", ... ({len(names)} in all)" if len(names) > 60 else "")
        raise LayerNotFoundError(type(model).__name__,
                                 f"no layer named {name!r}; available layers: {shown}")
    return modules[name]


@contextlib.contextmanager
def capture(model: torch.nn.Module, layer: str) -> Iterator[list]:
    """Context manager: while open, every forward pass appends ``layer``'s output to the list.

    >>> with capture(model, "down_tr512") as out:
    ...     model(x)
    >>> A = out[-1]          # [B, K, d, h, w]
    """
    module = find_layer(model, layer)
    outputs: list = []

    def hook(_module, _inputs, output):
        if isinstance(output, (tuple, list)):
            output = output[0]
        outputs.append(output.detach().clone())  # a later in-place op must not change it

    handle = module.register_forward_hook(hook)
    try:
        yield outputs
    finally:
        handle.remove()


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model.eval()`` inside the block (batch norm uses its running statistics, dropout is
    off: a sample's activations do not depend on the rest of its batch); the previous mode of
    every sub-module is restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode


def _autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA (fp16 where bf16 is missing, e.g. a T4); nothing on CPU."""
    if device.type == "cuda" and amp:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def _probabilities(output, batch: int) -> torch.Tensor:
    """P(fracture) from the model's output: sigmoid of one logit (softmax for two classes)."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    logits = output.float().reshape(batch, -1)
    if logits.shape[1] == 1:
        return torch.sigmoid(logits[:, 0])
    if logits.shape[1] == 2:
        return torch.softmax(logits, dim=1)[:, 1]
    raise DataValueError("model output", f"expected one logit (or two classes) per sample, got "
                         f"shape {tuple(output.shape)}")


def _batches(data, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Slices of ``data`` ([N, ...]: numpy, memmap or tensor) as tensors on ``device``.

    On CUDA the next batch is read (and pinned) in a background thread while the GPU works.
    """
    n = len(data)

    def load(start: int) -> torch.Tensor:
        batch = data[start:start + batch_size]
        t = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(batch))
        if device.type == "cuda" and not t.is_cuda:
            t = t.pin_memory()
        return t

    starts = range(0, n, batch_size)
    if device.type != "cuda":
        for s in starts:
            yield load(s).to(device)
        return
    with cf.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(load, 0) if n else None
        for s in starts:
            t = pending.result()
            pending = pool.submit(load, s + batch_size) if s + batch_size < n else None
            yield t.to(device, non_blocking=True)


def activations(model: torch.nn.Module, data, layer: str = DEFAULT_LAYER, *,
                units: Sequence[int] | None = None, batch_size: int = 32,
                transform: Callable | None = None, device: str | torch.device | None = None,
                amp: bool = True, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Layer activations A [N, K, ...] (float32; only ``units`` if given) and P(fracture) [N].

    Everything is kept in memory: for exemplars, single inferences, or a few units over a
    split (histograms); T_k and the statistics of a whole split come from :func:`dissect`.
    ``transform`` maps a batch of ``data`` (on the device) to the network input, e.g.
    ``lambda hu: vfcore.data.to_network_input(hu, preset)``.
    """
    from tqdm.auto import tqdm

    from vfcore.runtime import pick_device

    device = pick_device(str(device) if device is not None else None)
    model = model.to(device)
    As, ps = [], []
    pick = None if units is None else torch.as_tensor(np.asarray(units, dtype=np.int64))
    bar = tqdm(total=len(data), desc=f"activations of {layer}", unit="sample", disable=not progress)
    with evaluating(model), capture(model, layer) as out, torch.inference_mode():
        for x in _batches(data, batch_size, device):
            x = transform(x) if transform is not None else x
            with _autocast(device, amp):
                y = model(x)
            ps.append(_probabilities(y, x.shape[0]).cpu())
            A = out.pop()
            As.append((A if pick is None else A[:, pick.to(A.device)]).float().cpu())
            bar.update(x.shape[0])
    bar.close()
    if not As:
        raise DataValueError("data", "no samples")
    return torch.cat(As).numpy(), torch.cat(ps).numpy()


# --------------------------------------------------------------------------------------------
# Thresholds T_k: exact (TopQuantile) and a sampled sketch (SampledQuantile, for comparison)
# --------------------------------------------------------------------------------------------

def _linear_index(n: int, level: float) -> tuple[int, int, float]:
    """numpy.quantile(method="linear") on n sorted values: (lower index, upper index, gamma).

    numpy computes the virtual index (n - 1) * level in float64, interpolates between its floor
    and floor + 1 with weight gamma = index - floor, and clips at the last value.
    """
    virtual = (n - 1) * np.float64(level)
    lo = math.floor(virtual)
    if virtual >= n - 1:
        return n - 1, n - 1, float(virtual - lo)
    return lo, lo + 1, float(virtual - lo)


def _lerp(a: np.ndarray, b: np.ndarray, gamma: float) -> np.ndarray:
    """numpy's own interpolation formula (``_lerp``), so T_k is bit-identical to np.quantile."""
    diff = b - a
    if gamma >= 0.5:
        return b - diff * (1 - gamma)
    return a + diff * gamma


def tail_size(n: int, q_tail: float) -> int:
    """m: how many of the largest of n values decide the (1 - q_tail) quantile
    (= ceil(q_tail (n - 1)) + 1 up to float rounding, computed as numpy does)."""
    lo, _, _ = _linear_index(n, 1.0 - q_tail)
    return n - lo


def _check_q(q_tail: float) -> float:
    q = float(q_tail)
    if not 0.0 < q < 1.0:
        raise DataValueError("q_tail", f"must lie in (0, 1), got {q_tail!r} "
                             f"(the paper uses {Q_TAIL_PAPER}, the published code {Q_TAIL_PUBLISHED})")
    return q


def _as_units(acts) -> torch.Tensor:
    """[B, K, *spatial] -> [K, B * positions] (sample-major: index = sample * positions + pos)."""
    a = torch.as_tensor(acts)
    if a.ndim < 2:
        raise DataValueError("activations", f"expected [batch, units, ...], got shape {tuple(a.shape)}")
    if not a.is_floating_point():
        a = a.float()
    b, k = a.shape[:2]
    return a.reshape(b, k, -1).transpose(0, 1).reshape(k, -1)


class TopQuantile:
    """Exact per-unit thresholds T_k with P(a_k > T_k) = q_tail, streamed, in bounded memory.

    Like netdissect's ``runningstats``: ``update(acts)`` with batches [B, K, *spatial] (torch
    or numpy, any device), then ``thresholds()``. Per unit it keeps the m largest values seen
    (with their flat index sample * positions + position), merged with each batch by
    ``torch.topk``; T_k is read by linear interpolation between the two order statistics around
    (1 - q_tail)(n - 1), exactly as ``numpy.quantile(values_k, 1 - q_tail)`` (method "linear").
    The result does not depend on batch size or order.

    m depends on n, the final number of values per unit. Give ``n_samples`` (the number of
    samples that will pass; positions are read from the first batch) and the buffer holds
    exactly m values. Without it, a value dropped early might be needed later, so pass
    ``capacity`` (values kept per unit; ``thresholds()`` checks it was enough and raises
    otherwise) or nothing (every value is kept: exact, but memory grows with n).

    Memory: K x m values + indices; e.g. 512 units x 25,601 (10,000 vertebrae x 8^3,
    q = 0.005) = 52 MB of values.
    """

    def __init__(self, q_tail: float = Q_TAIL_PAPER, n_samples: int | None = None,
                 capacity: int | None = None):
        self.q_tail = _check_q(q_tail)
        if n_samples is not None and n_samples < 1:
            raise DataValueError("n_samples", f"must be >= 1, got {n_samples}")
        self.n_samples_expected = n_samples
        self.capacity = capacity
        self.n_samples = 0          # samples seen
        self.positions: int | None = None
        self.units: int | None = None
        self.values: torch.Tensor | None = None   # [K, <= capacity]
        self.index: torch.Tensor | None = None    # same shape, int64 flat index
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None
        self.zeros: torch.Tensor | None = None    # how many values are <= 0, per unit
        self._exact_upto: float = math.inf        # the smallest capacity that ever dropped values

    @property
    def n_values(self) -> int:
        """n: values per unit seen so far (samples x positions)."""
        return self.n_samples * (self.positions or 0)

    def update(self, acts) -> None:
        """Add a batch of activations [B, K, *spatial]."""
        a = torch.as_tensor(acts)
        flat = _as_units(a)
        k, bp = flat.shape
        b = a.shape[0]
        positions = bp // b if b else 0
        if self.units is None:
            self.units, self.positions = k, positions
            if self.n_samples_expected is not None:
                self.capacity = tail_size(self.n_samples_expected * positions, self.q_tail)
            self.values = flat.new_empty((k, 0))
            self.index = torch.empty((k, 0), dtype=torch.int64, device=flat.device)
            self.min = torch.full((k,), math.inf, dtype=torch.float64, device=flat.device)
            self.max = torch.full((k,), -math.inf, dtype=torch.float64, device=flat.device)
            self.zeros = torch.zeros(k, dtype=torch.int64, device=flat.device)
        elif (k, positions) != (self.units, self.positions):
            raise DataValueError("activations", f"batch has {k} units x {positions} positions; "
                                 f"earlier batches had {self.units} x {self.positions}")
        if b == 0:
            return
        if self.n_samples_expected is not None and self.n_samples + b > self.n_samples_expected:
            raise DataValueError("activations", f"more samples than n_samples="
                                 f"{self.n_samples_expected} (the buffer was sized for it)")
        if not torch.isfinite(flat).all():
            raise DataValueError("activations", "NaN or inf in the activations: T_k is undefined")
        flat = flat.to(self.values.device, self.values.dtype)
        self.min = torch.minimum(self.min, flat.amin(dim=1).double())
        self.max = torch.maximum(self.max, flat.amax(dim=1).double())
        self.zeros += (flat <= 0).sum(dim=1)

        base = self.n_samples * positions
        old = self.values.shape[1]
        merged = torch.cat([self.values, flat], dim=1)
        keep = merged.shape[1] if self.capacity is None else min(self.capacity, merged.shape[1])
        if keep < merged.shape[1]:
            self._exact_upto = min(self._exact_upto, keep)
            self.values, pick = torch.topk(merged, keep, dim=1, sorted=False)
            new_index = base + (pick - old)
            self.index = torch.where(pick < old, torch.gather(self.index, 1, pick.clamp(max=max(old - 1, 0)))
                                     if old else new_index, new_index)
        else:
            self.values = merged
            self.index = torch.cat([self.index, base + torch.arange(
                bp, device=flat.device).expand(k, bp)], dim=1)
        self.n_samples += b

    def _sorted(self, q_tail: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Kept values and indices, each unit sorted in descending order (numpy, CPU)."""
        if self.values is None or self.n_values == 0:
            raise DataValueError("TopQuantile", "no activations were added: call update() first")
        if self.n_samples_expected is not None and self.n_samples != self.n_samples_expected:
            raise DataValueError("TopQuantile", f"saw {self.n_samples} samples, n_samples="
                                 f"{self.n_samples_expected} was promised: T_k would be wrong")
        need = tail_size(self.n_values, self.q_tail if q_tail is None else _check_q(q_tail))
        if need > min(self._exact_upto, self.values.shape[1]):
            raise DataValueError("TopQuantile", f"the buffer kept {self._exact_upto} values per "
                                 f"unit but the quantile of {self.n_values} values needs the top "
                                 f"{need}: pass n_samples= (or a larger capacity=; a smaller "
                                 f"q_tail than the one the buffer was sized for)")
        values, order = torch.sort(self.values, dim=1, descending=True, stable=True)
        index = torch.gather(self.index, 1, order)
        return values.cpu().numpy(), index.cpu().numpy()

    def thresholds(self, q_tail: float | None = None) -> np.ndarray:
        """T_k [K] (dtype of the activations): equal to ``np.quantile(a_k, 1 - q_tail)``.

        ``q_tail`` defaults to the one given at construction; any smaller one is exact too
        (its tail is inside the buffer), so one pass serves several q.
        """
        q_tail = self.q_tail if q_tail is None else q_tail
        values, _ = self._sorted(q_tail)
        n = self.n_values
        lo, hi, gamma = _linear_index(n, 1.0 - q_tail)
        # ascending position i is descending rank n - 1 - i
        return _lerp(values[:, n - 1 - lo], values[:, n - 1 - hi], gamma)

    def realised_tail(self, T: np.ndarray | None = None, q_tail: float | None = None) -> np.ndarray:
        """P(a_k > T_k) actually obtained (ties at T_k make it smaller than q_tail) [K].

        Exact: every value above T_k is in the buffer. Pass ``T`` to evaluate other
        thresholds (e.g. a sketch's); a T below the smallest kept value of a unit cannot be
        counted from the buffer (use :func:`tail_fraction` on the activations for that).
        """
        values, _ = self._sorted(q_tail)
        T = self.thresholds(q_tail) if T is None else np.asarray(T)
        dropped = math.isfinite(self._exact_upto)
        if dropped and np.any(T < values[:, -1]):
            raise DataValueError("T", "thresholds below the smallest value the buffer kept: "
                                 "the values above them were not all kept")
        return (values > T[:, None]).sum(axis=1) / self.n_values

    def tail(self, q_tail: float | None = None) -> dict[str, np.ndarray]:
        """The masks M_k of every sample, sparse: every (unit, sample, position, value) with
        value > T_k, ordered by unit, then value (descending)."""
        values, index = self._sorted(q_tail)
        T = self.thresholds(q_tail)
        above = values > T[:, None]
        unit = np.broadcast_to(np.arange(values.shape[0])[:, None], values.shape)[above]
        flat = index[above]
        return {"unit": unit.astype(np.int32), "sample": (flat // self.positions).astype(np.int32),
                "position": (flat % self.positions).astype(np.int32),
                "value": values[above]}

    def flags(self) -> dict[str, np.ndarray]:
        """Degenerate units [K] bool: ``constant`` (one value everywhere: M_k is always empty),
        ``zero_threshold`` (T_k <= 0: at least 1 - q_tail of the values are zero, typical for a
        ReLU unit that is almost always off), ``never_fires`` (no value above T_k),
        ``sparse_tail`` (realised tail below half of q_tail: many ties at T_k)."""
        T = self.thresholds()
        tail = self.realised_tail()
        lo, hi = self.min.cpu().numpy(), self.max.cpu().numpy()
        out = {"constant": lo == hi, "zero_threshold": T <= 0, "never_fires": tail == 0,
               "sparse_tail": tail < SPARSE_TAIL_FRACTION * self.q_tail}
        out["degenerate"] = np.logical_or.reduce(list(out.values()))
        return out

    def summary(self) -> dict[str, np.ndarray]:
        """Per-unit arrays [K]: min, max, fraction of values <= 0."""
        return {"min": self.min.cpu().numpy(), "max": self.max.cpu().numpy(),
                "zero_fraction": self.zeros.cpu().numpy() / self.n_values}


class SampledQuantile:
    """A randomized quantile sketch, like the published code's (netdissect ``RunningQuantile``):
    for comparison only (notebook 03, ``bench/bench_dissect.py``), never for results.

    Per unit, a stack of compactors of ``resolution`` values: when a level is full it is
    sorted and every second value (random offset) moves up one level with double weight. The
    thresholds are the weighted quantile of what is left. Memory is O(resolution log n), the
    answer is approximate and depends on the seed and the batch order.
    """

    def __init__(self, q_tail: float = Q_TAIL_PAPER, resolution: int = 1024, seed: int | None = 0):
        self.q_tail = _check_q(q_tail)
        self.resolution = int(resolution)
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(int(seed))
        else:
            self.generator.seed()
        self.levels: list[torch.Tensor] = []

    def update(self, acts) -> None:
        """Add a batch [B, K, *spatial]."""
        flat = _as_units(acts).detach().float().cpu()
        for start in range(0, flat.shape[1], self.resolution):
            self._push(0, flat[:, start:start + self.resolution])

    def _push(self, level: int, values: torch.Tensor) -> None:
        while len(self.levels) <= level:
            self.levels.append(values.new_empty((values.shape[0], 0)))
        merged = torch.cat([self.levels[level], values], dim=1)
        if merged.shape[1] < 2 * self.resolution:
            self.levels[level] = merged
            return
        merged, _ = torch.sort(merged, dim=1)
        offset = int(torch.randint(2, (1,), generator=self.generator))
        n = merged.shape[1] - merged.shape[1] % 2
        self.levels[level] = merged[:, n:]
        self._push(level + 1, merged[:, offset:n:2])

    def thresholds(self) -> np.ndarray:
        """Estimated T_k [K] (weighted quantile, linear between kept values)."""
        values = torch.cat(self.levels, dim=1).numpy()
        weights = np.concatenate([np.full(lv.shape[1], 2.0 ** i) for i, lv in enumerate(self.levels)])
        order = np.argsort(values, axis=1, kind="stable")
        v = np.take_along_axis(values, order, axis=1)
        cum = np.cumsum(weights[order], axis=1)
        target = (1.0 - self.q_tail) * cum[:, -1:]
        return np.array([np.interp(t, c, row) for t, c, row in zip(target[:, 0], cum, v)],
                        dtype=np.float32)


def example_units(d: "Dissection", n: int = 4) -> list[int]:
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


def q_table(A: np.ndarray, units: Sequence[int], qs: Sequence[float]) -> pd.DataFrame:
    """What q does, for a few units' activations A [N, U, *spatial] over a whole split: per q
    and unit, T_k, the realised tail, the fraction of samples in which the unit fires (k in E_x)
    and the mean mask size |M_k(x)| (positions per sample). One TopQuantile for the largest q
    serves every smaller one."""
    A = np.asarray(A)
    tq = TopQuantile(max(qs), n_samples=len(A))
    tq.update(torch.from_numpy(A))
    flat = A.reshape(A.shape[0], A.shape[1], -1)
    rows = []
    for q in sorted(qs, reverse=True):
        T = tq.thresholds(q)
        M = flat > T[None, :, None]
        for j, u in enumerate(units):
            rows.append({"q": q, "unit": int(u), "T_k": float(T[j]), "realised_tail": float(M[:, j].mean()),
                         "fires_in_samples": float(M[:, j].any(axis=1).mean()),
                         "mean_mask_positions": float(M[:, j].sum(axis=1).mean())})
    return pd.DataFrame(rows)


def tail_fraction(acts, T) -> np.ndarray:
    """P(a_k > T_k) over a batch [B, K, *spatial] for given thresholds T [K] (count / n)."""
    flat = _as_units(acts)
    T = torch.as_tensor(np.asarray(T), dtype=flat.dtype, device=flat.device)
    return ((flat > T[:, None]).sum(dim=1).double() / flat.shape[1]).cpu().numpy()


# --------------------------------------------------------------------------------------------
# One pass over a split: T_k, per-sample unit statistics, masks (as the tail), probabilities
# --------------------------------------------------------------------------------------------

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


def dissect(model: torch.nn.Module, data, layer: str = DEFAULT_LAYER, *,
            q_tail: float = Q_TAIL_PAPER, batch_size: int = 64,
            transform: Callable | None = None, device: str | torch.device | None = None,
            amp: bool = True, progress: bool = True) -> Dissection:
    """One forward pass over ``data`` ([N, ...], batched here) -> :class:`Dissection`.

    ``transform`` maps a batch (already on the device) to the network input. The model runs
    in eval mode under ``torch.inference_mode`` (bf16 autocast on CUDA when ``amp``); its
    training flags are restored afterwards. Everything is exact (see the module docstring):
    T_k from :class:`TopQuantile` sized for N, r_k and |M_k| from the kept tail, so the cost
    is one forward pass plus one ``torch.topk`` merge per batch.

    The trade-off behind it: r_k(x) and M_k(x) need T_k, known only after the last sample.
    (a) Two passes (thresholds, then statistics) double the cost. (b) Keeping the layer's
    activations (float16 in RAM or a memmap) costs N x K x positions x 2 bytes: 5 GB for
    10,000 vertebrae with the paper's layer, beyond Colab's RAM and Binder's 2 GB. (c) The
    kept tail (this function) is exact in one pass with K x m x 12 bytes (values + indices),
    m = ceil(q (n - 1)) + 1: 0.6 % of (b) for q = 0.005, independent of the batch size.
    """
    from tqdm.auto import tqdm

    from vfcore.runtime import pick_device

    q_tail = _check_q(q_tail)
    n = len(data)
    if n == 0:
        raise DataValueError("data", "no samples to dissect")
    device = pick_device(str(device) if device is not None else None)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last_3d)
    stats = TopQuantile(q_tail, n_samples=n)
    maxs, means, probs = [], [], []
    spatial = None
    start = time.perf_counter()
    bar = tqdm(total=n, desc=f"dissecting {layer}", unit="sample", disable=not progress)
    with evaluating(model), capture(model, layer) as out, torch.inference_mode():
        for x in _batches(data, batch_size, device):
            x = transform(x) if transform is not None else x
            if device.type == "cuda" and x.ndim == 5:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            with _autocast(device, amp):
                y = model(x)
            A = out.pop().float()
            b = A.shape[0]
            if spatial is None:
                spatial = tuple(int(s) for s in A.shape[2:])
            probs.append(_probabilities(y, b))
            flat = A.reshape(b, A.shape[1], -1)
            maxs.append(flat.amax(dim=2))
            means.append(flat.mean(dim=2))
            stats.update(A)
            bar.update(b)
    bar.close()
    T = stats.thresholds()
    tail = stats.tail()
    K = len(T)
    # Eq. 2 for every sample at once: r_k(x) = sum over the tail entries of x and k
    key = tail["sample"].astype(np.int64) * K + tail["unit"]
    r = np.bincount(key, weights=tail["value"].astype(np.float64), minlength=n * K).reshape(n, K)
    size = np.bincount(key, minlength=n * K).reshape(n, K).astype(np.int32)
    summary = stats.summary()
    return Dissection(
        layer=layer, q_tail=q_tail, spatial_shape=spatial, T=T,
        realised_tail=stats.realised_tail(), flags=stats.flags(),
        unit_min=summary["min"], unit_max=summary["max"], zero_fraction=summary["zero_fraction"],
        max=torch.cat(maxs).cpu().numpy(), mean=torch.cat(means).cpu().numpy(), r=r,
        mask_size=size, probability=torch.cat(probs).cpu().numpy(), tail=tail,
        seconds=time.perf_counter() - start)


# --------------------------------------------------------------------------------------------
# Eq. 1 and Eq. 2, outcomes, rankings
# --------------------------------------------------------------------------------------------

def enabled_sets(A, T, axis: int = 1) -> np.ndarray:
    """E_x as an indicator [N, K]: sum M_k(x) > 0 with M_k(x) = A_k(x) > T_k, for activations
    A [N, K, *spatial] (``axis`` = the unit axis)."""
    A = np.asarray(A.detach().cpu() if isinstance(A, torch.Tensor) else A)
    T = np.asarray(T).reshape((-1,) + (1,) * (A.ndim - axis - 1))
    M = A > T
    return M.reshape(M.shape[:axis + 1] + (-1,)).any(axis=-1)


def relevance(A, T, axis: int = 0) -> np.ndarray:
    """r_k = sum(M_k(x) * A_k(x)) (Eq. 2) with M_k(x) = A_k(x) > T_k (float64).

    ``A`` [K, *spatial] for one sample -> [K]; [N, K, *spatial] with ``axis=1`` -> [N, K].
    """
    A = np.asarray(A.detach().float().cpu() if isinstance(A, torch.Tensor) else A, dtype=np.float64)
    T = np.asarray(T, dtype=np.float64).reshape((-1,) + (1,) * (A.ndim - axis - 1))
    thresholded = np.where(A > T, A, 0.0)
    return thresholded.reshape(thresholded.shape[:axis + 1] + (-1,)).sum(axis=-1)


def top_units(r: np.ndarray, n: int = 10) -> np.ndarray:
    """The n most relevant units of one inference: descending r_k, ties by unit index."""
    r = np.asarray(r, dtype=np.float64)
    return np.lexsort((np.arange(len(r)), -r))[:n]


def outcomes(labels, probability, threshold: float = 0.5) -> dict[str, np.ndarray]:
    """Boolean [N] masks of the samples: ``tp``, ``fp``, ``tn``, ``fn`` (prediction =
    probability >= threshold), ``positive`` (ground truth) and ``all``."""
    y = np.asarray(labels).astype(int) == 1
    pred = np.asarray(probability) >= threshold
    return {"tp": y & pred, "fp": ~y & pred, "tn": ~y & ~pred, "fn": y & ~pred,
            "positive": y, "all": np.ones_like(y)}


SUBSET_NAMES = {"tp": "true-positive predictions", "fp": "false-positive predictions",
                "tn": "true negatives", "fn": "false negatives",
                "positive": "ground-truth fractures", "all": "all samples"}


def correlation(enabled: np.ndarray, subset: np.ndarray, name: str = "subset") -> np.ndarray:
    """c_k = sum_{x in P} 1_{E_x}(k) / |P| (Eq. 1) for the samples where ``subset`` is True.

    ``enabled`` [N, K] bool (k in E_x). An empty subset raises
    :class:`UndefinedCorrelationError` (c_k is undefined; no division by zero).
    """
    enabled = np.asarray(enabled, dtype=bool)
    subset = np.asarray(subset, dtype=bool)
    n = int(subset.sum())
    if n == 0:
        raise UndefinedCorrelationError(name, f"c_k is undefined: the split has no "
                                        f"{SUBSET_NAMES.get(name, name)} (0 of {len(subset)} samples)")
    return enabled[subset].sum(axis=0) / n


def _order(primary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    """Descending by ``primary``, then ``secondary``, then ascending unit index."""
    k = np.arange(len(primary))
    return np.lexsort((k, -np.nan_to_num(secondary, nan=-np.inf), -np.nan_to_num(primary, nan=-np.inf)))


def _c_or_nan(d: Dissection, subset: np.ndarray, name: str) -> np.ndarray:
    try:
        return correlation(d.enabled, subset, name)
    except UndefinedCorrelationError:
        return np.full(d.n_units, np.nan)


def _mean_r(d: Dissection, subset: np.ndarray) -> np.ndarray:
    return d.r[subset].mean(axis=0) if subset.any() else np.full(d.n_units, np.nan)


def rank_units(d: Dissection, labels, subset: str = "tp", threshold: float = 0.5) -> pd.DataFrame:
    """Units sorted by c_k over ``subset`` (``"tp"``: true-positive predictions, the paper;
    ``"positive"``: ground-truth fractures, what the published code did).

    Columns: ``rank`` (1 = most correlated), ``unit``, ``c_k`` (the sort key), ``c_tp``,
    ``c_positive``, ``c_fp``, ``c_all``, ``mean_r`` (mean r_k over the subset; ties in c_k are
    broken by it, then by unit index), ``T_k``, ``realised_tail``, ``degenerate``.
    Raises :class:`UndefinedCorrelationError` when the subset is empty.
    """
    o = outcomes(labels, d.probability, threshold)
    c = correlation(d.enabled, o[subset], subset)
    mean_r = _mean_r(d, o[subset])
    order = _order(c, mean_r)
    table = pd.DataFrame({
        "unit": np.arange(d.n_units), "c_k": c,
        "c_tp": _c_or_nan(d, o["tp"], "tp"), "c_positive": _c_or_nan(d, o["positive"], "positive"),
        "c_fp": _c_or_nan(d, o["fp"], "fp"), "c_all": _c_or_nan(d, o["all"], "all"),
        "mean_r": mean_r, "T_k": d.T.astype(np.float64), "realised_tail": d.realised_tail,
        "degenerate": d.flags["degenerate"]}).iloc[order].reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, d.n_units + 1))
    return table


def rank_false_positives(d: Dissection, labels, threshold: float = 0.5) -> pd.DataFrame:
    """Units behind false positives: c_k over the false positives (Eq. 1 with P = FP, divided by
    |FP|), and the differential ``delta = c_fp - c_tp`` (fires more in false than in true
    positives). Sorted by ``delta`` (then c_fp); ``rank`` is that order, ``rank_c_fp`` the
    order by c_fp alone. ``c_tp``/``delta`` are NaN when there are no true positives.
    Raises :class:`UndefinedCorrelationError` when there are no false positives.
    """
    o = outcomes(labels, d.probability, threshold)
    c_fp = correlation(d.enabled, o["fp"], "fp")
    c_tp = _c_or_nan(d, o["tp"], "tp")
    delta = c_fp - c_tp
    by_fp = _order(c_fp, _mean_r(d, o["fp"]))
    rank_fp = np.empty(d.n_units, dtype=int)
    rank_fp[by_fp] = np.arange(1, d.n_units + 1)
    order = _order(delta, c_fp)
    table = pd.DataFrame({
        "unit": np.arange(d.n_units), "delta": delta, "c_fp": c_fp, "c_tp": c_tp,
        "rank_c_fp": rank_fp, "mean_r_fp": _mean_r(d, o["fp"]), "mean_r_tp": _mean_r(d, o["tp"]),
        "T_k": d.T.astype(np.float64), "degenerate": d.flags["degenerate"]}).iloc[order]
    table = table.reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, d.n_units + 1))
    return table


# --------------------------------------------------------------------------------------------
# Exemplars: top-activating samples per unit, from the requested subset only
# --------------------------------------------------------------------------------------------

EXEMPLAR_SCORES = ("r", "max", "mean")


def exemplars(d: Dissection, subset: np.ndarray | None = None, k: int = 25, by: str = "r",
              units: Sequence[int] | None = None) -> dict[int, list[int]]:
    """Per unit, the indices of its ``k`` top-activating samples among ``subset`` (bool [N];
    None = all), best first (ties: lower index first).

    ``by``: ``"r"`` = r_k(x) = sum(M_k * A_k) (default; only samples where the unit fires, so
    every exemplar shows a mask), ``"max"`` or ``"mean"`` of A_k(x). A unit that fires in fewer
    than k samples of the subset gets fewer exemplars: the list is never filled with samples
    outside the subset (the published code's defect).
    """
    if by not in EXEMPLAR_SCORES:
        raise DataValueError("by", f"must be one of {EXEMPLAR_SCORES}, got {by!r}")
    score = {"r": d.r, "max": d.max, "mean": d.mean}[by]
    member = np.ones(d.n_samples, dtype=bool) if subset is None else np.asarray(subset, dtype=bool)
    if member.shape != (d.n_samples,):
        raise DataValueError("subset", f"expected {d.n_samples} booleans, got shape {member.shape}")
    out = {}
    for u in (range(d.n_units) if units is None else units):
        u = int(u)
        candidates = member & (d.mask_size[:, u] > 0) if by == "r" else member
        idx = np.flatnonzero(candidates)
        order = np.lexsort((idx, -score[idx, u].astype(np.float64)))
        out[u] = [int(i) for i in idx[order[:k]]]
    return out


# --------------------------------------------------------------------------------------------
# Patch geometry: activations on the 96^3 patch, best slice, NIfTI, concept overlap
# --------------------------------------------------------------------------------------------

#: Patch axes are (I, P, L) (``vfcore.patches``); a view keeps one axis fixed (as the explorer).
VIEWS: dict[str, int] = {"sagittal": 2, "coronal": 1, "axial": 0}
#: HU written outside the mask in the masked-CT export (air, as ``vfcore.patches``).
AIR_HU = -1024


def upsample_to_patch(A: np.ndarray, field: Sequence[slice],
                      patch_shape: Sequence[int] = (96, 96, 96)) -> np.ndarray:
    """Activation maps [..., d, h, w] -> [..., *patch_shape] float32.

    Trilinear interpolation with ``align_corners=False`` onto the region of the patch that the
    network input covers (``field``, e.g. the centre 64^3 crop ``slice(16, 80)`` per axis): a
    feature voxel then sits at the centre of the input block it summarises. Zero outside the
    field (the network never saw it). All-zero maps stay all-zero (no normalisation, no NaN).
    """
    a = torch.as_tensor(np.asarray(A, dtype=np.float32))
    lead = a.shape[:-3]
    size = tuple(int(s.stop - s.start) for s in field)
    up = F.interpolate(a.reshape(-1, 1, *a.shape[-3:]), size=size, mode="trilinear",
                       align_corners=False).reshape(*lead, *size).numpy()
    out = np.zeros((*lead, *patch_shape), dtype=np.float32)
    out[(Ellipsis, *field)] = up
    return out


def patch_mask(M: np.ndarray, field: Sequence[slice], patch_shape: Sequence[int] = (96, 96, 96)) -> np.ndarray:
    """M_k on the patch: each feature voxel of the mask M_k(x) = A_k(x) > T_k [..., d, h, w]
    becomes the block of the field it summarises (nearest-neighbour upsampling: 8^3 mm blocks
    for the paper preset, 16^3 mm for the small one); False outside the field.

    Why not NetDissect's "upsample A_k, then threshold at T_k": interpolation lowers a peak
    that lies only just above T_k (most of a unit's tail does), so masks vanish; on the small
    preset most exemplar masks were lost that way. The smooth upsampled activation is still
    what the figures colour inside the mask.
    """
    m = torch.as_tensor(np.asarray(M, dtype=np.float32))
    lead = m.shape[:-3]
    size = tuple(int(s.stop - s.start) for s in field)
    up = F.interpolate(m.reshape(-1, 1, *m.shape[-3:]), size=size, mode="nearest")
    out = np.zeros((*lead, *patch_shape), dtype=bool)
    out[(Ellipsis, *field)] = up.reshape(*lead, *size).numpy() > 0.5
    return out


def best_slice(up: np.ndarray, T: float, view: str = "sagittal", mask: np.ndarray | None = None) -> int:
    """The slice of ``view`` where the unit's thresholded activation is largest: the paper
    shows "a single slice with high activation (after thresholding)".

    ``up``: the upsampled activation; the thresholded part is ``up`` inside ``mask`` (the
    upsampled M_k, :func:`patch_mask`) or, without a mask, where ``up > T``. Nothing
    thresholded: the slice with the largest activation sum; an all-zero map: the middle slice.
    """
    axis = VIEWS[view]
    other = tuple(a for a in range(up.ndim) if a != axis)
    a = np.asarray(up, dtype=np.float64)
    inside = (a > T) if mask is None else np.asarray(mask, dtype=bool)
    for score in (np.where(inside, np.maximum(a, 0.0), 0.0).sum(axis=other),
                  inside.sum(axis=other).astype(np.float64), np.abs(a).sum(axis=other)):
        if np.any(score > 0):
            return int(np.argmax(score))
    return up.shape[axis] // 2


def canonical_patch_affine(shape: Sequence[int] = (96, 96, 96), spacing: float = 1.0) -> np.ndarray:
    """World affine of a patch in its own frame: axes (I, P, L) at ``spacing`` mm, centre at 0.

    Used when the patch store does not record where the vertebra was in the scan; every
    export of one patch shares it, so CT, activation and masked CT overlay in any viewer.
    """
    axes = np.array([[0.0, 0.0, -1.0], [0.0, -1.0, 0.0], [-1.0, 0.0, 0.0]]).T  # columns I, P, L (RAS+)
    affine = np.eye(4)
    affine[:3, :3] = spacing * axes
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape, dtype=np.float64) - 1) / 2)
    return affine


def patch_world_affine(run_dir: str | Path, case: str, label: int) -> np.ndarray:
    """The patch's affine in the original scan's world (``vfcore.patches.patch_affine`` of the
    frame recorded in ``<run>/patches/<case>/case.json``), so exports also overlay the source
    CT; :func:`canonical_patch_affine` when the record is missing."""
    from vfcore.patches import PATCH_SIZE, PATCH_SPACING, RECORD_NAME, Frame, patch_affine

    record = Path(run_dir) / "patches" / str(case) / RECORD_NAME
    try:
        rec = json.loads(record.read_text())
        v = next(v for v in rec["vertebrae"] if int(v["label"]) == int(label))
        frame = Frame(*(np.asarray(v[k], dtype=np.float64) for k in ("c", "e_S", "e_A", "e_L")))
        params = rec.get("params", {})
        return patch_affine(frame, params.get("size", PATCH_SIZE), params.get("spacing", PATCH_SPACING))
    except (OSError, ValueError, KeyError, StopIteration):
        return canonical_patch_affine()


def write_nifti_exemplar(folder: str | Path, stem: str, ct: np.ndarray, activation: np.ndarray,
                         T: float, affine: np.ndarray, mask: np.ndarray | None = None) -> dict[str, Path]:
    """Three NIfTI files sharing one affine (1 mm; qform and sform set): the CT patch (int16
    HU), the unit's upsampled activation (float32) and the CT inside the unit's mask (``mask``,
    the upsampled M_k; default ``activation > T``), air elsewhere. Written atomically; never NaN."""
    import nibabel as nib

    from vfcore.io import atomic_save

    act = np.nan_to_num(np.asarray(activation, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    ct = np.asarray(ct).astype(np.int16)
    inside = act > T if mask is None else np.asarray(mask, dtype=bool)
    volumes = {"ct": ct, "activation": act, "masked_ct": np.where(inside, ct, AIR_HU).astype(np.int16)}
    paths = {}
    for kind, data in volumes.items():
        img = nib.Nifti1Image(data, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        img.header.set_xyzt_units("mm")
        path = Path(folder) / f"{stem}_{kind}.nii.gz"
        paths[kind] = atomic_save(path, lambda tmp, img=img: nib.save(img, tmp), suffix=".nii.gz")
    return paths


def concept_group(value: int, names: Mapping[int, str]) -> str:
    """Name of a concept-mask value: discs (100 + L normal, 150 + L degenerated) are grouped."""
    value = int(value)
    if value >= 150:
        return "degenerated disc"
    if value >= 100:
        return "intervertebral disc"
    return names.get(value, f"concept {value}")


def concept_overlap(mask: np.ndarray, concepts: np.ndarray, names: Mapping[int, str],
                    field: Sequence[slice] | None = None) -> pd.DataFrame:
    """What a unit's mask covers, measured against a ground-truth concept mask (the phantom).

    ``mask`` bool (the unit's mask on the patch, :func:`patch_mask`), ``concepts`` the concept
    labels of the same patch. Per concept name: ``fraction`` = |mask & C| / |mask| (how much of
    what the unit marks is C), ``iou`` = |mask & C| / |mask | C|, ``share`` = |C| / |field|
    (how much of what the network sees is C) and ``lift`` = fraction / share (above 1: the unit
    prefers C to a random block of the field; a mask block is 8-16 mm wide, so fractions are
    diluted and the lift tells more). C is restricted to ``field``, the part of the patch the
    network sees (and so is the mask). Sorted by fraction; empty for an empty mask.
    """
    mask = np.asarray(mask, dtype=bool)
    concepts = np.asarray(concepts)
    visible = np.zeros(mask.shape, dtype=bool)
    visible[tuple(field) if field is not None else ...] = True
    concepts = np.where(visible, concepts, 0)
    mask = mask & visible
    total = int(mask.sum())
    rows = []
    if total:
        groups: dict[str, np.ndarray] = {}
        for value in np.unique(concepts):
            name = "background" if value == 0 else concept_group(value, names)
            groups[name] = groups.get(name, np.zeros(mask.shape, dtype=bool)) | (concepts == value)
        n_visible = int(visible.sum())
        for name, c in groups.items():
            inter = int((mask & c).sum())
            if inter:
                share = int((c & visible).sum()) / n_visible
                rows.append({"concept": name, "fraction": inter / total,
                             "iou": inter / int((mask | c).sum()), "share": share,
                             "lift": inter / total / share})
    table = pd.DataFrame(rows, columns=["concept", "fraction", "iou", "share", "lift"])
    return table.sort_values(["fraction", "concept"], ascending=[False, True]).reset_index(drop=True)


def vertebra_overlap(mask: np.ndarray, vertebrae: np.ndarray, label: int) -> dict[str, float]:
    """Fractions of a unit's mask on the target vertebra, the adjacent ones and outside bone
    (``vertebrae`` = the patch's vertebra label mask)."""
    mask = np.asarray(mask, dtype=bool)
    total = int(mask.sum())
    if not total:
        return {"target": 0.0, "adjacent": 0.0, "outside": 0.0}
    v = np.asarray(vertebrae)[mask]
    return {"target": float((v == label).mean()), "adjacent": float(((v != label) & (v > 0)).mean()),
            "outside": float((v == 0).mean())}


# --------------------------------------------------------------------------------------------
# The run folder: <run>/dissection/ (notebooks 03 and 04; read by the explorer of notebook 05)
# --------------------------------------------------------------------------------------------

FORMAT = 1
NOTEBOOK_03 = "notebooks/03_quantile_thresholding.ipynb"
NOTEBOOK_04 = "notebooks/04_correlation_ranking.ipynb"
#: What identifies a dissection: a different value makes every artifact stale.
IDENTITY = ("checkpoint_sha256", "split", "q_tail", "layer", "manifest_sha256")


def dissection_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "dissection"


def network_field(preset) -> tuple[slice, slice, slice]:
    """The part of the 96^3 patch (voxel slices) that the network input of ``preset`` covers:
    the centre ``crop``^3 mm (``vfcore.model.Preset``; paper: ``slice(16, 80)`` per axis)."""
    from vfcore.model import PATCH_SIZE, get_preset

    p = get_preset(preset)
    start = (PATCH_SIZE - p.crop) // 2
    return (slice(start, start + p.crop),) * 3


def _identity_id(identity: Mapping) -> str:
    text = json.dumps({k: identity[k] for k in IDENTITY}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_dissection(d: Dissection, folder: str | Path, labels=None) -> None:
    """``thresholds.npz`` (per unit), ``stats.npz`` (per sample and unit), ``tail.npz`` (the
    masks, sparse), each written atomically."""
    from vfcore.io import atomic_save

    folder = Path(folder)

    def npz(name: str, **arrays):
        atomic_save(folder / name, lambda tmp: np.savez(tmp, **arrays), suffix=".npz")

    npz("thresholds.npz", T=d.T, realised_tail=d.realised_tail, unit_min=d.unit_min,
        unit_max=d.unit_max, zero_fraction=d.zero_fraction, q_tail=np.float64(d.q_tail),
        **{f"flag_{k}": v for k, v in d.flags.items()})
    npz("stats.npz", max=d.max, mean=d.mean, r=d.r, mask_size=d.mask_size,
        probability=d.probability,
        label=np.full(d.n_samples, -1, np.int8) if labels is None else np.asarray(labels, np.int8))
    npz("tail.npz", spatial_shape=np.asarray(d.spatial_shape, np.int64), **d.tail)


def load_dissection(folder: str | Path, layer: str = "", seconds: float = 0.0) -> Dissection:
    """The :class:`Dissection` saved by :func:`save_dissection`."""
    folder = Path(folder)
    with np.load(folder / "thresholds.npz") as t, np.load(folder / "stats.npz") as s, \
            np.load(folder / "tail.npz") as tail:
        flags = {k[5:]: t[k] for k in t.files if k.startswith("flag_")}
        return Dissection(
            layer=layer, q_tail=float(t["q_tail"]), spatial_shape=tuple(int(v) for v in tail["spatial_shape"]),
            T=t["T"], realised_tail=t["realised_tail"], flags=flags, unit_min=t["unit_min"],
            unit_max=t["unit_max"], zero_fraction=t["zero_fraction"], max=s["max"], mean=s["mean"],
            r=s["r"], mask_size=s["mask_size"], probability=s["probability"],
            tail={k: tail[k] for k in ("unit", "sample", "position", "value")}, seconds=seconds)


@dataclass
class DissectionArtifacts:
    """What ``<run>/dissection/`` holds (see docs/architecture.md): ``meta`` (meta.json),
    ``dissection`` (T_k, statistics, masks), ``samples`` (samples.csv), ``ranking_tp`` /
    ``ranking_fp`` (None where c_k is undefined), ``exemplars`` (exemplars.json, None before
    notebook 04), ``units`` (units.csv, None before notebook 04)."""

    folder: Path
    meta: dict
    dissection: Dissection
    samples: pd.DataFrame
    ranking_tp: pd.DataFrame | None
    ranking_fp: pd.DataFrame | None
    exemplars: dict | None = None
    units: pd.DataFrame | None = None

    @property
    def labels(self) -> np.ndarray:
        return self.samples["fracture"].to_numpy(dtype=int)

    @property
    def field(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in self.meta["field"])

    def exemplar_list(self, unit: int, subset: str = "positive") -> list[int]:
        """Sample indices (rows of ``samples``) of a unit's exemplars in ``subset``."""
        if self.exemplars is None:
            raise MissingArtifactError(self.folder / "exemplars.json",
                                       f"no exemplars yet: run {NOTEBOOK_04}")
        entry = self.exemplars["subsets"][subset]["units"].get(str(int(unit)), [])
        return [int(e["sample"]) for e in entry]


def _missing(path: Path, notebook: str, what: str) -> MissingArtifactError:
    return MissingArtifactError(path, f"{what} not found: run {notebook} first")


def load_artifacts(run_dir: str | Path, expect: Mapping | None = None,
                   require_exports: bool = False) -> DissectionArtifacts:
    """Read ``<run>/dissection/``; check it against ``expect`` (any of ``checkpoint_sha256``,
    ``split``, ``q_tail``, ``layer``, ``manifest_sha256``, ``n_samples``).

    Raises :class:`MissingArtifactError` naming the notebook that makes a missing file, and
    :class:`StaleArtifactError` when the artifacts come from other inputs (another checkpoint,
    split, q, layer or patch store), or when notebook 04's exports belong to an earlier
    dissection. ``require_exports``: exemplars.json must exist too.
    """
    folder = dissection_dir(run_dir)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise _missing(meta_path, NOTEBOOK_03, "the dissection (T_k, statistics)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        from vfcore.errors import CorruptFileError
        raise CorruptFileError(meta_path, f"unreadable JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise StaleArtifactError(meta_path, f"format {meta.get('format')} (this vfcore writes "
                                 f"{FORMAT}): run {NOTEBOOK_03} again")
    for key, want in (expect or {}).items():
        if want is None:
            continue
        have = meta.get(key)
        same = math.isclose(float(have), float(want)) if key == "q_tail" and have is not None else have == want
        if not same:
            raise StaleArtifactError(meta_path, f"stale: made with {key} = {have!r}, expected "
                                     f"{want!r}: run {NOTEBOOK_03} again (parameters of this run)")
    for name in ("thresholds.npz", "stats.npz", "tail.npz", "samples.csv"):
        if not (folder / name).is_file():
            raise _missing(folder / name, NOTEBOOK_03, name)
    d = load_dissection(folder, meta["layer"], meta.get("seconds", 0.0))
    samples = pd.read_csv(folder / "samples.csv", dtype={"case": str, "level": str})
    if len(samples) != d.n_samples or d.n_samples != meta["n_samples"]:
        raise StaleArtifactError(folder, f"samples.csv has {len(samples)} rows, stats.npz "
                                 f"{d.n_samples}, meta.json {meta['n_samples']}: run {NOTEBOOK_03} again")
    rankings = {}
    for which in ("tp", "fp"):
        path = folder / f"ranking_{which}.csv"
        if meta["rankings"][which]["defined"]:
            if not path.is_file():
                raise _missing(path, NOTEBOOK_03, path.name)
            rankings[which] = pd.read_csv(path)
        else:
            rankings[which] = None
    exemplars, units = None, None
    ex_path = folder / "exemplars.json"
    if ex_path.is_file():
        exemplars = json.loads(ex_path.read_text())
        if exemplars.get("dissection_id") != meta["dissection_id"]:
            raise StaleArtifactError(ex_path, f"exports of an earlier dissection "
                                     f"({exemplars.get('dissection_id')} != {meta['dissection_id']}): "
                                     f"run {NOTEBOOK_04} again")
        if (folder / "units.csv").is_file():
            units = pd.read_csv(folder / "units.csv")
    elif require_exports:
        raise _missing(ex_path, NOTEBOOK_04, "the exemplars and collages")
    return DissectionArtifacts(folder, meta, d, samples, rankings["tp"], rankings["fp"], exemplars, units)


def _checkpoint_path(run_dir: Path, checkpoint: str | Path | None) -> Path:
    path = Path(checkpoint) if checkpoint is not None else run_dir / "model" / "best.pt"
    if not path.is_file():
        raise _missing(path, "notebooks/02_training.ipynb", "the trained model")
    return path


def _manifest_path(run_dir: Path) -> Path:
    path = run_dir / "patches" / "manifest.csv"
    if not path.is_file():
        raise _missing(path, "notebooks/01_preprocessing.ipynb", "the patch store")
    return path


def _network(checkpoint: Path):
    """(model, its ``vfcore.model.Preset``, transform HU batch -> network input) from a
    checkpoint (``vfcore.train.load_checkpoint``: weights-only, preset stored in it)."""
    from vfcore.data import to_network_input
    from vfcore.train import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    preset = model.preset
    return model, preset, (lambda hu: to_network_input(hu, preset))


@dataclass
class Network:
    """A run's trained network as the notebooks use it: ``model``, ``preset``
    (``vfcore.model.Preset``), ``layer`` (the dissected one: the preset's ``dissect_layer``),
    ``transform`` (int16 HU batch -> network input)."""

    model: torch.nn.Module
    preset: object
    layer: str
    transform: Callable


def load_network(run_dir: str | Path, checkpoint: str | Path | None = None,
                 layer: str | None = None) -> Network:
    """The run's checkpoint (``<run>/model/best.pt``) with its preset's input transform."""
    model, preset, transform = _network(_checkpoint_path(Path(run_dir), checkpoint))
    return Network(model, preset, layer or preset.dissect_layer, transform)


def sketch_comparison(model: torch.nn.Module, data, layer: str, T: np.ndarray, *,
                      q_tail: float = Q_TAIL_PAPER, first: int | None = None,
                      resolution: int = 1024, seed: int = 0, batch_size: int = 16,
                      transform: Callable | None = None, device: str | None = None,
                      progress: bool = True) -> pd.DataFrame:
    """How far sampled thresholds are from the exact ones, per unit (notebook 03, bench).

    Two passes over ``data``: the first feeds :class:`SampledQuantile` with every sample
    (``sketch``) and, like the published code, with only the ``first`` samples in file order
    (``sketch_first``); the second counts, over all values, the realised tail P(a_k > T_k) of
    the exact ``T`` and of both estimates. Columns: ``unit``, ``T_exact``, ``T_sketch``,
    ``T_sketch_first``, ``tail_exact``, ``tail_sketch``, ``tail_sketch_first``.
    """
    from tqdm.auto import tqdm

    from vfcore.runtime import pick_device

    device = pick_device(str(device) if device is not None else None)
    model = model.to(device)
    n = len(data)
    first = n if first is None else min(int(first), n)
    every, head = SampledQuantile(q_tail, resolution, seed), SampledQuantile(q_tail, resolution, seed)
    bar = tqdm(total=2 * n, desc="sketch vs exact", unit="sample", disable=not progress)
    with evaluating(model), capture(model, layer) as out, torch.inference_mode():
        seen = 0
        for x in _batches(data, batch_size, device):
            with _autocast(device, True):
                model(transform(x) if transform is not None else x)
            A = out.pop().float()
            every.update(A)
            if seen < first:
                head.update(A[:first - seen])
            seen += A.shape[0]
            bar.update(A.shape[0])
        estimates = {"exact": np.asarray(T), "sketch": every.thresholds(), "sketch_first": head.thresholds()}
        counts = {k: np.zeros(len(T)) for k in estimates}
        positions = 0
        for x in _batches(data, batch_size, device):
            with _autocast(device, True):
                model(transform(x) if transform is not None else x)
            A = out.pop().float()
            positions += A.shape[0] * int(np.prod(A.shape[2:]))
            for k, t in estimates.items():
                counts[k] += tail_fraction(A, t) * A.shape[0] * int(np.prod(A.shape[2:]))
            bar.update(A.shape[0])
    bar.close()
    table = pd.DataFrame({"unit": np.arange(len(T))})
    for k, t in estimates.items():
        table[f"T_{k}"] = np.asarray(t, dtype=np.float64)
    for k in estimates:
        table[f"tail_{k}"] = counts[k] / positions
    return table


def _samples_table(rows: pd.DataFrame, labels: np.ndarray, d: Dissection, threshold: float) -> pd.DataFrame:
    o = outcomes(labels, d.probability, threshold)
    outcome = np.select([o["tp"], o["fp"], o["tn"], o["fn"]], ["TP", "FP", "TN", "FN"], default="")
    table = pd.DataFrame({"index": np.arange(d.n_samples)})
    for col in ("case", "label", "level", "grade", "ct_path", "mask_path", "concept_path"):
        if col in rows:
            table[col] = rows[col].to_numpy()
    table["fracture"] = np.asarray(labels, dtype=int)
    table["probability"] = d.probability.astype(np.float64)
    table["prediction"] = (d.probability >= threshold).astype(int)
    table["outcome"] = outcome
    table["n_enabled"] = d.enabled.sum(axis=1)
    return table


def _relative_to(path: Path, root: Path) -> str:
    path, root = Path(path).resolve(), Path(root).resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def write_artifacts(run_dir: str | Path, d: Dissection, identity: Mapping, rows: pd.DataFrame,
                    labels, threshold: float = 0.5, extra: Mapping | None = None) -> Path:
    """Write a dissection's artifacts into ``<run>/dissection/`` (see :func:`dissect_run`):
    arrays, ``samples.csv`` (``rows``: the split's manifest rows, in sample order), the two
    rankings where defined, and ``meta.json`` last (``identity`` + ``extra`` + counts)."""
    from vfcore.io import atomic_write, versions, write_json

    folder = dissection_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(labels, dtype=int)
    save_dissection(d, folder, labels)
    rows = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    samples = _samples_table(rows.reset_index(drop=True), labels, d, threshold)
    with atomic_write(folder / "samples.csv", "w") as f:
        samples.to_csv(f, index=False, lineterminator="\n")
    o = outcomes(labels, d.probability, threshold)
    rankings = {}
    for which, make in (("tp", lambda: rank_units(d, labels, "tp", threshold)),
                        ("fp", lambda: rank_false_positives(d, labels, threshold))):
        try:
            table = make()
        except UndefinedCorrelationError as e:
            (folder / f"ranking_{which}.csv").unlink(missing_ok=True)
            rankings[which] = {"defined": False, "n": 0, "reason": e.problem}
            continue
        with atomic_write(folder / f"ranking_{which}.csv", "w") as f:
            table.to_csv(f, index=False, lineterminator="\n", float_format="%.9g")
        rankings[which] = {"defined": True, "n": int(o[which].sum()), "reason": ""}
    meta = {
        "format": FORMAT, **{k: identity[k] for k in IDENTITY}, "dissection_id": _identity_id(identity),
        "checkpoint": "model/best.pt", "preset": None, "field": None, "patch_shape": [96, 96, 96],
        **(extra or {}),
        "n_samples": d.n_samples, "n_units": d.n_units, "spatial_shape": list(d.spatial_shape),
        "n_values_per_unit": d.n_samples * int(np.prod(d.spatial_shape)),
        "threshold": threshold, "ranking_subset": "tp",
        "counts": {k: int(v.sum()) for k, v in o.items()},
        "rankings": rankings,
        "degenerate": {k: [int(u) for u in np.flatnonzero(v)] for k, v in d.flags.items()},
        "seconds": round(d.seconds, 3),
        "samples_per_second": round(d.n_samples / d.seconds, 2) if d.seconds > 0 else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": versions(),
    }
    write_json(folder / "meta.json", meta)
    return folder


def dissect_run(run_dir: str | Path, split: str = "test", q_tail: float = Q_TAIL_PAPER, *,
                batch_size: int | None = None, checkpoint: str | Path | None = None,
                layer: str | None = None, device: str | None = None, threshold: float = 0.5,
                force: bool = False, progress: bool = True) -> DissectionArtifacts:
    """Notebook 03's step: dissect the run's checkpoint on one split and write the artifacts.

    Writes ``<run>/dissection/``: ``thresholds.npz``, ``stats.npz``, ``tail.npz``,
    ``samples.csv``, ``ranking_tp.csv``, ``ranking_fp.csv`` (when defined), and ``meta.json``
    last (its presence means complete). An earlier dissection with the same identity
    (checkpoint sha256, split, q, layer, patch store) is reused unless ``force``; one with
    another identity is replaced, and notebook 04's exports of it are removed.
    """
    import shutil

    from vfcore.data import load_split
    from vfcore.io import sha256_file

    run_dir = Path(run_dir)
    q_tail = _check_q(q_tail)
    ckpt = _checkpoint_path(run_dir, checkpoint)
    manifest = _manifest_path(run_dir)
    identity = {"checkpoint_sha256": sha256_file(ckpt), "split": split, "q_tail": q_tail,
                "manifest_sha256": sha256_file(manifest)}
    model, preset, transform = _network(ckpt)
    identity["layer"] = layer or preset.dissect_layer
    if not force:
        try:
            return load_artifacts(run_dir, expect=identity)
        except VfcoreError:
            pass
    folder = dissection_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").unlink(missing_ok=True)        # incomplete until meta.json lands
    for old in ("exemplars.json", "units.csv", "unit_concepts.csv", "ranking_tp.csv", "ranking_fp.csv"):
        (folder / old).unlink(missing_ok=True)
    for old in ("collages", "nifti"):
        shutil.rmtree(folder / old, ignore_errors=True)

    patches, labels, rows = load_split(run_dir, split)
    labels = np.asarray(labels, dtype=int)
    if len(labels) == 0:
        raise DataValueError(manifest, f"split {split!r} has no labelled vertebrae")
    if batch_size is None:
        batch_size = 128 if torch.cuda.is_available() and device != "cpu" else 16
    d = dissect(model, patches, identity["layer"], q_tail=q_tail, batch_size=batch_size,
                transform=transform, device=device, progress=progress)
    from vfcore.runtime import pick_device
    write_artifacts(run_dir, d, identity, rows, labels, threshold=threshold, extra={
        "checkpoint": _relative_to(ckpt, run_dir), "preset": preset.name,
        "field": [[s.start, s.stop] for s in network_field(preset)],
        "device": str(pick_device(device)), "batch_size": batch_size})
    return load_artifacts(run_dir, expect=identity)


def _load_patch(run_dir: Path, rel: str) -> np.ndarray | None:
    if not isinstance(rel, str) or not rel:
        return None
    path = run_dir / "patches" / rel
    if not path.is_file():
        raise _missing(path, "notebooks/01_preprocessing.ipynb", "a patch of the store")
    return np.load(path)


def concept_names(run_dir: str | Path) -> dict[int, str] | None:
    """Concept label -> name from the data root's ``concept_labels.json`` (the phantom; the
    root is recorded in ``<run>/patches/report.json``); None for data without concept masks."""
    try:
        report = json.loads((Path(run_dir) / "patches" / "report.json").read_text())
        table = json.loads((Path(report["root"]) / "concept_labels.json").read_text())
        return {int(k): str(v) for k, v in table["labels"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None


class PatchFiles:
    """The int16 HU patches of some samples, read from the patch store when sliced (so a
    forward pass over them never holds more than one batch in memory)."""

    def __init__(self, run_dir: str | Path, rel_paths: Sequence[str]):
        self.run_dir = Path(run_dir)
        self.rel_paths = list(rel_paths)

    def __len__(self) -> int:
        return len(self.rel_paths)

    def __getitem__(self, item):
        if isinstance(item, slice):
            return np.stack([_load_patch(self.run_dir, p) for p in self.rel_paths[item]])
        return _load_patch(self.run_dir, self.rel_paths[item])


def export_units(run_dir: str | Path, top: int = 10, top_fp: int = 5, k: int = 25,
                 nifti_top: int = 5, subset: str = "positive", by: str = "r",
                 view: str = "sagittal", device: str | None = None, batch_size: int = 16,
                 progress: bool = True) -> DissectionArtifacts:
    """Notebook 04's step: exemplars, collages, NIfTI files and (phantom) measured concepts.

    * ``exemplars.json``: for every unit its ``k`` top samples by ``by`` within each subset
      (``tp``, ``positive``, ``fp``, ``all``), never filled from outside the subset;
    * for the ``top`` units by c_k over true positives (exemplars from ``subset``: the paper
      shows fractured samples) and the ``top_fp`` units of the false-positive ranking
      (exemplars from ``fp``): ``collages/unit_<k>_<role>.png`` (5x5 single slices, each at
      the slice where that unit's thresholded activation is largest) and, for the first
      ``nifti_top`` exemplars, ``nifti/unit_<k>/<nn>_<case>_<level>_{ct,activation,masked_ct}.nii.gz``;
    * ``units.csv`` (one row per exported unit) and, where the patch store has concept masks
      (the phantom), ``unit_concepts.csv``: which concepts each unit's masks cover.

    The exemplars' activations (for the heat map) are recomputed in one forward pass over the
    union of the exported exemplars, keeping only the exported units; their masks are the
    pass's own M_k (from the kept tail), upsampled with :func:`patch_mask`.
    """
    import shutil

    from tqdm.auto import tqdm

    from vfcore.io import atomic_write, sha256_file, write_json

    run_dir = Path(run_dir)
    art = load_artifacts(run_dir)
    meta, d, samples = art.meta, art.dissection, art.samples
    ckpt = _checkpoint_path(run_dir, run_dir / meta["checkpoint"])   # absolute stays absolute
    if sha256_file(ckpt) != meta["checkpoint_sha256"]:
        raise StaleArtifactError(art.folder / "meta.json", f"the dissection was made from another "
                                 f"checkpoint than {ckpt}: run {NOTEBOOK_03} again")
    folder = art.folder
    (folder / "exemplars.json").unlink(missing_ok=True)   # incomplete until it is rewritten
    for old in ("collages", "nifti"):
        shutil.rmtree(folder / old, ignore_errors=True)
    o = outcomes(art.labels, d.probability, meta["threshold"])
    score = {"r": d.r, "max": d.max, "mean": d.mean}[by] if by in EXEMPLAR_SCORES else None
    ex = {"format": FORMAT, "dissection_id": meta["dissection_id"], "k": k, "by": by,
          "view": view, "subsets": {}, "exported": {}}
    for name in ("tp", "positive", "fp", "all"):
        lists = exemplars(d, o[name], k, by)
        ex["subsets"][name] = {"description": SUBSET_NAMES[name], "n": int(o[name].sum()),
                               "units": {str(u): [{"sample": i, "score": float(score[i, u])} for i in idx]
                                         for u, idx in lists.items()}}
    jobs: list[tuple[str, int, int, float, str]] = []      # role, rank, unit, c, subset
    if art.ranking_tp is not None:
        for row in art.ranking_tp.head(top).itertuples():
            jobs.append(("tp", int(row.rank), int(row.unit), float(row.c_k), subset))
    if art.ranking_fp is not None:
        for row in art.ranking_fp.head(top_fp).itertuples():
            jobs.append(("fp", int(row.rank), int(row.unit), float(row.c_fp), "fp"))
    members = {(role, unit): [e["sample"] for e in ex["subsets"][sub]["units"][str(unit)]]
               for role, _, unit, _, sub in jobs}
    union = sorted({i for idx in members.values() for i in idx})
    units = sorted({unit for _, _, unit, _, _ in jobs})
    maps: dict[int, np.ndarray] = {}
    if union:
        net_model, _, transform = _network(ckpt)
        A, _ = activations(net_model, PatchFiles(run_dir, samples.loc[union, "ct_path"]), meta["layer"],
                           units=units, batch_size=batch_size, transform=transform, device=device,
                           progress=progress)
        maps = {i: A[j] for j, i in enumerate(union)}
    column = {u: j for j, u in enumerate(units)}
    names = concept_names(run_dir)
    unit_rows, concept_rows = [], []
    for role, rank, unit, c, sub in tqdm(jobs, desc="collages and NIfTI", disable=not progress):
        idx = members[(role, unit)]
        entry, row, concepts = _export_unit(run_dir, folder, art, role, rank, unit, c, sub, idx,
                                            [maps[i][column[unit]] for i in idx],
                                            [d.masks(i, [unit])[0] for i in idx], nifti_top, view, names)
        ex["exported"][f"{role}:{unit}"] = entry
        unit_rows.append(row)
        concept_rows.extend(concepts)
    with atomic_write(folder / "units.csv", "w") as f:
        pd.DataFrame(unit_rows, columns=UNITS_COLUMNS).to_csv(f, index=False, lineterminator="\n",
                                                              float_format="%.6g")
    (folder / "unit_concepts.csv").unlink(missing_ok=True)
    if concept_rows:
        with atomic_write(folder / "unit_concepts.csv", "w") as f:
            pd.DataFrame(concept_rows).to_csv(f, index=False, lineterminator="\n", float_format="%.6g")
    write_json(folder / "exemplars.json", ex)              # last: the exports are complete
    return load_artifacts(run_dir, require_exports=True)


UNITS_COLUMNS = ["role", "rank", "unit", "c", "subset", "n_exemplars", "n_masks", "T_k", "degenerate",
                 "measured_concept", "on_target_vertebra", "on_adjacent_vertebrae", "outside_vertebrae",
                 "collage", "strip"]


def _export_unit(run_dir: Path, folder: Path, art: DissectionArtifacts, role: str, rank: int,
                 unit: int, c: float, sub: str, idx: list[int], feature_maps: list[np.ndarray],
                 feature_masks: list[np.ndarray], nifti_top: int, view: str, names: dict[int, str] | None):
    """One unit's collage, NIfTI files and measured concepts -> (exemplars.json entry,
    units.csv row, unit_concepts.csv rows)."""
    import matplotlib.pyplot as plt

    from vfcore.io import atomic_save
    from vfcore.viz.dissection import collage, take

    d, samples = art.dissection, art.samples
    T = float(d.T[unit])
    entry = {"role": role, "rank": rank, "c": c, "subset": sub, "samples": idx, "slices": [],
             "collage": f"collages/unit_{unit:03d}_{role}.png",
             "strip": f"collages/unit_{unit:03d}_{role}_top5.png", "nifti": []}
    tiles, overlaps, where, n_masks = [], [], [], 0
    for j, (i, a, M) in enumerate(zip(idx, feature_maps, feature_masks)):
        row = samples.loc[i]
        ct = _load_patch(run_dir, row["ct_path"])
        up = upsample_to_patch(a, art.field, ct.shape)
        mask = patch_mask(M, art.field, ct.shape)           # M_k of the pass, on the patch
        s = best_slice(up, T, view, mask)
        entry["slices"].append(s)
        tiles.append((take(ct, view, s), take(up, view, s),
                      f"{row['case']} {row['level']}\nr_k = {d.r[i, unit]:.3g}", take(mask, view, s)))
        if j < nifti_top:
            affine = patch_world_affine(run_dir, row["case"], int(row["label"]))
            paths = write_nifti_exemplar(folder / "nifti" / f"unit_{unit:03d}",
                                         f"{j + 1:02d}_{row['case']}_{row['level']}", ct, up, T, affine, mask)
            entry["nifti"].append({kind: p.relative_to(folder).as_posix() for kind, p in paths.items()})
        n_masks += bool(mask.any())
        concepts = _load_patch(run_dir, row.get("concept_path", ""))
        if mask.any() and concepts is not None and names is not None:
            overlaps.append(concept_overlap(mask, concepts, names, art.field))
            vertebrae = _load_patch(run_dir, row.get("mask_path", ""))
            if vertebrae is not None:
                where.append(vertebra_overlap(mask, vertebrae, int(row["label"])))
    kind = "true" if role == "tp" else "false"
    fig = collage(tiles, T, f"unit {unit}: rank {rank} by c_k over {kind} positives (c = {c:.2f}); "
                            f"exemplars: {SUBSET_NAMES[sub]}")
    atomic_save(folder / entry["collage"], lambda tmp: fig.savefig(tmp, dpi=110), suffix=".png")
    plt.close(fig)
    fig = collage(tiles[:5], T, rows=1)                    # the gallery's row (Table 2)
    atomic_save(folder / entry["strip"], lambda tmp: fig.savefig(tmp, dpi=110), suffix=".png")
    plt.close(fig)
    concept_rows, measured = [], ""
    if overlaps:
        long = pd.concat(overlaps)
        summary = long.groupby("concept")[["fraction", "iou"]].sum() / len(overlaps)   # absent = 0
        summary["share"] = long.groupby("concept")["share"].mean()
        summary["lift"] = summary["fraction"] / summary["share"]
        summary = summary.sort_values("fraction", ascending=False)
        concept_rows = [{"unit": unit, "role": role, "concept": name, "fraction": r["fraction"],
                         "iou": r["iou"], "share": r["share"], "lift": r["lift"], "n_masks": len(overlaps)}
                        for name, r in summary.iterrows()]
        named = summary.drop(index="background", errors="ignore")   # concept 0: no structure
        measured = ", ".join(f"{name} {r['fraction']:.0%} (x{r['lift']:.1f})"
                             for name, r in named.head(3).iterrows())
    w = {key: float(np.mean([x[key] for x in where])) if where else None
         for key in ("target", "adjacent", "outside")}
    row = {"role": role, "rank": rank, "unit": unit, "c": c, "subset": sub, "n_exemplars": len(idx),
           "n_masks": n_masks, "T_k": T, "degenerate": bool(d.flags["degenerate"][unit]),
           "measured_concept": measured, "on_target_vertebra": w["target"],
           "on_adjacent_vertebrae": w["adjacent"], "outside_vertebrae": w["outside"],
           "collage": entry["collage"], "strip": entry["strip"]}
    return entry, row, concept_rows
