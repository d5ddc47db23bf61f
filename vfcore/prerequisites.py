"""Build the earlier steps a notebook needs when it is opened alone.

A Colab or Binder badge opens one notebook in a fresh runtime: the run folder is empty, and
notebook 04 would stop at its first cell that reads notebook 03's dissection. Each notebook
from 02 on therefore starts with one call::

    run = prepare(RUN_DIR, "ranking")     # builds what is missing, with the quick settings

which looks at the run folder (:class:`vfcore.run.RunFolder`), lists the missing artifacts,
and makes them with the same package functions the notebooks call, with the quick settings
of :data:`vfcore.notebooks.QUICK` (the CI / Binder sizes). A run folder that already has
everything is left alone, so the call costs nothing in the series.
"""
from __future__ import annotations

import time
from pathlib import Path

from .errors import InvalidParameterError
from .lock import writer_lock
from .provenance import model_staleness, stale_steps
from .run import ARTIFACTS, NOTEBOOKS, RunFolder

#: What each notebook reads from the run folder (artifact names of vfcore.run.ARTIFACTS).
NEEDS: dict[str, tuple[str, ...]] = {
    "preprocessing": (),
    "training": ("manifest",),
    "thresholds": ("manifest", "checkpoint"),
    "ranking": ("manifest", "checkpoint"),
    "explorer": ("manifest", "checkpoint", "dissection_meta", "exemplars"),
    "alignment": ("manifest", "checkpoint", "dissection_meta", "exemplars"),
    "causal": ("manifest", "checkpoint", "dissection_meta", "exemplars"),
    "directions": ("manifest", "checkpoint", "dissection_meta", "exemplars"),
}

#: The stages that make artifacts, in the order they must run.
ORDER = ("preprocessing", "training", "ranking")

#: Seconds each step took in the quick run on this project's 2-core AMD EPYC CPU (no GPU),
#: the run the README's Binder table comes from; shown so a student knows what to expect.
CPU_SECONDS: dict[str, int] = {"preprocessing": 123, "training": 511, "ranking": 70}


def _stage_key(stage: str) -> str:
    """A stage name from a stage key or a notebook stem (``"04_correlation_ranking"``)."""
    if stage in NEEDS:
        return stage
    for key, stem in NOTEBOOKS.items():
        if stage in (stem, f"{stem}.ipynb"):
            return key
    raise InvalidParameterError("notebook or stage", f"one of {sorted(NEEDS)} or a notebook stem", stage)


def _producer(artifact: str) -> str:
    """The step of :data:`ORDER` that makes an artifact (the dissection: the ranking step)."""
    stage = ARTIFACTS[artifact].stage
    return "ranking" if stage == "thresholds" else stage


def missing_steps(run_dir, stage: str) -> list[str]:
    """The steps (of :data:`ORDER`) that must run before ``stage`` can read its inputs.

    From the first step whose output is missing or stale on (made from other inputs than the
    run folder holds now: a dissection of an earlier checkpoint after retraining, a model of an
    earlier patch store; :func:`vfcore.provenance.stale_steps`), every step ``stage`` depends
    on runs again: a later artifact made from other inputs would be stale.
    """
    run = RunFolder(run_dir)
    needs = NEEDS[_stage_key(stage)]
    steps = [s for s in ORDER if any(_producer(n) == s for n in needs)]
    stale = stale_steps(run) if any(run.path(n).exists() for n in needs) else {}
    for i, step in enumerate(steps):
        if step in stale or any(not run.path(n).exists() for n in needs if _producer(n) == step):
            return steps[i:]
    return []


def _run_step(step: str, run: RunFolder, quick: dict) -> None:
    """Make one step's artifacts with the quick settings (the calls the notebooks make)."""
    if step == "preprocessing":
        from .patches import extract_patches
        from .phantom import write_phantom_root

        p = quick.get("01_preprocessing", {})
        root = write_phantom_root(run.data, n_scans=p.get("N_SCANS", 48), seed=0,
                                  workers=p.get("WORKERS", 1), prevalence=p.get("PREVALENCE", 0.2),
                                  dissect_scans=p.get("N_DISSECT_SCANS", 0),
                                  dissect_prevalence=p.get("DISSECT_PREVALENCE", 0.5),
                                  dissect_confounders=p.get("DISSECT_CONFOUNDERS"))
        extract_patches(root, run.root, workers=p.get("WORKERS", 1), seed=0)
    elif step == "training":
        from .train import fit

        why = model_staleness(run)
        if why:   # trained on another patch store: it cannot resume; kept aside, not deleted
            aside = run.model.with_name(run.model.name + ".replaced")
            if aside.exists():
                import shutil

                shutil.rmtree(aside)
            run.model.rename(aside)
            print(f"{why}: the old models are moved to {aside}")

        p = quick.get("02_training", {})
        fit(run.root, p.get("PRESET", "small"), seeds=p.get("SEEDS", [0]), epochs=p.get("EPOCHS"),
            patience=p.get("PATIENCE"), augment=p.get("AUGMENT"))
    elif step == "ranking":
        from .dissect import dissect_run
        from .export import export_units

        p = quick.get("04_correlation_ranking", {})
        dissect_run(run.root, p.get("SPLIT"), p.get("Q_TAIL", 0.005))
        export_units(run.root, top=p.get("TOP_UNITS", 10), top_fp=p.get("TOP_FP_UNITS", 5))


def prepare(run_dir, stage: str, *, quick: dict | None = None) -> RunFolder:
    """Build the missing earlier steps of ``stage`` in ``run_dir`` (quick settings); return the run.

    Prints the absolute run folder, what it builds and about how long that takes on a CPU.
    """
    from tqdm.auto import tqdm

    from .notebooks import QUICK

    run = RunFolder(run_dir)
    print(f"run folder: {run.root}")
    steps = missing_steps(run, stage)
    if not steps:
        return run
    stale = stale_steps(run)
    for step in steps:
        if step in stale:
            print(f"{NOTEBOOKS[step]}: its output is stale ({stale[step]}): building it again")
    eta = sum(CPU_SECONDS[s] for s in steps)
    how = ("the quick settings (about " f"{eta / 60:.0f} min on a 2-core CPU, less on a GPU)"
           if quick is None else "the settings given (PREPARE)")
    print(f"this notebook needs the output of {', '.join(NOTEBOOKS[s] for s in steps)}, which is not "
          f"in the run folder yet: building it with {how}")
    run.root.mkdir(parents=True, exist_ok=True)
    with writer_lock(run.root, f"prepare for {NOTEBOOKS[_stage_key(stage)]}"):  # one writer
        for step in tqdm(steps, desc="earlier notebooks", unit="step"):
            start = time.perf_counter()
            _run_step(step, run, quick or QUICK)
            tqdm.write(f"{NOTEBOOKS[step]}: done in {time.perf_counter() - start:.0f} s")
    return run
