"""Quality on the phantom: a fresh phantom -> patches -> several seeds of a preset -> Table 1.

Issue 4's quality targets: the ``paper`` preset on a GPU reaches AUC >= 0.95 and F1 >= 0.85 on
the held-out test split, mean of 3 seeds; the ``small`` preset is what CI and Binder train.
Prints the Table-1 row (mean +- std over seeds), the per-seed test metrics, what the best
seed gets wrong (with the phantom's drawn confounders), training throughput and peak memory,
with the device name. Figures, no pass/fail.

    # one H100 (about 8 min): 120 scans, 3 seeds, the paper preset and augmentation
    python bench/bench_quality.py --preset paper --scans 120 --seeds 0 1 2 --epochs 100 --workers 16
    # this CPU (about 30 min): what the quick CI run does, 3 seeds
    python bench/bench_quality.py --preset small --scans 48 --seeds 0 1 2 --epochs 30 --augment none

The run folder (``--run``, default a temporary one) is resumable: phantom scans, patches and
each seed's ``last.pt`` are reused when the command runs again with the same arguments.
"""
from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vfcore import patches, phantom, train
from vfcore.run import RunFolder
from vfcore.runtime import device_name, pick_device, precision_line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--scans", type=int, default=120)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--patience", type=int, default=None, help="default: the preset's")
    ap.add_argument("--augment", default="paper", help='"paper", "light" or "none"')
    ap.add_argument("--workers", type=int, default=1, help="processes for phantom and patches")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--run", default=None, help="run folder (default: temporary, removed)")
    args = ap.parse_args()

    dev = pick_device()
    tmp = None if args.run else tempfile.mkdtemp(prefix="vfcore-quality-")
    run = Path(args.run or tmp)
    augment = None if args.augment == "none" else args.augment
    print(f"device: {device_name(dev)}; torch {torch.__version__}; preset {args.preset}; "
          f"augment {augment}; {args.scans} scans; seeds {args.seeds}; up to {args.epochs} epochs")
    print(precision_line(dev))
    try:
        t0 = time.perf_counter()
        root = phantom.write_phantom_root(RunFolder(run).data, n_scans=args.scans, seed=0,
                                          workers=args.workers, progress=False)
        manifest = patches.extract_patches(root, run, workers=args.workers, seed=0, progress=False)
        t_data = time.perf_counter() - t0
        counts = manifest.groupby("split")["fracture"].apply(lambda f: f"{int((f == 1).sum())}/{len(f)}")
        print(f"phantom + patches: {t_data:.0f} s; fractured/all per split: {counts.to_dict()}")

        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        metrics = train.fit(run, args.preset, seeds=args.seeds, epochs=args.epochs,
                            patience=args.patience, augment=augment, compile=args.compile,
                            progress=False)
        t_train = time.perf_counter() - t0
        rates, epochs = [], []
        for seed in args.seeds:
            history = train.pd.read_csv(RunFolder(run).history(seed))
            rates.append(history["samples_per_s"].iloc[1:].median() if len(history) > 1
                         else history["samples_per_s"].iloc[0])
            epochs.append(len(history))
        print(f"training: {t_train:.0f} s for {sum(epochs)} epochs ({epochs} per seed); "
              f"median {np.median(rates):.0f} samples/s")
        for seed, m in metrics["per_seed"].items():
            print(f"  seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()))
        print(train.table1(metrics["per_seed"]).to_string(index=False))

        found = train.predict_split(run)
        found = found.merge(phantom.read_truth(root)[["case", "label", "height_loss", "confounders"]],
                            on=["case", "label"], how="left")
        wrong = found[found["outcome"].isin(["FP", "FN"])]
        print(f"best seed {metrics['best_seed']}: {len(wrong)} wrong calls of {len(found)}")
        if len(wrong):
            print(wrong[["case", "level", "fracture", "grade", "shape", "height_loss", "confounders",
                         "probability"]].to_string(index=False))

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peak host memory (RSS of this process): {peak:.0f} MB")
        if dev.type == "cuda":
            print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MB")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
