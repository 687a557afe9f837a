"""Where a figure comes from, and the results file that keeps it.

Every figure is stored with its run: the commit and whether the tree was dirty, the UTC time, the machine (CPU
model, cores, memory), the machine's load before and during the suite (`common.LoadMonitor`), the scale it ran
at, and the code it depends on: the repository's source files the suite's process had imported when it finished
(each file's hash is kept per suite, their combined hash with each figure). `benchmarks.check` compares those
hashes with the working tree and flags figures whose code changed since they were measured.

A suite's figures replace ALL of that suite's earlier figures (a renamed or dropped figure does not linger).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.common import Result, quiet

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results.json"
QUICK_RESULTS = Path(__file__).parent / "results-quick.json"
# Files whose changes cannot move a figure: the runner, the provenance and the table (not hashed).
NOT_CODE_PATHS = {"benchmarks/run.py", "benchmarks/record.py", "benchmarks/table.py", "benchmarks/check.py"}
SOURCE_ROOTS = ("benchmarks/", "pipeline/", "stllm/", "schemas/")


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False).stdout

    changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    # results files change by running the benchmarks: not a change of what was measured
    dirty = [p for p in changed if not p.startswith("benchmarks/results")]
    return {"commit": git("rev-parse", "HEAD").strip() or None, "branch": git("rev-parse", "--abbrev-ref", "HEAD")
            .strip() or None, "dirty": bool(dirty), "dirty_files": dirty[:20]}


def machine() -> dict[str, Any]:
    model = None
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), None)
    except OSError:
        pass
    mem = None
    try:
        kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:"))
        mem = round(kib / 2**20, 1)
    except (OSError, StopIteration):
        pass
    out: dict[str, Any] = {"cpu_model": model, "cores": os.cpu_count(), "memory_gib": mem,
                           "platform": platform.platform(), "python": platform.python_version()}
    torch = sys.modules.get("torch")
    if torch is not None:  # only when the suite used it: importing it here would cost seconds
        out["torch"] = torch.__version__
        out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return out


def file_hash(rel: str) -> str | None:
    try:
        return hashlib.sha256((REPO / rel).read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def start() -> dict[str, Any]:
    """What a suite runs on, taken before it starts (the tree may change while it runs): the commit and the hash of
    every source file."""
    files = {}
    for root in SOURCE_ROOTS:
        for path in sorted((REPO / root).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel not in NOT_CODE_PATHS and (h := file_hash(rel)):
                files[rel] = h
    return {"git": git_state(), "files": files}


def imported_sources(files: dict[str, str]) -> dict[str, str]:
    """{repo-relative path: hash at the start} of the project's modules this process has imported: the code a
    suite ran (its Ray workers and decode subprocesses import the same modules)."""
    out = {}
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if not f:
            continue
        try:
            rel = Path(f).resolve().relative_to(REPO).as_posix()
        except ValueError:
            continue
        if rel in files:
            out[rel] = files[rel]
    return dict(sorted(out.items()))


def combined(sources: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(sources, sort_keys=True).encode()).hexdigest()[:16]


def load(path: Path = RESULTS) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def save(results: list[Result], suite: str, load_info: dict[str, Any], scale: str, began: dict[str, Any],
         path: Path = RESULTS) -> None:
    """Replace `suite`'s figures in the results file with `results`, each with this run's provenance (`began`:
    `start()`'s, taken before the suite ran)."""
    data = load(path)
    figures = {k: v for k, v in data.get("benchmarks", {}).items() if v.get("suite") != suite}
    sources = imported_sources(began["files"])
    run = {"measured_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), **began["git"], "machine": machine(),
           "load": load_info, "quiet": quiet(load_info), "scale": scale}
    for r in results:
        entry = asdict(r)
        if r.reps:
            entry["reps"] = {"values": [round(x, 4) for x in r.reps], "median": round(statistics.median(r.reps), 4),
                             "min": round(min(r.reps), 4), "max": round(max(r.reps), 4), "n": len(r.reps)}
        else:
            entry.pop("reps")
        figures[r.name] = {**entry, "met": r.met, "suite": suite, "run": run,
                           "code": {"hash": combined(sources), "files": len(sources)}}
    suites = {k: v for k, v in data.get("suites", {}).items() if k != suite}
    suites[suite] = {"sources": sources}
    out = {"about": "Written by `python -m benchmarks.run`; the README's table: `python -m benchmarks.table`; "
                    "figures whose code changed since: `make bench-check`.",
           "benchmarks": dict(sorted(figures.items(), key=lambda kv: (kv[1]["suite"], kv[0]))),
           "suites": dict(sorted(suites.items()))}
    path.write_text(json.dumps(out, indent=2, default=str) + "\n")


def stale(data: dict[str, Any]) -> dict[str, list[str]]:
    """{figure: the source files changed (or gone) since it was measured} for every figure whose code moved."""
    out = {}
    for name, fig in data.get("benchmarks", {}).items():
        sources = data.get("suites", {}).get(fig.get("suite"), {}).get("sources")
        if not sources:
            out[name] = ["(no record of its code: measured before provenance was kept)"]
            continue
        changed = [p for p, h in sources.items() if file_hash(p) != h]
        if changed:
            out[name] = changed
    return out
