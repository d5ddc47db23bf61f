"""The run folder: the one place that knows where every artifact of a run lives.

A run folder (e.g. ``runs/phantom/``) holds everything one pass through the course makes::

    data/                    the phantom's VerSe-layout root        notebook 01 / `vfcore phantom`
    patches/manifest.csv     the patch store (+ report.json)        notebook 01 / `vfcore patches`
    model/best.pt            the checkpoint dissection reads        notebook 02 / `vfcore train`
    model/seed<k>/           per-seed checkpoints and history       notebook 02
    model/metrics.json       test metrics per seed                  notebook 02
    dissection/              T_k, statistics, rankings              notebook 03/04 / `vfcore dissect`
    dissection/units.csv     the exported units (collages/, nifti/)  notebook 04
    concepts.json            the student's concept dictionary       notebook 05
    alignment/               concept alignment and controls         notebook 06 (ablation.csv: 07)
    directions/              probes, bases, TCAV, healed twins       notebook 08
    notebooks/               executed copies of the notebooks       `vfcore run-notebooks`

No other module spells these paths or the notebook names: they ask a :class:`RunFolder`.
``RunFolder.require(name)`` returns the path of an artifact or raises
:class:`~vfcore.errors.MissingArtifactError` naming the notebook (or command) that makes it.

A relative run folder is resolved against the project root when the project is a source
checkout (so ``runs/phantom`` is the same folder from the README command, from JupyterLab in
``notebooks/`` and from papermill anywhere), otherwise against the working directory.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidParameterError, MissingArtifactError

#: The project root of a source checkout (where ``pyproject.toml`` and ``notebooks/`` are).
PROJECT = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = PROJECT / "notebooks"

#: The notebooks of the series by stage, and what each teaches (the README's table).
NOTEBOOKS: dict[str, str] = {
    "preprocessing": "01_preprocessing",
    "training": "02_training",
    "thresholds": "03_quantile_thresholding",
    "ranking": "04_correlation_ranking",
    "explorer": "05_concept_explorer",
    "alignment": "06_concept_alignment",
    "causal": "07_causal_checks",
    "directions": "08_concept_directions",
}


@dataclass(frozen=True)
class Artifact:
    """One artifact of a run folder: its path relative to the run, what it is, who makes it."""

    rel: str
    what: str
    stage: str  # a key of NOTEBOOKS
    command: str = ""  # the command-line equivalent, if there is one

    @property
    def notebook(self) -> str:
        """The notebook that makes this artifact, as ``notebooks/<stem>.ipynb``."""
        return notebook_path(self.stage)


#: Every named artifact of a run folder.
ARTIFACTS: dict[str, Artifact] = {
    "data": Artifact("data", "the phantom data root", "preprocessing", "vfcore phantom"),
    "patches": Artifact("patches", "the patch store", "preprocessing", "vfcore patches"),
    "manifest": Artifact("patches/manifest.csv", "the patch store", "preprocessing", "vfcore patches"),
    "patch_report": Artifact("patches/report.json", "the patch store's report", "preprocessing",
                             "vfcore patches"),
    "model": Artifact("model", "the trained models", "training", "vfcore train"),
    "checkpoint": Artifact("model/best.pt", "the trained model", "training", "vfcore train"),
    "metrics": Artifact("model/metrics.json", "the test metrics", "training", "vfcore train"),
    "dissection": Artifact("dissection", "the dissection", "thresholds", "vfcore dissect"),
    "dissection_meta": Artifact("dissection/meta.json", "the dissection (T_k, statistics)",
                                "thresholds", "vfcore dissect"),
    "exemplars": Artifact("dissection/exemplars.json", "the exemplars and collages", "ranking"),
    "units": Artifact("dissection/units.csv", "the exported units (collages, NIfTI)", "ranking"),
    "concepts": Artifact("concepts.json", "the concept dictionary", "explorer"),
    "alignment": Artifact("alignment", "the concept alignment", "alignment"),
    "alignment_units": Artifact("alignment/units.csv", "the measured concept of every unit",
                                "alignment"),
    "directions": Artifact("directions", "concept directions, TCAV and healed twins", "directions"),
    "notebooks": Artifact("notebooks", "the executed notebooks", "preprocessing", "vfcore run-notebooks"),
}


def notebook_path(stage: str) -> str:
    """``notebooks/<stem>.ipynb`` of a stage (a key of :data:`NOTEBOOKS`) or a notebook stem."""
    stem = NOTEBOOKS.get(stage, stage)
    return f"notebooks/{stem}.ipynb"


def resolve_run_dir(run_dir: str | Path) -> Path:
    """The absolute run folder: a relative path is taken from the project root of a checkout."""
    path = Path(run_dir).expanduser()
    if path.is_absolute():
        return path
    base = PROJECT if (PROJECT / "pyproject.toml").is_file() and NOTEBOOKS_DIR.is_dir() else Path.cwd()
    return (base / path).resolve()


class RunFolder:
    """The paths of one run folder (see the module docstring), resolved once.

    >>> run = RunFolder("runs/phantom")
    >>> run.checkpoint                  # <project>/runs/phantom/model/best.pt
    >>> run.require("checkpoint")       # the same, or MissingArtifactError naming notebook 02
    """

    def __init__(self, run_dir: str | Path | "RunFolder"):
        self.root = run_dir.root if isinstance(run_dir, RunFolder) else resolve_run_dir(run_dir)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.root)!r})"

    def __fspath__(self) -> str:
        return str(self.root)

    def path(self, name: str) -> Path:
        """The path of a named artifact (a key of :data:`ARTIFACTS`)."""
        try:
            return self.root / ARTIFACTS[name].rel
        except KeyError:
            raise InvalidParameterError("name", f"one of {sorted(ARTIFACTS)}", name) from None

    def missing(self, name: str, path: Path | None = None) -> MissingArtifactError:
        """The error for a missing artifact: what it is and which notebook (or command) makes it."""
        art = ARTIFACTS[name]
        how = f"run {art.notebook} first"
        if art.command:
            how += f" (or `{art.command}`)"
        return MissingArtifactError(path or self.path(name), f"{art.what} not found: {how}")

    def require(self, name: str) -> Path:
        """The path of an artifact that must exist, else :class:`MissingArtifactError`."""
        path = self.path(name)
        if not path.exists():
            raise self.missing(name, path)
        return path

    def has(self, *names: str) -> bool:
        """True when every named artifact exists."""
        return all(self.path(n).exists() for n in names)

    # the artifacts used most, as attributes
    data = property(lambda self: self.path("data"))
    patches = property(lambda self: self.path("patches"))
    manifest = property(lambda self: self.path("manifest"))
    model = property(lambda self: self.path("model"))
    checkpoint = property(lambda self: self.path("checkpoint"))
    metrics = property(lambda self: self.path("metrics"))
    dissection = property(lambda self: self.path("dissection"))
    units = property(lambda self: self.path("units"))
    concepts = property(lambda self: self.path("concepts"))
    alignment = property(lambda self: self.path("alignment"))
    notebooks = property(lambda self: self.path("notebooks"))

    def seed_dir(self, seed: int) -> Path:
        """``model/seed<k>/``: one seed's checkpoints (best.pt, last.pt) and history.csv."""
        return self.model / f"seed{seed}"

    def seed_checkpoint(self, seed: int, which: str = "best") -> Path:
        """``model/seed<k>/best.pt`` (best validation F1) or ``last.pt`` (where training resumes)."""
        if which not in ("best", "last"):
            raise InvalidParameterError("which", "'best' or 'last'", which)
        return self.seed_dir(seed) / f"{which}.pt"

    def history(self, seed: int) -> Path:
        """``model/seed<k>/history.csv``: one row per epoch of that seed."""
        return self.seed_dir(seed) / "history.csv"

    def patch(self, rel: str | Path) -> Path:
        """A file of the patch store, from its path relative to ``patches/`` (as in the manifest)."""
        return self.patches / rel
