"""Seconds per phantom scan on one core, and for the default data set.

    python bench/bench_phantom.py [n_scans]

Prints CPU seconds per scan (drawing and drawing + writing the files), voxels, vertebrae with
a centroid (each gives one patch), the field of view (spine-centred or trunk), the bytes
written per scan, and the wall time of ``write_phantom_root`` for the default data set (one
worker).  No pass/fail: figures only.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from vfcore.phantom import DEFAULT_SCANS, sample_scan, write_phantom_root, write_scan  # noqa: E402
from vfcore.phantom.render import render_scan  # noqa: E402


def main(n: int = 12) -> None:
    draw, total, voxels, verts, sizes = [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            t0 = time.process_time()
            spec = sample_scan(0, i)
            scan = render_scan(spec)
            draw.append(time.process_time() - t0)
            voxels.append(scan.ct.size)
            verts.append(len(scan.centroids))
            t0 = time.process_time()
            write_scan(tmp, 0, i)
            total.append(time.process_time() - t0)
            sizes.append(sum(f.stat().st_size for f in Path(tmp).rglob(f"{scan.case}_*")))
            print(f"scan {i:3d} {spec.acq.kind:12s} {getattr(spec.acq, 'fov', '-'):5s} {scan.ct.shape} "
                  f"{scan.ct.size / 1e6:5.2f} Mvox {verts[-1]:2d} vertebrae: draw {draw[-1]:.2f} s, "
                  f"draw + write {total[-1]:.2f} s CPU, {sizes[-1] / 1e6:.1f} MB")
    print(f"\nper scan (CPU, one core): draw {np.mean(draw):.2f} s, draw + write {np.mean(total):.2f} s "
          f"(max {np.max(total):.2f} s); {np.mean(voxels) / 1e6:.1f} Mvox and "
          f"{np.mean(verts):.1f} vertebrae with a centroid per scan; "
          f"{np.sum(total) / np.sum(verts):.3f} s CPU per vertebra; {np.mean(sizes) / 1e6:.1f} MB per scan")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_phantom_root(tmp, n_scans=DEFAULT_SCANS, seed=0, workers=1, progress=False)
        wall = time.perf_counter() - t0
    print(f"default data set ({DEFAULT_SCANS} scans, 1 worker): {wall:.1f} s wall")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 12)
