"""Faults the tests inject (test-only): into the decode worker (picklable, imported by the worker by module path)
and into the writer's commit steps."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class StallAt:
    """A `stage_hook` for `decode_video` (picklable): when the decode worker reaches `stage`, sleep
    `seconds` (a stuck decoder) or, with `exit_code`, kill the worker process (a crashing one)."""

    stage: str
    seconds: float = 3600.0
    exit_code: int | None = None

    def __call__(self, stage: str) -> None:
        if stage == self.stage:
            if self.exit_code is not None:
                os._exit(self.exit_code)
            time.sleep(self.seconds)


def kill_at(point: str, nth: int = 1, table: str | None = None) -> None:
    """SIGKILL this process at the `nth` passing of a named commit step (`pipeline.store.commit.COMMIT_HOOKS`):
    how the exactly-once tests crash a real writer between two steps of a commit."""
    import signal

    from pipeline.store.commit import COMMIT_HOOKS

    passes = {"n": 0}

    def hook(name: str, of: str) -> None:
        if name == point and table in (None, of):
            passes["n"] += 1
            if passes["n"] == nth:
                os.kill(os.getpid(), signal.SIGKILL)

    COMMIT_HOOKS.append(hook)


def held_at(point: str, marker: str, table: str | None = None, nth: int = 1, timeout_s: float = 120.0) -> None:
    """At the `nth` passing of a named commit step, create the file `marker` and hold the writer there until
    someone deletes it (or `timeout_s` passes): the test does its harm meanwhile (e.g. stops the store), so a
    run is certain to be mid-way when it strikes, whatever the machine's speed."""
    from pathlib import Path

    from pipeline.store.commit import COMMIT_HOOKS

    passes = {"n": 0}

    def hook(name: str, of: str) -> None:
        if name == point and table in (None, of):
            passes["n"] += 1
            if passes["n"] == nth:
                flag = Path(marker)
                flag.touch()
                end = time.monotonic() + timeout_s
                while flag.exists() and time.monotonic() < end:
                    time.sleep(0.05)

    COMMIT_HOOKS.append(hook)


def cli_held_at(point: str, marker: str, table: str | None, repo: str) -> str:
    """`python -c` code running `stllm-index` with `held_at(point, marker, table)` installed (its arguments
    follow)."""
    return (f"import sys; sys.path.insert(0, {repo!r}); from tests.faults import held_at; "
            f"held_at({point!r}, {marker!r}, {table!r}); from pipeline.cli import main; sys.exit(main(sys.argv[1:]))")


def cli_killed_at(point: str, nth: int, repo: str) -> str:
    """`python -c` code running `stllm-index` with `kill_at(point, nth)` installed (its arguments follow)."""
    return (f"import sys; sys.path.insert(0, {repo!r}); from tests.faults import kill_at; kill_at({point!r}, {nth}); "
            "from pipeline.cli import main; sys.exit(main(sys.argv[1:]))")
