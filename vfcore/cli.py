"""The ``vfcore`` command: the stages as shell commands, and the whole notebook series.

    vfcore run-notebooks --run runs/phantom         # notebooks 01-05 on the embedded phantom
    vfcore phantom data/phantom --scans 60          # write a synthetic VerSe-layout root
    vfcore download --release verse19 --target data/verse
    vfcore patches data/phantom runs/phantom        # straightened 96^3 patches + manifest
    vfcore train runs/phantom                       # the classifier (checkpoint, metrics)
    vfcore dissect runs/phantom                     # T_k, c_k, r_k and the exported units
    vfcore badges                                   # regenerate Colab/Binder badges

    torchrun --standalone --nproc_per_node 4 -m vfcore train runs/big     # 4 GPUs, one model
    torchrun --standalone --nproc_per_node 4 -m vfcore dissect runs/big   # the exact pass, sharded

``train`` and ``dissect`` join a torchrun job (``vfcore.distributed.init``; nothing happens
without torchrun) and run the same code with one process or N: rank 0 alone writes and prints.
An error names its rank (``vfcore: error: rank 1 of 4: ...``); a rank that dies or hangs ends
the job with a message from rank 0 after the collective timeout (``VFCORE_DIST_TIMEOUT``).
See ``docs/distributed.md``.

Exit status: 0 everything done; 1 the command ran but part of the work failed (a scan, a
notebook: one line per failure); 2 bad input or usage (one line, ``vfcore: error: <file>:
<problem>``); 130 interrupted.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from .errors import InputError, InvalidParameterError, VfcoreError
from .run import RunFolder

#: The exit status of a command whose work partly failed (bad input and usage: 2, as argparse).
FAILED = 1
USAGE = 2
#: The commands that join a torchrun job (one process without torchrun).
DISTRIBUTED = ("train", "dissect")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _parse(text: str, kind: type):
    """``text`` as an int or a float, or argparse's error naming what it is not."""
    try:
        return kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def _positive_int(text: str) -> int:
    value = _parse(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


def _fraction(text: str) -> float:
    """A number strictly between 0 and 1 (``--q``, ``--threshold``)."""
    value = _parse(text, float)
    if not 0.0 < value < 1.0:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"{text!r} must lie strictly between 0 and 1")
    return value


#: Largest seed a command takes (numpy and torch both take 0 .. 2^32 - 1 everywhere).
MAX_SEED = 2 ** 32 - 1
#: Most seeds one ``vfcore train`` trains (one model each).
MAX_SEEDS = 100


#: Most worker processes a command starts (``--workers``).
MAX_WORKERS = 256


def _workers(text: str) -> int:
    """``--workers``: 1 .. :data:`MAX_WORKERS` processes."""
    value = _positive_int(text)
    if value > MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"{text!r} must be at most {MAX_WORKERS}")
    return value


def _seed(text: str) -> int:
    """A seed: a whole number 0 .. 2^32 - 1 (``--seed``, ``--seeds``)."""
    value = _parse(text, int)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text!r} must lie between 0 and {MAX_SEED}")
    return value


def _count(text: str) -> int:
    """A whole number >= 0 (``--top-fp``, ``--dissect-scans``)."""
    value = _parse(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 0")
    return value


def _share(text: str) -> float:
    """A number in [0, 1] (``--prevalence``)."""
    value = _parse(text, float)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} must lie between 0 and 1")
    return value


def _rate(text: str) -> float:
    """A finite number >= 0 (``--dissect-confounders``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


def check_device(text: str | None) -> None:
    """``--device``: cpu, cuda, cuda:N (N < the GPUs present) or mps, and only one that this
    machine has; else :class:`InvalidParameterError` (before any work)."""
    if text is None:
        return
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise InvalidParameterError("--device", "cpu, cuda, cuda:N or mps", text) from None
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise InvalidParameterError("--device", "cpu (this PyTorch sees no CUDA GPU)", text)
        if device.index is not None and device.index >= n:
            raise InvalidParameterError("--device", f"cuda or cuda:0 .. cuda:{n - 1}", text)
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise InvalidParameterError("--device", "cpu (no Apple MPS device here)", text)
    elif device.type != "cpu":
        raise InvalidParameterError("--device", "cpu, cuda, cuda:N or mps", text)


def check_environment() -> None:
    """The environment variables a torchrun job reads, before it starts: ``WORLD_SIZE``,
    ``RANK``, ``LOCAL_RANK`` whole numbers (rank < world size), ``MASTER_ADDR`` and
    ``MASTER_PORT`` set when the world has several processes, ``VFCORE_DIST_TIMEOUT`` a
    positive number of seconds, ``VFCORE_LOCK_WAIT`` seconds >= 0."""
    env = os.environ

    def whole(name: str, low: int, default: str) -> int:
        text = env.get(name, default).strip()
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise InvalidParameterError(name, f"a whole number >= {low}", text)
        return value

    size = whole("WORLD_SIZE", 1, "1")
    if size > 1:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not env.get(name, "").strip():
                raise InvalidParameterError(name, f"set when WORLD_SIZE is {size} (start the job "
                                            "with torchrun, which sets it)", env.get(name))
        whole("MASTER_PORT", 1, "0")
        rank = whole("RANK", 0, "-1")
        if rank >= size:
            raise InvalidParameterError("RANK", f"below WORLD_SIZE ({size})", rank)
        whole("LOCAL_RANK", 0, "0")
    text = env.get("VFCORE_DIST_TIMEOUT")
    if text is not None:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not 0 < value < float("inf"):
            raise InvalidParameterError("VFCORE_DIST_TIMEOUT", "a positive number of seconds", text)
    from .lock import wait_seconds

    wait_seconds()


# --------------------------------------------------------------------------------------------
# The commands
# --------------------------------------------------------------------------------------------


def _run_notebooks(args) -> int:
    from .notebooks import NotebookError, run_notebooks

    try:
        executed = run_notebooks(args.run, quick=args.quick, only=args.only)
    except NotebookError as err:  # the notebook's own error, one line; its copy stays readable
        print(f"vfcore: failed: {_one_line(err)}", file=sys.stderr)
        return FAILED
    print("\nExecuted notebooks:")
    for path in executed:
        print(f"  {path}")
    print(f"Artifacts (patches, model, dissection, concepts) are in {RunFolder(args.run).root}/")
    return 0


def _phantom(args) -> int:
    from .phantom import write_phantom_root

    root = write_phantom_root(args.root, n_scans=args.scans, seed=args.seed, workers=args.workers,
                              prevalence=args.prevalence, dissect_scans=args.dissect_scans,
                              dissect_prevalence=args.dissect_prevalence,
                              dissect_confounders=args.dissect_confounders)
    print(f"phantom written to {root}")
    return 0


def _download(args) -> int:
    from .verse import download

    download(args.release, args.target)
    return 0


def _patches(args) -> int:
    import json

    from .patches import extract_patches

    run = RunFolder(args.run)
    manifest = extract_patches(args.root, run, workers=args.workers, seed=args.seed,
                               grades=args.grades, progress=not args.quiet)
    report = json.loads(run.path("patch_report").read_text(encoding="utf-8"))
    table = report["grade_table"]
    print(f"{len(manifest)} vertebrae from {report['extracted']} of {report['cases']} scans "
          f"in {run.manifest}")
    print(f"labelled: {report['labelled']} ({report['fractured']} fractured); grade table: "
          f"{table['source'] or 'none found'}")
    if report["redone"]:
        print(f"re-extracted {len(report['redone'])} scan(s) whose patch files were damaged")
    print(f"report: {run.path('patch_report')}")
    for f in report["failed"]:
        print(f"vfcore: failed: {f['case']}: {_one_line(f['reason'])}", file=sys.stderr)
    if report["failed"]:
        print(f"vfcore: {len(report['failed'])} of {report['cases']} scans failed",
              file=sys.stderr)
        return FAILED
    return 0


def _join():
    """This process's place in the torchrun job (a world of one without torchrun)."""
    from .distributed import init

    return init()


def _train(args) -> int:
    from .data import AUGMENTATIONS
    from .model import PRESETS, default_preset

    check_environment()
    check_device(args.device)
    if len(args.seeds) > MAX_SEEDS or len(set(args.seeds)) != len(args.seeds):
        raise InvalidParameterError("--seeds", f"at most {MAX_SEEDS} different seeds",
                                    " ".join(map(str, args.seeds)))
    w = _join()
    if args.preset != "auto" and args.preset not in PRESETS:
        raise InputError("--preset", f"unknown preset {args.preset!r}; choose one of "
                                     f"{', '.join(sorted(PRESETS))} or auto")
    preset = PRESETS[default_preset() if args.preset == "auto" else args.preset]
    augment = (preset.augment if args.augment == "preset"
               else None if args.augment.lower() == "none" else args.augment)
    if augment is not None and augment not in AUGMENTATIONS:
        raise InputError("--augment", f"unknown augmentation {args.augment!r}; choose one of "
                                      f"{', '.join(sorted(AUGMENTATIONS))} or none")
    run = RunFolder(args.run)
    from .patches import read_manifest

    manifest = read_manifest(run.require("manifest"))  # a typed error naming the file, first
    labelled = manifest["fracture"].isin([0, 1]).fillna(False)
    draws = int((labelled & (manifest["split"] == "train")).sum()) // 2 * 2   # data.balanced_epoch
    batch = args.batch_size or preset.batch_size
    if batch > draws:       # no batch in an epoch: nothing would be learnt
        raise InvalidParameterError("--batch-size", f"at most {draws} (the draws per epoch of the "
                                    f"training split of {run.manifest})", batch)
    from .train import fit

    metrics = fit(run.root, preset, seeds=args.seeds, epochs=args.epochs,
                  augment=augment, device=args.device, batch_size=args.batch_size,
                  patience=args.patience, progress=not args.quiet)
    if not w.is_main:
        return 0
    test = ", ".join(f"{k} {v:.3f}" for k, v in metrics["test"].items() if v is not None)
    print(f"best seed {metrics['best_seed']} of {metrics['seeds']}: test ({metrics['n_test']} "
          f"vertebrae, {metrics['n_test_fractured']} fractured): {test}")
    print(f"checkpoint: {run.checkpoint}")
    print(f"metrics:    {run.metrics}")
    print(f"per seed:   {', '.join(str(run.seed_dir(s)) for s in metrics['seeds'])}")
    return 0


def _dissect(args) -> int:
    from . import dissect
    from .dissect.artifacts import parse_split

    check_environment()
    check_device(args.device)
    if args.split is not None:  # a bad split is bad input, before anything is read
        try:
            splits = parse_split(args.split)
        except VfcoreError as err:
            raise InputError("--split", err.problem) from None
        if "train" in splits:   # the network has seen these vertebrae: T_k would describe them
            raise InvalidParameterError("--split", "held-out splits only (test, val, dissect or a "
                                        "union such as test+dissect), never train", args.split)
    w = _join()
    run = RunFolder(args.run)
    run.require("checkpoint")

    art = dissect.dissect_run(run.root, args.split, args.q, layer=args.layer, device=args.device,
                              batch_size=args.batch_size, threshold=args.threshold, force=args.force,
                              progress=not args.quiet)
    if not w.is_main:             # rank 0 reports and exports
        return 0
    meta, d = art.meta, art.dissection
    print(f"dissected layer {meta['layer']} on split {meta['split']!r}: {d.n_samples} vertebrae, "
          f"{d.n_units} units, q = {meta['q_tail']}")
    print(f"dissection: {art.folder}")
    if not args.no_export:  # notebook 04's step: exemplars, collages, NIfTI files
        from .export import export_units

        art = export_units(run.root, top=args.top, top_fp=args.top_fp, device=args.device,
                     progress=not args.quiet)
        n = 0 if art.units is None else len(art.units)
        print(f"exported {n} units (exemplars, collages, NIfTI files): {art.folder}")
    return 0


def _badges(args) -> int:
    from .notebooks import write_badges

    changed = write_badges()
    print(f"badges updated in {len(changed)} notebook(s)")
    return 0


# --------------------------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``vfcore`` argument parser (one sub-command per stage)."""
    parser = argparse.ArgumentParser(prog="vfcore", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run-notebooks", help="execute the notebooks in order (papermill)")
    p.add_argument("--run", default="runs/phantom", help="run folder for artifacts and executed notebooks")
    p.add_argument("--quick", action="store_true", help="small sizes (CI, Binder): minutes on a 2-core CPU")
    p.add_argument("--only", nargs="+", metavar="STEM",
                   help="notebooks to run, by stem, stage or number (their inputs must exist)")
    p.set_defaults(func=_run_notebooks)

    p = sub.add_parser("phantom", help="write a synthetic VerSe-layout root")
    p.add_argument("root")
    p.add_argument("--scans", type=_positive_int, default=60)
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--workers", type=_workers, default=1)
    p.add_argument("--prevalence", type=_share, default=0.12,
                   help="share of fractured vertebrae in the scans (notebook 01's quick run: 0.2)")
    p.add_argument("--dissect-scans", type=_count, default=0,
                   help="more scans held out for the dissection only (split 'dissect')")
    p.add_argument("--dissect-prevalence", type=_share, default=0.5,
                   help="share of fractured vertebrae in the dissection-only scans (quick run: 0.3)")
    p.add_argument("--dissect-confounders", type=_rate, default=None, metavar="RATE",
                   help="confounder rate of the dissection-only scans (default: that of the others, "
                        "1; above 1 enriches them in fracture mimics such as strong physiological "
                        "wedges, so that the false-positive ranking has false positives to rank)")
    p.set_defaults(func=_phantom)

    p = sub.add_parser("download", help="download and extract a VerSe release (resumable, checked)")
    p.add_argument("--release", required=True, help="e.g. verse19 or verse20 (see vfcore.verse.VERSE_ARCHIVES)")
    p.add_argument("--target", required=True)
    p.set_defaults(func=_download)

    p = sub.add_parser("patches", help="straightened 96^3 vertebra patches for every scan of a root")
    p.add_argument("root", help="a VerSe-layout data root")
    p.add_argument("run", help="the run folder (writes its patches/)")
    p.add_argument("--grades", metavar="TABLE",
                   help="the fracture grade table (default: one found in the root)")
    p.add_argument("--workers", type=_workers, default=1)
    p.add_argument("--seed", type=_seed, default=0, help="seeds the patient-level split")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_patches)

    p = sub.add_parser("train", help="train the fracture classifier on the run's patches")
    p.add_argument("run", help="the run folder (reads patches/, writes model/)")
    p.add_argument("--preset", default="auto",
                   help="small (CPU), paper (the published network) or auto (paper with CUDA, else small)")
    p.add_argument("--epochs", type=_positive_int, help="upper limit (default: the preset's)")
    p.add_argument("--seeds", type=_seed, nargs="+", default=[0],
                   help=f"one model per seed (0 .. 2^32 - 1, at most {MAX_SEEDS})")
    p.add_argument("--augment", default="preset",
                   help="paper, light, none, or preset (the preset's: small light, paper paper)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA when available)")
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--patience", type=_positive_int, help="early-stopping patience in epochs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)

    p = sub.add_parser("dissect", help="network dissection of the run's checkpoint (T_k, c_k, r_k)")
    p.add_argument("run", help="the run folder (reads the trained checkpoint, writes the dissection)")
    p.add_argument("--split", default=None,
                   help="the split(s) whose activations define T_k: test, val, dissect or a union "
                        "such as test+dissect (default: test+dissect when the store has "
                        "dissection-only scans, else test; never train)")
    p.add_argument("--q", type=_fraction, default=0.005, help="P(a_k > T_k); the paper: 0.005")
    p.add_argument("--threshold", type=_fraction, default=0.5,
                   help="P(fracture) at which a vertebra counts as predicted fractured (TP, FP)")
    p.add_argument("--layer", help="the layer to dissect (default: the preset's)")
    p.add_argument("--device", help="cpu, cuda, ... (default: CUDA when available)")
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--top", type=_positive_int, default=10, help="units exported by c_k over TPs")
    p.add_argument("--top-fp", type=_count, default=5, help="units exported for the false positives")
    p.add_argument("--no-export", action="store_true", help="skip notebook 04's unit exports")
    p.add_argument("--force", action="store_true", help="redo even if an identical dissection exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_dissect)

    p = sub.add_parser("badges", help="regenerate the Colab/Binder badges of every notebook")
    p.set_defaults(func=_badges)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"vfcore: warning: {_one_line(message)}", file=sys.stderr)


def _where(args) -> str:
    """``"rank r of n: "`` inside a torchrun job of several processes, else ``""``."""
    if args.command not in DISTRIBUTED:
        return ""
    from .distributed import world

    w = world()
    return "" if w.size == 1 else f"{w.where}: "


def _error(args, text: str) -> int:
    where = _where(args)
    print(f"vfcore: error: {text if text.startswith(where) else where + text}", file=sys.stderr)
    return USAGE


def _leave(args, code: int) -> int:
    """End a torchrun job's process: leave the group after success; after an error exit at
    once (a peer may be gone, and a clean shutdown could wait for it for ever)."""
    if not _where(args):
        return code
    if code == 0:
        from .distributed import shutdown

        shutdown()
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (see the module docstring)."""
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            code = args.func(args)
        except VfcoreError as err:
            code = _error(args, _one_line(err))
        except OSError as err:  # a missing or unreadable file the stage did not wrap
            where = f"{err.filename}: " if err.filename else ""
            code = _error(args, f"{where}{_one_line(err.strerror or err)}")
        except KeyboardInterrupt:
            print("vfcore: interrupted", file=sys.stderr)
            return 130
    return _leave(args, code)
