"""Notebook 04's exports: exemplar collages (PNG) and NIfTI files of the top units.

A layer above :mod:`vfcore.viz`: :func:`export_units` reads the dissection
(:func:`vfcore.dissect.load_artifacts`), recomputes the exemplars' activations with the forward
engine, and draws each unit's collage with :func:`vfcore.viz.dissection.collage`. The
analysis package :mod:`vfcore.dissect` draws nothing and never imports this module;
notebooks and the command line call it.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from vfcore.data import PatchArray, read_patch
from vfcore.dissect import (SUBSET_NAMES, DissectionArtifacts, activations, best_slice, exemplars,
                            load_artifacts, outcomes, patch_mask, upsample_to_patch)
from vfcore.dissect.artifacts import FORMAT, NOTEBOOK_03, checkpoint_path, concept_names, load_network
from vfcore.dissect.geometry import (concept_overlap, patch_world_affine, vertebra_overlap,
                                     write_nifti_exemplar)
from vfcore.dissect.ranking import EXEMPLAR_SCORES
from vfcore.errors import StaleArtifactError
from vfcore.io import atomic_save, atomic_write, sha256_file, write_json
from vfcore.lock import writes
from vfcore.run import RunFolder
from vfcore.viz.dissection import collage
from vfcore.viz.units import take_slice

__all__ = ["export_units", "UNITS_COLUMNS"]


def _load_patch(run_dir: Path, rel: str) -> np.ndarray | None:
    """A patch of the store from its manifest path (None for an empty path, e.g. no concept
    mask); :class:`MissingArtifactError` naming notebook 01 when the file is gone."""
    if not isinstance(rel, str) or not rel:
        return None
    run = RunFolder(run_dir)
    path = run.patch(rel)
    if not path.is_file():
        raise run.missing("patches", path)
    return read_patch(path)


@writes("vfcore dissect (export_units)")
def export_units(run_dir: str | Path, top: int = 10, top_fp: int = 5, k: int = 25,
                 nifti_top: int = 5, subset: str = "positive", by: str = "r",
                 view: str = "sagittal", device: str | None = None, batch_size: int = 16,
                 progress: bool = True) -> DissectionArtifacts:
    """Notebook 04's step: exemplars, collages, NIfTI files and (phantom) measured concepts.

    * ``exemplars.json``: for every unit its ``k`` top samples by ``by`` within each subset
      (``tp``, ``positive``, ``fp``, ``all``), never filled from outside the subset;
    * for the ``top`` units by c_k over true positives (exemplars from ``subset``: the paper
      shows fractured samples) and the ``top_fp`` units of the false-positive ranking
      (exemplars from ``fp``): ``collages/unit_<k>_<role>.png`` (5x5 single slices, each at
      the slice where that unit's thresholded activation is largest) and, for the first
      ``nifti_top`` exemplars, ``nifti/unit_<k>/<nn>_<case>_<level>_{ct,activation,masked_ct}.nii.gz``;
    * ``units.csv`` (one row per exported unit) and, where the patch store has concept masks
      (the phantom), ``unit_concepts.csv``: which concepts each unit's masks cover.

    The exemplars' activations (for the heat map) are recomputed in one forward pass over the
    union of the exported exemplars, keeping only the exported units; their masks are the
    pass's own M_k (from the kept tail), upsampled with :func:`patch_mask`.
    """
    run_dir = Path(run_dir)
    art = load_artifacts(run_dir)
    meta, d, samples = art.meta, art.dissection, art.samples
    ckpt = checkpoint_path(run_dir, run_dir / meta["checkpoint"])   # absolute stays absolute
    if sha256_file(ckpt) != meta["checkpoint_sha256"]:
        raise StaleArtifactError(art.folder / "meta.json", f"the dissection was made from another "
                                 f"checkpoint than {ckpt}: run {NOTEBOOK_03} again")
    folder = art.folder
    # drawn into a staging folder; the old exports stay until the new ones are complete
    stage = folder / ".exports-new"
    shutil.rmtree(stage, ignore_errors=True)
    o = outcomes(art.labels, d.probability, meta["threshold"])
    score = {"r": d.r, "max": d.max, "mean": d.mean}[by] if by in EXEMPLAR_SCORES else None
    ex = {"format": FORMAT, "dissection_id": meta["dissection_id"], "k": k, "by": by,
          "view": view, "subsets": {}, "exported": {}}
    for name in ("tp", "positive", "fp", "all"):
        lists = exemplars(d, o[name], k, by)
        ex["subsets"][name] = {"description": SUBSET_NAMES[name], "n": int(o[name].sum()),
                               "units": {str(u): [{"sample": i, "score": float(score[i, u])} for i in idx]
                                         for u, idx in lists.items()}}
    jobs: list[tuple[str, int, int, float, str]] = []      # role, rank, unit, c, subset
    if art.ranking_tp is not None:
        for row in art.ranking_tp.head(top).itertuples():
            jobs.append(("tp", int(row.rank), int(row.unit), float(row.c_k), subset))
    if art.ranking_fp is not None:
        for row in art.ranking_fp.head(top_fp).itertuples():
            jobs.append(("fp", int(row.rank), int(row.unit), float(row.c_fp), "fp"))
    members = {(role, unit): [e["sample"] for e in ex["subsets"][sub]["units"][str(unit)]]
               for role, _, unit, _, sub in jobs}
    union = sorted({i for idx in members.values() for i in idx})
    units = sorted({unit for _, _, unit, _, _ in jobs})
    maps: dict[int, np.ndarray] = {}
    if union:
        net = load_network(run_dir, ckpt, meta["layer"])
        A, _ = activations(net.model, PatchArray.of(run_dir, samples.loc[union, "ct_path"]), net.layer,
                           units=units, batch_size=batch_size, transform=net.transform, device=device,
                           progress=progress)
        maps = {i: A[j] for j, i in enumerate(union)}
    column = {u: j for j, u in enumerate(units)}
    names = concept_names(run_dir)
    unit_rows, concept_rows = [], []
    try:
        for role, rank, unit, c, sub in tqdm(jobs, desc="collages and NIfTI", disable=not progress):
            idx = members[(role, unit)]
            entry, row, concepts = _export_unit(run_dir, stage, art, role, rank, unit, c, sub, idx,
                                                [maps[i][column[unit]] for i in idx],
                                                [d.masks(i, [unit])[0] for i in idx], nifti_top,
                                                view, names)
            ex["exported"][f"{role}:{unit}"] = entry
            unit_rows.append(row)
            concept_rows.extend(concepts)
    except BaseException:           # the old exports are untouched; the half-drawn set goes
        shutil.rmtree(stage, ignore_errors=True)
        raise
    RunFolder(run_dir).path("exemplars").unlink(missing_ok=True)   # incomplete until it is rewritten
    for name in ("collages", "nifti"):                              # swap the new pictures in
        aside = folder / f".{name}-old"
        shutil.rmtree(aside, ignore_errors=True)
        if (folder / name).exists():
            os.replace(folder / name, aside)
        if (stage / name).exists():
            os.replace(stage / name, folder / name)
        shutil.rmtree(aside, ignore_errors=True)
    shutil.rmtree(stage, ignore_errors=True)
    with atomic_write(folder / "units.csv", "w") as f:
        pd.DataFrame(unit_rows, columns=UNITS_COLUMNS).to_csv(f, index=False, lineterminator="\n",
                                                              float_format="%.6g")
    (folder / "unit_concepts.csv").unlink(missing_ok=True)
    if concept_rows:
        with atomic_write(folder / "unit_concepts.csv", "w") as f:
            pd.DataFrame(concept_rows).to_csv(f, index=False, lineterminator="\n", float_format="%.6g")
    write_json(RunFolder(run_dir).path("exemplars"), ex)   # last: the exports are complete
    return load_artifacts(run_dir, require_exports=True)


UNITS_COLUMNS = ["role", "rank", "unit", "c", "subset", "n_exemplars", "n_masks", "T_k", "degenerate",
                 "measured_concept", "on_target_vertebra", "on_adjacent_vertebrae", "outside_vertebrae",
                 "collage", "strip"]


def _export_unit(run_dir: Path, folder: Path, art: DissectionArtifacts, role: str, rank: int,
                 unit: int, c: float, sub: str, idx: list[int], feature_maps: list[np.ndarray],
                 feature_masks: list[np.ndarray], nifti_top: int, view: str, names: dict[int, str] | None):
    """One unit's collage, NIfTI files and measured concepts -> (exemplars.json entry,
    units.csv row, unit_concepts.csv rows)."""
    d, samples = art.dissection, art.samples
    T = float(d.T[unit])
    entry = {"role": role, "rank": rank, "c": c, "subset": sub, "samples": idx, "slices": [],
             "collage": f"collages/unit_{unit:03d}_{role}.png",
             "strip": f"collages/unit_{unit:03d}_{role}_top5.png", "nifti": []}
    tiles, overlaps, where, n_masks, short = [], [], [], 0, []
    for j, (i, a, M) in enumerate(zip(idx, feature_maps, feature_masks)):
        row = samples.loc[i]
        ct = _load_patch(run_dir, row["ct_path"])
        up = upsample_to_patch(a, art.field, ct.shape)
        mask = patch_mask(M, art.field, ct.shape)           # M_k of the pass, on the patch
        s = best_slice(up, T, view, mask)
        entry["slices"].append(s)
        short.append((row["level"], d.r[i, unit]))
        tiles.append((take_slice(ct, view, s), take_slice(up, view, s),
                      f"{row['case']} {row['level']}\nr_k = {d.r[i, unit]:.3g}", take_slice(mask, view, s)))
        if j < nifti_top:
            affine = patch_world_affine(run_dir, row["case"], int(row["label"]))
            paths = write_nifti_exemplar(folder / "nifti" / f"unit_{unit:03d}",
                                         f"{j + 1:02d}_{row['case']}_{row['level']}", ct, up, T, affine, mask)
            entry["nifti"].append({kind: p.relative_to(folder).as_posix() for kind, p in paths.items()})
        n_masks += bool(mask.any())
        concepts = _load_patch(run_dir, row.get("concept_path", ""))
        if mask.any() and concepts is not None and names is not None:
            overlaps.append(concept_overlap(mask, concepts, names, art.field))
            vertebrae = _load_patch(run_dir, row.get("mask_path", ""))
            if vertebrae is not None:
                where.append(vertebra_overlap(mask, vertebrae, int(row["label"])))
    ranked = (f"rank {rank} by c_k over true positives (c = {c:.2f})" if role == "tp" else
              f"rank {rank} by c_FP - c_TP (c_FP = {c:.2f})")        # ranking_fp's order (its rank column)
    fig = collage(tiles, T, f"unit {unit}: {ranked}; exemplars: {SUBSET_NAMES[sub]}", view=view)
    atomic_save(folder / entry["collage"], lambda tmp: fig.savefig(tmp, dpi=110), suffix=".png")
    plt.close(fig)
    # the gallery's row (Table 2): drawn at about 40 % of its size there, so short, large captions
    fig = collage([(t[0], t[1], f"{lv}, r_k {r:.3g}", *t[3:]) for t, (lv, r) in zip(tiles[:5], short)], T,
                  rows=1, view=view, fontsize=17)
    atomic_save(folder / entry["strip"], lambda tmp: fig.savefig(tmp, dpi=110), suffix=".png")
    plt.close(fig)
    concept_rows, measured = [], ""
    if overlaps:
        long = pd.concat(overlaps)
        summary = long.groupby("concept")[["fraction", "iou"]].sum() / len(overlaps)   # absent = 0
        summary["share"] = long.groupby("concept")["share"].mean()
        summary["lift"] = summary["fraction"] / summary["share"]
        summary = summary.sort_values("fraction", ascending=False)
        concept_rows = [{"unit": unit, "role": role, "concept": name, "fraction": r["fraction"],
                         "iou": r["iou"], "share": r["share"], "lift": r["lift"], "n_masks": len(overlaps)}
                        for name, r in summary.iterrows()]
        named = summary.drop(index="background", errors="ignore")   # concept 0: no structure
        measured = ", ".join(f"{name} {r['fraction']:.0%} (x{r['lift']:.1f})"
                             for name, r in named.head(3).iterrows())
    w = {key: float(np.mean([x[key] for x in where])) if where else None
         for key in ("target", "adjacent", "outside")}
    row = {"role": role, "rank": rank, "unit": unit, "c": c, "subset": sub, "n_exemplars": len(idx),
           "n_masks": n_masks, "T_k": T, "degenerate": bool(d.flags["degenerate"][unit]),
           "measured_concept": measured, "on_target_vertebra": w["target"],
           "on_adjacent_vertebrae": w["adjacent"], "outside_vertebrae": w["outside"],
           "collage": entry["collage"], "strip": entry["strip"]}
    return entry, row, concept_rows
