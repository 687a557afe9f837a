"""CPU time and process trees, from /proc (Linux): what the benchmarks use to say where the cores and memory went."""

from __future__ import annotations

import os
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # the fields after "(comm)", which may hold spaces


def process_cpu_s(pid: int) -> float:
    """user + system seconds of one process (all its threads); 0 if it is gone."""
    f = _stat(pid)
    return (int(f[11]) + int(f[12])) / _TICK if f else 0.0


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (vLLM's engine core and workers below the process that holds the LLM)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (f := _stat(int(entry))):
            children.setdefault(int(f[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def machine_busy_s() -> float:
    """Non-idle CPU seconds of the whole machine since boot, all cores (from /proc/stat's first line)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / _TICK


def cpu_snapshot(pid: int | None = None) -> dict[str, float]:
    """CPU seconds so far of a process, of its descendants, and of the machine: subtract two snapshots for a
    window's split between this process, its engine processes and everything else."""
    pid = pid or os.getpid()
    return {"own": process_cpu_s(pid), "children": sum(process_cpu_s(p) for p in descendants(pid)),
            "machine": machine_busy_s()}


def cpu_split(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Seconds of CPU in a window: the process, its descendants, and the rest of the machine."""
    own = after["own"] - before["own"]
    children = after["children"] - before["children"]
    return {"own": round(own, 3), "children": round(children, 3),
            "others": round(after["machine"] - before["machine"] - own - children, 3)}
