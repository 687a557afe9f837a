"""`make bench`: every benchmark, a table on stdout, figures in benchmarks/results.json.

    python -m benchmarks.run [--only NAME ...]

Each suite runs in a process of its own: peak-memory figures (ru_maxrss, the driver's share of the job's PSS)
would otherwise carry what an earlier suite left in this one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import traceback

from benchmarks.common import RESULTS, Result, print_table, save

SUITES = {
    "decode": ("benchmarks.decode", "bench_decode"),
    "scores": ("benchmarks.scores", "bench_scores"),
    "pipeline": ("benchmarks.pipeline", "bench_pipeline"),
    "memory": ("benchmarks.pipeline", "bench_memory"),
    "engines": ("benchmarks.engines", "bench_engines"),
    "listing": ("benchmarks.listing", "bench_listing"),
    "search": ("benchmarks.search", "bench_search"),
    "writer": ("benchmarks.writer", "bench_writer"),
    "evolve": ("benchmarks.evolve", "bench_evolve"),
    "feeding": ("benchmarks.feeding", "bench_feeding"),
    "segments": ("benchmarks.segments", "bench_segments"),
    "segment_linearity": ("benchmarks.segments", "bench_segment_linearity"),
    "training": ("benchmarks.training", "bench_training"),
    "world": ("benchmarks.world", "bench_world"),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--only", nargs="*", choices=sorted(SUITES), help="run only these suites")
    args = p.parse_args(argv)
    names = args.only or list(SUITES)
    if len(names) > 1:
        return _each_in_own_process(names)
    results, failed = [], []
    for name in names:
        module, fn = SUITES[name]
        try:
            mod = __import__(module, fromlist=[fn])
            out = getattr(mod, fn)()
            results.extend(out)
            save(out, suite=name)  # keep what finished even if a later suite fails
        except Exception:  # noqa: BLE001 — report and go on with the other suites
            traceback.print_exc()
            failed.append(name)
    print_table(results)
    if failed:
        print(f"suites that failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _each_in_own_process(names: list[str]) -> int:
    failed = [n for n in names if subprocess.run([sys.executable, "-m", "benchmarks.run", "--only", n]).returncode]
    fields = ("name", "value", "goal", "unit", "detail")
    stored = json.loads(RESULTS.read_text())["benchmarks"] if RESULTS.exists() else {}
    wanted = {r for n in names if n not in failed for r in stored if stored[r].get("suite") == n}
    print_table([Result(**{k: stored[r][k] for k in fields}) for r in stored if r in wanted])
    if failed:
        print(f"suites that failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
