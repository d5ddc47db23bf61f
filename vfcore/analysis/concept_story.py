"""Notebook 08's sentences, computed from its run: where the concepts live, each method graded.

The conventions of :mod:`vfcore.analysis.story` (which holds notebooks 01-07's): a sentence that
depends on the run is written here from the run's numbers and returned for whichever way the run
came out (tests/test_story.py builds both); an expectation is stated, then what this run shows;
every statistic with its n; p at the precision of its rule (:func:`~vfcore.analysis.story.format_p`).
Draws nothing.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from vfcore.analysis.story import format_p, passes, pct, small

def _times(a: float, b: float) -> str:
    return f"{a / b:.1f}x" if b > 0 else "infinitely more than"


def direction_vs_unit(concept: str, iou: float, unit_iou: float, untrained_iou: float, shuffled_iou: float,
                      p: float, n: int, alpha: float = 0.01, n_perm: int = 200) -> str:
    """A concept direction (Net2Vec) against the best single unit, the untrained network and the shuffle."""
    head = (f"Net2Vec leads us to expect a direction to read a concept better than any single unit; here the "
            f"{concept} direction reaches a held-out IoU of {iou:.3f} (n = {n} vertebrae)")
    head += (f", {_times(iou, unit_iou)} the best single unit chosen on the training split ({unit_iou:.3f})"
             if iou > unit_iou else f", no more than the best single unit chosen on the training split ({unit_iou:.3f})")
    if iou > untrained_iou:
        head += f", and {_times(iou, untrained_iou)} the same read-out of an untrained network ({untrained_iou:.3f})."
    else:
        head += (f"; an untrained network's read-out gets as much ({untrained_iou:.3f}): the direction reflects the "
                 f"architecture and the straightened patch, not training.")
    kept = shuffled_iou / iou if iou > 0 else float("nan")
    at_floor = p <= 1 / (n_perm + 1) + 1e-12
    p_text = f"p = {format_p(p, alpha)}, " + (f"the smallest {n_perm} shuffles allow" if at_floor else f"{n_perm} shuffles")
    if passes(p, alpha) and kept < 2 / 3:
        return head + (f" It marks this vertebra's {concept}: scored against another vertebra's masks of the same "
                       f"class it keeps only {kept:.0%} of its IoU ({shuffled_iou:.3f}; {p_text}).")
    if passes(p, alpha):
        return head + (f" It beats the same-class shuffle ({p_text}), but {kept:.0%} of its IoU survives it "
                       f"({shuffled_iou:.3f}): mostly it marks where such zones usually are in a straightened patch; "
                       f"the part specific to this vertebra is {iou - shuffled_iou:.3f}.")
    return head + (f" It does not beat the same-class shuffle ({shuffled_iou:.3f}, {p_text}): it marks where "
                   f"such zones usually are more than where this vertebra's is.")


def directions_untrained(concepts: Sequence[str], trained: Sequence[float], untrained: Sequence[float]) -> str:
    """Concepts whose direction an untrained network reads as well (held-out IoU), i.e. not a trace of training."""
    same = [c for c, a, b in zip(concepts, trained, untrained) if b >= a]
    if not same:
        return f"For all {len(concepts)} concepts the trained network's direction reads better than the untrained one's."
    return (f"For {len(same)} of {len(concepts)} concepts an untrained network's direction reads as well or better "
            f"({', '.join(same)}): a direction there shows what the architecture and the straightened patch allow, "
            f"not what training added.")


def units_needed(concept: str, ks: Sequence[int], ious: Sequence[float], best_unit_iou: float) -> str:
    """How many units the concept's direction needs: the IoU-vs-k curve (last entry: all units)."""
    ks, ious = np.asarray(ks, dtype=int), np.asarray(ious, dtype=float)
    full = float(ious[-1])
    if not full > 0:
        return f"No read-out of the units finds the {concept} on held-out vertebrae (IoU 0 with all {ks[-1]} units)."
    curve = " / ".join(f"{i:.3f}" for i in ious)
    at = lambda share: int(ks[np.argmax(ious >= share * full)]) if (ious >= share * full).any() else int(ks[-1])  # noqa: E731
    text = (f"Held-out IoU of the {concept} with the {' / '.join(map(str, ks))} largest-weight units: {curve}. "
            f"Half of the full direction's IoU takes {at(0.5)} unit{'s' if at(0.5) > 1 else ''}, 90 % takes {at(0.9)}")
    if at(0.5) == 1:
        return text + ": one unit carries most of what the direction reads."
    return text + (": the concept is spread over many units; no single one reads it"
                   + (f" (the best single unit: {best_unit_iou:.3f})." if best_unit_iou < 0.5 * full else "."))


def direction_layers(concept: str, iou: Mapping[str, float], untrained: Mapping[str, float]) -> str:
    """The concept direction's held-out IoU by layer (the dissected one first), trained / untrained."""
    if not iou:
        return ""
    layers = list(iou)
    each = ", ".join(f"{l} {iou[l]:.3f} / {untrained.get(l, float('nan')):.3f}" for l in layers)
    best = max(layers, key=lambda l: iou[l] - untrained.get(l, 0.0))
    text = f"The {concept} direction by layer, held-out IoU trained / untrained: {each}."
    if best == layers[0]:
        return text + f" Training added the most at the dissected layer {layers[0]}."
    return text + f" Training added more at {best} than at the dissected layer: the concept is read better below it."


def basis_detectors(detectors: Mapping[str, int], sizes: Mapping[str, int], margin: float = 0.05) -> str:
    """Detectors per basis of the cell space ('<basis>, trained' / '<basis>, untrained' keys; the first
    trained basis is the units). A basis 'finds more' only with a share of detectors ``margin`` above
    the units'; random directions of the trained layer are the control of the basis itself."""
    names = [b[: -len(", trained")] for b in detectors if b.endswith(", trained")]
    if not names:
        return ""
    share = {b: detectors[f"{b}, trained"] / max(1, sizes[f"{b}, trained"]) for b in names}
    each = "; ".join(f"{b}: {detectors[f'{b}, trained']} of {sizes[f'{b}, trained']}"
                     + (f" (untrained {detectors[f'{b}, untrained']})" if f"{b}, untrained" in detectors else "")
                     for b in names)
    units, best = names[0], max(names[1:], key=share.get, default=names[0])
    text = f"Detectors per basis, dissected like units on the same held-out vertebrae: {each}."
    if share[best] > share[units] + margin:
        text += f" {best} finds clearly more per direction ({share[best]:.0%} against {share[units]:.0%} of the units)."
    else:
        text += (f" No other basis finds clearly more detectors per direction than the {units} "
                 f"({share[units]:.0%}; the best, {best}: {share[best]:.0%}).")
    rand = [b for b in names if b.startswith("random")]
    if rand and share[rand[0]] >= share[units] - margin:
        untrained = [detectors[k] for k in detectors if k.endswith(", untrained")]
        text += (f" Random directions of the trained layer find about as many as its {units} ({share[rand[0]]:.0%}): "
                 f"what makes detectors is training, not the basis"
                 + (f" (the untrained network's bases: {max(untrained)} at most)." if untrained else "."))
    return text


def tcav_verdict(table, fracture_signs: Sequence[str], outside: str = "outside the scan") -> str:
    """Which concepts TCAV finds significant (and which way), against the expectation: fracture signs yes,
    'outside the scan' no; and whether the untrained network shows the same."""
    t = table[table["reason"] == ""] if "reason" in table else table
    if len(t) == 0:
        return "TCAV: no concept had enough examples to be tested."
    sig = t["significant"].eq(True)            # an object column (untested rows hold NaN): never ~ on it
    up = list(t[sig & (t["mean"] > t["random_mean"])]["concept"])
    down = list(t[sig & (t["mean"] <= t["random_mean"])]["concept"])
    none = list(t[~sig]["concept"])
    n = int(t["n"].max())
    text = (f"TCAV over up to {n} true positives ({table.attrs.get('rule', 'Bonferroni-corrected')}): significant and "
            f"raising the fracture logit: {', '.join(up) or 'none'}; significant and lowering it: {', '.join(down) or 'none'}; "
            f"not significant: {', '.join(none) or 'none'}.")
    signs = [c for c in fracture_signs if c in set(t["concept"])]
    hit = [c for c in signs if c in up]
    text += (f" We expect the fracture signs to raise it and '{outside}' not to matter; here "
             f"{len(hit)} of {len(signs)} fracture signs do")
    if outside in set(t["concept"]):
        text += f", and '{outside}' is {'significant too' if outside in up + down else 'not significant'}"
    text += "."
    if "significant_untrained" in t:        # the control: the same test on an untrained network
        u = t.set_index("concept")
        sig_u = u["significant_untrained"].eq(True)
        raises_u = sig_u & (u["mean_untrained"] > u.get("random_mean_untrained", 0.5))
        text += (f" In the untrained network {int(sig_u.sum())} of {len(u)} are significant "
                 f"({int(raises_u.sum())} raising the logit, {int((sig_u & ~raises_u).sum())} lowering it).")
        evidence = [c for c in up if not raises_u[c]]
        text += (f" Significant and raising in the trained network but not in the untrained one (the evidence that "
                 f"training made the network use a concept): {', '.join(evidence) or 'none'}.")
    if outside in up + down:
        n_out = int(t.set_index("concept").loc[outside, "n"])
        text += (f" '{outside}' is a local sensitivity over the {n_out} true positives whose patch leaves the scan, "
                 f"not the shortcut notebook 07 tests (whether P(fracture) follows the share outside the scan).")
    return text


def twin_drop(delta_p: Sequence[float], healed_below: int, threshold: float = 0.5) -> str:
    """The fracture's ground-truth importance: P(healed twin) - P(original) over true positives."""
    d = np.asarray(delta_p, dtype=float)
    if d.size == 0:
        return "No true positive with a grade-0 healed twin: the fracture's importance is not measured."
    drops = int((d < 0).sum())
    text = (f"We expect P(fracture) to drop for every true positive when its fracture is healed; here it drops for "
            f"{pct(drops, d.size)} (mean change {d.mean():+.2f}, median {np.median(d):+.2f}, range {d.min():+.2f} "
            f"to {d.max():+.2f}), and {healed_below} of {d.size} twins fall below {threshold:g}{small(d.size, 'pairs')}")
    if drops == d.size and healed_below >= 0.9 * d.size:
        return text + ": the network's evidence is the fracture."
    if drops >= 0.9 * d.size:
        return text + ": the fracture is most of the evidence, not all of it."
    return text + ": for many of them the evidence is not (only) the fracture."


def ranking_grades(grades, k: int, random_detectors: float | None, auc_intact: float | None,
                   overlap: Mapping[str, Sequence[int]] | None = None, reference: str = "healed twins") -> str:
    """Section 5: detectors and ablation AUC of each ranking's top k, against random units (last row);
    ``overlap`` {ranking: units it shares with the ``reference`` ranking's top k}."""
    real = grades[grades["top units"] != ""] if "top units" in grades else grades
    if len(real) == 0:
        return ""
    parts = []
    if random_detectors is not None and "detectors" in real:
        parts.append(f"Detectors among each top {k} (random {k} units: {random_detectors:.1f} on average): "
                     + ", ".join(f"{r.ranking} {int(r.detectors)}" for r in real.itertuples()) + ".")
    if auc_intact is not None and "AUC, zeroed" in real:
        rand = float(grades.iloc[-1]["AUC, zeroed"])
        aucs = dict(zip(real["ranking"], real["AUC, zeroed"].astype(float)))
        worst = min(aucs, key=aucs.get)
        parts.append(f"Zeroing each top {k} (intact AUC {auc_intact:.3f}; {k} random units {rand:.3f}): "
                     + ", ".join(f"{name} {auc:.3f}" for name, auc in aucs.items()) + ".")
        if abs(rand - auc_intact) < 0.005 and aucs[worst] > auc_intact - 0.01:
            parts.append(f"Zeroing {k} random units does not move the AUC either: at this layer the ablation of {k} "
                         f"units cannot tell the rankings apart (notebook 07: the evidence is spread over many units).")
        else:
            parts.append(f"Removing the {worst} units costs the most AUC ({auc_intact - aucs[worst]:.3f}), more than random "
                         f"units." if aucs[worst] < rand - 0.01 else
                         f"No ranking's top {k} costs clearly more AUC than random units (by more than 0.01).")
    if overlap:
        parts.append(f"Units shared with the {reference} top {k}: "
                     + "; ".join(f"{name} {len(u)}" + (f" ({', '.join(map(str, u))})" if u else "") for name, u in overlap.items())
                     + ".")
    return " ".join(parts)
