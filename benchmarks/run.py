"""`make bench`: every benchmark, a table on stdout, figures in benchmarks/results.json.

    python -m benchmarks.run [--quick] [--only NAME ...] [--results PATH]

Each suite runs in a process of its own (peak-memory figures would otherwise carry what an earlier suite left in
this one, and the suite's imported modules are the code its figures are recorded to depend on). `--quick` runs
every suite at small sizes — to check the methods, not to measure the product — and writes
benchmarks/results-quick.json unless `--results` says otherwise; full-scale figures go to results.json.
Each suite's figures replace all of its earlier ones, with this run's provenance (`benchmarks.record`).
"""

from __future__ import annotations

import argparse
import inspect
import subprocess
import sys
import traceback
from pathlib import Path

from benchmarks.record import QUICK_RESULTS, RESULTS

SUITES = {
    "decode": ("benchmarks.decode", "bench_decode"),
    "scores": ("benchmarks.scores", "bench_scores"),
    "pipeline": ("benchmarks.pipeline", "bench_pipeline"),
    "memory": ("benchmarks.pipeline", "bench_memory"),
    "engines": ("benchmarks.engines", "bench_engines"),
    "listing": ("benchmarks.listing", "bench_listing"),
    "search": ("benchmarks.search", "bench_search"),
    "writer": ("benchmarks.writer", "bench_writer"),
    "writer_s3": ("benchmarks.writer", "bench_writer_s3"),
    "evolve": ("benchmarks.evolve", "bench_evolve"),
    "feeding": ("benchmarks.feeding", "bench_feeding"),
    "segments": ("benchmarks.segments", "bench_segments"),
    "segment_linearity": ("benchmarks.segments", "bench_segment_linearity"),
    "training": ("benchmarks.training", "bench_training"),
    "world": ("benchmarks.world", "bench_world"),
}


def run_suite(name: str, quick: bool, results: Path) -> int:
    from benchmarks.common import LoadMonitor
    from benchmarks.record import save, start

    module, fn = SUITES[name]
    try:
        bench = getattr(__import__(module, fromlist=[fn]), fn)
        kwargs = {"quick": True} if quick and "quick" in inspect.signature(bench).parameters else {}
        began = start()
        with LoadMonitor() as monitor:
            out = bench(**kwargs)
        save(out, suite=name, load_info=monitor.summary(), scale="quick" if quick else "full", began=began,
             path=results)
    except Exception:  # noqa: BLE001 — report; the parent goes on with the other suites
        traceback.print_exc()
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", choices=sorted(SUITES), help="run only these suites")
    p.add_argument("--quick", action="store_true", help="small sizes: checks the methods, not the product")
    p.add_argument("--results", type=Path, default=None, help="results file (default: results.json, or "
                   "results-quick.json with --quick)")
    p.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)  # one suite, in this process
    args = p.parse_args(argv)
    results = args.results or (QUICK_RESULTS if args.quick else RESULTS)
    names = args.only or list(SUITES)
    if args.in_process:
        return max(run_suite(n, args.quick, results) for n in names)
    failed = []
    for n in names:
        cmd = [sys.executable, "-m", "benchmarks.run", "--in-process", "--only", n, "--results", str(results)]
        if subprocess.run(cmd + (["--quick"] if args.quick else [])).returncode:
            failed.append(n)
    from benchmarks.table import print_results

    print_results(results, only_suites=[n for n in names if n not in failed])
    if failed:
        print(f"suites that failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
