"""DistributedDataParallel with batch norm over the global batch (GPUs and CPUs).

A leaf module (torch and :mod:`.world` only), so :mod:`vfcore.train` can use it without an
import cycle.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..errors import InvalidParameterError
from .world import collective, world


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks, differentiable (the gradient is summed over the ranks too)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm with the statistics of the global batch (every rank's samples), for CPU
    tensors and the gloo backend. Mean, then variance, each one differentiable all-reduce;
    eval mode (and a world of one) is plain batch norm. Same parameters and buffers as
    ``BatchNorm1d/3d``, so checkpoints do not change."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor(float(x.numel() // x.shape[1]), dtype=x.dtype)
        n = _AllReduceSum.apply(count.expand(1).clone())
        mean = _AllReduceSum.apply(x.sum(dims)) / n
        centred = x - mean.view(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims)) / n        # biased, as BN
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.num_batches_tracked += 1
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1))
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Batch norm over the global batch: torch's SyncBatchNorm on GPUs, GlooSyncBatchNorm on CPUs."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            new = GlooSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats).to(device)
            new.load_state_dict(child.state_dict())
            setattr(model, name, new)
        else:
            sync_batchnorm(child, device)
    return model


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel on a world of several ranks; the model itself on one.

    Batch norm must already be synchronised (:func:`sync_batchnorm`), and that before the
    optimiser is built: the conversion makes new parameter tensors, and an optimiser built
    earlier would go on updating the old ones (the network's batch norm would never train).
    """
    if world().size == 1:
        return model
    plain = [name for name, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and not isinstance(m, (GlooSyncBatchNorm, nn.SyncBatchNorm))]
    if plain:
        raise InvalidParameterError("model", "a network whose batch norm sync_batchnorm converted "
                                    "before its optimiser was built", f"plain batch norm {plain[0]!r}")
    ids = [device.index] if device.type == "cuda" else None
    with collective("broadcasting the initial weights (DistributedDataParallel)"):
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
