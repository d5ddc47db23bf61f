"""The run folder: ``<run>/dissection/`` (notebooks 03 and 04; read by the explorer of notebook 05).

:func:`dissect_run` dissects a run's best checkpoint on one split and writes the artifacts
with their identity (checkpoint, split, q, layer, patch manifest); :func:`load_artifacts`
reads them back and names the notebook to run when one is missing or stale;
:func:`export_units` writes exemplar collages and NIfTI files per unit.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from vfcore.errors import DataValueError, MissingArtifactError, StaleArtifactError, VfcoreError
from vfcore.train import outcome_names

from .capture import activations
from .dissection import Dissection, dissect
from .geometry import (best_slice, concept_overlap, patch_mask, patch_world_affine, upsample_to_patch,
                       vertebra_overlap, write_nifti_exemplar)
from .quantile import Q_TAIL_PAPER, _check_q
from .ranking import (EXEMPLAR_SCORES, SUBSET_NAMES, UndefinedCorrelationError, exemplars,
                      outcomes, rank_false_positives, rank_units)


FORMAT = 1
NOTEBOOK_03 = "notebooks/03_quantile_thresholding.ipynb"
NOTEBOOK_04 = "notebooks/04_correlation_ranking.ipynb"
#: What identifies a dissection: a different value makes every artifact stale.
IDENTITY = ("checkpoint_sha256", "split", "q_tail", "layer", "manifest_sha256")


def dissection_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "dissection"


def network_field(preset) -> tuple[slice, slice, slice]:
    """The part of the 96^3 patch (voxel slices) that the network input of ``preset`` covers:
    the centre ``crop``^3 mm (``vfcore.model.Preset``; paper: ``slice(16, 80)`` per axis)."""
    from vfcore.model import PATCH_SIZE, get_preset

    p = get_preset(preset)
    start = (PATCH_SIZE - p.crop) // 2
    return (slice(start, start + p.crop),) * 3


def _identity_id(identity: Mapping) -> str:
    text = json.dumps({k: identity[k] for k in IDENTITY}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_dissection(d: Dissection, folder: str | Path, labels=None) -> None:
    """``thresholds.npz`` (per unit), ``stats.npz`` (per sample and unit), ``tail.npz`` (the
    masks, sparse), each written atomically."""
    from vfcore.io import atomic_save

    folder = Path(folder)

    def npz(name: str, **arrays):
        atomic_save(folder / name, lambda tmp: np.savez(tmp, **arrays), suffix=".npz")

    npz("thresholds.npz", T=d.T, realised_tail=d.realised_tail, unit_min=d.unit_min,
        unit_max=d.unit_max, zero_fraction=d.zero_fraction, q_tail=np.float64(d.q_tail),
        **{f"flag_{k}": v for k, v in d.flags.items()})
    npz("stats.npz", max=d.max, mean=d.mean, r=d.r, mask_size=d.mask_size,
        probability=d.probability,
        label=np.full(d.n_samples, -1, np.int8) if labels is None else np.asarray(labels, np.int8))
    npz("tail.npz", spatial_shape=np.asarray(d.spatial_shape, np.int64), **d.tail)


def load_dissection(folder: str | Path, layer: str = "", seconds: float = 0.0) -> Dissection:
    """The :class:`Dissection` saved by :func:`save_dissection`."""
    folder = Path(folder)
    with np.load(folder / "thresholds.npz") as t, np.load(folder / "stats.npz") as s, \
            np.load(folder / "tail.npz") as tail:
        flags = {k[5:]: t[k] for k in t.files if k.startswith("flag_")}
        return Dissection(
            layer=layer, q_tail=float(t["q_tail"]), spatial_shape=tuple(int(v) for v in tail["spatial_shape"]),
            T=t["T"], realised_tail=t["realised_tail"], flags=flags, unit_min=t["unit_min"],
            unit_max=t["unit_max"], zero_fraction=t["zero_fraction"], max=s["max"], mean=s["mean"],
            r=s["r"], mask_size=s["mask_size"], probability=s["probability"],
            tail={k: tail[k] for k in ("unit", "sample", "position", "value")}, seconds=seconds)


@dataclass
class DissectionArtifacts:
    """What ``<run>/dissection/`` holds (see docs/architecture.md): ``meta`` (meta.json),
    ``dissection`` (T_k, statistics, masks), ``samples`` (samples.csv), ``ranking_tp`` /
    ``ranking_fp`` (None where c_k is undefined), ``exemplars`` (exemplars.json, None before
    notebook 04), ``units`` (units.csv, None before notebook 04)."""

    folder: Path
    meta: dict
    dissection: Dissection
    samples: pd.DataFrame
    ranking_tp: pd.DataFrame | None
    ranking_fp: pd.DataFrame | None
    exemplars: dict | None = None
    units: pd.DataFrame | None = None

    @property
    def labels(self) -> np.ndarray:
        return self.samples["fracture"].to_numpy(dtype=int)

    @property
    def field(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in self.meta["field"])

    def exemplar_list(self, unit: int, subset: str = "positive") -> list[int]:
        """Sample indices (rows of ``samples``) of a unit's exemplars in ``subset``."""
        if self.exemplars is None:
            raise MissingArtifactError(self.folder / "exemplars.json",
                                       f"no exemplars yet: run {NOTEBOOK_04}")
        entry = self.exemplars["subsets"][subset]["units"].get(str(int(unit)), [])
        return [int(e["sample"]) for e in entry]


def _missing(path: Path, notebook: str, what: str) -> MissingArtifactError:
    return MissingArtifactError(path, f"{what} not found: run {notebook} first")


def load_artifacts(run_dir: str | Path, expect: Mapping | None = None,
                   require_exports: bool = False) -> DissectionArtifacts:
    """Read ``<run>/dissection/``; check it against ``expect`` (any of ``checkpoint_sha256``,
    ``split``, ``q_tail``, ``layer``, ``manifest_sha256``, ``n_samples``).

    Raises :class:`MissingArtifactError` naming the notebook that makes a missing file, and
    :class:`StaleArtifactError` when the artifacts come from other inputs (another checkpoint,
    split, q, layer or patch store), or when notebook 04's exports belong to an earlier
    dissection. ``require_exports``: exemplars.json must exist too.
    """
    folder = dissection_dir(run_dir)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise _missing(meta_path, NOTEBOOK_03, "the dissection (T_k, statistics)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        from vfcore.errors import CorruptFileError
        raise CorruptFileError(meta_path, f"unreadable JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise StaleArtifactError(meta_path, f"format {meta.get('format')} (this vfcore writes "
                                 f"{FORMAT}): run {NOTEBOOK_03} again")
    for key, want in (expect or {}).items():
        if want is None:
            continue
        have = meta.get(key)
        same = math.isclose(float(have), float(want)) if key == "q_tail" and have is not None else have == want
        if not same:
            raise StaleArtifactError(meta_path, f"stale: made with {key} = {have!r}, expected "
                                     f"{want!r}: run {NOTEBOOK_03} again (parameters of this run)")
    for name in ("thresholds.npz", "stats.npz", "tail.npz", "samples.csv"):
        if not (folder / name).is_file():
            raise _missing(folder / name, NOTEBOOK_03, name)
    d = load_dissection(folder, meta["layer"], meta.get("seconds", 0.0))
    samples = pd.read_csv(folder / "samples.csv", dtype={"case": str, "level": str})
    if len(samples) != d.n_samples or d.n_samples != meta["n_samples"]:
        raise StaleArtifactError(folder, f"samples.csv has {len(samples)} rows, stats.npz "
                                 f"{d.n_samples}, meta.json {meta['n_samples']}: run {NOTEBOOK_03} again")
    rankings = {}
    for which in ("tp", "fp"):
        path = folder / f"ranking_{which}.csv"
        if meta["rankings"][which]["defined"]:
            if not path.is_file():
                raise _missing(path, NOTEBOOK_03, path.name)
            rankings[which] = pd.read_csv(path)
        else:
            rankings[which] = None
    exemplars, units = None, None
    ex_path = folder / "exemplars.json"
    if ex_path.is_file():
        exemplars = json.loads(ex_path.read_text())
        if exemplars.get("dissection_id") != meta["dissection_id"]:
            raise StaleArtifactError(ex_path, f"exports of an earlier dissection "
                                     f"({exemplars.get('dissection_id')} != {meta['dissection_id']}): "
                                     f"run {NOTEBOOK_04} again")
        if (folder / "units.csv").is_file():
            units = pd.read_csv(folder / "units.csv")
    elif require_exports:
        raise _missing(ex_path, NOTEBOOK_04, "the exemplars and collages")
    return DissectionArtifacts(folder, meta, d, samples, rankings["tp"], rankings["fp"], exemplars, units)


def _checkpoint_path(run_dir: Path, checkpoint: str | Path | None) -> Path:
    path = Path(checkpoint) if checkpoint is not None else run_dir / "model" / "best.pt"
    if not path.is_file():
        raise _missing(path, "notebooks/02_training.ipynb", "the trained model")
    return path


def _manifest_path(run_dir: Path) -> Path:
    path = run_dir / "patches" / "manifest.csv"
    if not path.is_file():
        raise _missing(path, "notebooks/01_preprocessing.ipynb", "the patch store")
    return path


def _network(checkpoint: Path):
    """(model, its ``vfcore.model.Preset``, transform HU batch -> network input) from a
    checkpoint (``vfcore.train.load_checkpoint``: weights-only, preset stored in it)."""
    from vfcore.data import to_network_input
    from vfcore.train import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    preset = model.preset
    return model, preset, (lambda hu: to_network_input(hu, preset))


@dataclass
class Network:
    """A run's trained network as the notebooks use it: ``model``, ``preset``
    (``vfcore.model.Preset``), ``layer`` (the dissected one: the preset's ``dissect_layer``),
    ``transform`` (int16 HU batch -> network input)."""

    model: torch.nn.Module
    preset: object
    layer: str
    transform: Callable


def load_network(run_dir: str | Path, checkpoint: str | Path | None = None,
                 layer: str | None = None) -> Network:
    """The run's checkpoint (``<run>/model/best.pt``) with its preset's input transform."""
    model, preset, transform = _network(_checkpoint_path(Path(run_dir), checkpoint))
    return Network(model, preset, layer or preset.dissect_layer, transform)


def _samples_table(rows: pd.DataFrame, labels: np.ndarray, d: Dissection, threshold: float) -> pd.DataFrame:
    table = pd.DataFrame({"index": np.arange(d.n_samples)})
    for col in ("case", "label", "level", "grade", "ct_path", "mask_path", "concept_path"):
        if col in rows:
            table[col] = rows[col].to_numpy()
    table["fracture"] = np.asarray(labels, dtype=int)
    table["probability"] = d.probability.astype(np.float64)
    table["prediction"] = (d.probability >= threshold).astype(int)
    table["outcome"] = outcome_names(labels, d.probability, threshold)
    table["n_enabled"] = d.enabled.sum(axis=1)
    return table


def _relative_to(path: Path, root: Path) -> str:
    path, root = Path(path).resolve(), Path(root).resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def write_artifacts(run_dir: str | Path, d: Dissection, identity: Mapping, rows: pd.DataFrame,
                    labels, threshold: float = 0.5, extra: Mapping | None = None) -> Path:
    """Write a dissection's artifacts into ``<run>/dissection/`` (see :func:`dissect_run`):
    arrays, ``samples.csv`` (``rows``: the split's manifest rows, in sample order), the two
    rankings where defined, and ``meta.json`` last (``identity`` + ``extra`` + counts)."""
    from vfcore.io import atomic_write, versions, write_json

    folder = dissection_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(labels, dtype=int)
    save_dissection(d, folder, labels)
    rows = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    samples = _samples_table(rows.reset_index(drop=True), labels, d, threshold)
    with atomic_write(folder / "samples.csv", "w") as f:
        samples.to_csv(f, index=False, lineterminator="\n")
    o = outcomes(labels, d.probability, threshold)
    rankings = {}
    for which, make in (("tp", lambda: rank_units(d, labels, "tp", threshold)),
                        ("fp", lambda: rank_false_positives(d, labels, threshold))):
        try:
            table = make()
        except UndefinedCorrelationError as e:
            (folder / f"ranking_{which}.csv").unlink(missing_ok=True)
            rankings[which] = {"defined": False, "n": 0, "reason": e.problem}
            continue
        with atomic_write(folder / f"ranking_{which}.csv", "w") as f:
            table.to_csv(f, index=False, lineterminator="\n", float_format="%.9g")
        rankings[which] = {"defined": True, "n": int(o[which].sum()), "reason": ""}
    meta = {
        "format": FORMAT, **{k: identity[k] for k in IDENTITY}, "dissection_id": _identity_id(identity),
        "checkpoint": "model/best.pt", "preset": None, "field": None, "patch_shape": [96, 96, 96],
        **(extra or {}),
        "n_samples": d.n_samples, "n_units": d.n_units, "spatial_shape": list(d.spatial_shape),
        "n_values_per_unit": d.n_samples * int(np.prod(d.spatial_shape)),
        "threshold": threshold, "ranking_subset": "tp",
        "counts": {k: int(v.sum()) for k, v in o.items()},
        "rankings": rankings,
        "degenerate": {k: [int(u) for u in np.flatnonzero(v)] for k, v in d.flags.items()},
        "seconds": round(d.seconds, 3),
        "samples_per_second": round(d.n_samples / d.seconds, 2) if d.seconds > 0 else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": versions(),
    }
    write_json(folder / "meta.json", meta)
    return folder


def dissect_run(run_dir: str | Path, split: str = "test", q_tail: float = Q_TAIL_PAPER, *,
                batch_size: int | None = None, checkpoint: str | Path | None = None,
                layer: str | None = None, device: str | None = None, threshold: float = 0.5,
                force: bool = False, progress: bool = True) -> DissectionArtifacts:
    """Notebook 03's step: dissect the run's checkpoint on one split and write the artifacts.

    Writes ``<run>/dissection/``: ``thresholds.npz``, ``stats.npz``, ``tail.npz``,
    ``samples.csv``, ``ranking_tp.csv``, ``ranking_fp.csv`` (when defined), and ``meta.json``
    last (its presence means complete). An earlier dissection with the same identity
    (checkpoint sha256, split, q, layer, patch store) is reused unless ``force``; one with
    another identity is replaced, and notebook 04's exports of it are removed.
    """
    import shutil

    from vfcore.data import load_split
    from vfcore.io import sha256_file

    run_dir = Path(run_dir)
    q_tail = _check_q(q_tail)
    ckpt = _checkpoint_path(run_dir, checkpoint)
    manifest = _manifest_path(run_dir)
    identity = {"checkpoint_sha256": sha256_file(ckpt), "split": split, "q_tail": q_tail,
                "manifest_sha256": sha256_file(manifest)}
    model, preset, transform = _network(ckpt)
    identity["layer"] = layer or preset.dissect_layer
    if not force:
        try:
            return load_artifacts(run_dir, expect=identity)
        except VfcoreError:
            pass
    folder = dissection_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").unlink(missing_ok=True)        # incomplete until meta.json lands
    for old in ("exemplars.json", "units.csv", "unit_concepts.csv", "ranking_tp.csv", "ranking_fp.csv"):
        (folder / old).unlink(missing_ok=True)
    for old in ("collages", "nifti"):
        shutil.rmtree(folder / old, ignore_errors=True)

    patches, labels, rows = load_split(run_dir, split)
    labels = np.asarray(labels, dtype=int)
    if len(labels) == 0:
        raise DataValueError(manifest, f"split {split!r} has no labelled vertebrae")
    if batch_size is None:
        batch_size = 128 if torch.cuda.is_available() and device != "cpu" else 16
    d = dissect(model, patches, identity["layer"], q_tail=q_tail, batch_size=batch_size,
                transform=transform, device=device, progress=progress)
    from vfcore.runtime import pick_device
    write_artifacts(run_dir, d, identity, rows, labels, threshold=threshold, extra={
        "checkpoint": _relative_to(ckpt, run_dir), "preset": preset.name,
        "field": [[s.start, s.stop] for s in network_field(preset)],
        "device": str(pick_device(device)), "batch_size": batch_size})
    return load_artifacts(run_dir, expect=identity)


def _load_patch(run_dir: Path, rel: str) -> np.ndarray | None:
    if not isinstance(rel, str) or not rel:
        return None
    path = run_dir / "patches" / rel
    if not path.is_file():
        raise _missing(path, "notebooks/01_preprocessing.ipynb", "a patch of the store")
    return np.load(path)


def concept_names(run_dir: str | Path) -> dict[int, str] | None:
    """Concept label -> name from the data root's ``concept_labels.json`` (the phantom; the
    root is recorded in ``<run>/patches/report.json``); None for data without concept masks."""
    try:
        report = json.loads((Path(run_dir) / "patches" / "report.json").read_text())
        table = json.loads((Path(report["root"]) / "concept_labels.json").read_text())
        return {int(k): str(v) for k, v in table["labels"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None


class PatchFiles:
    """The int16 HU patches of some samples, read from the patch store when sliced (so a
    forward pass over them never holds more than one batch in memory)."""

    def __init__(self, run_dir: str | Path, rel_paths: Sequence[str]):
        self.run_dir = Path(run_dir)
        self.rel_paths = list(rel_paths)

    def __len__(self) -> int:
        return len(self.rel_paths)

    def __getitem__(self, item):
        if isinstance(item, slice):
            return np.stack([_load_patch(self.run_dir, p) for p in self.rel_paths[item]])
        return _load_patch(self.run_dir, self.rel_paths[item])


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
    import shutil

    from tqdm.auto import tqdm

    from vfcore.io import atomic_write, sha256_file, write_json

    run_dir = Path(run_dir)
    art = load_artifacts(run_dir)
    meta, d, samples = art.meta, art.dissection, art.samples
    ckpt = _checkpoint_path(run_dir, run_dir / meta["checkpoint"])   # absolute stays absolute
    if sha256_file(ckpt) != meta["checkpoint_sha256"]:
        raise StaleArtifactError(art.folder / "meta.json", f"the dissection was made from another "
                                 f"checkpoint than {ckpt}: run {NOTEBOOK_03} again")
    folder = art.folder
    (folder / "exemplars.json").unlink(missing_ok=True)   # incomplete until it is rewritten
    for old in ("collages", "nifti"):
        shutil.rmtree(folder / old, ignore_errors=True)
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
        net_model, _, transform = _network(ckpt)
        A, _ = activations(net_model, PatchFiles(run_dir, samples.loc[union, "ct_path"]), meta["layer"],
                           units=units, batch_size=batch_size, transform=transform, device=device,
                           progress=progress)
        maps = {i: A[j] for j, i in enumerate(union)}
    column = {u: j for j, u in enumerate(units)}
    names = concept_names(run_dir)
    unit_rows, concept_rows = [], []
    for role, rank, unit, c, sub in tqdm(jobs, desc="collages and NIfTI", disable=not progress):
        idx = members[(role, unit)]
        entry, row, concepts = _export_unit(run_dir, folder, art, role, rank, unit, c, sub, idx,
                                            [maps[i][column[unit]] for i in idx],
                                            [d.masks(i, [unit])[0] for i in idx], nifti_top, view, names)
        ex["exported"][f"{role}:{unit}"] = entry
        unit_rows.append(row)
        concept_rows.extend(concepts)
    with atomic_write(folder / "units.csv", "w") as f:
        pd.DataFrame(unit_rows, columns=UNITS_COLUMNS).to_csv(f, index=False, lineterminator="\n",
                                                              float_format="%.6g")
    (folder / "unit_concepts.csv").unlink(missing_ok=True)
    if concept_rows:
        with atomic_write(folder / "unit_concepts.csv", "w") as f:
            pd.DataFrame(concept_rows).to_csv(f, index=False, lineterminator="\n", float_format="%.6g")
    write_json(folder / "exemplars.json", ex)              # last: the exports are complete
    return load_artifacts(run_dir, require_exports=True)


UNITS_COLUMNS = ["role", "rank", "unit", "c", "subset", "n_exemplars", "n_masks", "T_k", "degenerate",
                 "measured_concept", "on_target_vertebra", "on_adjacent_vertebrae", "outside_vertebrae",
                 "collage", "strip"]


def _export_unit(run_dir: Path, folder: Path, art: DissectionArtifacts, role: str, rank: int,
                 unit: int, c: float, sub: str, idx: list[int], feature_maps: list[np.ndarray],
                 feature_masks: list[np.ndarray], nifti_top: int, view: str, names: dict[int, str] | None):
    """One unit's collage, NIfTI files and measured concepts -> (exemplars.json entry,
    units.csv row, unit_concepts.csv rows)."""
    import matplotlib.pyplot as plt

    from vfcore.io import atomic_save
    from vfcore.viz.dissection import collage, take

    d, samples = art.dissection, art.samples
    T = float(d.T[unit])
    entry = {"role": role, "rank": rank, "c": c, "subset": sub, "samples": idx, "slices": [],
             "collage": f"collages/unit_{unit:03d}_{role}.png",
             "strip": f"collages/unit_{unit:03d}_{role}_top5.png", "nifti": []}
    tiles, overlaps, where, n_masks = [], [], [], 0
    for j, (i, a, M) in enumerate(zip(idx, feature_maps, feature_masks)):
        row = samples.loc[i]
        ct = _load_patch(run_dir, row["ct_path"])
        up = upsample_to_patch(a, art.field, ct.shape)
        mask = patch_mask(M, art.field, ct.shape)           # M_k of the pass, on the patch
        s = best_slice(up, T, view, mask)
        entry["slices"].append(s)
        tiles.append((take(ct, view, s), take(up, view, s),
                      f"{row['case']} {row['level']}\nr_k = {d.r[i, unit]:.3g}", take(mask, view, s)))
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
    kind = "true" if role == "tp" else "false"
    fig = collage(tiles, T, f"unit {unit}: rank {rank} by c_k over {kind} positives (c = {c:.2f}); "
                            f"exemplars: {SUBSET_NAMES[sub]}")
    atomic_save(folder / entry["collage"], lambda tmp: fig.savefig(tmp, dpi=110), suffix=".png")
    plt.close(fig)
    fig = collage(tiles[:5], T, rows=1)                    # the gallery's row (Table 2)
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
