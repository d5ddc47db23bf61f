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
  the patch's vertebra labels (``vfcore.dissect.geometry.vertebra_overlap``), averaged over those
  (unit, sample) pairs; notebook 04's figure over its exemplars (``units.csv``) beside it;
* where the top units *look* (``vfcore.analysis.looking``): the share of |input gradient| of
  each unit's activation summed over its mask cells on the target vertebra, beside its mask
  share, with chance, an untrained network (same cells) and 10 random units as controls, the
  share on the fracture signs against another TP sample's, and occlusion of the target
  vertebra / fracture signs against equal-volume regions elsewhere (``--no-looking`` skips it);
* patches more than 10 % outside the scan (manifest ``out_of_field``), their levels, and how
  many are cranio-caudal end vertebrae (``vfcore.analysis.shortcut.outside_patches``), and the mean
  out-of-field fraction per outcome (``vfcore.analysis.shortcut.run_out_of_field``);
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
    from vfcore.dissect import outcomes, patch_mask
    from vfcore.dissect.geometry import vertebra_overlap

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


def looking_figures(run, art, net, top: int = 10, max_samples: int | None = None, seed: int = 0) -> dict:
    """Where the top units look (input gradients) and occlusion, with controls (``vfcore.analysis.looking``)."""
    import torch

    from vfcore.analysis.alignment import random_unit_draws
    from vfcore.analysis.looking import (looking_summary, occlusion_summary, run_looking, run_occlusion,
                                         theoretical_rf)
    from vfcore.model import build_model

    if art.ranking_tp is None:
        return {"defined": False, "reason": art.reasons["tp"]}
    units = art.ranking_tp["unit"].head(top).astype(int).tolist()
    torch.manual_seed(seed)
    untrained = build_model(net.preset)
    pairs = run_looking(run.root, art, net, units, max_samples, control=untrained)
    rest = np.setdiff1d(np.arange(art.dissection.n_units), units)
    draws = rest[random_unit_draws(len(rest), len(units), 2, seed)]
    rand = [run_looking(run.root, art, net, d, max_samples) for d in draws]
    rand_pairs = sum(len(r) for r in rand)
    occ = run_occlusion(run.root, art, net, units, None, seed)
    return {"defined": True, "units": units, "rf": theoretical_rf(net.model, net.layer, net.preset.zoom),
            "top": looking_summary(pairs), "random": {"n_pairs": rand_pairs, "draws": len(draws),
            "grad_target": float(np.mean([v for r in rand for v in r["grad_target"]])) if rand_pairs else None,
            "mask_target": float(np.mean([v for r in rand for v in r["mask_target"]])) if rand_pairs else None},
            "occlusion": occlusion_summary(occ, art.meta["threshold"]).to_dict("records"),
            "r_target": float(occ["r_target"].mean()) if "r_target" in occ else None,
            "r_elsewhere": float(occ["r_elsewhere"].mean()) if "r_elsewhere" in occ else None,
            "r_off_target": float(occ["r_off_target"].mean()) if "r_off_target" in occ else None,
            "r_off_elsewhere": float(occ["r_off_elsewhere"].mean()) if "r_off_elsewhere" in occ else None,
            "n_off": int(occ["r_off_target"].notna().sum()) if "r_off_target" in occ else 0}


def outside_figures(run_dir) -> dict:
    """Patches more than 10 % outside the scan (all of the manifest) and the errors against it."""
    from vfcore.analysis import shortcut
    from vfcore.data import read_store

    manifest = read_store(run_dir)
    out = shortcut.outside_patches(manifest)
    a = shortcut.run_out_of_field(run_dir)
    return {"n_patches": len(manifest), "n_outside": len(out), "n_outside_end": int(out["end"].sum()),
            "levels": out["level"].value_counts().to_dict(),
            "levels_not_end": out.loc[~out["end"], "level"].value_counts().to_dict(),
            "by_outcome": a.by_outcome.to_dict("records"), "correlation": a.correlation.to_dict("records"),
            "bins": a.bins.to_dict("records")}


def looking_rows(lk: dict | None, top: int) -> list[tuple[str, str, str]]:
    """The table's rows for :func:`looking_figures` (none when skipped)."""
    if lk is None:
        return []
    name = f"top-{top} c_k units: share of input gradient on the target vertebra"
    if not lk["defined"]:
        return [(name, f"undefined: {lk['reason']}", "(beside the mask share)")]
    t, r = lk["top"], lk["random"]
    occ = {o["region"]: o for o in lk["occlusion"]}
    o, e = occ["target"], occ["elsewhere"]
    return [(name, f"{_fmt(t['grad_target'], '.0%')} ({t['n_pairs']} pairs, {t['n_samples']} TP; mask "
                   f"{_fmt(t['mask_target'], '.0%')}, chance {_fmt(t['chance_target'], '.0%')}, untrained net "
                   f"{_fmt(t.get('control_target'), '.0%')} ({t.get('n_control')} pairs), random units {_fmt(r['grad_target'], '.0%')})",
             "(beside the mask share)"),
            ("occluding the target vertebra: drop in P(fracture)",
             f"{o['drop']:.2f} ({o['flips']} of {o['n']} TP below threshold); equal volume elsewhere "
             f"{e['drop']:.2f} ({e['flips']})", "(model-level check)")]


def _fmt(v, spec=".3f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="a run folder with a dissection (notebooks 01-03)")
    ap.add_argument("--top", type=int, default=10, help="top units by c_k (default 10)")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    ap.add_argument("--no-looking", action="store_true", help="skip the input-gradient and occlusion figures")
    ap.add_argument("--looking-samples", type=int, help="input gradients on the first N TP samples (default all)")
    args = ap.parse_args(argv)

    from vfcore.dissect import load_artifacts
    from vfcore.errors import VfcoreError
    from vfcore.run import RunFolder
    from vfcore.runtime import device_name, precision_line

    run = RunFolder(args.run)
    try:
        art = load_artifacts(run.root)
    except VfcoreError as err:
        print(f"bench_meaning: {err}", file=sys.stderr)
        return 1
    meta = art.meta
    g, seeds = grid_figures(meta), seed_figures(run)
    target, outside = on_target(run, art, args.top), outside_figures(run.root)
    looking = None
    if not args.no_looking:
        import torch

        from vfcore.dissect import load_network
        torch.set_num_threads(1)
        looking = looking_figures(run, art, load_network(run.root), args.top, args.looking_samples)
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
        *looking_rows(looking, args.top),
        ("patches more than 10 % outside the scan",
         f"{outside['n_outside']} of {outside['n_patches']} ({outside['n_outside_end']} end vertebrae)",
         "only cranio-caudal end vertebrae"),
        ("whole series (run-notebooks --quick)", series_text, "<= 15 min wall, <= 2 GB peak"),
    ]
    width = [max(len(r[i]) for r in rows + [("figure", "this run", "goal")]) for i in range(3)]
    line = lambda r: "| " + " | ".join(str(v).ljust(w) for v, w in zip(r, width)) + " |"  # noqa: E731
    print(f"issue 11 measured goals for {run.root}\nmachine: {device_name()}\n{precision_line()}\n")
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
    if looking is not None and looking["defined"]:
        t, rf = looking["top"], looking["rf"]
        print(f"  receptive field of one {meta['layer']} cell: {rf['rf_mm']:g} mm (theoretical; field "
              f"{'x'.join(f'{v:g}' for v in g['field_mm'])} mm, cell {rf['cell_mm']:g} mm)")
        print(f"  top-unit input gradients ({t['n_pairs']} pairs): target {_fmt(t['grad_target'], '.0%')}, adjacent "
              f"{_fmt(t['grad_adjacent'], '.0%')}, outside bone {_fmt(t['grad_outside'], '.0%')}; fracture signs "
              f"{_fmt(t.get('grad_fracture'), '.1%')} vs another TP sample's {_fmt(t.get('grad_fracture_other'), '.1%')} "
              f"(chance {_fmt(t.get('chance_fracture'), '.1%')}); random units ({looking['random']['draws']} draws, "
              f"{looking['random']['n_pairs']} pairs): gradient {_fmt(looking['random']['grad_target'], '.0%')}, "
              f"mask {_fmt(looking['random']['mask_target'], '.0%')}")
        for o in looking["occlusion"]:
            print(f"  occlusion {o['region']}: n = {o['n']}, {o['voxels']:.0f} voxels, drop in P(fracture) "
                  f"{o['drop']:.3f} (sd {_fmt(o['sd'])}), {o['flips']} below threshold")
        print(f"  top units' sum(M_k A_k) occluded / not (mean over TP): target {_fmt(looking['r_target'], '.2f')}, "
              f"equal volume elsewhere {_fmt(looking['r_elsewhere'], '.2f')}; on the mask cells holding no target voxel "
              f"({looking['n_off']} TP): {_fmt(looking['r_off_target'], '.2f')} vs {_fmt(looking['r_off_elsewhere'], '.2f')}")
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
                   "outside": outside, "series": series, "looking": looking}
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str))
        print(f"\nfigures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
