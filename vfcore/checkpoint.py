"""Checkpoints that are safe to share: weights and plain values only, written atomically.

A checkpoint is a ``torch.save`` zip archive of one dictionary: ``format``, ``preset`` (the
network's :class:`~vfcore.model.Preset` as a dict), ``model`` (the state dict), ``versions``
and plain metadata (epoch, validation metrics, config; ``last.pt`` also the optimizer, the
history and the random states, so a killed run resumes the same history).

It is read with ``torch.load(weights_only=True)``, which only rebuilds tensors and plain
Python values. A file that holds any other pickled object is refused: unpickling an object
can run code (its ``__reduce__``), so loading an untrusted checkpoint that way is unsafe.
Every problem is a :class:`~vfcore.errors.CheckpointError` naming the file.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from .errors import CheckpointError
from .io import atomic_save, versions
from .model import FractureNet, Preset, get_preset
from .run import notebook_path

FORMAT = "vfcore-checkpoint-1"
#: Keys every vfcore checkpoint has.
REQUIRED = ("preset", "model")


def preset_from_dict(d: dict) -> Preset:
    """The :class:`Preset` stored in a checkpoint (lists back to tuples)."""
    d = dict(d)
    d["head"], d["mlp"] = tuple(d["head"]), tuple(d["mlp"])
    return Preset(**d)


def save_checkpoint(path: str | Path, model: FractureNet, **extra) -> Path:
    """Weights + plain metadata (preset, versions, anything in ``extra``), atomically."""
    state = {"format": FORMAT, "preset": model.preset.to_dict(), "versions": versions(),
             "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **extra}
    return atomic_save(path, lambda tmp: torch.save(state, tmp), suffix=".pt")


def _refused(path: Path) -> CheckpointError:
    return CheckpointError(path, "refused: the file holds pickled Python objects, not only tensors "
                           "and plain values; loading such a checkpoint could run code hidden in "
                           "it, so vfcore reads weights-only checkpoints only (save the weights "
                           "with vfcore.checkpoint.save_checkpoint)")


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint's dictionary, read weights-only (no arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, f"no such checkpoint: train a model first ({notebook_path('training')})")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(path, "empty file (0 bytes): not a checkpoint (an interrupted copy?)")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(path, f"not a checkpoint: {size} bytes that are not a torch zip "
                              "archive (truncated, or written by something else)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:               # a global the weights-only unpickler refuses
        raise _refused(path) from None
    except Exception as err:                     # damaged records inside the archive
        raise CheckpointError(path, f"not a readable checkpoint: the archive is damaged "
                              f"({type(err).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(path, f"not a vfcore checkpoint (expected format {FORMAT!r})")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise CheckpointError(path, f"incomplete vfcore checkpoint: no {' and no '.join(map(repr, missing))}")
    return state


#: Bounds on a stored preset's fields (checked before the network is built).
PRESET_BOUNDS = {"crop": (8, 96), "zoom": (1, 8), "base": (1, 256), "width": (1, 8192), "layers": (1, 16)}


def check_preset_fits(path: Path, preset: Preset, weights) -> None:
    """:class:`CheckpointError` unless the stored preset lies within :data:`PRESET_BOUNDS` and
    the network it describes has exactly the stored weights' shapes: the network is built on
    the ``meta`` device (no memory), so a small file claiming a huge preset allocates nothing."""
    def bad(field, value, bounds):
        raise CheckpointError(path, f"the stored preset's {field} {value!r} is outside "
                              f"{bounds[0]}..{bounds[1]}: not a vfcore network (refused before "
                              f"building it)")

    def whole(field, value, bounds):
        if isinstance(value, bool) or not isinstance(value, int) or not bounds[0] <= value <= bounds[1]:
            bad(field, value, bounds)

    for field in ("crop", "zoom", "base"):
        whole(field, getattr(preset, field), PRESET_BOUNDS[field])
    for field in ("head", "mlp"):
        values = getattr(preset, field)
        whole(f"number of {field} layers", len(values), PRESET_BOUNDS["layers"])
        for v in values:
            whole(f"{field} width", v, PRESET_BOUNDS["width"])
    if not isinstance(weights, dict):
        raise CheckpointError(path, "its 'model' entry is not a dictionary of weights")
    try:
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in FractureNet(preset).state_dict().items()}
    except (ValueError, RuntimeError, TypeError) as err:
        raise CheckpointError(path, f"the stored preset does not describe a network: {err}") from None
    stored = {k: tuple(v.shape) for k, v in weights.items() if hasattr(v, "shape")}
    wrong = [k for k in shapes if stored.get(k) != shapes[k]]
    if wrong:
        k = wrong[0]
        raise CheckpointError(path, f"weights do not fit the {preset.name!r} architecture its "
                              f"preset describes (base {preset.base}): {k} is {stored.get(k)} in the file, "
                              f"{shapes[k]} in that network ({len(wrong)} tensors differ): refused "
                              f"before building it")


def load_checkpoint(path: str | Path, preset: str | Preset | None = None,
                    device: str | torch.device = "cpu") -> tuple[FractureNet, dict]:
    """(model in eval mode, metadata) from a checkpoint; ``preset`` asserts which one it is."""
    state = read_checkpoint(path)
    try:
        stored = preset_from_dict(state["preset"])
    except (TypeError, KeyError, ValueError) as err:
        raise CheckpointError(path, f"the stored preset is not a vfcore architecture ({err})") from None
    if preset is not None and get_preset(preset) != stored:
        want = get_preset(preset)
        raise CheckpointError(path, f"holds the {stored.name!r} network ({stored}), not the requested "
                              f"{want.name!r} one ({want})")
    check_preset_fits(path, stored, state["model"])   # before any allocation
    model = FractureNet(stored)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, AttributeError) as err:
        raise CheckpointError(path, f"weights do not fit the {stored.name!r} architecture: "
                              f"{str(err).splitlines()[1:2] or err}") from None
    meta = {k: v for k, v in state.items() if k not in ("model", "optimizer", "rng")}
    return model.to(device).eval(), meta
