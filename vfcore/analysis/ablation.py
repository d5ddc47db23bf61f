"""The causal check (Bau et al., PNAS 2020): does the network *use* the units that c_k ranks first?

Zero the top-k units by c_k at the dissected layer (k = 1, 5, 10, 20) and measure the recall
of the ground-truth fractures and the mean P(fracture) of the true positives; compare with k
random units (many draws). And the other way round: keep only the top-k, zero the rest. If the
ranked units matter, zeroing them costs far more recall than zeroing random ones.

:func:`zeroed` is a context manager around a forward hook: on exit the hook is removed and
the network is exactly as before. Everything here returns tables; notebook 06 draws them.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata

from vfcore.errors import DataValueError

from vfcore.forward import evaluating, find_layer, forward, forward_batches, probabilities
from vfcore.model import ENCODER_LAYERS, FractureNet

#: The k of the causal check.
KS = (1, 5, 10, 20)
#: Random draws per k (the issue asks for at least 20).
N_RANDOM = 20


def _gate(k: int, units=None, keep=None, layer: str = "", dtype=torch.float32, device=None) -> torch.Tensor:
    """[k] multipliers: 0 for ``units`` (or for all but ``keep``), 1 elsewhere."""
    chosen = torch.as_tensor(np.asarray(list(units if units is not None else keep), dtype=np.int64))
    if len(chosen) and (int(chosen.min()) < 0 or int(chosen.max()) >= k):
        raise DataValueError(layer, f"units {chosen.tolist()} outside the layer's {k} units")
    gate = torch.ones(k, dtype=dtype, device=device) if units is not None else torch.zeros(k, dtype=dtype, device=device)
    gate[chosen.to(gate.device)] = 0 if units is not None else 1
    return gate


@contextlib.contextmanager
def zeroed(model: torch.nn.Module, layer: str, units: Sequence[int] | None = None,
           keep: Sequence[int] | None = None) -> Iterator[torch.nn.Module]:
    """Inside the block, ``layer``'s output has channels ``units`` set to 0 (or, with ``keep``,
    every channel but ``keep``): A_k = 0, so M_k is empty and the layers above see nothing of k.

    >>> with zeroed(model, "down_tr512", units=[87, 71]):
    ...     p = model(x)
    On exit the hook is removed: the model computes exactly what it did before.
    """
    if (units is None) == (keep is None):
        raise DataValueError(None, "give exactly one of units= (zero them) or keep= (zero the rest)")
    module = find_layer(model, layer)

    def hook(_module, _inputs, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        gate = _gate(out.shape[1], units, keep, layer, out.dtype, out.device)
        out = out * gate.reshape(1, -1, *([1] * (out.ndim - 2)))
        return (out, *output[1:]) if isinstance(output, tuple) else out

    handle = module.register_forward_hook(hook)
    try:
        yield model
    finally:
        handle.remove()


def predict(model: torch.nn.Module, data, transform: Callable | None = None, batch_size: int = 16,
            device: str | None = None) -> np.ndarray:
    """P(fracture) [N] of ``data`` (eval mode, no gradients)."""
    p, _ = forward(model, data, batch_size=batch_size, transform=transform, device=device, amp=False)
    if not len(p):
        raise DataValueError(None, "data: no samples")
    return p


def _auc(p: np.ndarray, pos: np.ndarray) -> float:
    """AUC of ``p`` for ``pos`` (Mann-Whitney, ties half); NaN without both classes."""
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if n1 == 0 or n0 == 0:
        return np.nan
    r = rankdata(p)
    return float((r[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _row(mode: str, selection: str, k: int, draw: int, p: np.ndarray, tp: np.ndarray, threshold: float,
         pos: np.ndarray | None = None) -> dict:
    pred = p >= threshold
    pos = np.ones(len(p), dtype=bool) if pos is None else pos
    row = {"mode": mode, "selection": selection, "k": k, "draw": draw,
           "recall": float(pred[pos].mean()) if pos.any() else np.nan,
           "tp_kept": float(pred[tp].mean()) if tp.any() else np.nan,
           "mean_p_tp": float(p[tp].mean()) if tp.any() else np.nan}
    if not pos.all():
        row["fpr"] = float(pred[~pos].mean())
        row["auc"] = _auc(p, pos)
    return row


#: Largest cache of the layer's activations (bytes) for the fast path of :func:`ablation_table`.
CACHE_BYTES = 512 * 2 ** 20


def _above(model: torch.nn.Module, layer: str) -> Callable | None:
    """The network above ``layer`` as a function of its activations, where known: for
    ``vfcore.model.FractureNet`` and its last encoder layer, head + classifier."""
    if isinstance(model, FractureNet) and layer == ENCODER_LAYERS[-1]:
        return lambda A: model.classifier(model.head(A)).squeeze(1)
    return None


def _cached_runner(model, sub, layer, transform, batch_size, device) -> Callable | None:
    """p(gate) from the layer's activations computed once (the layers below are not rerun for
    every condition); None when the network above is unknown or the cache would be too big."""
    above = _above(model, layer)
    if above is None:
        return None
    As = []
    # fp32, as the intact baseline (predict) and the head below; the cache on the CPU, where
    # the engine leaves the model
    for out in forward_batches(model, sub, [layer], batch_size=batch_size, transform=transform,
                               device=device, amp=False):
        As.append(out.activations[layer].float().cpu())
        if sum(a.numel() for a in As) * 4 > CACHE_BYTES:
            return None
    A = torch.cat(As)

    def run(gate: torch.Tensor) -> np.ndarray:
        with evaluating(model), torch.inference_mode():
            ps = [probabilities(above(a * gate.to(a.device).reshape(1, -1, *([1] * (a.ndim - 2)))), a.shape[0])
                  for a in torch.split(A, batch_size)]
        return torch.cat(ps).float().cpu().numpy()

    return run


def ablation_table(model: torch.nn.Module, data, labels, layer: str, ranked: Sequence[int], *,
                   ks: Sequence[int] = KS, n_random: int = N_RANDOM, keep_only: bool = True,
                   transform: Callable | None = None, threshold: float = 0.5, seed: int = 0,
                   batch_size: int = 16, device: str | None = None, n_units: int | None = None,
                   fast: bool = True, negatives: bool = False, max_negatives: int | None = None,
                   extra: Mapping[str, Sequence[int]] | None = None) -> pd.DataFrame:
    """The causal check over the ground-truth fractures of ``data`` (only they are run).

    ``ranked``: units by c_k, best first (``rank_units(...)["unit"]``). One row per condition:
    ``mode`` (``"none"`` intact, ``"zero"`` the chosen units, ``"keep"`` only them),
    ``selection`` (``"top"`` or ``"random"``), ``k``, ``draw``, ``recall`` (fraction of the
    fractures predicted positive), ``tp_kept`` (fraction of the intact network's true positives
    still positive) and ``mean_p_tp`` (mean P(fracture) of those true positives). Random units
    are drawn from all ``n_units`` units of the layer (default: ``len(ranked)``).

    ``fast``: for the fracture network's dissected layer, compute the layer's activations once
    and rerun only the network above it per condition (the same numbers as the hooks of
    :func:`zeroed`, tested; bounded by :data:`CACHE_BYTES`); other models and layers use the hooks.

    ``negatives``: run the healthy vertebrae too and add ``fpr`` (healthy called fractured) and
    ``auc`` per condition: recall alone rewards a network that calls everything fractured;
    ``max_negatives``: at most this many healthy vertebrae, drawn at random (``seed``), to bound
    the cost (every condition reruns the network above the layer on every vertebra run).
    ``extra``: other rankings (name -> units, best first) run on the same conditions (no random
    draws of their own), as rows with ``selection`` = the name; one cache serves them all.
    """
    labels = np.asarray(labels).astype(int)
    pos = np.flatnonzero(labels == 1)
    if len(pos) == 0:
        raise DataValueError(None, "labels: no fractures in the set: recall is undefined")
    neg = np.flatnonzero(labels == 0) if negatives else np.zeros(0, dtype=int)
    if max_negatives is not None and len(neg) > max_negatives:
        neg = np.sort(np.random.default_rng(seed).choice(neg, size=int(max_negatives), replace=False))
    rows_run = np.sort(np.concatenate([pos, neg]))
    is_pos = labels[rows_run] == 1
    sub = _Subset(data, rows_run)
    cached = _cached_runner(model, sub, layer, transform, batch_size, device) if fast else None

    def run(**chosen) -> np.ndarray:
        if not chosen:
            return predict(model, sub, transform, batch_size, device)
        if cached is not None:
            return cached(_gate(K, layer=layer, **chosen))
        with zeroed(model, layer, **chosen):
            return predict(model, sub, transform, batch_size, device)

    ranked = [int(u) for u in ranked]
    n_units = len(ranked) if n_units is None else int(n_units)
    K = n_units
    p0 = cached(_gate(K, units=[], layer=layer)) if cached is not None else run()   # intact
    tp = (p0 >= threshold) & is_pos
    rows = [_row("none", "none", 0, 0, p0, tp, threshold, is_pos)]
    rng = np.random.default_rng(seed)
    modes = ("zero", "keep") if keep_only else ("zero",)
    for k in ks:
        k = min(int(k), n_units)
        for mode in modes:
            arg = "units" if mode == "zero" else "keep"
            rows.append(_row(mode, "top", k, 0, run(**{arg: ranked[:k]}), tp, threshold, is_pos))
            for name, units in (extra or {}).items():
                rows.append(_row(mode, name, k, 0, run(**{arg: [int(u) for u in units][:k]}), tp, threshold, is_pos))
            for draw in range(n_random):
                units = rng.choice(n_units, size=k, replace=False)
                rows.append(_row(mode, "random", k, draw, run(**{arg: units}), tp, threshold, is_pos))
    table = pd.DataFrame(rows)
    table.attrs.update(n_fractures=len(pos), n_tp=int(tp.sum()), threshold=threshold,
                       n_healthy=int((~is_pos).sum()), n_healthy_all=int((labels == 0).sum()))
    return table


def ablation_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per mode and k: recall (top), mean and sd of recall (random), recall lost by each from the
    intact network and their ratio (``loss_ratio`` = lost by top / lost by random), and the same
    for mean_p_tp; with ``negatives``: ``auc_*`` and ``fpr_*`` (intact, top, random mean and sd);
    with ``extra`` rankings: ``recall_<name>``, ``auc_<name>``, ``fpr_<name>``, ``mean_p_tp_<name>``."""
    base = table[table["mode"] == "none"].iloc[0]
    rows = []
    for (mode, k), g in table[table["mode"] != "none"].groupby(["mode", "k"], sort=True):
        top, rand = g[g["selection"] == "top"], g[g["selection"] == "random"]
        lost_top = base["recall"] - float(top["recall"].mean())
        lost_rand = base["recall"] - float(rand["recall"].mean())
        rows.append({"mode": mode, "k": int(k), "recall_intact": base["recall"],
                     "recall_top": float(top["recall"].mean()), "recall_random": float(rand["recall"].mean()),
                     "recall_random_sd": float(rand["recall"].std(ddof=1)) if len(rand) > 1 else np.nan,
                     "lost_top": lost_top, "lost_random": lost_rand,
                     "loss_ratio": lost_top / lost_rand if lost_rand > 0 else np.inf if lost_top > 0 else np.nan,
                     "mean_p_tp_top": float(top["mean_p_tp"].mean()),
                     "mean_p_tp_random": float(rand["mean_p_tp"].mean()), "draws": len(rand)})
        for sel in [s for s in g["selection"].unique() if s not in ("top", "random")]:
            other = g[g["selection"] == sel]
            for col in ("recall", "auc", "fpr", "mean_p_tp"):
                if col in other:
                    rows[-1][f"{col}_{sel}"] = float(other[col].mean())
        for col in ("auc", "fpr"):
            if col in g:
                rows[-1].update({f"{col}_intact": base[col], f"{col}_top": float(top[col].mean()),
                                 f"{col}_random": float(rand[col].mean()),
                                 f"{col}_random_sd": float(rand[col].std(ddof=1)) if len(rand) > 1 else np.nan})
    return pd.DataFrame(rows)


class _Subset:
    """Rows ``index`` of ``data`` (numpy, memmap, tensor or a lazy patch array), sliceable."""

    def __init__(self, data, index: np.ndarray):
        self.data, self.index = data, np.asarray(index)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item):
        idx = self.index[item]
        if isinstance(self.data, torch.Tensor):
            return self.data[torch.as_tensor(np.atleast_1d(idx))]
        return np.stack([np.asarray(self.data[int(i)]) for i in np.atleast_1d(idx)])
