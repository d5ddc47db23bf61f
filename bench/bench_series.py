"""Does the whole notebook series fit Binder? (target: under 15 min on a 2-core CPU, peak
memory under 2 GB.)

Runs ``vfcore.notebooks.run_notebooks(run_dir, quick=True)`` (the README's main command: notebooks
01-05 on the phantom, papermill) and, every 0.2 s, reads the memory of this process and all its
descendants (the notebook kernels and their worker processes) from ``/proc``:

* PSS (proportional set size, ``/proc/<pid>/smaps_rollup``): shared pages are split between
  the processes that share them, so the sum is what the tree really occupies; this is the
  figure compared with Binder's limit;
* RSS (``/proc/<pid>/status``): the sum over-counts shared libraries; printed for reference,
  with the largest single process (one kernel).

Wall time, CPU time (user + system of the whole tree, ``os.times``) and per-notebook wall time
(from the runner's log lines) are printed at the end and written to ``<run>/bench_series.json``.

    python bench/bench_series.py [--run /tmp/series-run] [--keep] [--cell-timeout 3600]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    kids, out, todo = _children_map(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _kib(path: str, key: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class MemoryWatch(threading.Thread):
    """Samples the process tree's PSS and RSS until stopped; keeps the peaks."""

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak_pss = self.peak_rss = self.peak_single_rss = 0
        self.peak_processes = 0
        self._halt = threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self._halt.is_set():
            pss = rss = single = 0
            pids = descendants(me)
            for p in pids:
                r = _kib(f"/proc/{p}/status", "VmRSS:") or 0
                rss += r
                single = max(single, r)
                pss += _kib(f"/proc/{p}/smaps_rollup", "Pss:") or r
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_single_rss = max(self.peak_single_rss, single)
            self.peak_processes = max(self.peak_processes, len(pids))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


class Tee:
    """Copy stdout into a list of (time, line) so per-notebook times can be read back."""

    def __init__(self, stream):
        self.stream, self.lines = stream, []

    def write(self, text):
        self.stream.write(text)
        for line in text.splitlines():
            if line.strip():
                self.lines.append((time.perf_counter(), line))
        return len(text)

    def flush(self):
        self.stream.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="run folder (default: a fresh temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary run folder")
    ap.add_argument("--cell-timeout", type=int, default=3600,
                    help="seconds one cell may run before the series counts as failed")
    args = ap.parse_args()

    from vfcore.notebooks import run_notebooks

    tmp = None
    if args.run:
        run = Path(args.run)
    else:
        tmp = tempfile.mkdtemp(prefix="vfcore-series-")
        run = Path(tmp) / "run"
    watch = MemoryWatch()
    watch.start()
    tee = Tee(sys.stdout)
    cpu0, t0 = os.times(), time.perf_counter()
    error = None
    real_stdout, sys.stdout = sys.stdout, tee
    try:
        executed = run_notebooks(run, quick=True, cell_timeout=args.cell_timeout)
    except Exception as exc:  # report the figures up to the failure, then the error
        executed, error = [], f"{type(exc).__name__}: {exc}"
    finally:
        sys.stdout = real_stdout
        wall = time.perf_counter() - t0
        cpu1 = os.times()
        watch.stop()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system) \
        + (cpu1.children_user - cpu0.children_user) + (cpu1.children_system - cpu0.children_system)

    per_notebook = {}
    for _, line in tee.lines:
        if line.startswith("[vfcore] ") and " done in " in line:
            name, _, rest = line[len("[vfcore] "):].partition(" done in ")
            per_notebook[name] = float(rest.split(" s")[0])
    result = {
        "run_dir": str(run), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
        "cpus": os.cpu_count(), "peak_pss_mib": round(watch.peak_pss / 1024, 1),
        "peak_rss_sum_mib": round(watch.peak_rss / 1024, 1),
        "peak_single_process_rss_mib": round(watch.peak_single_rss / 1024, 1),
        "peak_processes": watch.peak_processes, "per_notebook_wall_s": per_notebook,
        "executed": [str(p) for p in executed], "error": error,
        "targets": {"wall_s": 900, "peak_mib": 2048},
    }
    print(f"\nseries on {os.cpu_count()} CPUs: wall {wall / 60:.1f} min, CPU {cpu / 60:.1f} min "
          f"(target: < 15 min wall on 2 cores)")
    for name, secs in per_notebook.items():
        print(f"  {name}: {secs:.0f} s")
    print(f"peak memory of the process tree: PSS {result['peak_pss_mib']:.0f} MiB "
          f"(target < 2048 MiB); RSS sum {result['peak_rss_sum_mib']:.0f} MiB; "
          f"largest process RSS {result['peak_single_process_rss_mib']:.0f} MiB; "
          f"up to {watch.peak_processes} processes")
    if error:
        print(f"the series FAILED: {error}")
    if run.exists():
        (run / "bench_series.json").write_text(json.dumps(result, indent=2))
        print(f"figures written to {run / 'bench_series.json'}")
    if tmp and not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(1 if error else 0)


if __name__ == "__main__":
    main()
