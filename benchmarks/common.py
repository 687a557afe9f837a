"""Shared bits of the benchmarks: results file, table printing, memory of a process tree."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results.json"
SHARED_VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "videos"


@dataclass
class Result:
    name: str
    value: float
    goal: str  # e.g. ">= 0.9"
    unit: str = "ratio"
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def met(self) -> bool:
        op, target = self.goal.split()
        t = float(target)
        return {">=": self.value >= t, "<=": self.value <= t, "==": self.value == t}[op]


def machine() -> dict[str, Any]:
    import torch

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def save(results: list[Result], suite: str | None = None) -> None:
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data.setdefault("benchmarks", {})
    for r in results:
        data["benchmarks"][r.name] = {**asdict(r), "met": r.met, "suite": suite,
                                      "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    data["machine"] = machine()
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")


def print_table(results: list[Result]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="stllm-index benchmarks")
    for col in ("benchmark", "value", "goal", "met", "detail"):
        table.add_column(col)
    for r in results:
        detail = ", ".join(f"{k}={v}" for k, v in r.detail.items() if not isinstance(v, (list, dict)))
        table.add_row(r.name, f"{r.value:.3f} {r.unit}", r.goal, "yes" if r.met else "NO", detail[:120])
    Console().print(table)


def _pss(pid: int) -> int:
    """Proportional set size: shared pages (Ray's object store, shared libraries) split between their users,
    so summing over processes counts each page once, unlike RSS."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss_bytes(pid: int | None = None) -> int:
    """Memory of a process and all its descendants (Ray's processes included): the sum of their PSS."""
    from pipeline.proc_stats import descendants

    pid = pid or os.getpid()
    return sum(_pss(p) for p in (pid, *descendants(pid)))
