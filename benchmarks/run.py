"""`make bench`: every benchmark, a table on stdout, figures in benchmarks/results.json.

    python -m benchmarks.run [--only NAME ...] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import traceback

from benchmarks.common import print_table, save

SUITES = {
    "decode": ("benchmarks.decode", "bench_decode"),
    "pipeline": ("benchmarks.pipeline", "bench_pipeline"),
    "memory": ("benchmarks.pipeline", "bench_memory"),
    "engines": ("benchmarks.engines", "bench_engines"),
    "listing": ("benchmarks.listing", "bench_listing"),
    "search": ("benchmarks.search", "bench_search"),
    "feeding": ("benchmarks.feeding", "bench_feeding"),
    "segments": ("benchmarks.segments", "bench_segments"),
    "segment_linearity": ("benchmarks.segments", "bench_segment_linearity"),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--only", nargs="*", choices=sorted(SUITES), help="run only these suites")
    args = p.parse_args(argv)
    results, failed = [], []
    for name in args.only or SUITES:
        module, fn = SUITES[name]
        try:
            mod = __import__(module, fromlist=[fn])
            out = getattr(mod, fn)()
            results.extend(out)
            save(out)  # keep what finished even if a later suite fails
        except Exception:  # noqa: BLE001 — report and go on with the other suites
            traceback.print_exc()
            failed.append(name)
    print_table(results)
    if failed:
        print(f"suites that failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
