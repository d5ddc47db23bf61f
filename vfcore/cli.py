"""The ``vfcore`` command: the stages as shell commands, and the whole notebook series.

    vfcore run-notebooks --run runs/phantom         # notebooks 01-05 on the embedded phantom
    vfcore phantom data/phantom --scans 60          # write a synthetic VerSe-layout root
    vfcore download --release verse19 --target data/verse
    vfcore patches data/phantom runs/phantom        # straightened 96^3 patches + manifest
    vfcore badges                                   # regenerate Colab/Binder badges
"""
from __future__ import annotations

import argparse
import sys

from .errors import VfcoreError


def _run_notebooks(args) -> None:
    from .notebooks import run_notebooks

    executed = run_notebooks(args.run, quick=args.quick, only=args.only)
    print("\nExecuted notebooks:")
    for path in executed:
        print(f"  {path}")
    print(f"Artifacts (patches, model, dissection, concepts) are in {args.run}/")


def _phantom(args) -> None:
    from .phantom import write_phantom_root

    root = write_phantom_root(args.root, n_scans=args.scans, seed=args.seed, workers=args.workers)
    print(f"phantom written to {root}")


def _download(args) -> None:
    from .verse import download

    download(args.release, args.target)


def _patches(args) -> None:
    from .patches import extract_patches

    manifest = extract_patches(args.root, args.run, workers=args.workers, seed=args.seed)
    print(f"{len(manifest)} vertebrae in {args.run}/patches/manifest.csv")


def _badges(args) -> None:
    from .notebooks import write_badges

    changed = write_badges()
    print(f"badges updated in {len(changed)} notebook(s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vfcore", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run-notebooks", help="execute notebooks 01-05 in order (papermill)")
    p.add_argument("--run", default="runs/phantom", help="run folder for artifacts and executed notebooks")
    p.add_argument("--quick", action="store_true", help="small sizes (CI, Binder): minutes on a 2-core CPU")
    p.add_argument("--only", nargs="*", help="notebook stems to run (their inputs must exist)")
    p.set_defaults(func=_run_notebooks)

    p = sub.add_parser("phantom", help="write a synthetic VerSe-layout root")
    p.add_argument("root")
    p.add_argument("--scans", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.set_defaults(func=_phantom)

    p = sub.add_parser("download", help="download and extract a VerSe release (resumable, checked)")
    p.add_argument("--release", required=True, help="e.g. verse19 or verse20 (see vfcore.verse.VERSE_ARCHIVES)")
    p.add_argument("--target", required=True)
    p.set_defaults(func=_download)

    p = sub.add_parser("patches", help="straightened 96^3 vertebra patches for every scan of a root")
    p.add_argument("root")
    p.add_argument("run")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_patches)

    p = sub.add_parser("badges", help="regenerate the Colab/Binder badges of every notebook")
    p.set_defaults(func=_badges)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except VfcoreError as err:
        print(f"vfcore: error: {err}", file=sys.stderr)
        return 2
    return 0
