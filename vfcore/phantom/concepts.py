"""The phantom's concept labels: one anatomical concept per voxel, plus per-vertebra views.

The concept mask (``<stem>_seg-concept_msk.nii.gz``, uint8) says *what* each voxel is; the
vertebra mask (``_seg-vert_msk``) says *whose* it is.  Concepts that are relative to a target
vertebra L (its own endplates, the disc above and below, the adjacent vertebrae) are derived
from the two masks together by :func:`target_concepts`:

- a voxel of vertebra L's superior endplate has ``concept == 1`` and ``vert == L``;
- discs are numbered by the vertebra *below* them: ``100 + L`` is the disc above L
  (``150 + L`` when that disc is degenerated), so the disc below L is ``100 + next(L)``
  (``next`` in cranio-caudal order of the scan, see ``neighbours`` in the truth JSON;
  ``126`` / ``176`` is the disc between the last lumbar vertebra and the sacrum);
- the adjacent vertebrae of L are the voxels with ``vert`` equal to the vertebra above or
  below L (all their concepts);
- Schmorl nodes: the pit (disc material, ``vert == 0``) and its sclerotic rim (``vert == L``)
  both carry concept 9;
- ``12`` (:data:`OUTSIDE_SCAN`) marks, in a straightened patch, the voxels sampled outside the
  CT volume (a scan's own concept mask never holds it): the "outside the scan" concept, whose
  share of a patch is the manifest's ``out_of_field``.
"""
from __future__ import annotations

import numpy as np

#: Concept label -> name (0 = not any labelled structure).  Values >= 100 are discs (above).
CONCEPTS: dict[int, str] = {
    1: "superior endplate",
    2: "inferior endplate",
    3: "anterior cortex",
    4: "posterior wall / middle column",
    5: "lateral cortex",
    6: "trabecular core",
    7: "fracture-deformity zone",
    8: "sclerotic condensation band",
    9: "Schmorl node",
    10: "osteophyte",
    11: "degenerative endplate sclerosis",
    12: "outside the scan",
    13: "pedicle",
    14: "lamina",
    15: "spinous process",
    16: "transverse process",
    17: "articular process",
    18: "spinal canal",
    19: "rib",
    20: "paraspinal muscle",
    21: "psoas muscle",
    22: "lung",
    23: "fat",
    24: "vessel",
    25: "other soft tissue",
    26: "sacrum",
    27: "air",
}
#: Concept of a patch voxel sampled outside the CT volume (never in a scan's own concept mask:
#: :mod:`vfcore.patches` writes it where a straightened patch leaves the field of view).
OUTSIDE_SCAN = 12
DISC_BASE = 100
DEGENERATED_DISC_BASE = 150
BODY = (1, 2, 3, 4, 5, 6, 7, 8, 9, 11)           # concepts that make up a vertebral body
POSTERIOR_ELEMENTS = (13, 14, 15, 16, 17)

#: Named groups written to concept_labels.json and used by :func:`target_concepts`.
GROUPS = {
    "vertebral body": list(BODY),
    "posterior elements": list(POSTERIOR_ELEMENTS),
    "fracture signs": [7, 8],
    "confounders": [9, 10, 11],
    "outside the scan": [OUTSIDE_SCAN],
}


def disc_value(lower_label: int, degenerated: bool) -> int:
    """Concept value of the disc whose caudal neighbour is ``lower_label``."""
    return (DEGENERATED_DISC_BASE if degenerated else DISC_BASE) + int(lower_label)


def label_table() -> dict:
    """The JSON-ready documentation of the concept mask (written to concept_labels.json)."""
    return {
        "labels": {str(k): v for k, v in CONCEPTS.items()},
        "discs": {
            "normal": f"{DISC_BASE} + label of the vertebra below the disc",
            "degenerated": f"{DEGENERATED_DISC_BASE} + label of the vertebra below the disc",
            "sacrum_label": 26,
            "disc above vertebra L": f"{DISC_BASE} + L or {DEGENERATED_DISC_BASE} + L",
            "disc below vertebra L": "the disc above the next vertebra (neighbours.below in "
                                     "the truth JSON)",
        },
        "groups": GROUPS,
        "owner": "the vertebra mask (_seg-vert_msk) gives the vertebra a bone voxel belongs to",
        "adjacent vertebrae": "voxels whose vert label is the vertebra above or below the "
                              "target (neighbours in the truth JSON)",
        "target concepts": list(TARGET_CONCEPTS),
    }


TARGET_CONCEPTS = (
    "superior endplate", "inferior endplate", "anterior cortex",
    "posterior wall / middle column", "lateral cortex", "trabecular core",
    "fracture-deformity zone", "sclerotic condensation band", "vertebral body",
    "disc above", "disc below", "posterior elements", "spinal canal", "adjacent vertebrae",
    "Schmorl node", "osteophyte", "degenerated disc", "degenerative endplate sclerosis",
)


def target_concepts(concept: np.ndarray, vert: np.ndarray, label: int,
                    above: int | None, below: int | None) -> dict[str, np.ndarray]:
    """Boolean masks of every concept relative to target vertebra ``label``.

    ``concept`` and ``vert`` are aligned arrays (a whole scan or a straightened patch);
    ``above`` / ``below`` are the labels of the neighbouring vertebrae (``None`` when absent;
    26 for the sacrum below the last lumbar vertebra).
    """
    own = vert == label
    out: dict[str, np.ndarray] = {}
    for value in (1, 2, 3, 4, 5, 6, 7, 8, 11):
        out[CONCEPTS[value]] = own & (concept == value)
    out["vertebral body"] = own & np.isin(concept, BODY)
    out["disc above"] = np.isin(concept, (DISC_BASE + label, DEGENERATED_DISC_BASE + label))
    if below is not None:
        out["disc below"] = np.isin(concept, (DISC_BASE + below, DEGENERATED_DISC_BASE + below))
    else:
        out["disc below"] = np.zeros(concept.shape, dtype=bool)
    out["posterior elements"] = own & np.isin(concept, POSTERIOR_ELEMENTS)
    out["spinal canal"] = concept == 18
    neighbours = [n for n in (above, below) if n is not None and n != 26]
    out["adjacent vertebrae"] = np.isin(vert, neighbours) if neighbours else np.zeros_like(own)
    out["Schmorl node"] = (concept == 9) & (own | (vert == 0))
    out["osteophyte"] = own & (concept == 10)
    degen = [DEGENERATED_DISC_BASE + label]
    if below is not None:
        degen.append(DEGENERATED_DISC_BASE + below)
    out["degenerated disc"] = np.isin(concept, degen)
    out["outside the scan"] = concept == OUTSIDE_SCAN
    return {name: out[name] for name in TARGET_CONCEPTS}
