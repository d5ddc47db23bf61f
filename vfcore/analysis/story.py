"""Sentences computed from a run: the notebooks' conclusions, for either outcome.

A sentence that depends on the run is written here, from the run's numbers, never typed into a
notebook. Each function takes plain numbers (or small tables) and returns the sentence for
whichever way the run came out; tests/test_story.py builds inputs for both branches. Where the
course states an expectation (what the paper or the clinic leads us to expect), the function
returns the prediction followed by what this run shows: "We expect ...; here, ...".

Conventions: every statistic comes with its n; a ranking or comparison over fewer than
:data:`SMALL_N` samples says so; a p-value is printed with the precision of the rule it is
compared with (:func:`format_p`: p < 0.01 -> three decimals, and a value that fails the rule is
never printed as one that passes). Draws nothing.
"""
from __future__ import annotations

import textwrap
from typing import Mapping, Sequence

import numpy as np

#: Below this many samples a comparison "is a handful" and says so.
SMALL_N = 20
#: The thoracolumbar junction, where real fractures cluster (T11-L2).
JUNCTION = ("T11", "T12", "L1", "L2")


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------

def _decimals(alpha: float) -> int:
    """Decimals of ``alpha`` as written (0.01 -> 2, 0.05 -> 2, 0.001 -> 3)."""
    text = f"{alpha:.10f}".rstrip("0")
    return max(1, len(text.split(".")[1])) if "." in text else 0


def format_p(p: float, alpha: float = 0.01) -> str:
    """p printed with one decimal more than the rule ``p < alpha`` (0.01 -> 3 decimals), with
    more only where rounding would put it on the wrong side of ``alpha``: 0.0099 -> "0.0099",
    0.0100 -> "0.010" (fails), 0.0065 -> "0.007"; below the precision "< 0.001"."""
    if p is None or not np.isfinite(p):
        return "n/a"
    dec = _decimals(alpha) + 1
    if p < 10 ** -dec:
        return f"< {10 ** -dec:.{dec}f}"
    text = f"{p:.{dec}f}"
    while p < alpha and float(text) >= alpha and dec < 8:   # never print a pass as a fail
        dec += 1
        text = f"{p:.{dec}f}"
    return text


def passes(p: float, alpha: float = 0.01) -> bool:
    return p is not None and bool(np.isfinite(p)) and p < alpha


def pct(part: float, whole: float, digits: int = 0) -> str:
    """'a of b (c %)' with the n in it."""
    if not whole:
        return f"{part:g} of {whole:g}"
    return f"{part:g} of {whole:g} ({100 * part / whole:.{digits}f} %)"


def small(n: int, what: str = "samples") -> str:
    """The caveat for a handful of samples ('' when n is large enough)."""
    return f" (n = {n} {what}, a handful: one more or less can change this)" if n < SMALL_N else ""


def bullets(lines: Sequence[str], title: str = "") -> str:
    """A Markdown summary: one bullet per sentence (empty ones dropped), under ``title`` if given."""
    return (f"**{title}**\n\n" if title else "") + "\n".join(f"* {s}" for s in lines if s)


# --------------------------------------------------------------------------------------------
# 01 · the data
# --------------------------------------------------------------------------------------------

def fracture_levels(levels: Sequence[str], fractured: Sequence[int]) -> str:
    """Where the fractures of this store are, against the clinical expectation (T11-L2)."""
    levels = np.asarray(levels, dtype=str)
    y = np.asarray(fractured, dtype=int)
    n, k = len(y), int(y.sum())
    if k == 0:
        return f"This store holds no fractured vertebra (n = {n}): nothing to locate."
    at = {lv: int(y[levels == lv].sum()) for lv in dict.fromkeys(levels)}
    peak = max(at.values())
    peaks = [lv for lv, c in at.items() if c == peak]
    junction = np.isin(levels, JUNCTION)
    share_f, share_v = y[junction].sum() / k, junction.mean() if n else 0.0
    clusters = share_f > share_v + 0.05
    return (f"We expect fractures to be rare (VerSe about 6.5 % of vertebrae, the paper's combined set 11.7 %) "
            f"and to cluster at the thoracolumbar junction (T11-L2); here, {pct(k, n, 1)} vertebrae are "
            f"fractured (the phantom's prevalence is a setting of this notebook), the most at "
            f"{', '.join(peaks)} ({peak}{' each' if len(peaks) > 1 else ''}), and T11-L2 hold {100 * share_f:.0f} % of the fractures "
            f"against {100 * share_v:.0f} % of the vertebrae: "
            + ("the phantom reproduces that clustering." if clusters else
               "the phantom does not reproduce that clustering (it draws fractures at every level)."))


# --------------------------------------------------------------------------------------------
# 02 · training
# --------------------------------------------------------------------------------------------

def pooling(names: Sequence[str], pools: Sequence[bool], preset: str = "") -> str:
    """Which encoder levels end in a max-pool (the preset's ``pools``)."""
    pooled = [nm for nm, p in zip(names, pools) if p]
    unpooled = [nm for nm, p in zip(names, pools) if not p]
    who = f"the {preset!r} preset" if preset else "this preset"
    if not unpooled:
        return f"In {who} every encoder level ends in a 2x2x2 max-pool."
    if not pooled:
        return f"In {who} no encoder level pools: the dissected grid is the input grid."
    return (f"In {who}, {', '.join(pooled)} end in a 2x2x2 max-pool and {', '.join(unpooled)} do not, "
            f"so the last {len(unpooled)} level(s) keep the grid of the one before (see the layer table).")


def early_stopping(n_epochs: int, best_epoch: int, max_epochs: int, patience: int) -> str:
    """Did early stopping trigger? ``best_epoch`` 1-based; ``n_epochs`` run."""
    if n_epochs < max_epochs:
        return (f"Early stopping triggered: training stopped after {n_epochs} of {max_epochs} epochs, "
                f"{n_epochs - best_epoch} epochs after the best validation F1 (epoch {best_epoch}; patience {patience}).")
    return (f"Early stopping did not trigger: training ran all {max_epochs} epochs (patience {patience}) and the "
            f"best validation F1 came at epoch {best_epoch}"
            + (", near the end: more epochs might still help." if max_epochs - best_epoch < patience
               else "."))


def grade_difficulty(missed: Mapping[int, int], total: Mapping[int, int]) -> str:
    """Grade 1 hardest? ``missed``/``total`` per Genant grade 1-3 (false negatives / fractures)."""
    grades = [g for g in sorted(total) if g >= 1 and total[g] > 0]
    if not grades:
        return "We expect mild (grade 1) fractures to be missed most often; here, there is no fracture to check."
    rate = {g: missed.get(g, 0) / total[g] for g in grades}
    parts = ", ".join(f"grade {g} missed {missed.get(g, 0)} of {total[g]}" for g in grades)
    n = sum(total[g] for g in grades)
    worst = max(rate.values())
    hardest = [g for g in grades if rate[g] == worst]
    if worst == 0:
        verdict = "no fracture was missed, so no grade is hardest"
    elif hardest == [1]:
        verdict = "grade 1 is the hardest, as expected"
    else:
        verdict = (f"grade {' and '.join(map(str, hardest))} {'is' if len(hardest) == 1 else 'are'} missed most "
                   f"often{'' if 1 in hardest else ', not grade 1'}")
    return (f"We expect mild (grade 1) fractures to be missed most often, as by radiologists; here, {parts}: "
            f"{verdict}{small(n, 'fractures')}.")


def wedge_false_positives(confounders: Sequence[str], height_loss: Sequence[float],
                          fracture_at: float = 0.20, near: float = 0.04) -> str:
    """What the false positives are, from the phantom's truth: physiologically wedged bodies just
    short of the fracture's height loss? ``height_loss`` as a fraction (0.17 = 17 %)."""
    n = len(confounders)
    if n == 0:
        return "The network made no false positive here."
    hl = np.asarray(height_loss, dtype=float)
    wedge = np.array(["wedg" in str(c) for c in confounders])
    close = wedge & (hl >= fracture_at - near) & (hl < fracture_at)
    if wedge.sum() == 0:
        return (f"None of the {n} false positives carries physiological wedging: the wedge does not explain "
                f"them here.")
    rng = f"{100 * hl[close].min():.0f}-{100 * hl[close].max():.0f} %" if close.any() else ""
    return (f"{pct(int(wedge.sum()), n)} false positives carry physiological wedging"
            + (f", {int(close.sum())} of them at {rng} height loss, just under the {100 * fracture_at:.0f} % "
               f"that defines a fracture: near-threshold wedges" if close.any() else
               f", none of them within {100 * near:.0f} points of the {100 * fracture_at:.0f} % that defines a fracture")
            + f"{small(n, 'false positives')}.")


# --------------------------------------------------------------------------------------------
# 03 · thresholds and receptive field
# --------------------------------------------------------------------------------------------

def threshold_spread(T: Sequence[float]) -> str:
    """How far apart the live units' thresholds are (why a threshold per unit)."""
    t = np.asarray(T, dtype=float)
    t = t[t > 0]
    if len(t) < 2:
        return "Fewer than two units have a positive threshold here: nothing to compare."
    lo, hi = np.quantile(t, [0.1, 0.9])
    ratio, full = hi / lo, t.max() / t.min()
    size = "an order of magnitude or more" if ratio >= 10 else "a few-fold"
    return (f"Here the {len(t)} live units' thresholds T_k span {t.min():.3g} to {t.max():.3g} ({full:.1f}x); "
            f"the 90th percentile is {ratio:.1f}x the 10th: {size} apart, so one global threshold would let "
            f"the loud units fire far more often than the quiet ones.")


def receptive_field(cell_mm: float, rf_mm: float, field_mm: float, erf_mm: float | None = None) -> str:
    """What one mask cell means: its size, the theoretical (and effective) receptive field, the field."""
    text = (f"One cell of the dissected grid is {cell_mm:g} mm; its theoretical receptive field is {rf_mm:g} mm "
            f"in a {field_mm:g} mm field of view")
    if rf_mm >= field_mm:
        text += (": every cell can see the whole field (beyond it, zero padding), so where a mask sits says "
                 "where the activation is, not which voxels caused it")
    else:
        text += f": a cell sees {100 * rf_mm / field_mm:.0f} % of the field's edge"
    if erf_mm is not None:
        text += (f". The effective receptive field (where the input gradient of one cell holds 90 % of its mass) "
                 f"has a radius of {erf_mm:.0f} mm"
                 + (f", about the whole field (its half-width is {field_mm / 2:g} mm): this cell reads the whole patch"
                    if erf_mm >= 0.4 * field_mm else
                    f", a local neighbourhood of the {field_mm:g} mm field"))
    return text + "."


def mask_example(out_of_field: float, on_target: float | None = None) -> str:
    """What the first mask example shows: a vertebra inside the scan, or a truncated end one."""
    if out_of_field > 0.05:
        return (f"This vertebra is truncated: {100 * out_of_field:.0f} % of its patch lies outside the scan, and a "
                f"mask on the scan's edge there marks the edge, not bone.")
    where = "" if on_target is None else f"; {100 * on_target:.0f} % of the mask's voxels lie on the target vertebra"
    return f"This vertebra lies inside the scan ({100 * out_of_field:.1f} % of its patch outside){where}."


# --------------------------------------------------------------------------------------------
# 04 · Eq. 1 and its blind spot
# --------------------------------------------------------------------------------------------

def saturation(mean_enabled: float, n_units: int, n_high: int, q: float, cells: int, n_samples: int,
               high: float = 0.9) -> str:
    """Does Eq. 1 saturate? |E_x| against K, and why: q x cells mask cells per vertebra."""
    per = q * cells
    share = mean_enabled / n_units if n_units else 0.0
    head = (f"With q = {q:g} on a grid of {cells} cells a unit's mask holds about q x {cells} = {per:.1f} cells per "
            f"vertebra on average; here |E_x| averages {mean_enabled:.0f} of {n_units} units over {n_samples} "
            f"vertebrae, and {n_high} units have c_k >= {high:g}")
    if share >= 0.5:
        return head + (": most units fire somewhere on most vertebrae, so c_k is high for many units at once and "
                       "Eq. 1 (no negative class) ranks ubiquitous units as high as selective ones.")
    return head + ": most units fire on a minority of vertebrae, so c_k still separates units."


def ubiquity(c_tp: Sequence[float], c_tn: Sequence[float], k: int) -> str:
    """Do the top-k by c_k also fire on the true negatives?"""
    a, b = np.asarray(c_tp, float)[:k], np.asarray(c_tn, float)[:k]
    if len(a) == 0:
        return "No unit ranked."
    ubiq = int((b >= 0.5).sum())
    return (f"Of the top {len(a)} units by c_k, {ubiq} also fire on at least half of the true negatives "
            f"(their c over the true negatives: {b.min():.2f}-{b.max():.2f})"
            + (": Eq. 1 ranks them high because they fire on most vertebrae, fractured or not; how much "
               "more often they fire on fractures is the contrastive ranking c_TP - c_TN (section 1b)." if ubiq > len(a) / 2 else
               ": most are selective for the true positives."))


def ranking_detectors(n_eq1: float, n_contrast: float, random_mean: float, k: int, n_all: int, n_units: int,
                      n_untrained: int | None = None, contrast: str = "the contrastive ranking",
                      more: Mapping[str, float] | None = None) -> str:
    """Detectors among the top-k by Eq. 1, by a contrastive ranking (and ``more`` rankings:
    name -> detectors in its top k), and among k random units."""
    base = n_all / n_units * k if n_units else 0
    if n_eq1 < random_mean - 1:            # a difference of one unit or less is no difference
        verdict = f"Eq. 1's top {k} hold fewer detectors than {k} random units"
    elif n_eq1 > random_mean + 1:
        verdict = f"Eq. 1's top {k} hold more detectors than {k} random units"
    else:
        verdict = f"Eq. 1's top {k} hold about as many detectors as {k} random units"
    cmp_ = ("as many as" if n_contrast == n_eq1 else
            ("more than" if n_contrast > n_eq1 else "fewer than") + " Eq. 1"
            + ("" if abs(n_contrast - n_eq1) > max(1.0, 2 * (base * (1 - k / max(n_units, 1))) ** 0.5)
               else " (within chance for " + str(k) + " units)"))
    text = (f"{verdict} ({n_eq1:g} vs {random_mean:.1f} on average; {n_all} of all {n_units} units are detectors, "
            f"{base:.1f} expected in any {k}); {contrast} puts {n_contrast:g} in its top {k}, "
            f"{cmp_ if cmp_ != 'as many as' else 'as many as Eq. 1'}")
    for name, n in (more or {}).items():
        text += f"; {name}: {n:g}"
    if n_untrained is not None:
        text += f". An untrained network of the same shape has {n_untrained} detectors"
        text += (": training made detectors." if n_all > 2 * max(n_untrained, 1) else
                 ": training did not make many more than architecture alone.")
    else:
        text += "."
    return text


# --------------------------------------------------------------------------------------------
# 05/06 · alignment, use, where
# --------------------------------------------------------------------------------------------

def relevant_and_ranked(n_detectors_top: int, random_mean: float, k: int) -> str:
    """Is a relevant unit with a good c_k rank a learned fracture concept? (05's summary)"""
    if n_detectors_top > random_mean + 1:
        return (f"Here the top {k} by c_k hold {n_detectors_top} detectors against {random_mean:.1f} for random "
                f"units: a good c_k rank points at a concept.")
    return (f"Here the top {k} by c_k hold {n_detectors_top} detectors against {random_mean:.1f} for {k} random units: "
            f"a good c_k rank does not make a unit a fracture concept; ask its alignment (notebook 06).")


def ablation_verdict(auc_intact: float, auc_top: float, auc_random: float, auc_random_sd: float, k: int,
                     n_pos: int, n_neg: int, what: str = "zeroing", ranking: str = "c_k") -> str:
    """Does the network use the top-k units? Judged by AUC, which a constant 'fracture' cannot win."""
    lost_top, lost_random = auc_intact - auc_top, auc_intact - auc_random
    head = (f"{what[:1].upper() + what[1:]} the top {k} units by {ranking}: AUC {auc_intact:.3f} -> {auc_top:.3f}; "
            f"{k} random units: -> {auc_random:.3f} ± {auc_random_sd:.3f} ({n_pos} fractures, {n_neg} healthy)")
    if lost_top > lost_random + 2 * max(auc_random_sd, 0.005):
        return head + ": the top units matter more than random ones."
    if lost_top < lost_random - 2 * max(auc_random_sd, 0.005):
        return head + ": the top units matter less than random ones."
    return head + ": no clearer effect than random units."


def occlusion_verdict(drop_target: float, flips_target: int, drop_elsewhere: float, drop_signs: float | None,
                      n: int, threshold: float = 0.5) -> str:
    """Is the network's evidence the target (and its fracture signs)?"""
    text = (f"Occluding the target vertebra drops P(fracture) by {drop_target:.2f} on average ({flips_target} of {n} "
            f"true positives fall below {threshold:g}); an equal volume elsewhere by {drop_elsewhere:.2f}")
    if drop_signs is not None:
        text += f"; the fracture signs alone by {drop_signs:.2f}"
    if drop_target > drop_elsewhere + 0.1:
        text += (": the evidence is the vertebra" + (", and within it the fracture signs" if drop_signs is not None
                                                        and drop_signs > 0.5 * drop_target else "") + ".")
    else:
        text += ": occluding the vertebra does no more than occluding elsewhere."
    return text


def where_method(name: str, iou: Mapping[str, float], near_zero: float = 0.05) -> str:
    """Does a 'where' map (Grad-CAM, occlusion) locate the fracture signs? IoU per concept."""
    if not iou:
        return f"{name}: no fracture sign on this vertebra to compare with."
    best = max(iou, key=iou.get)
    if iou[best] < near_zero:
        return (f"{name} does not locate the fracture: its IoU with every fracture sign is below {near_zero:g} "
                + (f"(all {iou[best]:.3f})." if round(iou[best], 3) == 0 else f"(best {best}, {iou[best]:.3f})."))
    strength = (f"weakly (below {2 * near_zero:g}, twice the near-zero line of {near_zero:g})"
                if iou[best] < 2 * near_zero else "clearly")
    return f"{name} overlaps the fracture signs {strength}: best IoU {iou[best]:.3f} ({best})."


def gradcam_hotspot(share: Mapping[str, float]) -> str:
    """Where Grad-CAM's hot region lies: the structure holding most of it."""
    if not share:
        return ""
    best = max(share, key=share.get)
    if share[best] >= 0.5:
        return f"Its hot region (> 0.5 of its maximum) lies mostly on {best} ({100 * share[best]:.0f} % of it)."
    return (f"Its hot region (> 0.5 of its maximum) lies mostly off the labelled structures of the target: the "
            f"largest share, {100 * share[best]:.0f} %, is on {best}.")


def correlation(rho: float, p: float, n: int, what: str, alpha: float = 0.01, expect_none: bool = True) -> str:
    """A rank correlation against the rule p < alpha, with its n (e.g. P(fracture) vs field of view)."""
    if rho is None or not np.isfinite(rho):
        return f"{what}: undefined (n = {n})."
    sig = passes(p, alpha)
    head = f"{what}: Spearman rho = {rho:.2f}, p = {format_p(p, alpha)} (n = {n})"
    if expect_none:
        return (f"We expect no correlation; here, {head}: "
                + (f"correlated (p < {alpha:g}), a shortcut to look into." if sig else
                   f"no correlation at p < {alpha:g}."))
    return head + (f": correlated at p < {alpha:g}." if sig else f": not significant at p < {alpha:g}.")


def layer_grids(grids: Mapping[str, Sequence[int]]) -> str:
    """We expect finer grids below; here ... (names -> grid shapes, dissected layer first)."""
    shapes = {nm: "x".join(map(str, g)) for nm, g in grids.items()}
    distinct = len(set(shapes.values()))
    listing = ", ".join(f"{nm} {s}" for nm, s in shapes.items())
    if distinct == 1:
        return (f"We expect finer grids below the dissected layer; here, all {len(shapes)} layers are on the same "
                f"grid ({listing}): this preset pools only in its first levels, so these layers differ in depth, "
                f"not in resolution.")
    return f"We expect finer grids below the dissected layer; here, {listing}."


def detector_count(n_detectors: int, n_units: int, iou: float, alpha: float, n_perm: int) -> str:
    return (f"{n_detectors} of {n_units} units are detectors (IoU > {iou:g} and shuffle p < {alpha:g}, {n_perm} "
            f"shuffles; the smallest possible p is {format_p(1 / (n_perm + 1), alpha)}).")


def concept_views() -> str:
    """The three readings of 'a unit's concept' in the course, fixed text (they never change)."""
    return ("A unit's concept is read three ways in this course: the **mask share** (which structure holds most "
            "of its mask voxels, notebook 04 and the explorer), the **best IoU** (the concept its masks overlap "
            "most relative to their union) and the **detector** label (best IoU > 0.04 and beating the same-class "
            "shuffle, notebook 06). Only the detector label is a measured concept; the other two describe where "
            "the mask lies. A unit can be 'on soft tissue' by share, 'vertebral body' by IoU and no detector.")


def call_caption(outcome: str, probability: float, grade, height_loss: float | None = None,
                 confounders: str = "", level: str = "", case: str = "") -> str:
    """A wrong call's caption: the case and level (as in the table above it), outcome and P, grade
    and the drawn height loss, what was drawn there."""
    short = {"physiological wedging": "wedge", "degenerated disc": "degen.\u00a0disc", "Schmorl node": "Schmorl",
             "degenerative endplate sclerosis": "sclerosis", "low density": "low density",
             "osteophyte": "osteophyte"}
    g = "" if grade is None or (isinstance(grade, float) and not np.isfinite(grade)) else f"G{int(grade)}"
    hl = "" if height_loss is None or not np.isfinite(height_loss) else f", {100 * height_loss:.0f} % loss"
    drawn = []
    for c in str(confounders or "").split(";"):
        c = c.strip()
        if c:
            name = next((v for k, v in short.items() if c.startswith(k)), c)
            if name not in drawn:
                drawn.append(name)
    what = textwrap.fill(", ".join(drawn), 26) if drawn else "no confounder"
    where = f"{case} {level}".strip()
    return (f"{where}\n" if where else "") + f"{outcome} P={probability:.2f}\n{g}{hl}\n{what}"


#: The phantom's fracture mimics (notebook 01), as concept names.
MIMICS = ("Schmorl node", "osteophyte", "degenerated disc", "degenerative endplate sclerosis",
          "physiological wedge", "low density")


def fp_units_where(measured: Mapping[int, str], n_fp: int) -> str:
    """Where the units behind false positives sit (by mask share: ``measured`` unit -> the export's
    "concept 45% (x1.2), ..." text), against the expectation that they sit on fracture mimics."""
    head = ("We expect the units behind false positives to sit on fracture mimics (Schmorl nodes, "
            "osteophytes, degenerated discs, wedged bodies); here, by mask share")
    first = {u: str(m).split(",")[0].rsplit(" ", 2)[0].strip() for u, m in measured.items() if isinstance(m, str) and m}
    if not first:
        return head + ", no unit could be measured (no concept masks or no false positive)."
    on_mimic = [u for u, c in first.items() if any(c.startswith(m) for m in MIMICS)]
    listing = "; ".join(f"unit {u}: {c}" for u, c in first.items())
    verdict = (f"{len(on_mimic)} of {len(first)} sit mostly on a mimic" if on_mimic
               else f"none of the {len(first)} sits mostly on a mimic")
    return f"{head}, the largest share of each unit's mask is on {listing}: {verdict}{small(n_fp, 'false positives')}."


def confounder_detectors(fp_detected: Mapping[int, str], n_fp_units: int, wedge_detectors: int, n_units: int) -> str:
    """Do the units behind false positives detect a confounder? ``fp_detected``: unit -> the
    confounder it is a detector of (the false-positive ranking's top units that are detectors);
    ``wedge_detectors``: detectors of the physiological wedge among all ``n_units`` units."""
    if n_fp_units == 0:
        return "No false positive: no false-positive unit to check."
    head = (f"{len(fp_detected)} of the top {n_fp_units} false-positive units are detectors of a confounder"
            + (": " + ", ".join(f"unit {u} ({c})" for u, c in fp_detected.items()) if fp_detected else ""))
    return head + (f"; {wedge_detectors} of all {n_units} units detect the physiological wedge"
                   + (": no unit of this layer detects the wedge (notebook 04 says how many false positives carry one)." if wedge_detectors == 0
                      else "."))


def redundancy(auc_intact: float, auc_keep_random: float, k: int, n_units: int, n_draws: int) -> str:
    """Is the evidence spread over many units? AUC with only k random units of the layer kept."""
    head = (f"Keeping only {k} random units of {n_units} (zeroing the rest; mean of {n_draws} draws) gives AUC "
            f"{auc_keep_random:.3f} against {auc_intact:.3f} intact")
    if auc_keep_random >= auc_intact - 0.05:
        return head + (": any such small set suffices, so the evidence is spread over many units "
                       "(whether a set is *necessary* is what zeroing it tests).")
    return head + ": a random small set does not suffice; the evidence needs more units than these."
