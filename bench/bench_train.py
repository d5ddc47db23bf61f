"""Training throughput against the machine's peak: the step under each precision and layout,
the split of an epoch, and (on a GPU) a published-style pipeline beside ours.

    python bench/bench_train.py                      # CPU: the small preset at batch 16
    python bench/bench_train.py --preset paper --batch 64 --steps 30 [--compile]   # a GPU

Prints, in one run, with the device name and the precision policy's choice and reason:
1. the machine's matmul peaks (2048^2, fp32 and bf16; fp16 on a GPU), GFLOP/s;
2. one Adam step (forward, backward, update) under every path: fp32 in the default layout (the
   policy before issue 21), fp32 + ``channels_last_3d`` (the policy on a CPU without native
   bf16), bf16 autocast, bf16 + ``channels_last_3d`` (the policy on a CPU with native bf16;
   on CUDA below compute capability 8.0 the fp16 + GradScaler path): samples/s, GFLOP/s
   (FLOPs counted by ``torch.utils.flop_counter``) and the share of the matching peak;
3. an epoch split into its parts, each timed alone over the same batches: reading the
   patches from the store, the batched augmentation, the step (the policy's path) and the
   validation predictions, so the next bottleneck is visible;
4. on a GPU: a published-style pipeline (MONAI dictionary transforms on DataLoader workers,
   fp32, batch 16; workers: at most the machine's cores) and the ratio.
Figures, no pass/fail.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))              # the vfcore of this checkout
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from store_helpers import write_store  # noqa: E402

from vfcore import data, train  # noqa: E402
from vfcore.runtime import Precision, cpu_flags, precision  # noqa: E402
from vfcore.model import build_model, get_preset  # noqa: E402
from vfcore.runtime import device_name, precision_line  # noqa: E402


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, steps: int, dev: torch.device, warmup: int = 2) -> float:
    """Seconds per call of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(dev)
    return (time.perf_counter() - t0) / steps


def matmul_peak(dev: torch.device, dtype: torch.dtype, n: int = 2048, steps: int = 10) -> float:
    """GFLOP/s of an n x n matmul in ``dtype`` (the machine's practical peak)."""
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    return 2 * n ** 3 / timed(lambda: a @ b, steps, dev) / 1e9


def step_paths(dev: torch.device) -> dict[str, Precision]:
    """The paths the step is timed under (the policy's own among them)."""
    if dev.type == "cuda":
        half = precision(dev)
        return {"fp32, default layout": Precision(None, False, False, ""),
                "fp32, channels_last_3d": Precision(None, False, True, ""),
                f"{half.name} (the policy)": half}
    return {"fp32, default layout (before issue 21)": Precision(None, False, False, ""),
            "fp32, channels_last_3d (policy without native bf16)": Precision(None, False, True, ""),
            "bf16 autocast, default layout": Precision(torch.bfloat16, False, False, ""),
            "bf16 autocast, channels_last_3d (policy with native bf16)": Precision(torch.bfloat16, False, True, "")}


def make_step(preset, batch: int, dev: torch.device, path: Precision, compile: bool = False):
    """One training step under ``path`` (train.train_step, with a GradScaler for fp16)."""
    torch.manual_seed(0)
    layout = torch.channels_last_3d if path.channels_last else torch.contiguous_format
    model = build_model(preset).to(dev).to(memory_format=layout).train()
    net = torch.compile(model) if compile else model
    opt = torch.optim.Adam(model.parameters(), lr=preset.lr)
    scaler = torch.amp.GradScaler(dev.type) if path.scaler else None
    hu = torch.randint(-1000, 1500, (batch, 96, 96, 96), dtype=torch.int16, device=dev)
    x = data.to_network_input(hu, preset).contiguous(memory_format=layout)
    y = (torch.rand(batch, device=dev) > 0.5).float()
    return lambda: train.train_step(net, opt, x, y, dtype=path.dtype, scaler=scaler)


def step_flops(preset, batch: int) -> float:
    """FLOPs of one training step (forward + backward) at ``batch``, counted on the CPU."""
    model = build_model(preset).train()
    x = torch.rand(batch, 1, *(preset.input_size,) * 3)
    with FlopCounterMode(display=False) as counter:
        F.binary_cross_entropy_with_logits(model(x), torch.ones(batch)).backward()
    return float(counter.get_total_flops())


def epoch_split(preset, batch: int, dev: torch.device, n: int, augment: str) -> None:
    """One epoch's parts over the same batches, each timed alone (seconds per epoch)."""
    with tempfile.TemporaryDirectory() as tmp:
        run = write_store(Path(tmp), n=n)
        train_x, train_y, _ = data.load_split(run, "train")
        val_x, val_y, _ = data.load_split(run, "val")
        gen = torch.Generator().manual_seed(0)
        order = data.balanced_epoch(train_y, gen)
        batches = [np.sort(order[b * batch:(b + 1) * batch]) for b in range(len(order) // batch)]
        policy = precision(dev)
        step = make_step(preset, batch, dev, policy)
        aug = data.get_augment(augment)
        hu = torch.as_tensor(train_x[batches[0]], device=dev)
        data.augment_batch(hu, preset, gen, aug)                       # warm-up
        step()
        parts = {}
        t0 = time.perf_counter()
        hus = [torch.as_tensor(train_x[ids], device=dev) for ids in batches]
        sync(dev)
        parts["reading patches (memory-mapped .npy)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for h in hus:
            data.augment_batch(h, preset, gen, aug)
        sync(dev)
        parts[f"augmentation ({augment!r}, batched)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in hus:
            step()
        sync(dev)
        parts[f"training step ({policy.name})"] = time.perf_counter() - t0
        model = build_model(preset)
        t0 = time.perf_counter()
        train.predict(model, val_x, preset, device=dev)
        parts[f"validation ({len(val_y)} vertebrae)"] = time.perf_counter() - t0
    total = sum(parts.values())
    samples = len(batches) * batch
    print(f"\nan epoch of {len(batches)} batches ({samples} training samples), each part alone:")
    for name, s in parts.items():
        print(f"  {name:58} {s:7.2f} s  {100 * s / total:5.1f} %")
    print(f"  {'sum':58} {total:7.2f} s  -> {samples / total:.1f} training samples/s end to end")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--augment", default="light", help="for the epoch split: light or paper")
    parser.add_argument("--patches", type=int, default=None,
                        help="patches in the epoch's store (default: 24 x batch on a GPU, 6 x batch on a CPU)")
    args = parser.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = get_preset(args.preset or ("paper" if dev.type == "cuda" else "small"))
    batch = args.batch or preset.batch_size
    policy = precision(dev)
    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "bf16"})
    print(f"device: {device_name(dev)}; torch {torch.__version__}; preset {preset.name}; batch {batch}")
    print(f"CPU flags: {' '.join(flags) or 'none of avx2/avx512/bf16/amx'}")
    print(precision_line(dev))

    peaks = {"fp32": matmul_peak(dev, torch.float32), "bf16": matmul_peak(dev, torch.bfloat16)}
    if dev.type == "cuda":
        peaks["fp16"] = matmul_peak(dev, torch.float16)
    print("matmul peak (2048^2): " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()))

    flops = step_flops(preset, batch)
    print(f"\none training step: {flops / batch / 1e9:.2f} GFLOP per sample; {args.steps} timed steps each")
    base = None
    for name, path in step_paths(dev).items():
        t = timed(make_step(preset, batch, dev, path), args.steps, dev)
        base = base or t
        gflops = flops / t / 1e9
        kind = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[path.dtype]
        print(f"  {name:58} {batch / t:7.1f} samples/s {gflops:6.0f} GFLOP/s "
              f"{100 * gflops / peaks[kind]:4.0f} % of {kind} peak  {base / t:4.2f}x")
    if args.compile:
        t = timed(make_step(preset, batch, dev, policy, compile=True), args.steps, dev, warmup=3)
        print(f"  {policy.name + ' + torch.compile':58} {batch / t:7.1f} samples/s  {base / t:4.2f}x")

    n = args.patches or max((24 if dev.type == "cuda" else 6) * batch, 40)
    epoch_split(preset, batch, dev, n, args.augment)
    if dev.type == "cuda":
        with tempfile.TemporaryDirectory() as tmp:
            run = write_store(Path(tmp), n=n)
            ours = train_end_to_end(run, preset, batch, dev, args.compile)
            theirs = published_style(run, preset, dev)
            print(f"ratio (this pipeline / published-style): {ours / theirs:.1f}x")
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MB")
    print(f"peak host memory (RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


def train_end_to_end(run: Path, preset, batch: int, dev: torch.device, compile: bool) -> float:
    """train_seed for 3 epochs with the paper augmentation: samples/s of epochs 2-3."""
    train.train_seed(run, preset, 0, epochs=3, batch_size=batch, patience=99, progress=False,
                     device=str(dev), compile=compile, augment="paper")
    history = train.pd.read_csv(train.RunFolder(run).history(0))
    rate = history["samples_per_s"].iloc[1:].mean()
    print(f"end to end (store -> augmentation -> step), epochs 2-3: {rate:8.1f} samples/s")
    return rate


def published_style(run: Path, preset, dev: torch.device, steps: int = 20) -> float:
    """MONAI dictionary transforms on DataLoader workers, fp32, batch 16, every transform on."""
    from monai import transforms as mt
    from torch.utils.data import DataLoader

    workers = min(16, os.cpu_count() or 1)
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
            sync(dev)
            t0, n = time.perf_counter(), 0
        x = F.avg_pool3d(batch["image"].to(dev), preset.zoom) if preset.zoom > 1 else batch["image"].to(dev)
        train.train_step(model, opt, x, batch["label"].to(dev))
        n += 16
        if i == 3 + steps:
            break
    sync(dev)
    rate = n / (time.perf_counter() - t0)
    print(f"published-style pipeline (MONAI on {workers} workers, fp32, batch 16): {rate:8.1f} samples/s")
    return rate


if __name__ == "__main__":
    main()
