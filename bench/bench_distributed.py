"""The dissection pass on 1 and 2 processes (and on every GPU when there are several), and the
cost of merging the ranks' threshold buffers (vfcore.distributed, issue 15).

Launches itself with ``torchrun`` (gloo on CPUs, NCCL on GPUs, MASTER_ADDR=127.0.0.1) once per
process count and prints, from rank 0:

* ``pass``: :func:`vfcore.dissect.sharded.dissect_sharded` over N random int16 patches (forward,
  hooks, the per-rank TopQuantile, the all-gather and merge, the [N, K] statistics): samples/s
  of the whole job (N / the slowest rank's wall time) and the peak memory of rank 0;
* ``merge``: the all-gather and exact merge alone, at the scale of a real split: each rank holds
  a full buffer of K units x m values (m = the split's tail size for --merge-n samples and the
  preset's positions, q = 0.005), as after its share of the pass; seconds, the gathered bytes
  per rank (world x K x m x 12 bytes: float32 values + int64 indices) and the peak memory.

    python bench/bench_distributed.py                       # small preset, CPU, 1 and 2 processes
    python bench/bench_distributed.py --merge-units 512 --merge-positions 512   # paper's layer
    python bench/bench_distributed.py --preset paper --samples 2048                  # on GPUs
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from bench_dissect import peak_mb, reset_peak  # noqa: E402  (one memory reader for the benches)


def rss_mb() -> float:
    """The CPU memory this process holds now (VmRSS, MB; 0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def worker(args) -> None:
    from vfcore import distributed as dd
    from vfcore.data import to_network_input
    from vfcore.dissect.quantile import TopQuantile, tail_size
    from vfcore.dissect.sharded import _gather, dissect_sharded
    from vfcore.model import FractureNet, get_preset
    from vfcore.runtime import device_name, precision_line

    torch.set_num_threads(args.threads)
    w = dd.init()
    dev = w.device
    p = get_preset(args.preset or ("paper" if dev.type == "cuda" else "small"))
    torch.manual_seed(0)
    model = FractureNet(p).eval()
    patches = torch.from_numpy(np.random.default_rng(0).integers(
        -1000, 1500, (args.samples, 96, 96, 96), dtype=np.int16))
    kw = dict(q_tail=0.005, batch_size=args.batch, transform=lambda hu: to_network_input(hu, p),
              device=dev, progress=False)
    dissect_sharded(model, patches[:args.batch * w.size], p.dissect_layer, **kw)   # warm-up
    dd.barrier("bench")
    reset_peak()
    t0 = time.perf_counter()
    d = dissect_sharded(model, patches, p.dissect_layer, **kw)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dd.barrier("bench")
    seconds = time.perf_counter() - t0
    if w.is_main:
        print(f"{w.size} process(es), {device_name(dev)}: pass over N={args.samples} ({p.name}, "
              f"{p.dissect_layer}: K={d.n_units} x {int(np.prod(d.spatial_shape))} positions, batch "
              f"{args.batch}): {args.samples / seconds:.1f} samples/s ({seconds:.2f} s), peak {peak_mb()}",
              flush=True)
        print(precision_line(dev), flush=True)

    # the merge at a real split's scale: every rank holds a full buffer, as after its share
    K, P, N = args.merge_units, args.merge_positions, args.merge_n
    m = tail_size(N * P, 0.005)
    gen = torch.Generator().manual_seed(w.rank)
    share = N // w.size + (w.rank < N % w.size)
    state = {"format": TopQuantile.STATE_FORMAT, "q_tail": 0.005, "n_samples_expected": N,
             "n_samples": share, "positions": P, "units": K,
             "values": torch.rand(K, m, generator=gen),
             "index": torch.randint(share * P, (K, m), generator=gen),
             "min": torch.zeros(K, dtype=torch.float64), "max": torch.ones(K, dtype=torch.float64),
             "zeros": torch.zeros(K, dtype=torch.int64)}
    stats = TopQuantile(0.005, n_samples=N).load_state_dict(state, device=dev)
    del state
    dd.barrier("bench")
    reset_peak()
    before = rss_mb()
    t0 = time.perf_counter()
    merged = _gather(stats, N) if w.size > 1 else stats
    if w.size > 1:
        assert merged.values.shape == (K, m)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    dd.barrier("bench")
    if w.is_main:
        gathered = w.size * K * m * 12 / 2**20
        print(f"{w.size} process(es): merge of {w.size} buffer(s) of K={K} x m={m} (N={N} x "
              f"{P} positions, q=0.005): {seconds:.3f} s, {gathered:.0f} MB gathered per rank, "
              f"peak {peak_mb()} ({before:.0f} MB before the merge)", flush=True)
    dd.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, help="small (default on CPU) or paper (default on GPU)")
    ap.add_argument("--samples", type=int, default=64, help="patches in the pass (N)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--procs", type=int, nargs="*", default=None,
                    help="process counts (default: 1 and 2 on CPU; 1 and every GPU)")
    ap.add_argument("--merge-n", type=int, default=10_000, help="split size for the merge")
    ap.add_argument("--merge-units", type=int, default=128, help="K (small preset: 128, paper: 512)")
    ap.add_argument("--merge-positions", type=int, default=64, help="positions (small: 4^3, paper: 8^3)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    gpus = torch.cuda.device_count()
    procs = args.procs or ([1, gpus] if gpus > 1 else [1, 2] if gpus == 0 else [1])
    for n in procs:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS=str(args.threads),
                   PYTHONPATH=str(HERE.parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
               "--master_addr", "127.0.0.1", "--master_port", str(port), str(HERE), "--worker",
               *sys.argv[1:]]
        subprocess.run(cmd, env=env, check=True)


if __name__ == "__main__":
    main()
