"""A synthetic, fully known stand-in for a run, used by the explorer's kernel-side tests.

A "network" whose activations are computed by numpy from the patch: the centre 64^3 of the
96^3 patch (the paper preset's crop) is scaled like the network input and mean-pooled to
8^3, and unit k multiplies that pooled map by its own spatial weight pattern W_k. So every
activation map, r_k, top unit, best slice and rendered pixel has an independent reference.
"""
from __future__ import annotations

import functools

import numpy as np
import pandas as pd

from vfcore.explorer import ConceptBook, Pool, RunData, outcome

K = 12
GRID = 8
FIELD = (slice(16, 80),) * 3
N = 10


def weights(seed: int = 0) -> np.ndarray:
    """W_k [K, 8, 8, 8]: unit k likes one corner-ish block, with a different size each."""
    rng = np.random.default_rng(seed)
    w = np.zeros((K, GRID, GRID, GRID), dtype=np.float32)
    for k in range(K):
        lo = rng.integers(0, 5, size=3)
        hi = lo + rng.integers(2, 4, size=3)
        w[k, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1.0 + 0.1 * k
        w[k] += 0.05 * rng.random((GRID, GRID, GRID), dtype=np.float32)
    return w


W = weights()


def pooled(patches: np.ndarray) -> np.ndarray:
    """Network-input scaling ([-1000, 1000] HU -> [0, 1]) of the centre crop, mean-pooled to 8^3."""
    x = (np.clip(patches[:, 16:80, 16:80, 16:80].astype(np.float32), -1000, 1000) + 1000) / 2000
    b = x.shape[0]
    return x.reshape(b, GRID, 8, GRID, 8, GRID, 8).mean(axis=(2, 4, 6))


def activations(patches: np.ndarray):
    """A [B, K, 8, 8, 8] and a probability per patch."""
    p = pooled(np.asarray(patches))
    A = p[:, None] * W[None]
    prob = 1 / (1 + np.exp(-(p.mean(axis=(1, 2, 3)) - 0.565) * 200))
    return A.astype(np.float32), prob


LABELS = [19, 20, 21, 22, 18, 17, 23, 20, 19, 21]


@functools.lru_cache(maxsize=2)
def make_patches(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """N int16 HU patches (soft-tissue noise and a bright 'vertebral body' block placed per
    sample) and their vertebra label patches: the block carries the sample's label, the slab
    above it (towards the head, smaller I) the cranial neighbour's label - 1."""
    rng = np.random.default_rng(seed)
    out = rng.normal(40, 60, size=(N, 96, 96, 96)).astype(np.float32)
    vert = np.zeros((N, 96, 96, 96), dtype=np.int16)
    for i in range(N):
        c = rng.integers(30, 66, size=3)
        h = 10 + i
        block = (slice(c[0] - h, c[0] + h), slice(c[1] - h, c[1] + h), slice(c[2] - h, c[2] + h))
        out[i][block] += 700 + 40 * i
        vert[i][block] = LABELS[i]
        vert[i][(slice(max(c[0] - h - 12, 0), c[0] - h),) + block[1:]] = LABELS[i] - 1
    out = np.rint(out).astype(np.int16)
    out.flags.writeable = vert.flags.writeable = False  # cached: shared by every test
    return out, vert


def make_run_data(tmp_path, thresholds=None) -> tuple[RunData, np.ndarray]:
    patches, vertebrae = make_patches()
    A, prob = activations(patches)
    if thresholds is None:
        # T_k: the 0.995 quantile of each unit over all positions of all samples (as dissection does)
        thresholds = np.quantile(A.transpose(1, 0, 2, 3, 4).reshape(K, -1), 0.995, axis=1)
    labels = np.array([1, 1, 0, 0, 1, 0, 1, 0, 0, 1])
    pred = (prob >= 0.5).astype(int)
    table = pd.DataFrame({
        "case": [f"sub-syn{i:03d}" for i in range(N)],
        "level": ["T12", "L1", "L2", "L3", "T11", "T10", "L4", "L1", "T12", "L2"],
        "label": LABELS,
        "grade": [2, 3, 0, 0, 1, 0, 2, 0, 0, 3],
        "fracture": labels,
        "probability": prob,
        "prediction": pred,
        "outcome": [outcome(l, p) for l, p in zip(labels, pred)],
    })
    pool = Pool(table=table, load=lambda i: patches[i], load_vertebrae=lambda i: vertebrae[i])
    masked = np.where(A > thresholds[None, :, None, None, None], A, 0).sum(axis=(2, 3, 4))  # [N, K]
    exemplars = {k: [int(i) for i in np.argsort(-A[:, k].max(axis=(1, 2, 3)), kind="stable")[:5]]
                 for k in range(K)}
    c_k = np.linspace(0.9, -0.2, K)[np.random.default_rng(3).permutation(K)]
    c_k[5] = np.nan
    data = RunData(
        thresholds=np.asarray(thresholds, dtype=np.float64), c_k=c_k, samples=pool,
        exemplar_pool=pool, exemplars=exemplars, activations=activations, field=FIELD,
        min_input=(64, 64, 64), concepts=ConceptBook.load(tmp_path / "concepts.json", "abc123", "syn"),
        meta={"split": "test", "layer": "syn"},
    )
    data.meta["masked_sum"] = masked
    data.meta["vertebrae"] = vertebrae
    return data, patches
