"""The explorer's words: sample and unit labels, the prediction line, unit info, headers.

Pure functions of :class:`~.data.RunData` and :class:`~.data.Analysis` (HTML where a widget
shows HTML), so the widget view only places them.
"""
from __future__ import annotations

import html

import pandas as pd

from vfcore.analysis.alignment import VERTEBRA_FLAGS, patch_concepts
from vfcore.analysis.findings import draft_findings, off_target, student_dictionary
from vfcore.dissect.geometry import concept_overlap, vertebra_overlap

from .data import Analysis, RunData, outcome

OUTCOMES = ("TP", "FP", "TN", "FN")
OUTCOME_NAMES = {"TP": "true positive", "FP": "false positive", "TN": "true negative", "FN": "false negative"}


def _grade(row) -> str:
    grade = row.get("grade")
    return "" if grade is None or pd.isna(grade) else f", grade {int(grade)}"


def sample_label(row) -> str:
    """One entry of the sample list: '<case> <level> · label, grade · p · outcome'."""
    truth = "fracture" if int(row["fracture"]) else "healthy"
    return (f"{row['case']} {row['level']} · {truth}{_grade(row)} · p = {row['probability']:.2f} "
            f"· {row['outcome']}")


def prediction_html(a: Analysis) -> str:
    """The prediction line: verdict, probability and, for a sample of the split, its outcome."""
    verdict = "fracture" if a.prediction else "no fracture"
    text = f"<b>Prediction: {verdict}</b> (probability of fracture {100 * a.probability:.1f} %)"
    if a.truth is not None:
        truth = "fracture" if int(a.truth["fracture"]) else "no fracture"
        o = outcome(int(a.truth["fracture"]), a.prediction)
        text += f" · label: {truth}{_grade(a.truth)} → <b>{OUTCOME_NAMES[o]}</b>"
    else:
        text += " · uploaded patch, no label"
    return f"{html.escape(a.name)}: {text}"


def findings_html(data: RunData, a: Analysis) -> str:
    """The draft finding of this inference (:func:`vfcore.analysis.findings.draft_findings`): its most
    relevant units named by the student's labels; once notebook 06 (a later notebook, optional
    here) has measured the units' concepts, by those. A unit without a measured concept "has no
    significant concept (no detector)"; a unit the student has not labelled "has no label of yours yet"."""
    if data.measured_concepts is not None:
        dictionary, source = data.measured_concepts, "concepts measured in notebook 06"
        none = "no significant concept (no detector)"
    else:
        dictionary = student_dictionary({"units": data.concepts.units})
        source = "your concept labels; after notebook 06, the concepts it measures"
        none = "no label of yours yet"
    level = str(a.truth["level"]) if a.truth is not None else a.name
    off = []
    if data.measured_concepts is not None and a.concept_patch is not None and a.vertebrae is not None \
            and a.label is not None:      # phantom: is each measured detector's mask on its concept here?
        here = patch_concepts(a.concept_patch, a.vertebrae, a.label, data.concept_names)
        here = {c: m for c, m in here.items() if c not in VERTEBRA_FLAGS.values()}   # flags unknown here
        shown = [u for u in a.top if u in a.maps]
        off = off_target(shown, [a.maps[u].mask for u in shown], here, dictionary)
    text = draft_findings(level, a.probability, a.relevance, dictionary, threshold=data.threshold, none=none,
                          off_target=off)
    return f"<i>Draft finding ({source}):</i> {html.escape(text)}"


def unit_label(data: RunData, a: Analysis, position: int, unit: int) -> str:
    """One entry of the unit list: position by r_k, r_k, c_k rank and the concept label."""
    label = data.concepts.get(unit)["label"]
    return (f"{position}. unit {unit} · r_k {a.relevance[unit]:.3g} · c_k rank {data.rank[unit]}"
            + (f" · {label}" if label else ""))


def unit_info_html(data: RunData, a: Analysis, k: int) -> str:
    """r_k, |M_k| and c_k of unit k on the sample; where its mask lies (vertebra mask) and
    which ground-truth concepts it covers (phantom)."""
    mask = a.maps[k].mask
    parts = [f"<b>unit {k}</b> on this sample: r_k = {a.relevance[k]:.4g}, "
             f"M_k = {int(mask.sum())} voxels; c_k = {data.c_k[k]:.3f} "
             f"(rank {data.rank[k]} of {data.n_units} for true positives)"]
    if a.vertebrae is not None and a.label is not None and mask.any():
        ov = vertebra_overlap(mask, a.vertebrae, a.label)
        parts.append(f"mask on the target vertebra {ov['target']:.0%}, on adjacent vertebrae "
                     f"{ov['adjacent']:.0%}, outside bone {ov['outside']:.0%}")
    if a.concept_patch is not None and data.concept_names and mask.any():
        ov = concept_overlap(mask, a.concept_patch, data.concept_names, field=data.field)
        ov = ov[ov["concept"] != "background"].head(3)
        if len(ov):
            parts.append("mask share by phantom structure (where the mask lies, not a detector label): " + ", ".join(
                f"{html.escape(c)} {f:.0%}" for c, f in zip(ov["concept"], ov["fraction"])))
    return "<br>".join(parts)


def concept_table_html(units: dict[int, dict[str, str]]) -> str:
    """The concept dictionary as an HTML table."""
    if not units:
        return "<i>No concept labels yet.</i>"
    rows = "".join(f"<tr><td>{k}</td><td>{html.escape(v['label'])}</td><td>{html.escape(v['note'])}</td></tr>"
                   for k, v in sorted(units.items()))
    return f"<table><tr><th>unit</th><th>label</th><th>note</th></tr>{rows}</table>"


def exemplar_header(data: RunData, unit: int, n: int) -> str:
    """What the exemplar row shows: how many, from which subset, and the concept label."""
    split = data.meta.get("split", "?")
    label = data.concepts.get(unit)["label"]
    among = data.exemplar_subset(unit)
    if n:
        text = (f"unit {unit}: {n} exemplar(s), the {among} of the {split} split with the "
                f"largest r_k of this unit; concept label: {label or '(none yet)'}")
    else:
        text = f"unit {unit}: no exemplars (it fires on none of the {among} of the {split} split)"
    if data.exemplar_source == "computed":
        text += " (computed here: notebook 04 has not exported exemplars yet)"
    return text
