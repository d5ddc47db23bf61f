"""What the explorer reads from a run, and one analysed sample.

* :class:`RunData`: the thresholds T_k, c_k and its ranks (Eq. 1), the dissected split with
  its predictions, each unit's exemplars as notebook 04 exported them
  (``DissectionArtifacts.exemplar_list``: the same subset, in the same order, as its
  collages), and a function patch -> activations (one forward pass);
* :class:`Analysis`: one sample's patch, probability, r_k (Eq. 2), top units and their
  :class:`UnitMap` (A_k upsampled to the patch *once*, so a slider step only slices arrays).

:func:`load_run_data` builds a :class:`RunData` from a run folder; whatever is missing, stale
or damaged there becomes a :class:`~vfcore.errors.VfcoreError` that names the file.
"""
from __future__ import annotations

import functools
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from vfcore.analysis.findings import concept_dictionary
from vfcore.dissect import (M_k, SUBSET_NAMES, activations, best_slice, exemplars, load_artifacts,
                            load_network, outcomes, patch_mask, relevance, top_units, upsample_to_patch)
from vfcore.dissect.artifacts import concept_names, default_split, network_field
from vfcore.dissect.geometry import concept_overlap, vertebra_overlap
from vfcore.errors import CorruptFileError, InputError, VfcoreError
from vfcore.io import sha256_file
from vfcore.run import ARTIFACTS, RunFolder
from vfcore.metrics import outcome_names
from vfcore.viz.units import take_slice, unit_rgb

from .concepts import ConceptBook

#: How many units by r_k the explorer lists (paper, Table 3: ten).
TOP_UNITS = 10
#: Exemplars shown per unit (notebook 04 exports 25; one row of five fits the widget).
N_EXEMPLARS = 5
#: On-screen pixels per patch voxel (nearest neighbour): 96 voxels -> 480 px.
SCALE = 5
#: The exemplar subset of notebook 04's collages of the c_k ranking (its default), used
#: when notebook 04 has not exported exemplars yet.
DEFAULT_EXEMPLAR_SUBSET = "positive"


ActivationFn = Callable[[np.ndarray], "tuple[np.ndarray, np.ndarray]"]


@dataclass
class Pool:
    """A list of patches: ``table`` (one row per sample, index 0..N-1 = position in the split)
    and ``load(i)`` giving sample i's int16 HU patch (I, P, L); optionally its vertebra label
    patch (``load_vertebrae``) and ground-truth concept patch (``load_concepts``, phantom only),
    each returning None where a sample has none."""

    table: pd.DataFrame
    load: Callable[[int], np.ndarray]
    load_vertebrae: Callable[[int], np.ndarray | None] | None = None
    load_concepts: Callable[[int], np.ndarray | None] | None = None


@dataclass
class UnitMap:
    """One unit on one patch, ready to slice: ``activation`` = A_k(x) upsampled to the patch
    (trilinear, float32), ``mask`` = M_k(x) = A_k(x) > T_k on the network's grid, each feature
    voxel drawn as the block of the patch it summarises (``vfcore.dissect.patch_mask``, the
    masks notebook 04 shows), ``T`` = T_k, ``low`` / ``high`` = the smallest / largest upsampled
    activation inside the mask (the ends of the colour scale)."""

    activation: np.ndarray
    mask: np.ndarray
    T: float
    low: float
    high: float

    @classmethod
    def from_grid(cls, A: np.ndarray, T: np.ndarray, field_slices, patch_shape) -> list["UnitMap"]:
        """UnitMaps for activations [U, d, h, w] with thresholds T [U] (one per unit)."""
        A = np.asarray(A, dtype=np.float32)
        T = np.asarray(T, dtype=np.float64).reshape(-1)
        up = upsample_to_patch(A, field_slices, patch_shape)
        masks = patch_mask(M_k(A, T, axis=0), field_slices, patch_shape)
        return [cls(u, m, float(t), float(u[m].min()) if m.any() else float(t),
                    float(u[m].max()) if m.any() else float(t))
                for u, m, t in zip(up, masks, T)]

    def render(self, patch: np.ndarray, view: str, index: int, mode: str = "overlay",
               scale: int = SCALE) -> np.ndarray:
        """The RGB picture of slice ``index`` of ``view`` (:func:`vfcore.viz.units.unit_rgb`)."""
        return unit_rgb(take_slice(patch, view, index), take_slice(self.mask, view, index),
                        take_slice(self.activation, view, index), self.low, self.high, mode, scale)

    def best_slice(self, view: str) -> int:
        """The slice with the largest thresholded activation (``vfcore.dissect.best_slice``)."""
        return best_slice(self.activation, self.T, view, mask=self.mask)


@dataclass
class Analysis:
    """One sample seen by the network: everything a slider step needs, precomputed.

    ``maps[k]`` (a :class:`UnitMap`) for the ``top`` units by r_k only (all the explorer shows).
    """

    name: str
    patch: np.ndarray
    probability: float
    relevance: np.ndarray  # r_k(x) for every unit (Eq. 2)
    top: list[int]
    maps: dict[int, UnitMap]
    truth: dict | None = None  # the sample's table row (None for an upload)
    threshold: float = 0.5  # decision threshold on the probability (recorded with the dissection)
    vertebrae: np.ndarray | None = None  # vertebra labels of the patch (None: unknown)
    concept_patch: np.ndarray | None = None  # ground-truth concept labels (phantom only)

    @property
    def prediction(self) -> int:
        return int(self.probability >= self.threshold)

    @property
    def label(self) -> int | None:
        """The target vertebra's label (e.g. 20 = L1); None for an upload."""
        return None if self.truth is None else int(self.truth["label"])


@dataclass
class RunData:
    """What the explorer reads from a run folder (see :meth:`from_run`), or builds in a test.

    ``activations(patches [B, 96, 96, 96] HU) -> (A [B, K, h, w, d], probability [B])`` runs the
    network once; ``field`` is the part of the patch its input covers (activations are
    upsampled onto it).
    """

    thresholds: np.ndarray  # T_k
    c_k: np.ndarray  # correlation with true-positive predictions (Eq. 1), NaN where undefined
    samples: Pool  # the split shown in the sample list (columns below)
    exemplar_pool: Pool  # the split the exemplars index into
    exemplars: dict[int, list[int]]  # unit -> sample indices in exemplar_pool, best first
    activations: ActivationFn
    field: tuple[slice, slice, slice]
    min_input: tuple[int, int, int]  # smallest upload the network can take
    concepts: ConceptBook
    meta: dict = field(default_factory=dict)
    concept_names: dict[int, str] = field(default_factory=dict)  # phantom concept labels
    c_rank: np.ndarray | None = None  # rank by c_k as the dissection wrote it (its tie-breaks)
    exemplar_subsets: dict[int, str] = field(default_factory=dict)  # unit -> subset of its exemplars
    exemplar_source: str = "given"  # "exported" (notebook 04), "computed" (before it) or "given"
    threshold: float = 0.5  # decision threshold of the predictions
    measured_concepts: dict[int, str | None] | None = None  # unit -> concept (notebook 06) or None
    _exemplar_cache: "OrderedDict[int, list]" = field(default_factory=OrderedDict, repr=False)

    #: columns of ``samples.table``: case, level, label, grade, fracture (0/1),
    #: probability, prediction (0/1), outcome (TP/FP/TN/FN)

    @property
    def n_units(self) -> int:
        return int(len(self.thresholds))

    @functools.cached_property
    def rank(self) -> np.ndarray:
        """c_k rank of every unit, 1 = most correlated with true positives: ``c_rank`` (the
        dissection's ranking table) if given, else by c_k, ties by unit (NaN c_k last)."""
        if self.c_rank is not None:
            return np.asarray(self.c_rank, dtype=int)
        c = np.where(np.isfinite(self.c_k), self.c_k, -np.inf)
        order = np.argsort(-c, kind="stable")
        rank = np.empty(len(c), dtype=int)
        rank[order] = np.arange(1, len(c) + 1)
        return rank

    def relevance(self, A: np.ndarray) -> np.ndarray:
        """r_k(x) (Eq. 2) from one sample's activations [K, h, w, d]."""
        return relevance(A, self.thresholds)

    def analyse(self, patch: np.ndarray, name: str, truth: dict | None = None, top: int = TOP_UNITS) -> Analysis:
        """Run the network on one patch; keep r_k and the top units' upsampled maps."""
        A, prob = self.activations(np.asarray(patch)[None])
        A = np.asarray(A)[0]
        r = self.relevance(A)
        order = [int(k) for k in top_units(r, top)]
        maps = UnitMap.from_grid(A[order], self.thresholds[order], self.field, patch.shape)
        return Analysis(name=name, patch=np.asarray(patch), probability=float(np.asarray(prob)[0]),
                        relevance=r, top=order, maps=dict(zip(order, maps)), truth=truth,
                        threshold=self.threshold)

    def analyse_sample(self, index: int, top: int = TOP_UNITS) -> Analysis:
        index = int(index)
        row = self.samples.table.loc[index]
        name = f"{row['case']} {row['level']}"
        a = self.analyse(self.samples.load(index), name, truth=row.to_dict(), top=top)
        if self.samples.load_vertebrae is not None:
            a.vertebrae = self.samples.load_vertebrae(index)
        if self.samples.load_concepts is not None:
            a.concept_patch = self.samples.load_concepts(index)
        return a

    def unit_table(self, a: Analysis) -> pd.DataFrame:
        """The sample's top units: r_k (Eq. 2), c_k (Eq. 1) and its rank, the size of the mask
        M_k on this sample, where it lies (target vertebra / adjacent vertebrae / outside bone,
        if the patch has a vertebra mask), the ground-truth concept it covers most (phantom)
        and the student's concept label."""
        rows = []
        for pos, k in enumerate(a.top, start=1):
            mask = a.maps[k].mask
            row = {"relevance rank": pos, "unit": k, "r_k": float(a.relevance[k]),
                   "c_k": float(self.c_k[k]), "c_k rank": int(self.rank[k]),
                   "mask voxels": int(mask.sum())}
            if a.vertebrae is not None and a.label is not None:
                row.update(vertebra_overlap(mask, a.vertebrae, a.label))
            if a.concept_patch is not None and self.concept_names:
                ov = concept_overlap(mask, a.concept_patch, self.concept_names, field=self.field)
                ov = ov[ov["concept"] != "background"]
                row["mask share (phantom)"] = (f"{ov['concept'].iloc[0]} ({ov['fraction'].iloc[0]:.0%})"
                                          if len(ov) else "")
            row["concept label"] = self.concepts.get(k)["label"]
            rows.append(row)
        return pd.DataFrame(rows).set_index("relevance rank")

    def exemplar_maps(self, unit: int, n: int = N_EXEMPLARS) -> list[tuple[int, np.ndarray, UnitMap]]:
        """(sample index, patch, :class:`UnitMap` of the unit) for its top exemplars (cached)."""
        unit = int(unit)
        if unit in self._exemplar_cache:
            self._exemplar_cache.move_to_end(unit)
            return self._exemplar_cache[unit]
        idx = [int(i) for i in self.exemplars.get(unit, [])[:n]]
        out = []
        if idx:
            patches = np.stack([self.exemplar_pool.load(i) for i in idx])
            A, _ = self.activations(patches)
            maps = UnitMap.from_grid(np.asarray(A)[:, unit], np.full(len(idx), self.thresholds[unit]),
                                     self.field, patches.shape[1:])
            out = list(zip(idx, patches, maps))
        self._exemplar_cache[unit] = out
        while len(self._exemplar_cache) > 3:
            self._exemplar_cache.popitem(last=False)
        return out

    def exemplar_subset(self, unit: int) -> str:
        """What the unit's exemplars are drawn from, in words (e.g. "ground-truth fractures")."""
        sub = self.exemplar_subsets.get(int(unit))
        return SUBSET_NAMES.get(sub, "samples") if sub else "samples"

    def pick(self, outcome: str = "TP") -> int | None:
        """The most confident sample of an outcome (TP/FP: highest probability; TN/FN:
        lowest); None when the split has none."""
        t = self.samples.table
        sub = t[t["outcome"] == outcome]
        if sub.empty:
            return None
        positive = outcome in ("TP", "FP")
        return int(sub["probability"].idxmax() if positive else sub["probability"].idxmin())

    def find(self, key: int | str) -> int:
        """A sample by table index or by ``"<case> <level>"`` (``InputError`` if unknown)."""
        t = self.samples.table
        if isinstance(key, (int, np.integer)):
            if int(key) not in t.index:
                raise InputError(None, f"SAMPLE: no sample {key}; the list has 0..{len(t) - 1}")
            return int(key)
        names = t["case"].astype(str) + " " + t["level"].astype(str)
        hit = np.flatnonzero(names.to_numpy() == str(key))
        if not len(hit):
            raise InputError(None, f"SAMPLE: no sample named {key!r} (write '<case> <level>', e.g. {names.iloc[0]!r})")
        return int(t.index[hit[0]])

    @classmethod
    def from_run(cls, run_dir: str | Path, split: str | None = None, device: str | None = None) -> "RunData":
        """Read a run folder (:func:`load_run_data`): the checkpoint, the dissection artifacts
        (notebooks 03/04) and the patch store (notebook 01).

        Raises :class:`~vfcore.errors.MissingArtifactError` (naming the notebook to run),
        :class:`~vfcore.errors.StaleArtifactError` (dissection of another checkpoint) or
        :class:`~vfcore.errors.CorruptFileError` (a damaged artifact, named).
        """
        return load_run_data(run_dir, split=split, device=device)


def outcome(label: int, prediction: int) -> str:
    """TP/FP/TN/FN of one prediction (0/1) against its label."""
    return str(outcome_names([label], [prediction])[0])


def damaged_artifact(folder: Path, exc: Exception) -> VfcoreError:
    """The error for a dissection folder that exists but cannot be read (a truncated
    ``thresholds.npz``, a cut CSV, ...): the first file that fails to load is named."""
    how = f"run {ARTIFACTS['dissection'].notebook} again"
    files = sorted(folder.glob("*.npz")) + sorted(folder.glob("*.csv")) + sorted(folder.glob("*.json"))
    for path in files:
        try:
            if path.suffix == ".npz":
                with np.load(path, allow_pickle=False) as z:
                    for key in z.files:
                        z[key]
            elif path.suffix == ".csv":
                pd.read_csv(path)
            else:
                json.loads(path.read_text())
        except Exception as bad:  # noqa: BLE001 - any failure to read is "damaged"
            return CorruptFileError(path, f"damaged or truncated ({type(bad).__name__}: {bad}): {how}")
    return CorruptFileError(folder, f"the dissection could not be read ({type(exc).__name__}: {exc}): {how}")


def exported_exemplars(art, n_units: int) -> tuple[dict[int, list[int]], dict[int, str], str]:
    """(unit -> exemplar sample indices, unit -> subset, source) as notebook 04 shows them.

    With ``exemplars.json`` (notebook 04): each unit's list from the subset of its collage
    (a unit exported for the c_k ranking: that collage's subset; for the false-positive
    ranking only: ``fp``; any other unit: the subset of the c_k ranking's collages), in the
    exported order. Before notebook 04: the same lists computed from the dissection
    (``vfcore.dissect.exemplars`` by r_k among the ground-truth fractures, notebook 04's
    default)."""
    if art.exemplars is None:
        d = art.dissection
        o = outcomes(art.labels, d.probability, art.meta.get("threshold", 0.5))
        lists = exemplars(d, o[DEFAULT_EXEMPLAR_SUBSET], k=25, by="r")
        return ({int(u): [int(i) for i in v] for u, v in lists.items()},
                {u: DEFAULT_EXEMPLAR_SUBSET for u in range(n_units)}, "computed")
    exported = art.exemplars.get("exported", {})
    subsets: dict[int, str] = {}
    for key, entry in sorted(exported.items(), key=lambda kv: not kv[0].startswith("tp:")):
        subsets.setdefault(int(key.split(":")[1]), entry["subset"])
    default = next((e["subset"] for k, e in exported.items() if k.startswith("tp:")), DEFAULT_EXEMPLAR_SUBSET)
    subsets = {u: subsets.get(u, default) for u in range(n_units)}
    return {u: art.exemplar_list(u, subsets[u]) for u in range(n_units)}, subsets, "exported"


def load_run_data(run_dir: str | Path, split: str | None = None, device: str | None = None) -> RunData:
    """:meth:`RunData.from_run`: the run's network and dissection, checked against each other.

    ``split`` None: the run's default dissection set (:func:`vfcore.dissect.artifacts.default_split`)."""
    run = RunFolder(run_dir)
    manifest = run.require("manifest")
    checkpoint = run.require("checkpoint")
    net = load_network(run.root)
    checkpoint_sha = sha256_file(checkpoint)
    if split is None:
        split = default_split(run.root)
    try:
        art = load_artifacts(run.root, expect={
            "checkpoint_sha256": checkpoint_sha, "split": split, "layer": net.layer,
            "manifest_sha256": sha256_file(manifest)})
    except VfcoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged file must become a message naming it
        raise damaged_artifact(run.dissection, exc) from None
    d = art.dissection
    c_k, c_rank = np.full(d.n_units, np.nan), None
    if art.ranking_tp is not None:  # rank 1 = largest c_k; ties as notebook 04 shows them
        units = art.ranking_tp["unit"].to_numpy(dtype=int)
        c_k[units] = art.ranking_tp["c_k"].to_numpy(dtype=float)
        c_rank = np.full(d.n_units, d.n_units, dtype=int)
        c_rank[units] = art.ranking_tp["rank"].to_numpy(dtype=int)
    table = art.samples.copy()
    table.index = pd.RangeIndex(len(table))

    def loader(column: str, required: bool):
        paths = table[column] if column in table else pd.Series([""] * len(table))

        def load(i: int):
            rel = paths.iloc[int(i)]
            if not isinstance(rel, str) or not rel:
                if required:
                    raise run.missing("manifest", run.manifest)
                return None
            return np.load(run.patch(rel), allow_pickle=False)
        return load

    pool = Pool(table=table, load=loader("ct_path", True), load_vertebrae=loader("mask_path", False),
                load_concepts=loader("concept_path", False))

    def run_network(patches: np.ndarray):
        return activations(net.model, patches, net.layer, transform=net.transform, device=device,
                           batch_size=8)

    field_slices = art.field if art.meta.get("field") else network_field(net.preset)
    meta = {k: art.meta.get(k) for k in ("split", "layer", "q_tail", "preset", "n_samples", "dissection_id")}
    meta["checkpoint_sha256"] = checkpoint_sha
    if art.ranking_tp is None:
        meta["c_k_problem"] = art.meta["rankings"]["tp"]["reason"]
    lists, subsets, source = exported_exemplars(art, d.n_units)
    return RunData(
        thresholds=np.asarray(d.T, dtype=np.float64), c_k=c_k, samples=pool, exemplar_pool=pool,
        exemplars=lists, activations=run_network,
        field=tuple(field_slices), min_input=tuple(s.stop - s.start for s in field_slices),
        concepts=ConceptBook.load(run.concepts, checkpoint_sha, net.layer),
        meta=meta, concept_names=concept_names(run.root) or {}, c_rank=c_rank,
        exemplar_subsets=subsets, exemplar_source=source,
        threshold=float(art.meta.get("threshold", 0.5)),
        measured_concepts=_measured_concepts(run),
    )


def _measured_concepts(run: RunFolder) -> dict[int, str | None] | None:
    """unit -> the concept it detects, as notebook 06 measured it on the phantom. Optional:
    notebook 05 never needs a later notebook's output; before notebook 06 has run (or when its
    table cannot be read) this is None and the explorer names units by the student's labels,
    saying that it shows the measured concepts once notebook 06 has run. A table older than the
    dissection (``dissection/meta.json``: notebook 06 ran on an earlier network) is not used."""
    path, meta = run.path("alignment_units"), run.path("dissection_meta")
    try:
        if not path.is_file() or (meta.is_file() and path.stat().st_mtime < meta.stat().st_mtime):
            return None
        return concept_dictionary(pd.read_csv(path))
    except (OSError, ValueError, KeyError, AttributeError):
        return None
