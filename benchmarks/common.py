"""What the benchmarks measure with: the figure (`Result`), repetitions, the machine's load, memory per process.

Provenance (commit, machine, the code a figure depends on) and the results file live in `benchmarks.record`.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SHARED_VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "videos"


@dataclass
class Result:
    """One figure. `value` is the median of `reps` (the figure of each repetition) when there are any;
    `baseline` says what the figure is compared with and that baseline's own speed."""

    name: str
    value: float
    goal: str  # ">= 0.9", "<= 20", "in [0.9, 1.1]"; "info" for a figure without a goal
    unit: str = "ratio"
    detail: dict[str, Any] = field(default_factory=dict)
    reps: list[float] = field(default_factory=list)
    baseline: dict[str, Any] = field(default_factory=dict)

    @property
    def met(self) -> bool | None:
        if self.goal == "info":
            return None
        if self.goal.startswith("in ["):
            lo, hi = (float(x) for x in self.goal[4:].rstrip("]").split(","))
            return lo <= self.value <= hi
        op, target = self.goal.split()
        t = float(target)
        return {">=": self.value >= t, "<=": self.value <= t, "==": self.value == t}[op]


def from_reps(name: str, reps: Sequence[float], goal: str, unit: str = "ratio", **kw: Any) -> Result:
    """A figure as the median of its repetitions (the range goes with it, in `reps`)."""
    return Result(name, float(statistics.median(reps)), goal, unit, reps=[float(r) for r in reps], **kw)


def spread(values: Sequence[float], digits: int = 3) -> dict[str, float]:
    """median, min and max of per-item or per-repetition values."""
    return {"median": round(float(statistics.median(values)), digits), "min": round(float(min(values)), digits),
            "max": round(float(max(values)), digits), "n": len(values)}


# ---- the machine's load: others' work on shared cores makes every timing noisy -------------------------------


def busy_cores(seconds: float = 1.0) -> float:
    """The machine's busy cores over the next `seconds` (all processes)."""
    from pipeline.proc_stats import machine_busy_s

    b0, t0 = machine_busy_s(), time.monotonic()
    time.sleep(seconds)
    return (machine_busy_s() - b0) / (time.monotonic() - t0)


def _tree_cpu_s(pid: int) -> dict[int, float]:
    from pipeline.proc_stats import descendants, process_cpu_s

    return {p: process_cpu_s(p) for p in (pid, *descendants(pid))}


class LoadMonitor:
    """The machine's load before and during a benchmark: 1-minute load average and busy cores before it, and
    while it runs, per second, the cores the machine used minus those our own process tree used (`others`).
    A figure measured while `others` was well above 0 was measured on a shared machine: noisy."""

    def __init__(self, interval_s: float = 1.0):
        self.interval_s = interval_s
        self.before: dict[str, float] = {}
        self._others: list[float] = []
        self._ours: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LoadMonitor:
        self.before = {"loadavg_1min": round(os.getloadavg()[0], 2), "busy_cores": round(busy_cores(1.0), 2)}
        self._thread = threading.Thread(target=self._run, name="load-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        from pipeline.proc_stats import machine_busy_s

        pid = os.getpid()
        prev_tree, prev_busy, prev_t = _tree_cpu_s(pid), machine_busy_s(), time.monotonic()
        while not self._stop.wait(self.interval_s):
            tree, busy, t = _tree_cpu_s(pid), machine_busy_s(), time.monotonic()
            dt = max(t - prev_t, 1e-6)
            # a process that started in this interval counts from 0; one that ended is lost (a slight over-count
            # of `others` at a process's exit)
            ours = sum(max(0.0, c - prev_tree.get(p, 0.0)) for p, c in tree.items()) / dt
            self._ours.append(ours)
            self._others.append(max(0.0, (busy - prev_busy) / dt - ours))
            prev_tree, prev_busy, prev_t = tree, busy, t

    def summary(self) -> dict[str, Any]:
        others = sorted(self._others) or [0.0]
        return {"cores": os.cpu_count(), "before": self.before,
                "during": {"loadavg_1min_after": round(os.getloadavg()[0], 2),
                           "others_busy_cores_mean": round(statistics.fmean(others), 2),
                           "others_busy_cores_p90": round(others[int(0.9 * (len(others) - 1))], 2),
                           "ours_busy_cores_mean": round(statistics.fmean(self._ours or [0.0]), 2),
                           "seconds": round(len(self._others) * self.interval_s)}}


def quiet(load: dict[str, Any], others_cores: float = 0.15) -> bool:
    """Whether a figure's run had the machine to itself (others used < `others_cores` cores on average)."""
    return load.get("during", {}).get("others_busy_cores_mean", 99.0) < others_cores


# ---- memory: per process, by role -----------------------------------------------------------------------------


def _status_kib(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "RssAnon:", "RssFile:", "RssShmem:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def role(pid: int, parent_cmdline: bytes | None = None) -> str:
    """What a process of a run is: the driver's children by their command line (Ray's actors by class).
    "fork" for a child that still runs its parent's command line (between fork and exec: its RSS is the parent's
    pages, shared copy-on-write)."""
    raw = _cmdline(pid)
    if not raw:
        return "gone"
    if parent_cmdline is not None and raw == parent_cmdline:
        return "fork"
    argv = raw.split(b"\0")
    cmd = b" ".join(argv).decode(errors="replace")
    if "pipeline.decode.worker" in cmd:
        return "decode worker (subprocess)"
    if cmd.startswith("ray::"):
        name = cmd.split()[0][5:].split(".")[0]  # "ray::_StatsActor.register_dataset": the task runs
        for stage in ("DecodeStage", "ModelStage", "EmbedStage"):
            if stage in cmd:
                return f"ray actor {stage}"
        return f"ray {name}"
    if cmd.startswith("VLLM::"):
        return cmd.split()[0]
    exe = os.path.basename(argv[0].decode(errors="replace")) if argv and argv[0] else "?"
    if exe.startswith("python"):
        mod = next((a.decode() for a in argv[1:3] if a and not a.startswith(b"-")), "")
        return f"python {os.path.basename(mod)[:40]}" if mod else "python"
    return exe


class ProcessMemory:
    """Samples the RSS of this process and every descendant (Ray's processes, decode subprocesses, vLLM's) every
    `interval_s`: the peak per role (the most any one process of that role held; a recycled process's successor
    counts under the same role), with its anonymous / shared-memory / file-backed parts at that peak, and the
    peak of the tree's summed PSS (shared pages counted once)."""

    def __init__(self, interval_s: float = 0.25, driver_role: str = "driver"):
        self.interval_s = interval_s
        self.driver_role = driver_role
        self.peaks: dict[str, dict[str, int]] = {}
        self.tree_pss_peak = 0
        self.timeline: list[tuple[float, dict[str, int]]] = []  # (s, {role: RSS KiB}) every ~2 s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ProcessMemory:
        self._thread = threading.Thread(target=self._run, name="process-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        from pipeline.proc_stats import descendants

        me, t0, last_mark = os.getpid(), time.monotonic(), -10.0
        mine = _cmdline(me)
        while True:
            now: dict[str, int] = {}
            pids = [me, *descendants(me)]
            for pid in pids:
                # Ray's workers start as setup_worker.py and take their actor's name later: asked every time
                r, st = self.driver_role if pid == me else role(pid, mine), _status_kib(pid)
                if not st or r in ("fork", "gone"):
                    continue
                now[r] = max(now.get(r, 0), st["VmRSS"])
                if st["VmRSS"] > self.peaks.get(r, {}).get("VmRSS", -1):
                    self.peaks[r] = st
            if time.monotonic() - last_mark >= 2.0:
                last_mark = time.monotonic()
                self.timeline.append((round(last_mark - t0, 1), now))
                self.tree_pss_peak = max(self.tree_pss_peak, tree_pss_bytes(me))
            if self._stop.wait(self.interval_s):
                return

    def peak_mib(self) -> dict[str, float]:
        return {r: round(p["VmRSS"] / 1024, 1) for r, p in sorted(self.peaks.items())}

    def parts_mib(self) -> dict[str, dict[str, float]]:
        """At each role's peak: anonymous, shared memory (Ray's object store, mapped) and file-backed RSS."""
        return {r: {k[3:].lower(): round(v / 1024, 1) for k, v in p.items() if k != "VmRSS"}
                for r, p in sorted(self.peaks.items())}


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


def tree_pss_bytes(pid: int | None = None) -> int:
    """Memory of a process and all its descendants (Ray's processes included): the sum of their PSS."""
    from pipeline.proc_stats import descendants

    pid = pid or os.getpid()
    return sum(_pss(p) for p in (pid, *descendants(pid)))


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
