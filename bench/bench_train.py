"""Training throughput: model step, batched augmentation, end to end from a patch store.

    python bench/bench_train.py                 # CPU: the small preset (GPU: the paper preset)
    python bench/bench_train.py --preset paper --batch 64 --steps 30 [--compile]

Prints samples/s and peak memory with the device name. On a GPU it also runs a
published-style pipeline (MONAI dictionary transforms on DataLoader workers, fp32, batch 16)
in the same run and prints the ratio. Figures, no pass/fail.
"""
from __future__ import annotations

import argparse
import contextlib
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from store_helpers import write_store  # noqa: E402

from vfcore import data, train  # noqa: E402
from vfcore.forward import precision  # noqa: E402
from vfcore.run import RunFolder  # noqa: E402
from vfcore.model import build_model, get_preset  # noqa: E402
from vfcore.runtime import device_name  # noqa: E402


def timed(fn, steps: int, dev: torch.device) -> float:
    """Seconds per call of ``fn`` after two warm-up calls."""
    for _ in range(2):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--patches", type=int, default=None,
                        help="patches in the end-to-end store (default: 24 x batch on a GPU, "
                             "4 x batch on a CPU)")
    args = parser.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = get_preset(args.preset or ("paper" if dev.type == "cuda" else "small"))
    batch = args.batch or preset.batch_size
    dtype, _ = precision(dev)
    print(f"device: {device_name(dev)}; torch {torch.__version__}; preset {preset.name}; batch {batch}")

    hu = torch.randint(-1000, 1500, (batch, 96, 96, 96), dtype=torch.int16, device=dev)
    gen = torch.Generator().manual_seed(0)
    layout = torch.channels_last_3d if dev.type == "cuda" else torch.contiguous_format
    model = build_model(preset).to(dev).to(memory_format=layout)
    step_model = torch.compile(model) if args.compile else model
    opt = torch.optim.Adam(model.parameters(), lr=preset.lr)
    y = (torch.rand(batch, device=dev) > 0.5).float()
    x0 = data.to_network_input(hu, preset).contiguous(memory_format=layout)

    def model_step():
        with torch.autocast(dev.type, dtype=dtype) if dtype else contextlib.nullcontext():
            loss = F.binary_cross_entropy_with_logits(step_model(x0).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t_step = timed(model_step, args.steps, dev)
    t_aug = timed(lambda: data.augment_batch(hu, preset, gen), args.steps, dev)
    print(f"model step alone:        {batch / t_step:8.1f} samples/s")
    print(f"batched augmentation:    {batch / t_aug:8.1f} samples/s")

    with tempfile.TemporaryDirectory() as tmp:
        n = args.patches or max((24 if dev.type == "cuda" else 4) * batch, 40)
        run = write_store(Path(tmp), n=n)
        t0 = time.perf_counter()
        # preload=None: on a GPU the training split goes to GPU memory once (int16)
        train.train_seed(run, preset, 0, epochs=3, batch_size=batch, patience=99, progress=False,
                         device=str(dev), compile=args.compile, augment="paper")
        history = train.pd.read_csv(RunFolder(run).history(0))
        print(f"end to end (store -> augmentation -> step), {n} patches, epochs 2-3: "
              f"{history['samples_per_s'].iloc[1:].mean():8.1f} samples/s "
              f"({time.perf_counter() - t0:.0f} s for 3 epochs, validation included)")
        if dev.type == "cuda":
            ours = history["samples_per_s"].iloc[1:].mean()
            theirs = published_style(run, preset, dev)
            print(f"ratio (this pipeline / published-style): {ours / theirs:.1f}x")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak host memory (RSS): {peak:.0f} MB")
    if dev.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MB")


def published_style(run: Path, preset, dev: torch.device, workers: int = 16, steps: int = 20) -> float:
    """MONAI dictionary transforms on DataLoader workers, fp32, batch 16, every transform on."""
    from monai import transforms as mt
    from torch.utils.data import DataLoader

    patches, labels, _ = data.load_split(run, "train")
    items = [{"image": (np.clip(patches[i], -1000, 1000)[None].astype(np.float32) + 1000) / 2000,
              "label": np.float32(labels[i])} for i in range(len(labels))]
    chain = mt.Compose([
        mt.RandGaussianNoised("image", prob=1.0, std=0.03),
        mt.RandGaussianSmoothd("image", prob=1.0),
        mt.RandAdjustContrastd("image", prob=1.0),
        mt.RandAffined("image", prob=1.0, rotate_range=(0.26,) * 3, scale_range=(0.15,) * 3,
                       translate_range=(4,) * 3, spatial_size=(preset.crop,) * 3),
        mt.Rand3DElasticd("image", prob=1.0, sigma_range=(1, 2), magnitude_range=(1, 3)),
        mt.RandFlipd("image", prob=0.5, spatial_axis=2),
    ])
    loader = DataLoader(mt.Dataset(items * 20, chain), batch_size=16, num_workers=workers, shuffle=True,
                        drop_last=True, persistent_workers=True)
    model = build_model(preset).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=preset.lr)
    n, t0 = 0, None
    for i, batch in enumerate(loader):
        if i == 3:
            torch.cuda.synchronize()
            t0, n = time.perf_counter(), 0
        x = F.avg_pool3d(batch["image"].to(dev), preset.zoom) if preset.zoom > 1 else batch["image"].to(dev)
        loss = F.binary_cross_entropy_with_logits(model(x), batch["label"].to(dev))
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += 16
        if i == 3 + steps:
            break
    torch.cuda.synchronize()
    rate = n / (time.perf_counter() - t0)
    print(f"published-style pipeline (MONAI on {workers} workers, fp32, batch 16): {rate:8.1f} samples/s")
    return rate


if __name__ == "__main__":
    main()
