"""Past one process: the dissection pass and training under ``torchrun`` (``torch.distributed``).

* :mod:`~vfcore.distributed.world`: :func:`init` (joins a torchrun job, NCCL on GPUs and gloo
  on CPUs, a timeout on every collective; a world of one without torchrun), :func:`world`
  (rank, size, device), :func:`collective` (a dead rank ends the job with a clear message);
* :mod:`~vfcore.distributed.thresholds`: :func:`dissect_sharded`, the exact dissection pass
  split over the ranks and merged (``TopQuantile.merge``), checkpointed and resumable;
* :mod:`~vfcore.distributed.ddp`: :func:`wrap_model` (DistributedDataParallel + batch norm over
  the global batch, :class:`GlooSyncBatchNorm` on CPUs);
* :mod:`~vfcore.distributed.training`: :func:`train_seed_distributed`, DDP training of one seed,
  one seeded balanced order, decisions and checkpoints on rank 0.

How to run it on one or several machines: ``docs/distributed.md``.
"""
from .world import (DEFAULT_TIMEOUT_S, World, all_gather_rows, all_reduce_sum, barrier, broadcast,
                    collective, init, shutdown, timeout_s, world)
from .thresholds import (dissect_sharded, load_pass_state, save_pass_state, shard_range,
                         state_file)
from .ddp import GlooSyncBatchNorm, sync_batchnorm, wrap_model
from .training import train_ranks, train_seed_distributed

__all__ = [
    "DEFAULT_TIMEOUT_S", "World", "all_gather_rows", "all_reduce_sum", "barrier", "broadcast",
    "collective", "init", "shutdown", "timeout_s", "world", "dissect_sharded",
    "load_pass_state", "save_pass_state", "shard_range", "state_file", "GlooSyncBatchNorm",
    "sync_batchnorm", "train_ranks", "train_seed_distributed", "wrap_model",
]
