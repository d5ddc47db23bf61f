"""Speed of straightening (vfcore.patches) on this CPU, one worker.

Prints
1. seconds per vertebra for ``straighten`` alone (CT + mask, volumes already in memory) on a
   VerSe-sized scan (512 x 512 x 400 voxels, 0.7 x 0.7 x 1.0 mm, oblique spine);
2. seconds per scan and per vertebra for ``extract_patches`` end to end (read, sha256, sample,
   save) on phantom scans written by ``vfcore.phantom`` (skipped if the phantom is missing).

    python bench/bench_patches.py [--scans 4] [--repeat 5]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def bench_straighten(repeat: int) -> None:
    from vfcore.patches import fit_spine, straighten
    from vfcore.verse import Volume

    shape, zooms = (512, 512, 400), (0.7, 0.7, 1.0)
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = -np.array(shape) * zooms / 2
    rng = np.random.default_rng(0)
    ct = Volume(rng.normal(40, 300, shape).astype(np.float32), affine)
    mask = Volume(rng.integers(0, 25, shape, dtype=np.int16), affine)
    z = np.linspace(150, -150, 10)
    centroids = {lb: np.array([5 * np.sin(zz / 90), 20 * np.cos(zz / 120), zz])
                 for lb, zz in zip(range(14, 24), z)}
    spine = fit_spine(centroids)
    straighten(ct, mask, centroids, 18, spine=spine)  # warm-up
    wall, cpu = [], []
    for i in range(repeat):
        lb = 15 + i % 8
        t0, c0 = time.perf_counter(), time.process_time()
        straighten(ct, mask, centroids, lb, spine=spine)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    print(f"straighten, CT (linear) + mask (nearest), 96^3 from a {shape} scan: "
          f"{np.median(wall):.3f} s wall, {np.median(cpu):.3f} s CPU per vertebra "
          f"(median of {repeat}, one core)")


def bench_store(n_scans: int) -> None:
    try:
        from vfcore.phantom import write_phantom_root
    except ImportError:
        print("vfcore.phantom not available: end-to-end extraction skipped")
        return
    from vfcore.patches import extract_patches

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        root = write_phantom_root(Path(tmp) / "data", n_scans=n_scans, seed=0, workers=1)
        t_phantom = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.process_time()
        manifest = extract_patches(root, Path(tmp) / "run", workers=1, progress=False)
        t, c = time.perf_counter() - t0, time.process_time() - c0
        n = len(manifest)
        print(f"phantom: {n_scans} scans written in {t_phantom:.1f} s")
        print(f"extract_patches, 1 worker: {n_scans} scans, {n} vertebrae in {t:.1f} s wall "
              f"({c:.1f} s CPU) = {t / n_scans:.2f} s per scan, {t / max(n, 1):.3f} s per "
              f"vertebra wall ({c / max(n, 1):.3f} s CPU); read + sha256 + sample CT, mask, "
              "concepts + save")
        t0 = time.perf_counter()
        extract_patches(root, Path(tmp) / "run", workers=1, progress=False)
        print(f"re-run (all cases finished, checksums only): {time.perf_counter() - t0:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scans", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"CPU: {os.cpu_count()} cores visible, load average {os.getloadavg()[0]:.1f}; "
          "timings use one worker (wall time suffers when others share the cores)")
    bench_straighten(args.repeat)
    bench_store(args.scans)


if __name__ == "__main__":
    main()
