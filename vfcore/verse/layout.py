"""Where VerSe-layout files are and what their names mean: vertebra levels, cases.

VerSe (Sekuboyina et al. 2021; Löffler et al. 2020) stores each scan in a BIDS-like layout::

    <root>/rawdata/<sub>[/ses-*]/<stem>_ct.nii.gz
    <root>/derivatives/<sub>[/ses-*]/<stem>_seg-vert_msk.nii.gz
    <root>/derivatives/<sub>[/ses-*]/<stem>_seg-subreg_ctd.json   (VerSe'19: _seg-vb_ctd.json)

Files are found by walking the tree, so the same code reads the phantom, VerSe'19, VerSe'20,
flat folders of loose files (like the test fixtures) and clinical data with session folders.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from vfcore.errors import EmptyRootError, FormatError, LabelError

# --------------------------------------------------------------------------------------------
# Levels
# --------------------------------------------------------------------------------------------

#: VerSe vertebra labels: 1-7 C1-C7, 8-19 T1-T12, 20-25 L1-L6 (L6 transitional), 28 T13.
LEVEL_NAMES: dict[int, str] = {
    **{i: f"C{i}" for i in range(1, 8)},
    **{i: f"T{i - 7}" for i in range(8, 20)},
    **{i: f"L{i - 19}" for i in range(20, 26)},
    28: "T13",
}
#: Level name -> label (inverse of :data:`LEVEL_NAMES`).
LEVEL_LABELS: dict[str, int] = {name: label for label, name in LEVEL_NAMES.items()}
#: Labels a vertebra mask may hold (0 = background).
VERTEBRA_LABELS: frozenset[int] = frozenset({0, *LEVEL_NAMES})
#: Labels of a subregion mask (``_seg-subreg_msk``): 41-49 posterior parts, 50 vertebral body.
SUBREG_LABELS: frozenset[int] = frozenset({0, *range(41, 51)})
#: Subregion label of the vertebral body.
SUBREG_BODY = 50

_CRANIOCAUDAL = [*range(1, 20), 28, *range(20, 26)]
_RANK = {label: i for i, label in enumerate(_CRANIOCAUDAL)}


def level_name(label: int) -> str:
    """``8 -> "T1"``, ``28 -> "T13"``; :class:`LabelError` for labels VerSe does not define."""
    try:
        return LEVEL_NAMES[int(label)]
    except (KeyError, ValueError, TypeError):
        raise LabelError(None, f"vertebra label {label!r} is not a VerSe label "
                               "(1-7 C1-C7, 8-19 T1-T12, 20-25 L1-L6, 28 T13)") from None


def craniocaudal(labels: Iterable[int]) -> list[int]:
    """Sort vertebra labels from head to feet: 1..19, then T13 (28), then 20..25."""
    labels = [int(label) for label in labels]
    for label in labels:
        level_name(label)  # raises LabelError for unknown labels
    return sorted(labels, key=_RANK.__getitem__)



def _ranges(values: Iterable[int]) -> str:
    """``{0, 1, 2, 3, 28}`` -> ``"0-3, 28"``."""
    values = sorted(values)
    runs = [[values[0], values[0]]]
    for v in values[1:]:
        if v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs)



# --------------------------------------------------------------------------------------------
# Finding cases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One scan's files in a VerSe-layout root (any of them may be missing: ``None``).

    ``case_id`` is the file stem without the ``seg-*`` entity and suffix, e.g.
    ``sub-verse408_split-verse223``; ``patient`` is its ``sub-`` entity (``sub-verse408``), the
    unit of patient-level splits; ``release_split`` is ``training``/``validation``/``test``
    when the files sit under a VerSe release folder (``dataset-verse19training``,
    ``dataset-02validation``, ...).
    """

    case_id: str
    patient: str
    ct: Path | None = None
    mask: Path | None = None
    centroids: Path | None = None
    subreg: Path | None = None
    concepts: Path | None = None
    session: str | None = None
    release_split: str | None = None


_RELEASE = re.compile(r"^dataset-(?:verse\d\d|\d\d)(training|validation|test)$")
_NIFTI_EXT = (".nii.gz", ".nii")
# Which kind of file a (suffix, seg entity) pair is; centroids prefer seg-subreg over seg-vb.
_CTD_PREFERENCE = {"subreg": 0, "vb": 1}


def _parse_name(name: str) -> tuple[str, dict[str, str], str, str] | None:
    """Split a BIDS-like file name into (stem, entities, suffix, extension); None otherwise.

    ``sub-ct_seg-vert_label-22_msk.nii.gz`` -> (``sub-ct_label-22``, {sub, seg, label}, ``msk``,
    ``.nii.gz``): the ``seg-`` entity is dropped from the stem wherever it stands.
    """
    for ext in (*_NIFTI_EXT, ".json"):
        if name.endswith(ext):
            break
    else:
        return None
    parts = name[: -len(ext)].split("_")
    if len(parts) < 2:
        return None
    *entities, suffix = parts
    pairs = {}
    for part in entities:
        key, sep, value = part.partition("-")
        if not sep or not key or not value:
            return None
        pairs[key] = value
    stem = "_".join(p for p in entities if not p.startswith("seg-"))
    return stem, pairs, suffix, ext


def _kind(pairs: dict[str, str], suffix: str, ext: str) -> str | None:
    seg = pairs.get("seg")
    if ext in _NIFTI_EXT:
        if suffix == "ct" and seg is None:
            return "ct"
        if suffix == "msk":
            return {"vert": "mask", "subreg": "subreg", "concept": "concepts"}.get(seg)
    elif suffix == "ctd":
        return "centroids"
    return None


def _dataset_root(path: Path, root: Path) -> Path:
    """The folder holding ``rawdata``/``derivatives`` above ``path``, else ``path``'s folder."""
    for parent in path.parents:
        if parent.name in ("rawdata", "derivatives"):
            return parent.parent
        if parent == root:
            break
    return path.parent


def find_cases(root: str | os.PathLike, *, require_ct: bool = True) -> list[Case]:
    """Walk ``root`` (any depth) and group CT, masks and centroid files into :class:`Case` s.

    Files of one scan share a stem and sit under the same dataset folder (the parent of
    ``rawdata``/``derivatives``, or one flat folder). By default only cases with a CT are
    returned; ``require_ct=False`` also returns cases that have only a vertebra mask (e.g. the
    official VerSe sample ``sub-verse004``, published without its CT). Hidden files and folders
    (names starting with ``.``, e.g. half-written temporaries) are skipped.

    Raises :class:`EmptyRootError` when nothing is found.
    """
    root = Path(root)
    if not root.is_dir():
        raise EmptyRootError(root, "is not a folder (expected a VerSe-layout root with "
                                   "rawdata/<sub>/<stem>_ct.nii.gz files)")
    groups: dict[tuple, dict[str, Path]] = {}
    ctd_rank: dict[tuple, int] = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            parsed = _parse_name(name)
            if parsed is None:
                continue
            stem, pairs, suffix, ext = parsed
            kind = _kind(pairs, suffix, ext)
            if kind is None:
                continue
            path = Path(folder) / name
            ses_dirs = [d for d in Path(folder).relative_to(root).parts if d.startswith("ses-")]
            session = f"ses-{pairs['ses']}" if "ses" in pairs else (ses_dirs[-1] if ses_dirs else None)
            key = (_dataset_root(path, root), session, stem)
            files_of = groups.setdefault(key, {})
            if kind == "centroids":
                rank = _CTD_PREFERENCE.get(pairs.get("seg", ""), 2)
                if key in ctd_rank and rank > ctd_rank[key]:
                    continue
                if key in ctd_rank and rank == ctd_rank[key]:
                    raise FormatError(path, f"two centroid files for case {stem}: "
                                            f"{files_of['centroids']} and {path}")
                ctd_rank[key] = rank
            elif kind in files_of:
                raise FormatError(path, f"two {kind} files for case {stem}: "
                                        f"{files_of[kind]} and {path}")
            files_of[kind] = path

    cases = []
    mask_only = 0
    for (dataset_root, session, stem), files_of in groups.items():
        if "ct" not in files_of and "mask" not in files_of:
            continue
        if require_ct and "ct" not in files_of:
            mask_only += 1
            continue
        any_file = next(iter(files_of.values()))
        release = None
        for part in reversed(any_file.resolve().parts):
            match = _RELEASE.match(part)
            if match:
                release = match.group(1)
                break
        sub = re.match(r"^(sub-[^_]+)", stem)
        cases.append(Case(case_id=stem, patient=sub.group(1) if sub else stem,
                          session=session, release_split=release,
                          **{k: files_of.get(k) for k in
                             ("ct", "mask", "centroids", "subreg", "concepts")}))
    if not cases:
        hint = (f"; found {mask_only} vertebra mask(s) without a CT: pass require_ct=False "
                "to list them") if mask_only else ""
        raise EmptyRootError(root, "no VerSe-layout cases found (expected files named "
                                   "<stem>_ct.nii.gz and <stem>_seg-vert_msk.nii.gz)" + hint)
    return sorted(cases, key=lambda c: (c.case_id, str(c.ct or c.mask)))
