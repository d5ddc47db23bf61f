"""Issue 11's measured goals for one run folder: is the dissection worth reading?

    python bench/bench_meaning.py RUN [--top 10] [--json FILE]

RUN is any run folder made by ``python -m vfcore run-notebooks --run RUN --quick`` (or by
notebooks 01-03: the dissection must exist). Prints the table of issue 11 (figure, this run,
goal) and the details behind each figure, with the machine (``vfcore.runtime.device_name()``):

* the dissected layer's grid and its cell size in mm (the network field / the grid);
* TP / FP in the dissected set (``meta.json`` counts, per split of the set);
* test AUC and F1 per seed (``model/metrics.json``) and whether training used augmentation
  (the checkpoint's config);
* the top-``top`` c_k units' share of mask on the target vertebra: for every top unit and every
  true-positive sample where it fires, the block mask M_k at patch resolution
  (``vfcore.dissect.patch_mask``: each feature voxel is the input block it summarises) against
  the patch's vertebra labels (``vfcore.dissect.vertebra_overlap``), averaged over those
  (unit, sample) pairs; notebook 04's figure over its exemplars (``units.csv``) beside it;
* patches more than 10 % outside the scan (manifest ``out_of_field``), their levels, and how
  many are cranio-caudal end vertebrae (``vfcore.shortcut.outside_patches``), and the mean
  out-of-field fraction per outcome (``vfcore.shortcut.run_out_of_field``);
* the whole series' wall time and peak memory where ``bench/bench_series.py`` measured this run.

Not a test: it prints figures (and writes them as JSON with ``--json``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the vfcore of this checkout


def grid_figures(meta: dict) -> dict:
    """The dissected layer's grid and cell size (mm) from meta.json (``field`` in 1 mm voxels)."""
    from vfcore.constants import PATCH_SPACING

    grid = [int(g) for g in meta["spatial_shape"]]
    extent = [(b - a) * PATCH_SPACING for a, b in meta["field"]]
    return {"layer": meta["layer"], "preset": meta.get("preset"), "grid": grid, "n_units": meta["n_units"],
            "cell_mm": [e / g for e, g in zip(extent, grid)], "field_mm": extent}


def seed_figures(run) -> dict:
    """Test AUC / F1 per seed from metrics.json, and the augmentation of the best checkpoint."""
    from vfcore.checkpoint import read_checkpoint

    out = {"per_seed": {}, "augment": None, "best_seed": None}
    path = run.path("metrics")
    if path.is_file():
        m = json.loads(path.read_text())
        out["per_seed"] = {s: {"auc": v.get("auc"), "f1": v.get("f1")} for s, v in m.get("per_seed", {}).items()}
        out["best_seed"] = m.get("best_seed")
    try:
        config = read_checkpoint(run.checkpoint).get("config") or {}
        out["augment"] = config.get("augment")
        out["augment_known"] = "augment" in config
    except Exception as err:                               # a bench reports, it does not stop
        out["augment_known"], out["checkpoint_error"] = False, str(err)
    return out


def on_target(run, art, top: int = 10) -> dict:
    """Share of the top units' block masks on the target vertebra, over TP samples where they fire."""
    from vfcore.data import read_patch
    from vfcore.dissect import outcomes, patch_mask, vertebra_overlap

    d, samples = art.dissection, art.samples
    if art.ranking_tp is None:
        return {"defined": False, "reason": art.reasons["tp"]}
    units = art.ranking_tp["unit"].head(top).astype(int).tolist()
    tp = np.flatnonzero(outcomes(art.labels, d.probability, art.meta["threshold"])["tp"])
    per_unit = {u: [] for u in units}
    pooled = {"target": 0, "all": 0}
    chance = []                                            # the target's share of the whole field
    for i in tp:
        rel = samples.loc[i].get("mask_path", "")
        if not isinstance(rel, str) or not rel or not d.enabled[i, units].any():
            continue
        vertebrae = read_patch(run.patch(rel))
        label = int(samples.loc[i, "label"])
        chance.append(float((vertebrae[art.field] == label).mean()))
        masks = d.masks(int(i), units)
        for u, M in zip(units, masks):
            if not M.any():
                continue
            mask = patch_mask(M, art.field, vertebrae.shape)
            per_unit[u].append(vertebra_overlap(mask, vertebrae, label))
            pooled["target"] += int((vertebrae[mask] == label).sum())
            pooled["all"] += int(mask.sum())
    pairs = [w for ws in per_unit.values() for w in ws]
    mean = {k: float(np.mean([w[k] for w in pairs])) if pairs else None for k in ("target", "adjacent", "outside")}
    exported = None
    if art.units is not None and "on_target_vertebra" in art.units:
        rows = art.units[art.units["role"] == "tp"]["on_target_vertebra"].dropna()
        exported = float(rows.mean()) if len(rows) else None
    return {"defined": True, "units": units, "n_tp": int(len(tp)), "pairs": len(pairs),
            "mean": mean, "pooled_target": pooled["target"] / pooled["all"] if pooled["all"] else None,
            "per_unit_target": {u: float(np.mean([w["target"] for w in ws])) if ws else None
                                for u, ws in per_unit.items()},
            "per_unit_pairs": {u: len(ws) for u, ws in per_unit.items()}, "exported_mean": exported,
            "chance_target": float(np.mean(chance)) if chance else None}


def outside_figures(run_dir) -> dict:
    """Patches more than 10 % outside the scan (all of the manifest) and the errors against it."""
    from vfcore import shortcut
    from vfcore.data import read_store

    manifest = read_store(run_dir)
    out = shortcut.outside_patches(manifest)
    a = shortcut.run_out_of_field(run_dir)
    return {"n_patches": len(manifest), "n_outside": len(out), "n_outside_end": int(out["end"].sum()),
            "levels": out["level"].value_counts().to_dict(),
            "levels_not_end": out.loc[~out["end"], "level"].value_counts().to_dict(),
            "by_outcome": a.by_outcome.to_dict("records"), "correlation": a.correlation.to_dict("records"),
            "bins": a.bins.to_dict("records")}


def _fmt(v, spec=".3f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="a run folder with a dissection (notebooks 01-03)")
    ap.add_argument("--top", type=int, default=10, help="top units by c_k (default 10)")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    from vfcore.dissect import load_artifacts
    from vfcore.errors import VfcoreError
    from vfcore.run import RunFolder
    from vfcore.runtime import device_name

    run = RunFolder(args.run)
    try:
        art = load_artifacts(run.root)
    except VfcoreError as err:
        print(f"bench_meaning: {err}", file=sys.stderr)
        return 1
    meta = art.meta
    g, seeds = grid_figures(meta), seed_figures(run)
    target, outside = on_target(run, art, args.top), outside_figures(run.root)
    series_path = run.root / "bench_series.json"           # written by bench/bench_series.py
    series = json.loads(series_path.read_text()) if series_path.is_file() else None
    c = meta["counts"]
    tp_info, fp_info = meta["rankings"]["tp"], meta["rankings"]["fp"]

    grid = "x".join(map(str, g["grid"]))
    cell = "x".join(f"{v:g}" for v in g["cell_mm"])
    aucs = [v["auc"] for v in seeds["per_seed"].values() if v["auc"] is not None]
    aug = ("augmentation " + ("on" if seeds["augment"] else "off")) if seeds.get("augment_known") else "augmentation ?"
    auc_text = ", ".join(f"{_fmt(a, '.3f')}" for a in aucs) or "n/a"
    if len(aucs) > 1:
        auc_text += f" (mean {np.mean(aucs):.3f} +- {np.std(aucs, ddof=1):.3f})"
    share = target["mean"]["target"] if target.get("defined") else None
    series_text = (f"{series['wall_s'] / 60:.1f} min, {series['peak_pss_mib'] / 1024:.2f} GB"
                   if series else "not measured (bench/bench_series.py --run RUN)")
    rows = [
        ("dissected grid, " + str(g["preset"]), f"{grid} ({cell} mm cells), layer {g['layer']}, K = {g['n_units']}",
         "8^3 (8 mm)"),
        ("TP / FP in the dissected set", f"{c['tp']} / {c['fp']} (of {meta['n_samples']}, split {meta['split']})",
         ">= 40 / >= 8"),
        (f"test AUC, {len(aucs)} seed(s)", f"{auc_text}; {aug}", ">= 0.95 each, with augmentation"),
        (f"top-{args.top} c_k units: share of mask on the target vertebra",
         f"{_fmt(share, '.0%')} ({target.get('pairs', 0)} unit-sample pairs; chance "
         f"{_fmt(target.get('chance_target'), '.0%')})" if target.get("defined")
         else f"undefined: {target['reason']}", ">= 60 %"),
        ("patches more than 10 % outside the scan",
         f"{outside['n_outside']} of {outside['n_patches']} ({outside['n_outside_end']} end vertebrae)",
         "only cranio-caudal end vertebrae"),
        ("whole series (run-notebooks --quick)", series_text, "<= 15 min wall, <= 2 GB peak"),
    ]
    width = [max(len(r[i]) for r in rows + [("figure", "this run", "goal")]) for i in range(3)]
    line = lambda r: "| " + " | ".join(str(v).ljust(w) for v, w in zip(r, width)) + " |"  # noqa: E731
    print(f"issue 11 measured goals for {run.root}\nmachine: {device_name()}\n")
    print(line(("figure", "this run", "goal")))
    print("|" + "|".join("-" * (w + 2) for w in width) + "|")
    for r in rows:
        print(line(r))

    print("\ndetails")
    for s, v in seeds["per_seed"].items():
        print(f"  seed {s}: test AUC {_fmt(v['auc'])}, F1 {_fmt(v['f1'])}"
              + ("  (best.pt)" if str(s) == str(seeds["best_seed"]) else ""))
    for name, sc in meta.get("split_counts", {}).items():
        print(f"  split {name}: {sc['n']} vertebrae, {sc['positive']} fractured, TP {sc['tp']}, FP {sc['fp']}, "
              f"TN {sc['tn']}, FN {sc['fn']}")
    for which, info in (("tp", tp_info), ("fp", fp_info)):
        if not info.get("defined"):
            print(f"  {which} ranking: undefined: {info.get('reason')}")
            continue
        flag = f"  SMALL n: {info['note']}" if info.get("small_n") else ""
        ties = info.get("ties", {}).get("note", "ties not recorded (a dissection of an older vfcore)")
        print(f"  {which} ranking: n = {info['n']}; {ties}{flag}")
    if art.ranking_tp is not None:
        top = art.ranking_tp.head(args.top)
        if "c_low" in top:
            print("  top units by c_k [95 % bootstrap interval]: " + ", ".join(
                f"{int(r.unit)}: {r.c_k:.2f} [{r.c_low:.2f}, {r.c_high:.2f}]" for r in top.itertuples()))
    if target.get("defined"):
        m = target["mean"]
        print(f"  top-unit masks over {target['n_tp']} TP samples: target {_fmt(m['target'], '.0%')}, adjacent "
              f"vertebrae {_fmt(m['adjacent'], '.0%')}, outside bone {_fmt(m['outside'], '.0%')} (mean over pairs); "
              f"pooled over voxels: target {_fmt(target['pooled_target'], '.0%')}; chance (the target's "
              f"share of the network field, same samples): {_fmt(target['chance_target'], '.0%')}")
        print("  per unit (target share, pairs): " + ", ".join(
            f"{u}: {_fmt(target['per_unit_target'][u], '.0%')} ({target['per_unit_pairs'][u]})" for u in target["units"]))
        if target["exported_mean"] is not None:
            print(f"  notebook 04's units.csv (TP units over their exemplars): target {target['exported_mean']:.0%}")
    print(f"  outside > 10 % by level: {outside['levels'] or 'none'}; not an end vertebra: "
          f"{outside['levels_not_end'] or 'none'}")
    print("  mean out-of-field fraction by outcome: " + ", ".join(
        f"{r['outcome']} {_fmt(r['mean_out_of_field'], '.2f')} (n = {r['n']}, {r['outside']} > 10 %)"
        for r in outside["by_outcome"]))
    print("  Spearman rho(out_of_field, P(fracture)) within each class: " + ", ".join(
        f"{r['class']} {_fmt(r['rho'], '.2f')} (n = {r['n']}{', ' + r['reason'] if r['reason'] else ''})"
        for r in outside["correlation"]))
    if args.json:
        figures = {"run": str(run.root), "machine": device_name(), "grid": g, "counts": c, "split": meta["split"],
                   "rankings": {"tp": tp_info, "fp": fp_info}, "seeds": seeds, "on_target": target,
                   "outside": outside, "series": series}
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str))
        print(f"\nfigures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
