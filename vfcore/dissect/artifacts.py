"""The dissection's artifacts in the run folder (``RunFolder.dissection``; written by notebook
03, completed by notebook 04's exports, read by the explorer of notebook 05).

:func:`dissect_run` dissects a run's best checkpoint on a dissection set (one split or a union
of held-out splits, e.g. ``"test+dissect"``) and writes the artifacts with their identity
(checkpoint, split, q, layer, patch manifest); :func:`load_artifacts`
reads them back and names the notebook to run when one is missing or stale. The exemplar
collages and NIfTI files are written by :func:`vfcore.export.export_units` (a layer above
``vfcore.viz``: this package draws nothing).
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from vfcore.checkpoint import load_checkpoint
from vfcore.constants import DISSECT_SPLIT, PATCH_SIZE  # DISSECT_SPLIT: scans written only for dissection
from vfcore.data import SPLITS, PatchArray, read_store, to_network_input
from vfcore.distributed import barrier, broadcast, world
from vfcore.errors import (CorruptFileError, DataValueError, MissingArtifactError, StaleArtifactError,
                           VfcoreError)
from vfcore.io import atomic_save, atomic_write, sha256_file, versions, write_json
from vfcore.metrics import outcome_names
from vfcore.lock import writes
from vfcore.model import get_preset
from vfcore.provenance import check_dissection
from vfcore.run import ARTIFACTS, RunFolder, notebook_path
from vfcore.runtime import pick_device

from .dissection import Dissection, check_layer, dissect
from .quantile import Q_TAIL_PAPER, _check_q
from .sharded import dissect_sharded
from .ranking import (BOOTSTRAP_B, BOOTSTRAP_SEED, UndefinedCorrelationError, outcomes,
                      rank_false_positives, rank_units, ranking_summary)


FORMAT = 1
NOTEBOOK_03 = notebook_path("thresholds")
NOTEBOOK_04 = notebook_path("ranking")
#: What identifies a dissection: a different value makes every artifact stale.
#: ``precision``: of the activations the pass computed (always ``"fp32"``: an earlier dissection
#: made under autocast is not reused).
IDENTITY = ("checkpoint_sha256", "split", "q_tail", "layer", "manifest_sha256", "precision")


def split_names() -> tuple[str, ...]:
    """The split names a dissection set may combine, in their canonical order: the patch
    store's splits (``vfcore.data.SPLITS``) and :data:`DISSECT_SPLIT`."""
    return tuple(SPLITS) + tuple(s for s in (DISSECT_SPLIT,) if s not in SPLITS)


def parse_split(split: str | Sequence[str]) -> tuple[str, ...]:
    """The splits of a dissection set: ``"test"``, ``"test+dissect"`` or ``("test", "dissect")``
    -> ``("test", "dissect")`` (canonical order, no repeats); an unknown name ->
    :class:`DataValueError`."""
    names = split.split("+") if isinstance(split, str) else [str(s) for s in split]
    names = [n.strip() for n in names]
    known = split_names()
    unknown = [n for n in names if n not in known]
    if not names or unknown or "" in names:
        raise DataValueError(None, f"split {split!r}: unknown split {unknown or names}; choose one of "
                             f"{known} or several joined by '+', e.g. 'test+{DISSECT_SPLIT}'")
    return tuple(s for s in known if s in names)


def split_name(split: str | Sequence[str]) -> str:
    """The canonical name of a dissection set, as recorded in meta.json: ``"test+dissect"``."""
    return "+".join(parse_split(split))


def _labelled(manifest: pd.DataFrame) -> pd.Series:
    return pd.to_numeric(manifest["fracture"], errors="coerce").isin([0, 1])


def default_split(run_dir: str | Path) -> str:
    """The held-out dissection set of a run: ``"test+dissect"`` when the patch store has
    labelled vertebrae in the ``dissect`` split (scans written only for dissection), else
    ``"test"``. Never the training split."""
    manifest = read_store(run_dir)
    has = (manifest["split"] == DISSECT_SPLIT) & _labelled(manifest)
    return split_name(("test", DISSECT_SPLIT)) if has.any() else "test"


def load_dissection_set(run_dir: str | Path, split: str | Sequence[str]):
    """The labelled vertebrae of a dissection set: (patches [N, 96, 96, 96] int16 HU, lazy
    ``vfcore.data.PatchArray``; labels [N] 0/1; manifest rows with a fresh index 0..N-1).
    Rows come split by split in canonical order (:func:`parse_split`), each in manifest order;
    rows without a label (``x``, ungraded) are left out, as in ``vfcore.data.load_split``."""
    manifest = read_store(run_dir)
    keep = _labelled(manifest)
    rows = pd.concat([manifest[(manifest["split"] == s) & keep] for s in parse_split(split)],
                     ignore_index=True)
    labels = pd.to_numeric(rows["fracture"]).to_numpy(dtype=np.int64)
    return PatchArray.of(run_dir, rows["ct_path"]), labels, rows


def dissection_dir(run_dir: str | Path) -> Path:
    """The run's dissection folder (``RunFolder(run_dir).dissection``)."""
    return RunFolder(run_dir).dissection


def network_field(preset) -> tuple[slice, slice, slice]:
    """The part of the 96^3 patch (voxel slices) that the network input of ``preset`` covers:
    the centre ``crop``^3 mm (``vfcore.model.Preset``; paper: ``slice(16, 80)`` per axis)."""
    p = get_preset(preset)
    start = (PATCH_SIZE - p.crop) // 2
    return (slice(start, start + p.crop),) * 3


def _identity_id(identity: Mapping) -> str:
    identity = {"precision": "fp32", **identity}
    text = json.dumps({k: identity[k] for k in IDENTITY}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_dissection(d: Dissection, folder: str | Path, labels=None) -> None:
    """``thresholds.npz`` (per unit), ``stats.npz`` (per sample and unit), ``tail.npz`` (the
    masks, sparse), each written atomically."""
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


def _npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file; a truncated or damaged one -> :class:`CorruptFileError`."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise CorruptFileError(path, f"unreadable arrays ({type(err).__name__}: truncated or "
                               f"damaged): run {NOTEBOOK_03} again") from None


def load_dissection(folder: str | Path, layer: str = "", seconds: float = 0.0) -> Dissection:
    """The :class:`Dissection` saved by :func:`save_dissection`."""
    folder = Path(folder)
    t, s, tail = (_npz(folder / name) for name in ("thresholds.npz", "stats.npz", "tail.npz"))
    try:
        flags = {k[5:]: t[k] for k in t if k.startswith("flag_")}
        return Dissection(
            layer=layer, q_tail=float(t["q_tail"]), spatial_shape=tuple(int(v) for v in tail["spatial_shape"]),
            T=t["T"], realised_tail=t["realised_tail"], flags=flags, unit_min=t["unit_min"],
            unit_max=t["unit_max"], zero_fraction=t["zero_fraction"], max=s["max"], mean=s["mean"],
            r=s["r"], mask_size=s["mask_size"], probability=s["probability"],
            tail={k: tail[k] for k in ("unit", "sample", "position", "value")}, seconds=seconds)
    except KeyError as err:
        raise CorruptFileError(folder, f"a dissection array is missing ({err}): run {NOTEBOOK_03} again") from None


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

    def ranking_status(self, which: str = "tp") -> str:
        """What to print above the ``"tp"`` or ``"fp"`` ranking: the reason it is undefined,
        the small-n warning, or "" when it stands on at least MIN_RANKING_N samples."""
        info = self.meta.get("rankings", {}).get(which, {})
        if not info.get("defined", False):
            return info.get("reason", "") or f"no {which} ranking"
        return info.get("note", "")

    @property
    def reasons(self) -> dict[str, str]:
        """``{"tp": reason, "fp": reason}``: why a ranking is undefined ("" where defined)."""
        return {w: ("" if i.get("defined") else i.get("reason", "")) for w, i in self.meta["rankings"].items()}

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
    ``split`` (any spelling :func:`parse_split` reads; None = any), ``q_tail``, ``layer``,
    ``manifest_sha256``, ``n_samples``). A ranking where c_k is undefined (no TP, no FP) is
    None, with the reason in ``meta["rankings"][which]["reason"]`` (:meth:`DissectionArtifacts.ranking_status`).

    Raises :class:`MissingArtifactError` naming the notebook that makes a missing file, and
    :class:`StaleArtifactError` when the artifacts come from other inputs (another checkpoint,
    split, q, layer or patch store), or when notebook 04's exports belong to an earlier
    dissection; without ``expect`` too, when the checkpoint or manifest in the run folder now
    differs from the recorded one (retrained or rebuilt since: ``vfcore.provenance``).
    ``require_exports``: exemplars.json must exist too.
    """
    run = RunFolder(run_dir)
    folder = run.dissection
    meta_path = run.require("dissection_meta")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise CorruptFileError(meta_path, f"unreadable JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise StaleArtifactError(meta_path, f"format {meta.get('format')} (this vfcore writes "
                                 f"{FORMAT}): run {NOTEBOOK_03} again")
    for key, want in (expect or {}).items():
        if want is None:
            continue
        have = meta.get(key)
        if key == "split":
            want = split_name(want)
        numeric = key in ("q_tail", "threshold") and have is not None
        same = math.isclose(float(have), float(want)) if numeric else have == want
        if not same:
            raise StaleArtifactError(meta_path, f"stale: made with {key} = {have!r}, expected "
                                     f"{want!r}: run {NOTEBOOK_03} again (parameters of this run)")
    check_dissection(run, meta, meta_path)   # the checkpoint and manifest there now (provenance)
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
    ex_path = run.path("exemplars")
    if ex_path.is_file():
        exemplars = json.loads(ex_path.read_text())
        if exemplars.get("dissection_id") != meta["dissection_id"]:
            raise StaleArtifactError(ex_path, f"exports of an earlier dissection "
                                     f"({exemplars.get('dissection_id')} != {meta['dissection_id']}): "
                                     f"run {NOTEBOOK_04} again")
        if (folder / "units.csv").is_file():
            units = pd.read_csv(folder / "units.csv")
    elif require_exports:
        raise run.missing("exemplars")
    return DissectionArtifacts(folder, meta, d, samples, rankings["tp"], rankings["fp"], exemplars, units)


def checkpoint_path(run_dir: str | Path, checkpoint: str | Path | None = None) -> Path:
    """``checkpoint``, or the run's checkpoint; :class:`MissingArtifactError` naming notebook
    02 when it does not exist."""
    run = RunFolder(run_dir)
    path = Path(checkpoint) if checkpoint is not None else run.checkpoint
    if not path.is_file():
        raise run.missing("checkpoint", path)
    return path


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
    """The run's checkpoint (``RunFolder.checkpoint``, or ``checkpoint``; read weights-only by
    ``vfcore.checkpoint.load_checkpoint``, the preset stored in it) with its preset's input
    transform; ``layer`` None: the preset's ``dissect_layer``."""
    model, _ = load_checkpoint(checkpoint_path(run_dir, checkpoint))
    preset = model.preset
    return Network(model, preset, layer or preset.dissect_layer, lambda hu: to_network_input(hu, preset))


def _samples_table(rows: pd.DataFrame, labels: np.ndarray, d: Dissection, threshold: float) -> pd.DataFrame:
    table = pd.DataFrame({"index": np.arange(d.n_samples)})
    for col in ("case", "label", "level", "grade", "split", "out_of_field", "ct_path", "mask_path",
                "concept_path"):
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
                    labels, threshold: float = 0.5, extra: Mapping | None = None,
                    B: int = BOOTSTRAP_B, seed: int = BOOTSTRAP_SEED) -> Path:
    """Write a dissection's artifacts into ``<run>/dissection/`` (see :func:`dissect_run`):
    arrays, ``samples.csv`` (``rows``: the set's manifest rows, in sample order), the two
    rankings where defined (c_k intervals from ``B`` bootstrap resamples, ``seed``), and
    ``meta.json`` last (``identity`` + ``extra`` + counts + per ranking ``defined``, ``n``,
    ``reason``, ``small_n``, ``note``, ``ties``, ``bootstrap``)."""
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
    for which, make in (("tp", lambda: rank_units(d, labels, "tp", threshold, B, seed)),
                        ("fp", lambda: rank_false_positives(d, labels, threshold, B, seed))):
        try:
            table = make()
        except UndefinedCorrelationError as e:
            (folder / f"ranking_{which}.csv").unlink(missing_ok=True)
            rankings[which] = {"defined": False, "n": 0, "reason": e.problem, "small_n": True,
                               "note": e.problem}
            continue
        with atomic_write(folder / f"ranking_{which}.csv", "w") as f:
            table.to_csv(f, index=False, lineterminator="\n", float_format="%.9g")
        key = "c_k" if which == "tp" else ("delta" if o["tp"].any() else "c_fp")
        rankings[which] = {"defined": True, "reason": "", **ranking_summary(table, key, which),
                           "bootstrap": _bootstrap(B, seed)}
    meta = {
        "format": FORMAT, **{k: {"precision": "fp32", **identity}[k] for k in IDENTITY}, "dissection_id": _identity_id(identity),
        "checkpoint": ARTIFACTS["checkpoint"].rel, "preset": None, "field": None,
        "patch_shape": [PATCH_SIZE] * 3,
        **(extra or {}),
        "n_samples": d.n_samples, "n_units": d.n_units, "spatial_shape": list(d.spatial_shape),
        "n_values_per_unit": d.n_samples * int(np.prod(d.spatial_shape)),
        "threshold": threshold, "ranking_subset": "tp", "bootstrap": _bootstrap(B, seed),
        "splits": list(parse_split(identity["split"])),
        "counts": {k: int(v.sum()) for k, v in o.items()},
        "split_counts": _split_counts(samples),
        "rankings": rankings,
        "degenerate": {k: [int(u) for u in np.flatnonzero(v)] for k, v in d.flags.items()},
        "seconds": round(d.seconds, 3),
        "samples_per_second": round(d.n_samples / d.seconds, 2) if d.seconds > 0 else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": versions(),
    }
    write_json(RunFolder(run_dir).path("dissection_meta"), meta)
    return folder


def _bootstrap(B: int, seed: int) -> dict:
    """How the c_k intervals were made (meta.json ``bootstrap``)."""
    return {"B": int(B), "seed": int(seed), "level": 0.95, "method": "percentile"}


def _split_counts(samples: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Per split of the set: vertebrae, fractures and TP/FP/TN/FN (samples.csv's columns)."""
    if "split" not in samples:
        return {}
    out = {}
    for name, group in samples.groupby("split", sort=False):
        counts = group["outcome"].value_counts()
        out[str(name)] = {"n": len(group), "positive": int(group["fracture"].sum()),
                          **{k.lower(): int(counts.get(k, 0)) for k in ("TP", "FP", "TN", "FN")}}
    return out


@writes("vfcore dissect (dissect_run)")
def dissect_run(run_dir: str | Path, split: str | Sequence[str] | None = None,
                q_tail: float = Q_TAIL_PAPER, *, batch_size: int | None = None,
                checkpoint: str | Path | None = None, layer: str | None = None,
                device: str | None = None, threshold: float = 0.5, force: bool = False,
                progress: bool = True, B: int = BOOTSTRAP_B, seed: int = BOOTSTRAP_SEED) -> DissectionArtifacts:
    """Notebook 03's step: dissect the run's checkpoint on a dissection set and write the artifacts.

    ``split``: one split (``"test"``), a union as ``"test+dissect"`` or ``("test", "dissect")``
    (recorded in meta.json as the canonical ``"test+dissect"``, with ``splits`` and
    ``split_counts``), or None = :func:`default_split` (the held-out union when the store has
    a ``dissect`` split, else ``"test"``). A set without true or false positives still runs:
    that ranking is absent and meta.json says why. A layer without a grid to dissect raises
    :class:`~vfcore.dissect.dissection.LayerGridError` naming the preset, layer and shape,
    before anything is removed.

    Writes ``<run>/dissection/``: ``thresholds.npz``, ``stats.npz``, ``tail.npz``,
    ``samples.csv``, ``ranking_tp.csv``, ``ranking_fp.csv`` (when defined), and ``meta.json``
    last (its presence means complete). An earlier dissection with the same identity
    (checkpoint sha256, split, q, layer, patch store) is reused unless ``force``; one with
    another identity is replaced, and notebook 04's exports of it are removed.

    With one process the pass is the core's :func:`~vfcore.dissect.dissection.dissect` and no
    collective runs. Under ``torchrun`` (:func:`vfcore.distributed.init` called first, world
    size > 1) the pass is :func:`~vfcore.dissect.sharded.dissect_sharded` (each rank a share;
    T_k and everything after it bit for bit those of one process); rank 0 decides on reuse and
    alone writes the artifacts while the others wait at a barrier; every rank returns them.
    """
    run_dir = Path(run_dir)
    q_tail = _check_q(q_tail)
    ckpt = checkpoint_path(run_dir, checkpoint)
    manifest = RunFolder(run_dir).require("manifest")
    split = split_name(default_split(run_dir) if split is None else split)
    identity = {"checkpoint_sha256": sha256_file(ckpt), "split": split, "q_tail": q_tail,
                "manifest_sha256": sha256_file(manifest), "precision": "fp32"}
    net = load_network(run_dir, ckpt, layer)
    model, preset, transform = net.model, net.preset, net.transform
    identity["layer"] = net.layer
    w = world()                   # rank and size: a world of one without torchrun
    ranks = w.size > 1
    earlier = None
    if not force and w.is_main:   # reused only when made with this threshold and bootstrap
        try:
            earlier = load_artifacts(run_dir, expect={**identity, "threshold": threshold,
                                                      "bootstrap": _bootstrap(B, seed)})
        except VfcoreError:
            pass
    reuse = earlier is not None
    if ranks:                     # every rank follows rank 0's decision
        flag = torch.tensor([float(reuse)], device=w.device)
        reuse = bool(broadcast(flag, "broadcasting rank 0's decision to reuse the dissection").item())
    if reuse:
        return earlier if earlier is not None else load_artifacts(run_dir, expect=identity)
    patches, labels, rows = load_dissection_set(run_dir, split)
    labels = np.asarray(labels, dtype=int)
    if len(labels) == 0:
        raise DataValueError(manifest, f"split {split!r} has no labelled vertebrae")
    check_layer(model, identity["layer"], patches[:1], transform, where=f"preset {preset.name!r}")
    if batch_size is None:
        batch_size = 128 if torch.cuda.is_available() and device != "cpu" else 16
    # the one pass: with one process the core's dissect(); under torchrun each rank runs its
    # share and every rank gets the merged Dissection, identical to dissect()'s
    run_pass = dissect_sharded if ranks else dissect
    d = run_pass(model, patches, identity["layer"], q_tail=q_tail, batch_size=batch_size,
                 transform=transform, device=device, progress=progress)
    folder = dissection_dir(run_dir)
    if w.is_main:                 # one writer: rank 0; the old set is kept until the pass is done
        folder.mkdir(parents=True, exist_ok=True)
        RunFolder(run_dir).path("dissection_meta").unlink(missing_ok=True)   # incomplete until it lands
        for old in ("exemplars.json", "units.csv", "unit_concepts.csv", "ranking_tp.csv", "ranking_fp.csv"):
            (folder / old).unlink(missing_ok=True)
        for old in ("collages", "nifti"):
            shutil.rmtree(folder / old, ignore_errors=True)
        write_artifacts(run_dir, d, identity, rows, labels, threshold=threshold, extra={
            "checkpoint": _relative_to(ckpt, run_dir), "preset": preset.name,
            "field": [[s.start, s.stop] for s in network_field(preset)],
            "device": str(pick_device(device)), "batch_size": batch_size, "processes": w.size},
            B=B, seed=seed)
    if ranks:
        barrier("waiting for rank 0 to write the dissection's artifacts")
    return load_artifacts(run_dir, expect=identity)


def concept_names(run_dir: str | Path) -> dict[int, str] | None:
    """Concept label -> name from the data root's ``concept_labels.json`` (the phantom; the
    root is recorded in ``<run>/patches/report.json``); None for data without concept masks."""
    try:
        report = json.loads(RunFolder(run_dir).path("patch_report").read_text())
        table = json.loads((Path(report["root"]) / "concept_labels.json").read_text())
        return {int(k): str(v) for k, v in table["labels"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None


