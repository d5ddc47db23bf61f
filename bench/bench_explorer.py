"""Slider-step latency of the concept explorer (target: under 150 ms per step on a 2-core CPU).

One step = what the kernel does when the slice slider moves: the observer slices the patch and
the selected unit's precomputed (upsampled) activation map, renders the overlay, encodes the
PNG and sets ``widgets.Image.value`` (serialised for the front end). Measured for every slice
of every view and overlay mode; also the cost of opening a sample (forward pass, r_k,
upsampling the top-10 maps), which happens once per sample, not per step.

    python bench/bench_explorer.py                 # synthetic run (tests/explorer_synthetic.py)
    python bench/bench_explorer.py --run runs/phantom   # a real run folder (after notebooks 01-04)

The browser round trip (key press -> new image on screen) is measured by
``tests/test_browser.py`` and printed there.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def percentile(values, q):
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="run folder (default: a synthetic run)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (Binder: 1-2)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from vfcore import explorer as ex
    from vfcore.dissect import VIEWS
    from vfcore.viz.units import png_bytes

    tmp = tempfile.TemporaryDirectory()
    if args.run:
        data = ex.RunData.from_run(args.run)
        source = f"run {args.run}"
    else:
        import explorer_synthetic as syn

        data, _ = syn.make_run_data(Path(tmp.name))
        source = "synthetic run (tests/explorer_synthetic.py)"

    app = ex.Explorer(data)
    sample = data.pick("TP")
    sample = int(data.samples.table.index[0]) if sample is None else sample
    t0 = time.perf_counter()
    app.select_sample(sample)
    open_ms = 1000 * (time.perf_counter() - t0)
    if app.analysis is None:
        sys.exit(f"could not open a sample: {app.status_text}")

    steps, render, encode = [], [], []
    for view in VIEWS:
        app.view_select.value = view
        for mode in ex.MODES:
            app.mode_select.value = mode
            n = app.analysis.patch.shape[VIEWS[view]]
            for s in list(range(n)) + list(range(n - 2, -1, -1)):
                if s == app.index:
                    continue
                t = time.perf_counter()
                app.slider.value = s  # what a front-end slider message does in the kernel
                steps.append(1000 * (time.perf_counter() - t))
                assert app.index == s and f"slice {s} " in app.readout_text
            # the pieces of one step
            for s in range(0, n, 4):
                t = time.perf_counter()
                rgb = app.expected_rgb(index=s)
                t2 = time.perf_counter()
                png_bytes(rgb)
                render.append(1000 * (t2 - t))
                encode.append(1000 * (time.perf_counter() - t2))

    print(f"source: {source}; units: {data.n_units}; torch threads: {args.threads}")
    print(f"open a sample (forward, r_k, top-{app.top_n} maps upsampled): {open_ms:.0f} ms")
    print(f"slider step, kernel side, {len(steps)} steps over 3 views x {len(ex.MODES)} modes: "
          f"median {statistics.median(steps):.1f} ms, p95 {percentile(steps, 95):.1f} ms, "
          f"max {max(steps):.1f} ms (target < 150 ms)")
    print(f"  of which render (slice + overlay + x{ex.SCALE} upscale): median {statistics.median(render):.2f} ms; "
          f"PNG encode: median {statistics.median(encode):.2f} ms; "
          f"PNG size {len(app.image.value) / 1024:.1f} KiB")
    tmp.cleanup()


if __name__ == "__main__":
    main()
