"""The dissection pass in pieces: sharded over ranks, checkpointed, resumed, merged exactly.

:func:`dissect_sharded` is :func:`vfcore.dissect.dissect` for a torchrun job (who is who:
:mod:`vfcore.distributed`): rank r runs the
network over its share of the split (whole batches of the one-process pass, contiguous, in
rank order: :func:`shard_range`), keeps its per-unit top-m buffer
(:class:`~vfcore.dissect.TopQuantile` sized for the WHOLE split, so each rank keeps the split's
m) and its per-sample maxima, means and P(fracture). Then every rank all-gathers the buffers
and merges them in rank order (:meth:`TopQuantile.merge`: the same top-m selection), so T_k,
the tail (the masks M_k), r_k(x), |M_k(x)| and E_x are identical to one process's pass, on
every rank. Each sample is computed in the same batch as in the one-process pass, so even a
convolution whose kernel choice depends on the batch size gives the same bits.

Nothing of the pass is copied here: the batches come from the one forward engine
(:func:`vfcore.forward.forward_batches`), each is added to a
:class:`~vfcore.dissect.dissection.PassState` as in :func:`~vfcore.dissect.dissect`, and the
merged state becomes a :class:`~vfcore.dissect.Dissection` through the same
:func:`~vfcore.dissect.dissection.dissection_from`. This module adds only the shard, the
all-gather + merge, and the checkpoint.

With ``state=<folder>`` each rank saves its part every ``save_every`` batches (atomically,
tensors only) and a restarted job continues from there: the result equals an uninterrupted
pass. Cost of the merge: every rank receives all ranks' buffers, world x K x m values and
int64 indices (``bench/bench_distributed.py`` prints it).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from vfcore.distributed import World, all_gather_rows, world
from vfcore.errors import CorruptFileError, DataValueError, StateMismatchError
from vfcore.forward import forward_batches
from vfcore.io import atomic_save

from .dissection import Dissection, PassState, dissection_from
from .quantile import Q_TAIL_PAPER, TopQuantile, _check_q

STATE_FORMAT = "vfcore-dissect-pass-1"


def shard_range(n: int, batch_size: int, rank: int, size: int) -> tuple[int, int]:
    """Samples [lo, hi) of ``rank``: a contiguous run of the one-process pass's batches."""
    n_batches = -(-n // batch_size)
    if n_batches < size:
        raise DataValueError(None, f"data: {n} samples make {n_batches} batches of {batch_size}, fewer "
                             f"than the {size} ranks: use a smaller batch_size or fewer ranks")
    first, last = rank * n_batches // size, (rank + 1) * n_batches // size
    return min(first * batch_size, n), min(last * batch_size, n)


class _Range:
    """Samples [lo, hi) of ``data`` as a sequence (slices only, as the forward engine reads them)."""

    def __init__(self, data, lo: int, hi: int):
        self.data, self.lo, self.hi = data, lo, hi

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, s: slice):
        start, stop, _ = s.indices(len(self))
        return self.data[self.lo + start:self.lo + stop]


def state_file(folder: str | Path, w: World) -> Path:
    """One rank's pass checkpoint inside ``folder``."""
    return Path(folder) / f"rank{w.rank}-of-{w.size}.pt"


def save_pass_state(path: str | Path, part: PassState, meta: dict) -> Path:
    """Atomically write a part of a pass (:class:`~vfcore.dissect.dissection.PassState`): the
    threshold buffer, the per-sample arrays so far (max, mean, probability), and ``meta``
    (range, layer, ...). Tensors and plain values only."""
    state = {"format": STATE_FORMAT, "meta": meta, "quantile": part.stats.state_dict(meta),
             **{k: v.cpu() for k, v in part.arrays().items()}}
    return atomic_save(path, lambda tmp: torch.save(state, tmp), suffix=".pt")


def load_pass_state(path: str | Path, meta: dict) -> dict:
    """Read a pass checkpoint (weights-only) and refuse one made for another pass."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CorruptFileError(path, f"not a readable pass checkpoint ({type(err).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CorruptFileError(path, f"not a dissection pass checkpoint ({STATE_FORMAT!r})")
    for key, want in meta.items():
        if state["meta"].get(key) != want:
            raise StateMismatchError(path, f"was saved for {key}={state['meta'].get(key)!r}, this "
                                     f"pass is for {key}={want!r}: delete it or use another folder")
    return state


def _gather(stats: TopQuantile, n: int) -> TopQuantile:
    """Every rank's buffer, merged in rank order (the one-process pass's order)."""
    w = world()
    if w.size == 1:
        return stats
    what = "all-gathering the threshold buffers"
    values = all_gather_rows(stats.values.T.contiguous(), what)          # [m_r, K] per rank
    index = all_gather_rows(stats.index.T.contiguous(), what)
    small = torch.stack([stats.min, stats.max, stats.zeros.double(),
                         torch.full_like(stats.min, stats.n_samples)])      # [4, K]
    smalls = all_gather_rows(small, what)
    shape = {"format": TopQuantile.STATE_FORMAT, "q_tail": stats.q_tail, "n_samples_expected": n,
             "positions": stats.positions, "units": stats.units}
    merged = None
    for v, i, s in zip(values, index, smalls):
        part = dict(shape, values=v.T, index=i.T, min=s[0], max=s[1], zeros=s[2].long(),
                    n_samples=int(s[3, 0]))
        part = TopQuantile(stats.q_tail, n_samples=n).load_state_dict(part, device=v.device)
        merged = part if merged is None else merged.merge(part)
    return merged


def dissect_sharded(model: torch.nn.Module, data, layer: str, *, q_tail: float = Q_TAIL_PAPER,
                    batch_size: int = 64, transform: Callable | None = None,
                    device: str | torch.device | None = None, amp: bool = False,
                    state: str | Path | None = None, save_every: int = 50,
                    stop_after: int | None = None, context: dict | None = None,
                    progress: bool = True) -> Dissection | None:
    """:func:`vfcore.dissect.dissect` over this job's ranks -> the same :class:`Dissection`
    on every rank (one process without torchrun).

    ``state``: a folder for each rank's pass checkpoint (saved every ``save_every`` batches
    and at the end of its share; a restarted job resumes from it, and a checkpoint made for
    another split size, q, layer, batch size, world size or ``context`` is refused: give a
    ``context`` naming the model, e.g. ``{"checkpoint": sha256}``, or a state folder of another
    model is resumed).
    ``stop_after``: stop (returning None) after that many batches of this rank, as a killed
    job would (for tests and demonstrations of resuming).
    """
    q_tail = _check_q(q_tail)
    w, n = world(), len(data)
    if n == 0:
        raise DataValueError(None, "data: no samples to dissect")
    device = w.device if device is None else torch.device(device)
    lo, hi = shard_range(n, batch_size, w.rank, w.size)
    meta = {"layer": layer, "q_tail": q_tail, "n": n, "batch_size": batch_size,
            "range": [lo, hi], "world": w.size, **(context or {})}
    part = PassState(TopQuantile(q_tail, n_samples=n))
    path = state_file(state, w) if state is not None else None
    start = lo
    if path is not None and path.is_file():
        saved = load_pass_state(path, meta)
        part.stats.load_state_dict(saved["quantile"], context=meta, device=device)
        part.per_sample = {k: [saved[k].to(device)] for k in part.per_sample}
        part.spatial = tuple(saved["meta"].get("spatial", ())) or None
        start = lo + part.stats.n_samples           # a whole number of batches after lo
    t0 = time.perf_counter()
    # the same batches as the one-process pass (start is a multiple of batch_size), so the
    # same bits even where a kernel's choice depends on the batch
    batches = forward_batches(model, _Range(data, start, hi), [layer], batch_size=batch_size,
                              transform=transform, device=device, amp=amp,
                              progress=progress and w.is_main,
                              desc=f"dissecting {layer} ({w.where}, from sample {start})")
    for b, out in enumerate(batches):
        part.add(out.activations[layer], out.probability)
        last = start + out.start + len(out.probability) >= hi
        if path is not None and ((b + 1) % save_every == 0 or last or b + 1 == stop_after):
            save_pass_state(path, part, {**meta, "spatial": list(part.spatial)})
        if stop_after is not None and b + 1 >= stop_after and not last:
            batches.close()                         # leaves eval mode and removes the hook
            return None
    merged = _gather(part.stats, n)
    arrays = {k: torch.cat(all_gather_rows(v, f"all-gathering the per-sample {k}"))
              for k, v in part.arrays().items()}
    return dissection_from(merged, arrays, layer, part.spatial, time.perf_counter() - t0)
