"""What the freed minutes buy (issue 21, item 4): alternatives to the quick run, each with its
cost, its test AUC and the concept figures of notebooks 06 and 08.

    python bench/bench_budget.py --root /tmp/budget                       # all, seeds 0 1 2
    python bench/bench_budget.py --root /tmp/budget --alternatives quick epochs40 --seeds 0

The alternatives (``ALTERNATIVES``) change one quick setting (``vfcore.notebooks.QUICK``) each:

* ``quick``: today's (48 scans + 24 dissection-only, small preset, 25 epochs, ``light``, the
  precision policy of this CPU), dissected at the preset's layer (down_tr512);
* ``epochs40``: 40 epochs (patience 40) on the same store;
* ``scans72``: 72 scans instead of 48 (the same 24 dissection-only scans' settings);
* ``layer256``: quick's networks, dissected one layer lower as well (down_tr256: 64 units, 8^3 in the
  small preset);
* ``fp32``: the old policy (``VFCORE_CPU_BF16=0``: fp32 + channels_last_3d), the same seeds:
  did bf16 cost AUC on this machine?

For every alternative and seed it prints and writes (``<root>/figures.csv``): the stage wall times
(phantom + patches, training, dissection), the held-out test AUC and F1 (n), the TP / FP of the
dissected set, the detectors of the dissected layer (best IoU > 0.04 with a concept and same-class
shuffle p < 0.01, 200 shuffles: notebook 06) and how many of Eq. 1's top 10 are detectors, and the
fracture-deformity zone's direction (a probe fitted on the training split: notebook 08) beside the
best single unit chosen on train and the direction's shuffle, all on the held-out dissected set.

Resumable: each store, each seed's training and each (alternative, seed)'s figures
(``<root>/<alternative>/figures-seed<S>.json``, written atomically) are reused when it runs again.
Figures, no pass/fail; run it on a quiet machine (the times are wall clock).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the vfcore of this checkout

CONCEPT = "fracture-deformity zone"
N_PERM = 200
TOP_K = 10

ALTERNATIVES = {
    "quick": {"scans": 48, "epochs": 25},
    "epochs40": {"scans": 48, "epochs": 40},
    "scans72": {"scans": 72, "epochs": 25},
    "layer256": {"scans": 48, "epochs": 25, "layer": "down_tr256", "models_of": "quick"},
    "fp32": {"scans": 48, "epochs": 25, "bf16": "0"},
}


def build_store(root: Path, scans: int) -> Path:
    """Phantom + patches as notebook 01 makes them (``vfcore.prerequisites.prepare``) with the
    quick settings and ``scans`` scans; reused if complete."""
    from vfcore.notebooks import NOTEBOOKS, QUICK
    from vfcore.prerequisites import prepare

    store = root / f"store-{scans}"
    done = store / "timing.json"
    if done.is_file():
        return store
    first = NOTEBOOKS["preprocessing"]
    t0 = time.perf_counter()
    prepare(store, "training", quick={**QUICK, first: {**QUICK[first], "N_SCANS": scans}})
    done.write_text(json.dumps({"seconds": time.perf_counter() - t0}))
    return store


def run_folder(root: Path, name: str, store: Path) -> Path:
    """``<root>/<name>`` holding hard links to the store's data and patches (no copy)."""
    folder = root / name
    if not (folder / "patches").is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        for part in ("data", "patches"):
            subprocess.run(["cp", "-al", str(store / part), str(folder / part)], check=True)
    return folder


def train_seeds(folder: Path, seeds, epochs: int) -> dict[int, float]:
    """Train each seed (a finished one is reused with its recorded time); wall seconds per seed."""
    from vfcore.notebooks import NOTEBOOKS, QUICK
    from vfcore.train import fit, train_seed

    p = QUICK[NOTEBOOKS["training"]]
    kw = dict(epochs=epochs, patience=epochs, augment=p["AUGMENT"], progress=False)
    seconds = {}
    for s in seeds:
        done = folder / f"train-seed{s}.json"
        if not done.is_file():
            t0 = time.perf_counter()
            train_seed(folder, p["PRESET"], s, **kw)
            done.write_text(json.dumps({"seconds": time.perf_counter() - t0}))
        seconds[s] = json.loads(done.read_text())["seconds"]
    fit(folder, p["PRESET"], seeds=seeds, **kw)          # resumes the finished seeds; tests them
    return seconds


def figures(folder: Path, seed: int, layer: str | None) -> dict:
    """Dissect seed ``seed``'s best checkpoint and compute the concept figures (notebooks 06, 08)."""
    import torch

    from vfcore import dissect as D
    from vfcore.analysis import alignment, directions
    from vfcore.data import load_split
    from vfcore.run import RunFolder

    run = RunFolder(folder)
    part = run.checkpoint.with_name(".best.pt.part")      # the run's checkpoint = this seed's best
    shutil.copyfile(run.seed_checkpoint(seed), part)
    part.replace(run.checkpoint)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    D.dissect_run(folder, layer=layer, progress=False)
    t_dissect = time.perf_counter() - t0

    t0 = time.perf_counter()
    art = D.load_artifacts(folder)
    d, meta, samples, labels = art.dissection, art.meta, art.samples, art.labels
    net = D.load_network(folder, layer=meta["layer"])
    masks = alignment.RunConcepts.from_run(folder, samples)
    counts = alignment.concept_counts(masks, d.spatial_shape, art.field)
    al = alignment.block_alignment(d.tail, counts, d.n_units, labels, n_perm=N_PERM, seed=0, layer=meta["layer"])
    table = alignment.unit_table(al).set_index("unit")
    top = list(art.ranking_tp.unit[:TOP_K]) if art.ranking_tp is not None else []

    patches, _, _ = D.load_dissection_set(folder, meta["split"])
    train_x, _, train_rows = load_split(folder, "train")
    A_test = directions.cell_activations(net.model, patches, net.layer, net.transform, 16)
    A_train = directions.cell_activations(net.model, train_x, net.layer, net.transform, 16)
    counts_train = alignment.concept_counts(alignment.RunConcepts.from_run(folder, train_rows), d.spatial_shape,
                                            art.field)
    probe = directions.probe_table(A_train, counts_train, A_test, counts, labels, concepts=[CONCEPT],
                                   n_perm=N_PERM, seed=0).iloc[0]
    metrics = json.loads(run.metrics.read_text())
    test = metrics["per_seed"][str(seed)]
    outcome = samples["outcome"].value_counts()
    return {"seed": seed, "layer": meta["layer"], "grid": "x".join(map(str, d.spatial_shape)), "units": d.n_units,
            "test_auc": test["auc"], "test_f1": test["f1"], "n_test": int(metrics["n_test"]),
            "n_dissected": int(len(samples)), "tp": int(outcome.get("TP", 0)), "fp": int(outcome.get("FP", 0)),
            "detectors": int(table["detector"].sum()),
            "top10_detectors": int(table.loc[top, "detector"].sum()) if top else None,
            "direction_iou": float(probe["iou"]), "unit_iou": float(probe["unit_iou"]),
            "shuffled_iou": float(probe["shuffled_iou"]), "direction_p": float(probe["p"]),
            "dissect_s": t_dissect, "figures_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="working folder (resumable; ~2.5 GB a 48-scan store)")
    ap.add_argument("--alternatives", nargs="+", default=list(ALTERNATIVES), choices=list(ALTERNATIVES))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()

    from vfcore.runtime import device_name, precision_line

    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    print(f"{device_name()}; {precision_line('cpu')}")
    rows = []
    for name in args.alternatives:
        alt = ALTERNATIVES[name]
        if "bf16" in alt:
            os.environ["VFCORE_CPU_BF16"] = alt["bf16"]
        else:
            os.environ.pop("VFCORE_CPU_BF16", None)
        t0 = time.perf_counter()
        store = build_store(root, alt["scans"])
        store_s = json.loads((store / "timing.json").read_text())["seconds"]
        folder = run_folder(root, alt.get("models_of", name), store)
        train_s = train_seeds(folder, args.seeds, alt["epochs"])
        for seed in args.seeds:
            out = root / name / f"figures-seed{seed}.json"
            if out.is_file():
                row = json.loads(out.read_text())
            else:
                row = {"alternative": name, **alt, "store_s": store_s, "train_s": train_s[seed],
                       **figures(folder, seed, alt.get("layer"))}
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = out.with_suffix(".part")
                tmp.write_text(json.dumps(row, indent=1))
                tmp.replace(out)
            rows.append(row)
            print(", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    table = pd.DataFrame(rows)
    table.to_csv(root / "figures.csv", index=False, float_format="%.4g")
    cols = ["test_auc", "test_f1", "tp", "fp", "detectors", "top10_detectors", "direction_iou", "unit_iou",
            "shuffled_iou", "train_s"]
    span = lambda v: f"{v.mean():.3g} ({v.min():.3g}-{v.max():.3g})"   # noqa: E731
    summary = table.groupby("alternative", sort=False)[cols].agg(span)
    summary.insert(0, "n_test", table.groupby("alternative", sort=False)["n_test"].first())
    with pd.option_context("display.width", 250, "display.max_columns", None):
        print(f"\nmean (min-max) over seeds {args.seeds}:")
        print(summary.T.to_string())


if __name__ == "__main__":
    main()
