"""A tiny synthetic patch store in the format of vfcore.patches (for data/train tests)."""
from __future__ import annotations

import contextlib
import io

from pathlib import Path

import numpy as np
import pandas as pd

from vfcore.run import RunFolder


def write_store(run: Path, n: int = 30, seed: int = 0) -> Path:
    """``n`` int16 patches: a bright box, flattened (shorter in I) when 'fractured'."""
    store = RunFolder(run).patches
    store.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        y = int(i % 3 == 0)
        patch = np.full((96, 96, 96), -900, np.int16)
        h = 12 if y else 22
        patch[48 - h:48 + h, 30:66, 30:66] = 300
        patch += rng.normal(0, 20, patch.shape).astype(np.int16)
        np.save(store / f"p{i:03d}_ct.npy", patch)
        split = ("train", "train", "train", "val", "test")[(i // 3) % 5]
        rows.append(dict(case=f"sub-x{i:03d}", patient=f"sub-x{i:03d}", label=20, level="L1",
                         fracture=y, grade=2 * y, shape=y, split=split, ct_path=f"p{i:03d}_ct.npy",
                         mask_path="", concept_path="", source_sha256="", out_of_field=0.0, reason=""))
    # one unlabelled vertebra ('x'): must never be used
    rows.append(dict(rows[-1], case="sub-xx", fracture="", grade="", reason="foreign material (x)"))
    pd.DataFrame(rows).to_csv(RunFolder(run).manifest, index=False)
    return run


def run_cli(*argv) -> tuple[int, str, str]:
    """``vfcore <argv>`` in this process: (exit status, stdout, stderr)."""
    from vfcore.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse's usage errors
            code = exit_.code
    return code, out.getvalue(), err.getvalue()
