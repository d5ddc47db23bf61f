"""Who am I in a torchrun job: rank, world size, device; collectives with timeouts.

``torchrun --nproc_per_node N ...`` starts N processes and sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in each. :func:`init` joins them into one
process group (NCCL on GPUs, gloo on CPUs) with a timeout on every collective; without
torchrun it does nothing and the job is one process (world size 1), the same code path.

A rank that dies must not leave the others waiting for ever: every collective that vfcore
runs goes through :func:`collective`, which turns a timeout or a broken connection into a
:class:`~vfcore.errors.DistributedError` saying which collective failed and why.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from vfcore.errors import DistributedError

#: Seconds a collective may wait for the other ranks (env ``VFCORE_DIST_TIMEOUT`` overrides).
#: It must exceed the longest stretch one rank works alone (rank 0's validation, a checkpoint).
DEFAULT_TIMEOUT_S = 600.0
#: Words in the errors of gloo/NCCL collectives whose peer is gone or late.
_PEER_TROUBLE = ("gloo", "nccl", "NCCL", "imed out", "imeout", "onnection", "peer", "socket")


@dataclass(frozen=True)
class World:
    """This process's place in the job: ``rank`` of ``size`` (``local_rank`` on its machine)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that decides, logs and writes files."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """This rank's GPU (``cuda:<local_rank>``) when there are GPUs, else the CPU."""
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return torch.device("cpu")

    @property
    def where(self) -> str:
        """``"rank r of n"``: what error messages name."""
        return f"rank {self.rank} of {self.size}"


def timeout_s() -> float:
    """The collective timeout: ``VFCORE_DIST_TIMEOUT`` (seconds) or :data:`DEFAULT_TIMEOUT_S`."""
    return float(os.environ.get("VFCORE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))


def world() -> World:
    """The current job: from the process group if there is one, else a world of one."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(),
                     int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return World()


def init(backend: str | None = None, timeout: float | None = None) -> World:
    """Join the torchrun job (no-op without torchrun, or when already joined).

    ``backend``: ``"nccl"`` when there are GPUs, else ``"gloo"``. ``timeout`` (seconds, default
    :func:`timeout_s`) bounds every collective and the start-up rendezvous.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local % torch.cuda.device_count())
        seconds = timeout_s() if timeout is None else float(timeout)
        with collective("joining the process group (init_process_group)"):
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
    return world()


def shutdown() -> None:
    """Leave the process group (at the end of a job)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Run collectives; a timeout or a lost peer becomes a :class:`DistributedError`."""
    try:
        yield
    except RuntimeError as err:     # DistError, DistBackendError, gloo's timeouts and closed sockets
        if isinstance(err, DistributedError) or not (
                isinstance(err, dist.DistError) or any(m in str(err) for m in _PEER_TROUBLE)):
            raise                   # e.g. out of memory, a shape error: not the other ranks' fault
        w = world() if dist.is_initialized() else World(int(os.environ.get("RANK", 0)),
                                                        int(os.environ.get("WORLD_SIZE", 1)))
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise DistributedError(w.where, f"{what} failed ({first}). Another rank probably died "
                               f"(its own log says why) or is stuck; stopping instead of waiting "
                               f"(collective timeout {timeout_s():.0f} s, env "
                               f"VFCORE_DIST_TIMEOUT)") from None


def all_gather_rows(t: torch.Tensor, what: str) -> list[torch.Tensor]:
    """Every rank's ``t``, in rank order; the ranks' tensors may differ in their first
    dimension (padded for the transfer, trimmed after). One rank: ``[t]``."""
    w = world()
    if w.size == 1:
        return [t]
    with collective(what):
        n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
        sizes = [torch.zeros_like(n) for _ in range(w.size)]
        dist.all_gather(sizes, n)
        sizes = [int(s) for s in sizes]
        pad = t.new_zeros((max(sizes) - t.shape[0], *t.shape[1:]))
        parts = [t.new_empty((max(sizes), *t.shape[1:])) for _ in range(w.size)]
        dist.all_gather(parts, torch.cat([t, pad]).contiguous())
    return [p[:s] for p, s in zip(parts, sizes)]


def broadcast(t: torch.Tensor, what: str, src: int = 0) -> torch.Tensor:
    """``t`` of rank ``src`` on every rank (in place)."""
    if world().size > 1:
        with collective(what):
            dist.broadcast(t, src)
    return t


def all_reduce_sum(t: torch.Tensor, what: str) -> torch.Tensor:
    """The sum of ``t`` over the ranks (in place)."""
    if world().size > 1:
        with collective(what):
            dist.all_reduce(t)
    return t


def barrier(what: str) -> None:
    """Wait for every rank."""
    if world().size > 1:
        with collective(what):
            dist.barrier()
