"""Faults the tests inject (test-only): into the decode worker (picklable, imported by the worker by module path)
and into the writer's commit steps."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
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


def on_pass(point: str, action: Callable[[], None], nth: int = 1, table: str | None = None) -> None:
    """Run `action` at the `nth` passing of a named commit step (`pipeline.store.commit.COMMIT_HOOKS`), of any
    table or of `table`."""
    from pipeline.store.commit import COMMIT_HOOKS

    passes = {"n": 0}

    def hook(name: str, of: str) -> None:
        if name == point and table in (None, of):
            passes["n"] += 1
            if passes["n"] == nth:
                action()

    COMMIT_HOOKS.append(hook)


def kill_at(point: str, nth: int = 1, table: str | None = None) -> None:
    """SIGKILL this process at the `nth` passing of a named commit step: how the exactly-once tests crash a real
    writer between two steps of a commit."""
    import signal

    on_pass(point, lambda: os.kill(os.getpid(), signal.SIGKILL), nth, table)


def held_at(point: str, marker: str, table: str | None = None, nth: int = 1, timeout_s: float = 120.0) -> None:
    """At the `nth` passing of a named commit step, create the file `marker` and hold the writer there until
    someone deletes it (or `timeout_s` passes): the test does its harm meanwhile (e.g. stops the store), so a
    run is certain to be mid-way when it strikes, whatever the machine's speed."""
    from pathlib import Path

    def hold() -> None:
        flag = Path(marker)
        flag.touch()
        end = time.monotonic() + timeout_s
        while flag.exists() and time.monotonic() < end:
            time.sleep(0.05)

    on_pass(point, hold, nth, table)


def cli_with(fault: str, repo: str) -> str:
    """`python -c` code running `stllm-index` (its arguments follow) with `fault`, a call of this module's, made
    first, e.g. `kill_at('journaled', 2)`."""
    name = fault.split("(", 1)[0]
    return (f"import sys; sys.path.insert(0, {repo!r}); from tests.faults import {name}; {fault}; "
            "from pipeline.cli import main; sys.exit(main(sys.argv[1:]))")


def cli_held_at(point: str, marker: str, table: str | None, repo: str) -> str:
    """`stllm-index` with `held_at(point, marker, table)` installed (see `cli_with`)."""
    return cli_with(f"held_at({point!r}, {marker!r}, {table!r})", repo)


def cli_killed_at(point: str, nth: int, repo: str) -> str:
    """`stllm-index` with `kill_at(point, nth)` installed (see `cli_with`)."""
    return cli_with(f"kill_at({point!r}, {nth})", repo)
