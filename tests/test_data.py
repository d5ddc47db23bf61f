"""Network inputs, splits, class balance and the batched augmentation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from store_helpers import write_store
from vfcore import data
from vfcore.errors import DataValueError, InvalidParameterError, MissingArtifactError

NO_AUG = data.Augment(rotate=0, scale=0, shift=0, flip=0, elastic=0, p_noise=0, p_smooth=0, p_contrast=0)


def reference_input(hu: np.ndarray, crop: int, zoom: int) -> np.ndarray:
    """numpy: clip, scale, centre crop, block average."""
    s = (96 - crop) // 2
    x = (np.clip(hu[s:s + crop, s:s + crop, s:s + crop].astype(np.float64), -1000, 1000) + 1000) / 2000
    n = crop // zoom
    return x.reshape(n, zoom, n, zoom, n, zoom).mean(axis=(1, 3, 5))


@pytest.mark.parametrize("preset,crop,zoom", [("paper", 64, 1), ("small", 64, 2)])
def test_to_network_input_against_numpy(preset, crop, zoom):
    hu = np.random.default_rng(0).integers(-1500, 2000, (96, 96, 96)).astype(np.int16)
    got = data.to_network_input(hu, preset)
    assert got.shape == (1, 1, crop // zoom, crop // zoom, crop // zoom)
    np.testing.assert_allclose(got[0, 0].numpy(), reference_input(hu, crop, zoom), atol=1e-6)


def test_bad_patch_shape():
    with pytest.raises(DataValueError, match="at least 64"):
        data.to_network_input(np.zeros((40, 40, 40), np.int16), "paper")


def test_load_split_leaves_out_unlabelled(tmp_path):
    run = write_store(tmp_path, n=30)
    counts = {s: len(data.load_split(run, s)[1]) for s in data.SPLITS}
    assert sum(counts.values()) == 30                 # the 'x' row is in no split
    x, y, rows = data.load_split(run, "train")
    assert x.shape == (len(y), 96, 96, 96) and x[np.array([0, 2])].shape == (2, 96, 96, 96)
    assert np.array_equal(x[1], np.load(tmp_path / "patches" / rows.loc[1, "ct_path"]))
    with pytest.raises(MissingArtifactError, match="01_preprocessing"):
        data.load_split(tmp_path / "elsewhere", "train")


def test_balanced_epoch_is_exactly_balanced():
    labels = np.array([1] * 7 + [0] * 93)
    g = torch.Generator().manual_seed(0)
    epoch = data.balanced_epoch(labels, g)
    assert len(epoch) == 100 and labels[epoch].sum() == 50            # perfect balance
    assert len(set(epoch[labels[epoch] == 0])) == 50                    # negatives: no repeats
    assert set(epoch[labels[epoch] == 1]) == set(range(7))             # positives: over-sampled
    assert not np.array_equal(epoch, data.balanced_epoch(labels, g))   # a new draw each epoch
    with pytest.raises(DataValueError, match="both classes"):
        data.balanced_epoch(np.zeros(10), g)


@pytest.mark.parametrize("preset", ["paper", "small"])
def test_augmentation_without_randomness_is_the_plain_input(preset):
    hu = torch.from_numpy(np.random.default_rng(1).integers(-1000, 1000, (3, 96, 96, 96)).astype(np.int16))
    got = data.augment_batch(hu, preset, torch.Generator().manual_seed(0), NO_AUG)
    torch.testing.assert_close(got, data.to_network_input(hu, preset), atol=1e-4, rtol=0)


def test_flip_mirrors_the_left_right_axis():
    hu = torch.from_numpy(np.random.default_rng(2).integers(-1000, 1000, (2, 96, 96, 96)).astype(np.int16))
    flip = data.Augment(rotate=0, scale=0, shift=0, flip=1.0, elastic=0, p_noise=0, p_smooth=0, p_contrast=0)
    got = data.augment_batch(hu, "paper", torch.Generator().manual_seed(0), flip)
    # grid_sample lands on voxel centres up to float rounding: 1e-4 of the window is 0.2 HU
    torch.testing.assert_close(got, data.to_network_input(hu, "paper").flip(-1), atol=1e-4, rtol=0)


def test_augmentation_is_applied_and_seeded():
    hu = torch.from_numpy(np.random.default_rng(3).integers(-1000, 1000, (4, 96, 96, 96)).astype(np.int16))
    a = data.augment_batch(hu, "small", torch.Generator().manual_seed(7))
    b = data.augment_batch(hu, "small", torch.Generator().manual_seed(7))
    c = data.augment_batch(hu, "small", torch.Generator().manual_seed(8))
    plain = data.to_network_input(hu, "small")
    assert torch.equal(a, b)                                       # the seed fixes everything
    assert not torch.allclose(a, c)
    per_sample = (a - plain).abs().flatten(1).mean(1)
    assert (per_sample > 0.01).all()                               # every sample was changed



def _box_height(x: torch.Tensor) -> torch.Tensor:
    """Extent (voxels) of the bright box along the I axis of network inputs [B, 1, S, S, S]."""
    return (x[:, 0] > 0.5).any(dim=3).any(dim=2).sum(1).float()


def test_named_augmentations():
    assert data.get_augment("paper") == data.Augment() and data.get_augment(None) is None
    light = data.get_augment("light")
    assert data.get_augment(light) is light
    with pytest.raises(InvalidParameterError, match=r"augment must be one of \['light', 'paper'\] or None.*got 'heavy'"):
        data.get_augment("heavy")
    # a 24 mm high bright "body" in air: the light augmentation changes its height less
    hu = np.full((32, 96, 96, 96), -1000, np.int16)
    hu[:, 36:60, 32:64, 32:64] = 1000
    hu = torch.from_numpy(hu)
    spatial = dict(p_noise=0, p_smooth=0, p_contrast=0)        # heights only from geometry
    plain = _box_height(data.to_network_input(hu, "paper"))
    assert (plain == 24).all()
    change = {}
    for name in ("paper", "light"):
        aug = data.Augment(**{**data.get_augment(name).__dict__, **spatial})
        got = _box_height(data.augment_batch(hu, "paper", torch.Generator().manual_seed(0), aug))
        change[name] = ((got - plain).abs() / plain).mean().item()
    assert 0 < change["light"] < change["paper"] / 2, change

def test_patch_array_keeps_no_file_open(tmp_path):
    """A split of thousands of patches must not hit the open-file limit (256 on macOS)."""
    import os
    import resource

    paths = []
    for i in range(300):
        paths.append(tmp_path / f"{i}.npy")
        np.save(paths[-1], np.full((4, 4, 4), i, np.int16))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = len(os.listdir("/proc/self/fd")) + 64 if os.path.isdir("/proc/self/fd") else 256
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, hard), hard))
    try:
        patches = data.PatchArray(paths)
        got = patches[np.arange(300)]
        assert [int(p[0, 0, 0]) for p in got] == list(range(300))
        assert int(patches[299][1, 2, 3]) == 299
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_a_damaged_patch_file_names_the_file(tmp_path, damage):
    from vfcore.errors import CorruptFileError

    path = tmp_path / "p.npy"
    np.save(path, np.zeros((96, 96, 96), np.int16))
    raw = path.read_bytes()
    path.write_bytes({"truncated": raw[:len(raw) // 3], "empty": b"", "garbage": b"x" * 500}[damage])
    with pytest.raises(CorruptFileError, match="p.npy") as err:
        data.PatchArray([path])[0]
    assert "mmap length" not in str(err.value)
    with pytest.raises(CorruptFileError, match="p.npy"):
        data.read_patch(path)


def test_patch_array_of_a_run_reads_the_manifest_paths(tmp_path):
    run = write_store(tmp_path, n=6)
    rows = data.read_store(run)
    patches = data.PatchArray.of(run, rows["ct_path"][:3])
    assert patches.shape == (3, 96, 96, 96)
    np.testing.assert_array_equal(patches[2], np.load(tmp_path / "patches" / rows["ct_path"][2]))


def test_read_store_is_the_manifest_reader_of_the_patch_store(tmp_path):
    from vfcore.patches import read_manifest

    run = write_store(tmp_path, n=6)
    got = data.read_store(run)
    ref = read_manifest(tmp_path / "patches" / "manifest.csv")
    assert dict(got.dtypes) == dict(ref.dtypes)
    assert str(got["fracture"].dtype) == "Int64" and got["fracture"].isna().sum() == 1   # the 'x' row
    assert got["case"].tolist()[:2] == ["sub-x000", "sub-x001"]


def test_scale_hu_by_hand_and_as_monai_scales():
    from monai.transforms import ScaleIntensityRange

    from vfcore.constants import NETWORK_WINDOW_HU

    hu = torch.tensor([-3000, -1000, -500, 0, 500, 1000, 3071], dtype=torch.int16)
    np.testing.assert_allclose(data.scale_hu(hu).numpy(), [0, 0, 0.25, 0.5, 0.75, 1, 1], atol=1e-7)
    lo, hi = NETWORK_WINDOW_HU
    monai = ScaleIntensityRange(lo, hi, 0.0, 1.0, clip=True)(hu.float())
    np.testing.assert_allclose(data.scale_hu(hu).numpy(), np.asarray(monai), atol=1e-7)
