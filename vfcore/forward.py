"""The one forward engine: batches of patches -> P(fracture) and, on request, layer activations.

Training's validation and test predictions (:func:`vfcore.train.predict`), the dissection pass
(:func:`vfcore.dissect.dissect`), :func:`vfcore.dissect.activations`, the sketch comparison
and the benchmarks all run the network through :func:`forward_batches` (streamed) or
:func:`forward` (collected in memory). One policy for all of them:

* the model in eval mode (batch norm uses its running statistics, dropout is off: a sample's
  result does not depend on its batch) under ``torch.inference_mode``; the previous training
  flags are restored afterwards;
* precision (:func:`precision`): bf16 autocast on CUDA, fp16 on GPUs without bf16 (e.g. the
  T4 of free Colab), fp32 on CPU; ``channels_last_3d`` memory layout on CUDA;
* batches read from the data ([N, ...]: a numpy array, a lazy :class:`vfcore.data.PatchArray`
  or a tensor) one at a time, the next one read in a background thread on CUDA;
* activations of named layers through forward hooks (:func:`capture`), as float32.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .errors import DataValueError, LayerNotFoundError
from .runtime import pick_device


# --------------------------------------------------------------------------------------------
# Layers and hooks
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
    """``model.eval()`` inside the block; the previous mode of every sub-module is restored."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode


# --------------------------------------------------------------------------------------------
# Device and precision
# --------------------------------------------------------------------------------------------

def precision(device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype, use a GradScaler when training): bf16 on CUDA where supported, fp16 +
    scaler on older GPUs (e.g. the T4 of free Colab), ``(None, False)`` = fp32 on CPU."""
    if device.type != "cuda":
        return None, False
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, False
    return torch.float16, True


def autocast(device: torch.device, amp: bool = True):
    """The autocast context of :func:`precision` (nothing on CPU or when ``amp`` is False)."""
    dtype, _ = precision(device)
    if dtype is None or not amp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def probabilities(output, batch: int) -> torch.Tensor:
    """P(fracture) [B] from the model's output: sigmoid of one logit (softmax for two classes)."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    logits = output.float().reshape(batch, -1)
    if logits.shape[1] == 1:
        return torch.sigmoid(logits[:, 0])
    if logits.shape[1] == 2:
        return torch.softmax(logits, dim=1)[:, 1]
    raise DataValueError("model output", f"expected one logit (or two classes) per sample, got "
                         f"shape {tuple(output.shape)}")


def batches(data, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Slices of ``data`` ([N, ...]: numpy, lazy patch array or tensor) as tensors on ``device``.

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


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------

@dataclass
class Batch:
    """One batch through the network: samples ``start .. start + len(probability) - 1``,
    ``probability`` [B] and ``activations[layer]`` [B, K, *spatial] (float32, on the device)."""

    start: int
    probability: torch.Tensor
    activations: dict[str, torch.Tensor]


def forward_batches(model: torch.nn.Module, data, layers: Sequence[str] = (), *,
                    batch_size: int = 32, transform: Callable | None = None,
                    device: str | torch.device | None = None, amp: bool = True,
                    progress: bool = False, desc: str = "forward") -> Iterator[Batch]:
    """Run ``model`` over ``data`` in batches and yield a :class:`Batch` per batch.

    ``transform`` maps a batch (already on the device) to the network input, e.g.
    ``lambda hu: vfcore.data.to_network_input(hu, preset)``; ``layers``: the named layers whose
    outputs to capture (:class:`~vfcore.errors.LayerNotFoundError` lists the names).
    """
    from tqdm.auto import tqdm

    device = device if isinstance(device, torch.device) else pick_device(
        str(device) if device is not None else None)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last_3d)
    for name in layers:
        find_layer(model, name)
    bar = tqdm(total=len(data), desc=desc, unit="sample", disable=not progress)
    with contextlib.ExitStack() as stack:
        stack.enter_context(evaluating(model))
        outs = {name: stack.enter_context(capture(model, name)) for name in layers}
        stack.enter_context(torch.inference_mode())
        start = 0
        for x in batches(data, batch_size, device):
            x = transform(x) if transform is not None else x
            if device.type == "cuda" and x.ndim == 5:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            with autocast(device, amp):
                y = model(x)
            b = x.shape[0]
            yield Batch(start, probabilities(y, b), {n: out.pop().float() for n, out in outs.items()})
            start += b
            bar.update(b)
    bar.close()


def forward(model: torch.nn.Module, data, layers: Sequence[str] = (), *,
            units: Sequence[int] | None = None, batch_size: int = 32,
            transform: Callable | None = None, device: str | torch.device | None = None,
            amp: bool = True, progress: bool = False,
            desc: str = "forward") -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """P(fracture) [N] (float32 numpy) and ``{layer: A [N, K, ...]}`` (float32; only the
    channels ``units`` if given), everything collected in memory (see :func:`forward_batches`)."""
    probs, acts = [], {name: [] for name in layers}
    pick = None if units is None else torch.as_tensor(np.asarray(units, dtype=np.int64))
    for out in forward_batches(model, data, layers, batch_size=batch_size, transform=transform,
                               device=device, amp=amp, progress=progress, desc=desc):
        probs.append(out.probability.cpu())
        for name, A in out.activations.items():
            acts[name].append((A if pick is None else A[:, pick.to(A.device)]).cpu())
    p = torch.cat(probs).numpy() if probs else np.zeros(0, np.float32)
    return p, {name: torch.cat(a).numpy() for name, a in acts.items() if a}
