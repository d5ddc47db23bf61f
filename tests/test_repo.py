"""The collection as a whole: the series is complete, badges are right, outputs are stripped."""
from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

from vfcore.notebooks import GITHUB_REPO, NOTEBOOKS_DIR, PROJECT, QUICK, series

EXPECTED = [
    "01_preprocessing",
    "02_training",
    "03_quantile_thresholding",
    "04_correlation_ranking",
    "05_concept_explorer",
    "06_concept_alignment",
    "07_causal_checks",
    "08_concept_directions",
]


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_series_is_complete_and_ordered():
    assert [p.stem for p in series()] == EXPECTED
    assert set(QUICK) == set(EXPECTED)


@pytest.mark.parametrize("stem", EXPECTED)
def test_outputs_are_stripped(stem):
    nb = _load(NOTEBOOKS_DIR / f"{stem}.ipynb")
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [], f"{stem}: cell {i} has outputs committed"
            assert cell.get("execution_count") is None, f"{stem}: cell {i} has an execution count"
    assert "widgets" not in nb.get("metadata", {}), f"{stem}: widget state committed"


@pytest.mark.parametrize("stem", EXPECTED)
def test_parameters_cell(stem):
    nb = _load(NOTEBOOKS_DIR / f"{stem}.ipynb")
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{stem}: needs exactly one cell tagged 'parameters'"
    source = "".join(tagged[0]["source"])
    names = re.findall(r"^([A-Za-z_]\w*)\s*=", source, flags=re.M)
    assert "RUN_DIR" in names and "SEED" in names
    assert all(n.isupper() for n in names), f"{stem}: parameter names must be UPPER_CASE: {names}"
    # the quick parameters CI passes must exist in the notebook (papermill would only warn)
    assert set(QUICK[stem]) <= set(names), f"{stem}: QUICK names unknown parameters"
    # papermill's own parser must read every one of them (a comment it cannot parse, e.g. one
    # holding "=" or "):", makes it warn "Unable to parse line" and lose that parameter's help)
    import papermill.inspection
    inferred = papermill.inspection.inspect_notebook(str(NOTEBOOKS_DIR / f"{stem}.ipynb"))
    assert list(inferred) == names, f"{stem}: papermill reads {list(inferred)}, the cell has {names}"


@pytest.mark.parametrize("stem", EXPECTED)
def test_badges_point_at_this_notebook(stem):
    """Each notebook's first cell carries Colab and Binder badges for its own path."""
    path = NOTEBOOKS_DIR / f"{stem}.ipynb"
    first = "".join(_load(path)["cells"][0]["source"])
    colab = re.findall(r"\((https://colab\.research\.google\.com/github/[^)]+)\)", first)
    binder = re.findall(r"\((https://mybinder\.org/v2/gh/[^)]+)\)", first)
    assert len(colab) == 1 and len(binder) == 1, f"{stem}: expected one Colab and one Binder badge"
    prefix = f"https://colab.research.google.com/github/{GITHUB_REPO}/blob/main/"
    assert colab[0].startswith(prefix)
    assert (PROJECT / colab[0][len(prefix):]).resolve() == path.resolve()
    repo, _, query = binder[0].removeprefix("https://mybinder.org/v2/gh/").partition("?labpath=")
    assert repo == f"{GITHUB_REPO}/main"
    assert (PROJECT / unquote(query)).resolve() == path.resolve()


@pytest.mark.parametrize("stem", EXPECTED)
def test_setup_cell_installs_only_on_colab(stem):
    nb = _load(NOTEBOOKS_DIR / f"{stem}.ipynb")
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    assert '"google.colab" in sys.modules' in code[0]
    assert "describe_runtime" in code[0]


def test_setup_cell_on_colab_never_downgrades_what_is_installed(monkeypatch):
    """Every notebook's setup cell, run as on Colab (a stand-in ``google.colab`` module, the
    ``%pip`` magic captured): pip installs vfcore under a constraint for each installed package
    that is at least its installed version (read here with importlib.metadata), torch pinned."""
    import shlex
    import sys
    import types
    import warnings
    from importlib import metadata

    from IPython.core.inputtransformer2 import TransformerManager
    from packaging.requirements import Requirement

    cells = {"".join([c for c in _load(NOTEBOOKS_DIR / f"{stem}.ipynb")["cells"]
                      if c["cell_type"] == "code"][0]["source"]) for stem in EXPECTED}
    assert len(cells) == 1, "the notebooks' setup cells differ"
    magics = []

    class Shell:
        def run_line_magic(self, name, line):
            magics.append((name, shlex.split(line)))

    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")               # no GPU here: describe_runtime warns
        exec(TransformerManager().transform_cell(cells.pop()), {"get_ipython": Shell})
    (name, args), = magics
    assert name == "pip" and args[:2] == ["install", "-q"]
    assert args[-1] == "vfcore @ git+https://github.com/vfcore-course/vfcore"
    constraints = {}
    for line in Path(args[args.index("-c") + 1]).read_text().splitlines():
        req = Requirement(line)
        constraints[req.name] = req.specifier
    for package in ("numpy", "pandas", "scipy", "matplotlib", "nibabel", "ipywidgets"):
        installed = metadata.version(package)
        assert constraints[package].contains(installed)
        assert all(s.operator == ">=" and s.version == installed for s in constraints[package])
    torch_version = metadata.version("torch").split("+")[0]
    assert [(s.operator, s.version) for s in constraints["torch"]] == [("==", torch_version)]
    assert "vfcore" not in constraints


def test_ci_runs_the_readme_commands():
    """.ci/run runs the README's install and test commands (as `python3 -m ...`)."""
    readme = (PROJECT / "README.md").read_text()
    ci = (PROJECT / ".ci" / "run").read_text().splitlines()
    for readme_cmd, ci_cmd in (('pip install -e ".[dev]"', 'python3 -m pip install -e ".[dev]"'),
                               ("python -m pytest", "python3 -m pytest")):
        assert readme_cmd in readme
        assert ci_cmd in ci


def test_device_name_names_the_cpu_model(monkeypatch):
    """Timings are quoted with the device: on a CPU, /proc/cpuinfo's model and torch's threads."""
    import torch

    from vfcore.runtime import device_name

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    name = device_name()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        model = next(ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                     if ln.startswith("model name"))
        assert name.startswith(model)
    assert name.endswith(f"({torch.get_num_threads()} threads)")
