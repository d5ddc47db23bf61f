"""The one forward engine: batches of patches -> P(fracture) and, on request, layer activations.

Training's validation and test predictions (:func:`vfcore.train.predict`), the dissection pass
(:func:`vfcore.dissect.dissect`), :func:`vfcore.dissect.activations`, the sketch comparison
and the benchmarks all run the network through :func:`forward_batches` (streamed) or
:func:`forward` (collected in memory). One policy for all of them:

* the model in eval mode (batch norm uses its running statistics, dropout is off: a sample's
  result does not depend on its batch) under ``torch.inference_mode``; the previous training
  flags are restored afterwards;
* precision and layout (:func:`precision`): bf16 autocast on GPUs of compute capability 8.0+
  and on CPUs with native bf16, fp16 on older GPUs (e.g. the T4 of free Colab), fp32 on
  other CPUs; ``channels_last_3d`` memory layout; ``amp=False``: fp32 (the dissection);
* the caller's model is not moved: on another device, a copy runs the pass;
* batches read from the data ([N, ...]: a numpy array, a lazy :class:`vfcore.data.PatchArray`
  or a tensor) one at a time, the next one read in a background thread on CUDA;
* activations of named layers through forward hooks (:func:`capture`), as float32.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
from copy import deepcopy
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .errors import DataValueError, LayerNotFoundError
from .runtime import Precision, pick_device, precision


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
# Device and precision: one policy for training, predictions and the benches
# --------------------------------------------------------------------------------------------

def autocast(device: torch.device, amp: bool = True, policy: Precision | None = None):
    """The autocast context of :func:`precision` (nothing for fp32 or when ``amp`` is False)."""
    policy = precision(device) if policy is None else policy
    if policy.dtype is None or not amp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=policy.dtype)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model`` is: the device of its first parameter or buffer (the CPU when it has none)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


@contextlib.contextmanager
def on_device(model: torch.nn.Module, device: torch.device,
              channels_last: bool = False) -> Iterator[torch.nn.Module]:
    """``model`` on ``device`` inside the block, without moving the caller's model.

    A model on another device is copied there for the block (its forward hooks come along;
    12.8 M parameters are 51 MB); a model already there is used as it is, in
    ``channels_last_3d`` inside the block if asked and back in its own layout afterwards. So
    after a GPU pass in a notebook, the notebook's model is still where the notebook put it.
    """
    if not _same_device(model_device(model), device):
        copy = deepcopy(model).to(device)
        yield copy.to(memory_format=torch.channels_last_3d) if channels_last else copy
        return
    was_last = any(p.dim() == 5 and not p.is_contiguous() and
                   p.is_contiguous(memory_format=torch.channels_last_3d) for p in model.parameters())
    if channels_last:
        model.to(memory_format=torch.channels_last_3d)
    try:
        yield model
    finally:
        if channels_last and not was_last:
            model.to(memory_format=torch.contiguous_format)


def probabilities(output, batch: int) -> torch.Tensor:
    """P(fracture) [B] from the model's output: sigmoid of one logit (softmax for two classes)."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    logits = output.float().reshape(batch, -1)
    if logits.shape[1] == 1:
        return torch.sigmoid(logits[:, 0])
    if logits.shape[1] == 2:
        return torch.softmax(logits, dim=1)[:, 1]
    raise DataValueError(None, f"model output: expected one logit (or two classes) per sample, got "
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
    ``amp``: the device's :func:`precision` (autocast, layout); ``amp=False`` computes in fp32
    in the default layout, as a plain ``model(x)`` does (the dissection's exact pass). The caller's model is not moved: a model on another device runs
    as a copy there (:func:`on_device`).
    """
    from tqdm.auto import tqdm  # tqdm.auto picks the notebook bar: imported when a bar is made

    device = device if isinstance(device, torch.device) else pick_device(
        str(device) if device is not None else None)
    # amp=False: fp32 in the default layout, bit for bit what a plain model(x) call computes
    # (notebook 03 checks its T_k that way); otherwise the device's precision and layout
    policy = precision(device) if amp else Precision(None, False, False, "fp32 (amp=False)")
    for name in layers:
        find_layer(model, name)
    bar = tqdm(total=len(data), desc=desc, unit="sample", disable=not progress)
    with contextlib.ExitStack() as stack:
        model = stack.enter_context(on_device(model, device, policy.channels_last))
        stack.enter_context(evaluating(model))
        outs = {name: stack.enter_context(capture(model, name)) for name in layers}
        stack.enter_context(torch.inference_mode())
        start = 0
        for x in batches(data, batch_size, device):
            x = transform(x) if transform is not None else x
            if policy.channels_last and x.ndim == 5:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            with autocast(device, amp, policy):
                y = model(x)
            b = x.shape[0]
            yield Batch(start, probabilities(y, b),
                        {n: out.pop().float().contiguous() for n, out in outs.items()})
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
