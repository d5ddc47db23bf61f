"""From the patch store to network inputs: splits, class balance, augmentation.

* :func:`to_network_input` is the one way a 96^3 HU patch becomes what the network sees
  (paper, Sec. 3): clip to [-1000, 1000] HU, scale to [0, 1], keep the centre ``crop``^3 mm,
  and average ``zoom``^3 blocks for the small preset. Training, dissection and the explorer
  all call it.
* :func:`load_split` reads one split of the patch store (the run folder's manifest, written
  by :mod:`vfcore.patches`) as a lazy :class:`PatchArray` of int16 patches: a split larger
  than RAM still works, and only the batches in use are read. :class:`PatchArray` (and
  :func:`read_patch` for one file) is the one lazy patch reader of the package.
* :func:`balanced_epoch`: negatives under-sampled and positives over-sampled to a perfect
  class balance in every epoch (paper, Sec. 3).
* :class:`Augment`: the paper's "intensity (Gaussian noise, smoothing, contrast) and heavy
  spatial (similarity transformation and elastic deformation)" augmentation, applied to a whole
  batch at once with torch, on the GPU when there is one. Flip, rotation, scaling, translation
  and the centre crop are one affine per sample; a coarse random displacement field adds the
  elastic part; the patch is resampled ONCE (``grid_sample``) straight to the network's grid.
  :data:`AUGMENTATIONS` names two strengths: ``paper`` and ``light`` (short CPU runs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .checks import patch_array
from .constants import NETWORK_WINDOW_HU, PATCH_SIZE
from .errors import CorruptFileError, DataValueError, InvalidParameterError
from .model import Preset, get_preset
from .patches import SPLITS, read_manifest
from .run import RunFolder

__all__ = ["SPLITS", "HU_MIN", "HU_MAX", "scale_hu", "to_network_input", "read_patch", "PatchArray",
           "read_store", "load_split", "balanced_epoch", "Augment", "AUGMENTATIONS", "get_augment",
           "AugmentDraw", "draw_augment", "apply_augment", "augment_batch"]

#: The HU window of the paper (``vfcore.constants.NETWORK_WINDOW_HU``): values are clipped to
#: it, then scaled to [0, 1].
HU_MIN, HU_MAX = NETWORK_WINDOW_HU


# --------------------------------------------------------------------------------------------
# One patch -> the network input
# --------------------------------------------------------------------------------------------

def scale_hu(hu: torch.Tensor) -> torch.Tensor:
    """Clip to [HU_MIN, HU_MAX] and scale to [0, 1] (float32); what MONAI's
    ``ScaleIntensityRange(HU_MIN, HU_MAX, 0, 1, clip=True)`` computes (the tests check it),
    without its MetaTensor wrapper (and about 1.8x faster on a CPU)."""
    return (hu.float().clamp(HU_MIN, HU_MAX) - HU_MIN) / (HU_MAX - HU_MIN)


def _as_batch(hu) -> torch.Tensor:
    """[96,96,96], [B,96,96,96] or [B,1,96,96,96] (numpy or torch) -> [B, 1, 96, 96, 96]."""
    t = hu if isinstance(hu, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(hu))
    if t.ndim == 3:
        t = t[None]
    if t.ndim == 4:
        t = t[:, None]
    if t.ndim != 5 or t.shape[1] != 1:
        raise DataValueError(None, f"patch: expected a 3D patch or a batch of them, got shape {tuple(t.shape)}")
    return t


def to_network_input(hu, preset: str | Preset) -> torch.Tensor:
    """HU patch(es) of 96^3 at 1 mm -> network input [B, 1, S, S, S] in [0, 1].

    The centre ``preset.crop``^3 voxels are kept (paper: 64^3), then averaged over
    ``preset.zoom``^3 blocks (small preset: 2 mm voxels, 32^3).
    """
    p = get_preset(preset)
    x = _as_batch(hu)
    size = x.shape[-1]
    if x.shape[-3:] != (size, size, size) or size < p.crop:
        raise DataValueError(None, f"patch: needs a cube of at least {p.crop}^3 voxels, got {tuple(x.shape[-3:])}")
    start = (size - p.crop) // 2
    x = x[..., start:start + p.crop, start:start + p.crop, start:start + p.crop]
    x = scale_hu(x)
    return F.avg_pool3d(x, p.zoom) if p.zoom > 1 else x


# --------------------------------------------------------------------------------------------
# The patch store
# --------------------------------------------------------------------------------------------

def read_patch(path: str | Path, mmap: bool = False) -> np.ndarray:
    """One stored patch (``.npy``), in memory or memory-mapped; a truncated or damaged file
    raises :class:`~vfcore.errors.CorruptFileError` naming it (not numpy's "mmap length is
    greater than file size")."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        if isinstance(err, (FileNotFoundError, PermissionError)):   # not damage: say what it is
            raise
        size = Path(path).stat().st_size if Path(path).is_file() else 0
        raise CorruptFileError(path, f"not a readable patch ({size} bytes: truncated or damaged "
                               f".npy file; extract the patches again)") from None


class PatchArray:
    """The int16 patches of some files, read lazily: ``len``, ``shape``, and indexing with an
    int, a slice or an index array (returns a numpy array, like a stacked array).

    Each access maps the file and copies the patch out; no map is kept open (every open map
    holds a file descriptor, and a split of thousands of patches would exceed the usual limit
    of 256-1024 open files).
    """

    def __init__(self, paths: Sequence[str | Path], patch_shape: Sequence[int] | None = None):
        self.paths = [Path(p) for p in paths]
        #: the shape every patch must have (a store's: 96^3 integers); None: not checked
        self.patch_shape = None if patch_shape is None else tuple(patch_shape)

    @classmethod
    def of(cls, run_dir: str | Path, rel_paths: Sequence[str]) -> "PatchArray":
        """The patches of a run's store from their paths relative to it (the manifest's
        ``ct_path``, ``mask_path`` or ``concept_path``)."""
        run = RunFolder(run_dir)
        return cls([run.patch(p) for p in rel_paths], (PATCH_SIZE,) * 3)

    def _get(self, i: int) -> np.ndarray:
        patch = read_patch(self.paths[i], mmap=True)
        if self.patch_shape is not None:   # a store's patch: its shape, an integer type
            patch_array(self.paths[i], patch, self.patch_shape)
        return patch

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self),) + (self._get(0).shape if len(self) else (PATCH_SIZE,) * 3)

    dtype = np.dtype(np.int16)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return np.array(self._get(int(index)))
        ids = range(len(self))[index] if isinstance(index, slice) else np.asarray(index).ravel()
        if len(ids) == 0:
            return np.zeros((0,) + self.shape[1:], np.int16)
        first = self._get(int(ids[0]))
        out = np.empty((len(ids),) + first.shape, first.dtype)
        out[0] = first
        for j, i in enumerate(ids[1:], start=1):   # one map open at a time
            out[j] = self._get(int(i))
        return out

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)


def read_store(run_dir: str | Path) -> pd.DataFrame:
    """The patch store's manifest (:func:`vfcore.patches.read_manifest`: typed columns,
    ``fracture``/``grade``/``shape`` nullable Int64)."""
    return read_manifest(RunFolder(run_dir).require("manifest"))


def load_split(run_dir: str | Path, split: str) -> tuple[PatchArray, np.ndarray, pd.DataFrame]:
    """The labelled vertebrae of one split: (patches [N, 96, 96, 96] int16 HU, labels [N] 0/1,
    manifest rows with a fresh index 0..N-1). Unlabelled rows (``x``, ungraded) are left out."""
    if split not in SPLITS:
        raise DataValueError(split, f"unknown split; choose one of {SPLITS}")
    manifest = read_store(run_dir)
    fracture = pd.to_numeric(manifest["fracture"], errors="coerce")
    rows = manifest[(manifest["split"] == split) & fracture.isin([0, 1])].reset_index(drop=True)
    labels = pd.to_numeric(rows["fracture"]).to_numpy(dtype=np.int64)
    return PatchArray.of(run_dir, rows["ct_path"]), labels, rows


# --------------------------------------------------------------------------------------------
# Class balance
# --------------------------------------------------------------------------------------------

def balanced_epoch(labels: np.ndarray, generator: torch.Generator) -> np.ndarray:
    """Indices of one balanced epoch (paper, Sec. 3), shuffled.

    Both classes get ``m = len(labels) // 2`` draws: the rarer class (fractures) is
    over-sampled with replacement, the commoner one under-sampled without replacement.
    """
    labels = np.asarray(labels)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    if len(pos) == 0 or len(neg) == 0:
        raise DataValueError(None, f"training split: needs both classes, has {len(pos)} fractured and "
                             f"{len(neg)} healthy vertebrae")
    m = len(labels) // 2

    def draw(ids: np.ndarray) -> np.ndarray:
        if len(ids) >= m:
            pick = torch.randperm(len(ids), generator=generator)[:m]
        else:
            pick = torch.randint(len(ids), (m,), generator=generator)
        return ids[pick.numpy()]

    epoch = np.concatenate([draw(pos), draw(neg)])
    return epoch[torch.randperm(len(epoch), generator=generator).numpy()]


# --------------------------------------------------------------------------------------------
# Batched augmentation
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Augment:
    """The paper's augmentation. Spatial parts are applied to every sample; each intensity
    part to a sample with its probability. Angles in degrees, shifts in mm, elastic in mm."""

    rotate: float = 15.0          # uniform in [-rotate, rotate] about each axis
    scale: float = 0.15           # isotropic factor in [1 - scale, 1 + scale]
    shift: float = 4.0            # uniform in [-shift, shift] mm along each axis
    flip: float = 0.5             # probability of a left-right mirror
    elastic: float = 2.0          # std of the displacement field (mm) ...
    elastic_grid: int = 4         # ... drawn on a grid of this many control points per axis
    noise: float = 0.03           # Gaussian noise, std up to this (in [0, 1] units)
    p_noise: float = 0.5
    smooth: tuple[float, float] = (0.5, 1.0)  # Gaussian smoothing sigma (voxels)
    p_smooth: float = 0.3
    contrast: tuple[float, float] = (0.7, 1.5)  # gamma
    p_contrast: float = 0.5


#: Named augmentations. ``paper``: the heavy augmentation above, for the paper preset and long
#: GPU runs. ``light``: the same transforms with a third of the spatial range, for short CPU
#: runs of the small preset. On the phantom (a few hundred training vertebrae, 30 epochs of the
#: small preset on a CPU) the ``paper`` strength kept the network at chance while ``light``
#: trained. One reason: the paper-strength elastic field alone changes the height of a 24 mm
#: box by 15 % on average (up to 29 %), as much as a grade-1 fracture's height loss (20-25 %);
#: the light one by 4 % (up to 8 %). See notebook 02 (training).
AUGMENTATIONS: dict[str, Augment] = {
    "paper": Augment(),
    "light": Augment(rotate=5.0, scale=0.05, shift=2.0, elastic=0.5),
}


def get_augment(augment: str | Augment | None) -> Augment | None:
    """An :class:`Augment` from its name in :data:`AUGMENTATIONS` (or itself; ``None``: none)."""
    if augment is None or isinstance(augment, Augment):
        return augment
    try:
        return AUGMENTATIONS[augment]
    except KeyError:
        raise InvalidParameterError("augment", f"one of {sorted(AUGMENTATIONS)} or None (no "
                                    "augmentation)", augment) from None


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """[B, 3] angles (radians) -> [B, 3, 3] rotation matrices Rz @ Ry @ Rx."""
    c, s = angles.cos(), angles.sin()
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])
    rx = torch.stack([one, zero, zero, zero, c[:, 0], -s[:, 0], zero, s[:, 0], c[:, 0]], 1)
    ry = torch.stack([c[:, 1], zero, s[:, 1], zero, one, zero, -s[:, 1], zero, c[:, 1]], 1)
    rz = torch.stack([c[:, 2], -s[:, 2], zero, s[:, 2], c[:, 2], zero, zero, zero, one], 1)
    return rz.view(-1, 3, 3) @ ry.view(-1, 3, 3) @ rx.view(-1, 3, 3)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int | None = None) -> torch.Tensor:
    """Separable Gaussian smoothing of [B, 1, D, H, W] with one sigma (voxels) per sample,
    over ``radius`` voxels each side (default: 3 sigma of the largest)."""
    radius = int(math.ceil(3 * float(sigma.max()))) if radius is None else radius
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernels = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)
    kernels = kernels / kernels.sum(1, keepdim=True)                 # [B, K]
    b = x.shape[0]
    out = x.transpose(0, 1)                                           # [1, B, D, H, W]: groups = B
    for dim in range(3):
        shape = [b, 1, 1, 1, 1]
        shape[2 + dim] = kernels.shape[1]
        pad = [0, 0] * 3
        pad[2 * (2 - dim)] = pad[2 * (2 - dim) + 1] = radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), kernels.view(shape), groups=b)
    return out.transpose(0, 1)


@dataclass(frozen=True)
class AugmentDraw:
    """The random numbers of one batch's augmentation (:func:`draw_augment`), per sample:
    ``theta`` [B, 3, 4] the similarity transform, ``coarse`` [B, 3, g, g, g] the elastic
    field (None without one), ``gamma``, ``sigma``, ``std`` [B] and the masks ``contrast``,
    ``smooth``, ``noisy`` [B] bool, ``radius`` (the blur's, the whole batch's), ``noise_seed``
    and ``rows``: which samples of the ``total`` drawn these are (:meth:`take`)."""

    theta: torch.Tensor
    coarse: torch.Tensor | None
    gamma: torch.Tensor
    contrast: torch.Tensor
    sigma: torch.Tensor
    smooth: torch.Tensor
    radius: int
    std: torch.Tensor
    noisy: torch.Tensor
    noise_seed: int
    total: int
    rows: slice

    def take(self, first: int, stop: int) -> "AugmentDraw":
        """Samples ``first .. stop - 1`` of the batch (a torchrun rank's slice of a global batch:
        each sample keeps the augmentation one process gives it)."""
        if not 0 <= first < stop <= self.total:
            raise InvalidParameterError("first, stop", f"0 <= first < stop <= {self.total}", (first, stop))
        rows = slice(first, stop)
        cut = lambda t: None if t is None else t[rows]  # noqa: E731
        return AugmentDraw(cut(self.theta), cut(self.coarse), cut(self.gamma), cut(self.contrast),
                           cut(self.sigma), cut(self.smooth), self.radius, cut(self.std),
                           cut(self.noisy), self.noise_seed, self.total, rows)


def draw_augment(b: int, preset: str | Preset, generator: torch.Generator,
                 aug: Augment = Augment()) -> AugmentDraw:
    """Every random number of a batch of ``b`` samples' augmentation, from ``generator`` (a CPU
    ``torch.Generator``: a seed fixes the augmentation on CPU and GPU alike)."""
    p = get_preset(preset)

    def uniform(*shape, low=-1.0, high=1.0):
        return (torch.rand(*shape, generator=generator) * (high - low) + low)

    # Similarity transform, in the normalised coordinates of grid_sample ([-1, 1] = patch edge).
    rot = _rotation(uniform(b, 3) * math.radians(aug.rotate))
    zoom = 1.0 + uniform(b, low=-aug.scale, high=aug.scale)
    flip = torch.where(torch.rand(b, generator=generator) < aug.flip, -1.0, 1.0)
    mirror = torch.diag_embed(torch.stack([flip, torch.ones(b), torch.ones(b)], 1))  # x = L axis
    linear = rot @ mirror * (p.crop / PATCH_SIZE) / zoom[:, None, None]
    shift = uniform(b, 3) * aug.shift * 2 / PATCH_SIZE
    theta = torch.cat([linear, shift[:, :, None]], 2)
    coarse = (torch.randn(b, 3, *(aug.elastic_grid,) * 3, generator=generator) * aug.elastic * 2 / PATCH_SIZE
              if aug.elastic > 0 else None)
    # the order of the draws is the order in which earlier versions drew them (same seed, same
    # augmentation): gamma before its mask, and so on
    gamma = uniform(b, low=aug.contrast[0], high=aug.contrast[1])
    contrast = torch.rand(b, generator=generator) < aug.p_contrast
    sigma = uniform(b, low=aug.smooth[0], high=aug.smooth[1])
    radius = int(math.ceil(3 * float(sigma.max())))
    smooth = torch.rand(b, generator=generator) < aug.p_smooth
    std = torch.rand(b, generator=generator) * aug.noise
    noise_seed = int(torch.randint(2**62, (1,), generator=generator))
    noisy = torch.rand(b, generator=generator) < aug.p_noise
    return AugmentDraw(theta, coarse, gamma, contrast, sigma, smooth, radius, std, noisy,
                       noise_seed, b, slice(0, b))


def apply_augment(hu: torch.Tensor, preset: str | Preset, draw: AugmentDraw) -> torch.Tensor:
    """Augmented network inputs [B, 1, S, S, S] from int16 HU patches [B, 96, 96, 96] and their
    drawn random numbers; the work runs on ``hu.device``. The patch is resampled once
    (``grid_sample``) straight to the network's grid, then contrast, smoothing and noise."""
    p = get_preset(preset)
    x = scale_hu(_as_batch(hu))                                       # [B, 1, 96, 96, 96]
    if p.zoom > 1:  # average zoom^3 blocks first: the same voxels as to_network_input's
        x = F.avg_pool3d(x, p.zoom)
    here, device, out = x.shape[0], x.device, p.input_size
    if draw.theta.shape[0] != here:
        raise DataValueError(None, f"hu: {here} patches for the augmentation of {draw.theta.shape[0]}")
    grid = F.affine_grid(draw.theta.to(device), [here, 1, out, out, out], align_corners=False)
    if draw.coarse is not None:    # the elastic part: a smooth field upsampled from a coarse grid
        field = F.interpolate(draw.coarse.to(device), size=(out,) * 3, mode="trilinear", align_corners=True)
        grid = grid + field.permute(0, 2, 3, 4, 1)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def per_sample(t):
        return t.to(device)[:, None, None, None, None]

    x = torch.where(per_sample(draw.contrast), x.clamp_min(0) ** per_sample(draw.gamma), x)
    x = torch.where(per_sample(draw.smooth), _gaussian_blur(x, draw.sigma.to(device), draw.radius), x)
    noise_gen = torch.Generator(device=device).manual_seed(draw.noise_seed)
    noise = torch.randn((draw.total, *x.shape[1:]), generator=noise_gen, device=device)[draw.rows]
    return torch.where(per_sample(draw.noisy), x + noise * per_sample(draw.std), x)


def augment_batch(hu: torch.Tensor, preset: str | Preset, generator: torch.Generator,
                  aug: Augment = Augment()) -> torch.Tensor:
    """Augmented network inputs [B, 1, S, S, S] from int16 HU patches [B, 96, 96, 96]: the
    random numbers drawn from ``generator`` (:func:`draw_augment`), then applied
    (:func:`apply_augment`)."""
    return apply_augment(hu, preset, draw_augment(len(hu), preset, generator, aug))
