"""`make bench-check`: figures in benchmarks/results.json whose code changed since they were measured.

    python -m benchmarks.check [--results PATH]

A figure depends on the source files its suite's process had imported (`benchmarks.record`); each file's hash
was stored with the suite's figures. Exit status 1 when any figure's files changed (or it has no such record),
listing them: rerun those suites (`python -m benchmarks.run --only SUITE`) or remove the figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.record import RESULTS, load, stale


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    data = load(args.results)
    changed = stale(data)
    for name, files in changed.items():
        suite = data["benchmarks"][name].get("suite")
        print(f"{name} (suite {suite}): {', '.join(files[:6])}{' …' if len(files) > 6 else ''}")
    n = len(data.get("benchmarks", {}))
    print(f"{len(changed)} of {n} figures measured on code that has changed since" if changed
          else f"all {n} figures were measured on the code as it is")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
