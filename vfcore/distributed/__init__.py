"""Past one process: who is who in a ``torchrun`` job, collectives with timeouts, DDP.

* :mod:`~vfcore.distributed.world`: :func:`init` (joins a torchrun job, NCCL on GPUs and gloo
  on CPUs, a timeout on every collective; a world of one without torchrun), :func:`world`
  (rank, size, device), :func:`collective` (a dead rank ends the job with a clear message);
* :mod:`~vfcore.distributed.ddp`: :func:`wrap_model` (DistributedDataParallel + batch norm over
  the global batch, :class:`GlooSyncBatchNorm` on CPUs).

A low room (torch and :mod:`vfcore.errors` only): the stages import it and run the same code
with one process or N. Training under torchrun is :func:`vfcore.train.train_seed` itself; the
exact sharded dissection pass is :func:`vfcore.dissect.sharded.dissect_sharded`, which
:func:`vfcore.dissect.dissect_run` and ``vfcore dissect`` run only under torchrun. How to run it on one or
several machines: ``docs/distributed.md``.
"""
from .world import (DEFAULT_TIMEOUT_S, World, all_gather_rows, all_reduce_sum, barrier, broadcast,
                    collective, init, shutdown, timeout_s, world)
from .ddp import GlooSyncBatchNorm, sync_batchnorm, wrap_model

__all__ = [
    "DEFAULT_TIMEOUT_S", "World", "all_gather_rows", "all_reduce_sum", "barrier", "broadcast",
    "collective", "init", "shutdown", "timeout_s", "world", "GlooSyncBatchNorm",
    "sync_batchnorm", "wrap_model",
]
