"""Memory held by another process, as on a busy laptop: `with hold_memory(gib):` starts a child that allocates
and touches that much, waits until it is resident, and stops it by its pid afterwards."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator

_CHILD = """
import sys, time
buf = bytearray(int(float(sys.argv[1]) * (1 << 30)))  # zero-filled: every page is touched
for i in range(0, len(buf), 4096):
    buf[i] = 1
print("ready", flush=True)
time.sleep(3600)
"""


def node_memory() -> tuple[int, int]:
    """(total, available) bytes of NUMA node 0 as vLLM's CPU worker reads them."""
    from vllm.utils.cpu_resource_utils import get_memory_node_info

    info = get_memory_node_info(0)
    return info.total_memory, info.available_memory


def gib_to_hold(below_fraction: float = 0.8) -> float:
    """How much to hold so that less than `below_fraction` of node 0 stays available (0 if already so)."""
    total, available = node_memory()
    return max(0.0, (available - below_fraction * total) / (1 << 30))


@contextlib.contextmanager
def hold_memory(gib: float) -> Iterator[int | None]:
    if gib <= 0:
        yield None
        return
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(gib)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait(10)
