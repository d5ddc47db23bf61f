"""Thresholds T_k with P(a_k > T_k) = q_tail (paper, Sec. 2.2), exact and streamed; masks M_k.

:func:`M_k` is the one place where a unit mask M_k(x) = A_k(x) > T_k is thresholded.

:class:`TopQuantile` keeps, per unit, the m = ceil(q_tail (n - 1)) + 1 largest values with
their sample and position, and the installed numpy computes T_k = ``numpy.quantile(a_k,
1 - q_tail)`` from them (:func:`numpy_quantile_of_top`): equal to numpy's on every numpy
version, with no copy of numpy's arithmetic.
:class:`SampledQuantile` is a randomized sketch like the published code's, for comparison only
(:func:`sketch_comparison`, notebook 03, ``bench/bench_dissect.py``).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from vfcore.errors import DataValueError, FormatError, InvalidParameterError, StateMismatchError
from vfcore.forward import forward_batches

#: The paper's tail probability: P(a_k > T_k) = 0.005 (Sec. 2.2).
Q_TAIL_PAPER = 0.005
#: What the published code used (the 0.99 quantile).
Q_TAIL_PUBLISHED = 0.01
#: Units whose realised tail is below this fraction of q_tail are flagged (ties at T_k).
SPARSE_TAIL_FRACTION = 0.5


def M_k(A, T, axis: int = 0) -> np.ndarray:
    """The unit masks M_k(x) = A_k(x) > T_k (paper, Sec. 2.3) as a boolean array of A's shape.

    ``A`` [K, *spatial] for one sample (``axis=0``) or [N, K, *spatial] (``axis=1``); ``T`` [K]
    (or one number for a single unit's map). The one place in the package where a mask is
    thresholded.
    """
    A = np.asarray(A.detach().float().cpu() if isinstance(A, torch.Tensor) else A)
    T = np.asarray(T).reshape((-1,) + (1,) * (A.ndim - axis - 1))
    return A > T


@functools.lru_cache(maxsize=32)
def tail_size(n: int, q_tail: float, dtype: str = "float32") -> int:
    """m: how many of the largest of n values ``numpy.quantile(values, 1 - q_tail)`` reads
    (= ceil(q_tail (n - 1)) + 1, up to the rounding of numpy's index (n - 1)(1 - q_tail)).

    Asked of the installed numpy rather than computed here, because numpy 2.0-2.3 compute that
    index in float32 for float32 data, the others in float64, and the two can differ by one
    (e.g. n = 1042 x 512, q_tail = 0.01): a probe of n values of ``dtype``, -inf below the top
    m, gives a finite quantile exactly when numpy reads only the top m.
    """
    q = _check_q(q_tail)
    probe = np.zeros(int(n), dtype=dtype)

    def enough(m: int) -> bool:
        probe[:n - m], probe[n - m:] = -np.inf, 0
        with np.errstate(invalid="ignore"):        # -inf - -inf when numpy reads below m
            return bool(np.isfinite(np.quantile(probe, 1.0 - q)))

    m = min(n, math.ceil(q * (n - 1)) + 1)
    while m < n and not enough(m):
        m += 1
    while m > 1 and enough(m - 1):
        m -= 1
    return m


def numpy_quantile_of_top(top: np.ndarray, n: int, q_tail: float) -> np.ndarray:
    """T_k = ``numpy.quantile(a_k, 1 - q_tail)`` [K] in ``top``'s dtype, from ``top`` [K, m]: per
    unit the m largest of its n values a_k (any order), m >= :func:`tail_size`.

    numpy itself computes each T_k, on n values: the kept ones above n - m values of -inf. Its
    linear method reads only the two order statistics around its index (n - 1)(1 - q_tail),
    both among the kept values, so the result is numpy's own, bit for bit, whatever numpy
    version's index rounding and interpolation; had it read a -inf, T_k would not be finite,
    and this raises instead. Cost: one numpy.quantile of n values per unit (about 30 ms for
    n = 10,000 vertebrae x 8^3 on one CPU core); memory: n values.
    """
    K, m = top.shape
    values = np.full(n, -np.inf, dtype=top.dtype)
    T = []
    for row in top:
        values[n - m:] = row
        with np.errstate(invalid="ignore"):        # checked below
            T.append(np.quantile(values, 1.0 - q_tail))
    T = np.array(T)
    if not np.isfinite(T).all():
        raise DataValueError("TopQuantile", f"numpy.quantile of {n} values reads below the {m} "
                             f"kept per unit: the buffer is too small for q_tail={q_tail}")
    return T.astype(top.dtype)      # numpy < 2 returns float64 for float32 data


def _check_q(q_tail: float) -> float:
    q = float(q_tail)
    if not 0.0 < q < 1.0:
        raise InvalidParameterError("q_tail", f"in (0, 1) (the paper uses {Q_TAIL_PAPER}, the published "
                                    f"code {Q_TAIL_PUBLISHED})", q_tail)
    return q


def _as_units(acts) -> torch.Tensor:
    """[B, K, *spatial] -> [K, B * positions] (sample-major: index = sample * positions + pos)."""
    a = torch.as_tensor(acts)
    if a.ndim < 2:
        raise DataValueError("TopQuantile.update", f"expected activations [batch, units, ...], got shape {tuple(a.shape)}")
    if not a.is_floating_point():
        a = a.float()
    b, k = a.shape[:2]
    return a.reshape(b, k, -1).transpose(0, 1).reshape(k, -1)


def _numpy_dtype(t: torch.Tensor) -> str:
    return str(torch.empty(0, dtype=t.dtype).numpy().dtype)


class TopQuantile:
    """Exact per-unit thresholds T_k with P(a_k > T_k) = q_tail, streamed, in bounded memory.

    Like netdissect's ``runningstats``: ``TopQuantile(q_tail, n_samples)``, ``update(acts)``
    with batches [B, K, *spatial] (torch or numpy, any device), then ``thresholds()``. With n
    = n_samples x positions values per unit (positions read from the first batch), T_k =
    ``numpy.quantile(a_k, 1 - q_tail)`` (method "linear") reads only the m = :func:`tail_size`
    largest values of a_k; per unit this keeps exactly those m (with their flat index sample *
    positions + position), merged with each batch by ``torch.topk``, and lets numpy compute T_k
    from them (:func:`numpy_quantile_of_top`). The result does not depend on batch size or order.

    The buffer is sorted once, when a result is first read, and the result kept until the next
    :meth:`update` or :meth:`merge`.

    Memory: K x m values + indices; e.g. 512 units x 25,601 (10,000 vertebrae x 8^3,
    q = 0.005) = 52 MB of values.
    """

    def __init__(self, q_tail: float, n_samples: int):
        self.q_tail = _check_q(q_tail)
        if int(n_samples) < 1:
            raise InvalidParameterError("n_samples", "a whole number >= 1", n_samples)
        self.n_samples_expected = int(n_samples)
        self.capacity: int | None = None  # m, once the positions per sample are known
        self.n_samples = 0          # samples seen
        self.positions: int | None = None
        self.units: int | None = None
        self.values: torch.Tensor | None = None   # [K, <= capacity]
        self.index: torch.Tensor | None = None    # same shape, int64 flat index
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None
        self.zeros: torch.Tensor | None = None    # how many values are <= 0, per unit
        self._read: dict = {}       # what was read from the buffer since it last changed

    @property
    def n_values(self) -> int:
        """n: values per unit seen so far (samples x positions)."""
        return self.n_samples * (self.positions or 0)

    def _size(self) -> None:
        """The buffer's size m for the whole split, once positions and dtype are known."""
        self.capacity = tail_size(self.n_samples_expected * self.positions, self.q_tail,
                                  _numpy_dtype(self.values))

    def update(self, acts) -> None:
        """Add a batch of activations [B, K, *spatial]."""
        a = torch.as_tensor(acts)
        flat = _as_units(a)
        k, bp = flat.shape
        b = a.shape[0]
        positions = bp // b if b else 0
        if self.units is None:
            self.units, self.positions = k, positions
            self.values = flat.new_empty((k, 0))
            self.index = torch.empty((k, 0), dtype=torch.int64, device=flat.device)
            self.min = torch.full((k,), math.inf, dtype=torch.float64, device=flat.device)
            self.max = torch.full((k,), -math.inf, dtype=torch.float64, device=flat.device)
            self.zeros = torch.zeros(k, dtype=torch.int64, device=flat.device)
            self._size()
        elif (k, positions) != (self.units, self.positions):
            raise DataValueError("TopQuantile.update", f"batch has {k} units x {positions} positions; "
                                 f"earlier batches had {self.units} x {self.positions}")
        if b == 0:
            return
        if self.n_samples + b > self.n_samples_expected:
            raise DataValueError("TopQuantile.update", f"more samples than n_samples="
                                 f"{self.n_samples_expected} (the buffer was sized for it)")
        if not torch.isfinite(flat).all():
            raise DataValueError("TopQuantile.update", "NaN or inf in the activations: T_k is undefined")
        self._read = {}
        flat = flat.to(self.values.device, self.values.dtype)
        self.min = torch.minimum(self.min, flat.amin(dim=1).double())
        self.max = torch.maximum(self.max, flat.amax(dim=1).double())
        self.zeros += (flat <= 0).sum(dim=1)

        base = self.n_samples * positions
        old = self.values.shape[1]
        merged = torch.cat([self.values, flat], dim=1)
        keep = min(self.capacity, merged.shape[1])
        if keep < merged.shape[1]:
            self.values, pick = torch.topk(merged, keep, dim=1, sorted=False)
            new_index = base + (pick - old)
            self.index = torch.where(pick < old, torch.gather(self.index, 1, pick.clamp(max=max(old - 1, 0)))
                                     if old else new_index, new_index)
        else:
            self.values = merged
            self.index = torch.cat([self.index, base + torch.arange(
                bp, device=flat.device).expand(k, bp)], dim=1)
        self.n_samples += b

    def _sorted(self) -> tuple[np.ndarray, np.ndarray]:
        """Kept values and indices, each unit sorted in descending order, equal values by
        index (numpy, CPU); sorted once per state of the buffer."""
        if self.values is None or self.n_values == 0:
            raise DataValueError("TopQuantile", "no activations were added: call update() first")
        if self.n_samples != self.n_samples_expected:
            raise DataValueError("TopQuantile", f"saw {self.n_samples} samples, n_samples="
                                 f"{self.n_samples_expected} was promised: T_k would be wrong")
        if "sorted" not in self._read:
            # equal values by their flat index: the same order however the buffer was filled
            # (one pass, or shards merged), so the tail's file is the same bit for bit
            index, order = torch.sort(self.index, dim=1, stable=True)
            values = torch.gather(self.values, 1, order)
            values, order = torch.sort(values, dim=1, descending=True, stable=True)
            index = torch.gather(index, 1, order)
            self._read["sorted"] = values.cpu().numpy(), index.cpu().numpy()
        return self._read["sorted"]

    def thresholds(self, q_tail: float | None = None) -> np.ndarray:
        """T_k [K] (dtype of the activations): equal to ``np.quantile(a_k, 1 - q_tail)``.

        ``q_tail`` defaults to the one given at construction; any smaller one is exact too
        (its tail is inside the buffer), so one pass serves several q.
        """
        q_tail = self.q_tail if q_tail is None else _check_q(q_tail)
        values, _ = self._sorted()
        key = ("T", q_tail)
        if key not in self._read:
            need = tail_size(self.n_values, q_tail, str(values.dtype))
            if need > values.shape[1]:
                raise DataValueError("TopQuantile", f"the buffer kept {values.shape[1]} values per "
                                     f"unit but the quantile of {self.n_values} values needs the "
                                     f"top {need}: a larger q_tail than the buffer was sized for")
            self._read[key] = numpy_quantile_of_top(values, self.n_values, q_tail)
        return self._read[key]

    def realised_tail(self, T: np.ndarray | None = None, q_tail: float | None = None) -> np.ndarray:
        """P(a_k > T_k) actually obtained (ties at T_k make it smaller than q_tail) [K].

        Exact: every value above T_k is in the buffer. Pass ``T`` to evaluate other
        thresholds (e.g. a sketch's); a T below the smallest kept value of a unit cannot be
        counted from the buffer (use :func:`tail_fraction` on the activations for that).
        """
        values, _ = self._sorted()
        T = self.thresholds(q_tail) if T is None else np.asarray(T)
        if values.shape[1] < self.n_values and np.any(T < values[:, -1]):
            raise DataValueError("T", "thresholds below the smallest value the buffer kept: "
                                 "the values above them were not all kept")
        return M_k(values, T).sum(axis=1) / self.n_values

    def tail(self, q_tail: float | None = None) -> dict[str, np.ndarray]:
        """The masks M_k of every sample, sparse: every (unit, sample, position, value) with
        value > T_k, ordered by unit, then value (descending), then sample and position."""
        values, index = self._sorted()
        T = self.thresholds(q_tail)
        above = M_k(values, T)
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

    # -- a pass in pieces: checkpoint and resume, shards merged (vfcore.dissect.sharded) ---

    #: The ``format`` of :meth:`state_dict`.
    STATE_FORMAT = "vfcore-topquantile-2"

    def state_dict(self, context: dict | None = None) -> dict:
        """Everything this pass has seen, as CPU tensors and plain values (``torch.save`` it and
        ``torch.load(..., weights_only=True)`` reads it back; no pickled objects).

        ``context``: plain values naming what was dissected (e.g. layer, split, checkpoint
        hash); :meth:`load_state_dict` refuses a state whose context differs.
        """
        def cpu(t):
            return None if t is None else t.detach().cpu().clone()
        return {"format": self.STATE_FORMAT, "q_tail": self.q_tail,
                "n_samples_expected": self.n_samples_expected,
                "n_samples": self.n_samples, "positions": self.positions, "units": self.units,
                "values": cpu(self.values), "index": cpu(self.index), "min": cpu(self.min),
                "max": cpu(self.max), "zeros": cpu(self.zeros), "context": dict(context or {})}

    def _refuse_other(self, q_tail, n_expected, shape, what: str) -> None:
        """StateMismatchError unless q, the promised sample count and (units, positions) agree
        with this pass."""
        problems = []
        if q_tail != self.q_tail:
            problems.append(f"q_tail={q_tail}, this pass uses q_tail={self.q_tail}")
        if n_expected != self.n_samples_expected:
            problems.append(f"sized for n_samples={n_expected} (the split's size), this pass "
                            f"for n_samples={self.n_samples_expected}")
        if self.units is not None and shape[0] is not None and shape != (self.units, self.positions):
            problems.append(f"{shape[0]} units x {shape[1]} positions, this pass has "
                            f"{self.units} x {self.positions} (another layer or model)")
        if problems:
            raise StateMismatchError(what, "belongs to another pass: " + "; ".join(problems))

    def load_state_dict(self, state: dict, context: dict | None = None, units: int | None = None,
                        device: str | torch.device | None = None) -> "TopQuantile":
        """Continue from ``state`` (:meth:`state_dict`): this object becomes that pass.

        Refused with :class:`~vfcore.errors.StateMismatchError` naming the reason when the state
        was saved with another q_tail, n_samples (split size), ``units`` (if given) or
        unit/position count (if this object has seen data), or when a key of ``context``
        (e.g. ``layer``, ``split``) differs from the saved one. ``device``: where the buffers go
        (default: the CPU).
        """
        if not isinstance(state, dict) or state.get("format") != self.STATE_FORMAT:
            raise FormatError("TopQuantile state", f"not a threshold state (expected format "
                              f"{self.STATE_FORMAT!r})")
        saved = state.get("context") or {}
        for key, want in (context or {}).items():
            if saved.get(key) != want:
                raise StateMismatchError("TopQuantile state", f"was saved for {key}="
                                         f"{saved.get(key)!r}, this pass is for {key}={want!r}")
        if units is not None and state["units"] is not None and state["units"] != units:
            raise StateMismatchError("TopQuantile state", f"has {state['units']} units, this "
                                     f"layer has {units}")
        self._refuse_other(state["q_tail"], state["n_samples_expected"],
                           (state["units"], state["positions"]), "TopQuantile state")
        dev = torch.device(device) if device is not None else torch.device("cpu")

        def on(t):
            return None if t is None else t.to(dev).clone()
        self.n_samples = int(state["n_samples"])
        self.positions, self.units = state["positions"], state["units"]
        self.values, self.index = on(state["values"]), on(state["index"])
        self.min, self.max, self.zeros = on(state["min"]), on(state["max"]), on(state["zeros"])
        self._read = {}
        if self.values is not None:
            self._size()
        return self

    def merge(self, other: "TopQuantile") -> "TopQuantile":
        """Add ``other``'s samples, taken as the samples that FOLLOW this pass's (its sample i
        becomes sample ``self.n_samples + i``), in place; returns ``self``.

        Exact: the per-unit top m of the union is the top m of the two kept top-m buffers, so
        T_k, the tail (every value > T_k with its sample and position), min, max and zero
        counts equal one pass over both parts in order, for any split point. The top m is
        chosen as :meth:`update` chooses it (``torch.topk``); which of several values equal at
        the buffer's edge it keeps never matters: such a value is <= T_k, so in no mask.
        Shards must be sized alike (the same q_tail and ``n_samples``, the split's full size,
        so each keeps the split's m); else :class:`~vfcore.errors.StateMismatchError`.
        """
        if other.units is None:                       # nothing seen: nothing to add
            return self
        self._refuse_other(other.q_tail, other.n_samples_expected,
                           (other.units, other.positions), "TopQuantile.merge")
        if self.units is None:
            return self.load_state_dict(other.state_dict(), device=other.values.device)
        n = self.n_samples + other.n_samples
        if n > self.n_samples_expected:
            raise StateMismatchError("TopQuantile.merge", f"{self.n_samples} + {other.n_samples} "
                                     f"samples, more than n_samples={self.n_samples_expected}")
        dev = self.values.device
        values = torch.cat([self.values, other.values.to(dev, self.values.dtype)], dim=1)
        index = torch.cat([self.index, other.index.to(dev) + self.n_values], dim=1)
        if self.capacity < values.shape[1]:
            values, pick = torch.topk(values, self.capacity, dim=1, sorted=False)  # as update()
            index = torch.gather(index, 1, pick)
        self.values, self.index = values, index
        self.min = torch.minimum(self.min, other.min.to(dev))
        self.max = torch.maximum(self.max, other.max.to(dev))
        self.zeros = self.zeros + other.zeros.to(dev)
        self.n_samples = n
        self._read = {}
        return self


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
        M = M_k(flat, T, axis=1)
        for j, u in enumerate(units):
            rows.append({"q": q, "unit": int(u), "T_k": float(T[j]), "realised_tail": float(M[:, j].mean()),
                         "fires_in_samples": float(M[:, j].any(axis=1).mean()),
                         "mean_mask_positions": float(M[:, j].sum(axis=1).mean())})
    return pd.DataFrame(rows)


def tail_fraction(acts, T) -> np.ndarray:
    """P(a_k > T_k) over a batch [B, K, *spatial] for given thresholds T [K] (count / n)."""
    flat = _as_units(acts)
    return M_k(flat, np.asarray(T, dtype=np.float32)).sum(axis=1) / flat.shape[1]


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

    n = len(data)
    first = n if first is None else min(int(first), n)
    every, head = SampledQuantile(q_tail, resolution, seed), SampledQuantile(q_tail, resolution, seed)
    bar = tqdm(total=2 * n, desc="sketch vs exact", unit="sample", disable=not progress)

    def passes():
        for out in forward_batches(model, data, [layer], batch_size=batch_size, transform=transform,
                                   device=device, amp=False):
            A = out.activations[layer]
            bar.update(A.shape[0])
            yield out.start, A

    for seen, A in passes():
        every.update(A)
        if seen < first:
            head.update(A[:first - seen])
    estimates = {"exact": np.asarray(T), "sketch": every.thresholds(), "sketch_first": head.thresholds()}
    counts = {k: np.zeros(len(T)) for k in estimates}
    positions = 0
    for _, A in passes():
        n_values = A.shape[0] * int(np.prod(A.shape[2:]))
        positions += n_values
        for k, t in estimates.items():
            counts[k] += tail_fraction(A, t) * n_values
    bar.close()
    table = pd.DataFrame({"unit": np.arange(len(T))})
    for k, t in estimates.items():
        table[f"T_{k}"] = np.asarray(t, dtype=np.float64)
    for k in estimates:
        table[f"tail_{k}"] = counts[k] / positions
    return table
