"""The processes vLLM starts (engine core, workers), found by their titles and stopped by process id.

vLLM's shutdown stops what it can reach; a killed engine core leaves its worker to init, blocked on the dead
core's queue, where only the process id still reaches it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import psutil  # a dependency of vLLM


def children() -> set[int]:
    """The process ids below this process."""
    return {p.pid for p in psutil.Process().children(recursive=True)}


def started_since(before: set[int], prefix: str = "VLLM::") -> list[psutil.Process]:
    """The processes below this one, not in `before`, titled `prefix…` (not the interpreter's shared helpers, such
    as multiprocessing's resource tracker). psutil.Process: a pid reused later is not mistaken for them."""
    return [p for p in psutil.Process().children(recursive=True) if p.pid not in before and _titled(p, prefix)]


def stop(processes: Iterable[psutil.Process], grace_s: float = 5.0) -> None:
    """SIGTERM to those still running, SIGKILL to those left after `grace_s` (a worker blocked on its dead core's
    queue does not act on SIGTERM)."""
    left = [p for p in processes if running(p)]
    for p in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(left, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=grace_s)


def running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _titled(p: psutil.Process, prefix: str) -> bool:
    try:
        return p.name().startswith(prefix) or " ".join(p.cmdline()).startswith(prefix)
    except psutil.Error:
        return False


__all__ = ["children", "running", "started_since", "stop"]
