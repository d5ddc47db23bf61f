"""Activation capture: forward hooks on a named layer, eval mode, batches on the device.

:func:`capture` records a layer's output during forward passes; :func:`activations` keeps a
split's activations A_k in memory (exemplars, histograms, single inferences). The one-pass
statistics of a whole split are :func:`vfcore.dissect.dissect`.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from vfcore.errors import DataValueError, LayerNotFoundError

#: The paper's dissected layer: the last encoder layer of the 3D U-Net.
DEFAULT_LAYER = "down_tr512"

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
