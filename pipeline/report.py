"""What the user sees: a progress bar, then a summary table — and nothing of the libraries' chatter.

`quiet_output(log)` sends everything written to file descriptors 1 and 2 (Ray's and vLLM's start-up notices,
C++ log lines of their worker processes, warnings) to a log file for the duration of a command; what the
command means to show goes to the terminal through `console()` / `err_console()`. `-v` turns it off.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

_terminal: dict[str, TextIO] = {}  # "out"/"err": the real terminal while quiet_output is active


def terminal(name: str = "out") -> TextIO:
    """The user's stdout ("out") or stderr ("err"), also while library output goes to the log."""
    return _terminal.get(name) or (sys.stdout if name == "out" else sys.stderr)


PIPED_WIDTH = 1000  # columns of output that is not a terminal: tables keep whole paths, rows stay one line


def console() -> Console:
    """A console on the user's stdout (the terminal even while library output goes to the log). When that is not a
    terminal (a pipe, a file), wide enough that no path or id is cut with "…" (rich would take $COLUMNS or 80)."""
    out = terminal("out")
    return Console(file=out, width=None if _is_terminal(out) else PIPED_WIDTH)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed, or not a real file
        return False


def err_console() -> Console:
    return Console(file=terminal("err"), stderr=True)


@contextmanager
def quiet_output(log_path: Path | None) -> Iterator[Path | None]:
    """Redirect fds 1 and 2 (this process and every child it starts) to `log_path` (appended); yields the
    path. With `None`, nothing is redirected."""
    if log_path is None or _terminal:
        yield None
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {"out": os.dup(1), "err": os.dup(2)}
    with log_path.open("ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    _terminal.update({k: os.fdopen(os.dup(fd), "w", buffering=1) for k, fd in saved.items()})
    try:
        yield log_path
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for name, fd in (("out", 1), ("err", 2)):
            _terminal.pop(name).close()
            os.dup2(saved[name], fd)
            os.close(saved[name])


class _Bar:
    def __init__(self, progress: Progress | None, task: Any):
        self.progress, self.task = progress, task
        self.done, self.t0 = 0, time.perf_counter()

    def update(self, done: int, total: int | None, errors: int = 0, advanced: int = 0) -> None:
        """`done` of `total` new objects so far (the total grows as the listing goes on)."""
        self.done = done
        if self.progress is not None:
            rate = done / max(time.perf_counter() - self.t0, 1e-9)
            self.progress.update(self.task, completed=done, total=max(total or 0, done) or None,
                                 rate=f"{rate:.2f} videos/s", errors=errors)


@contextmanager
def progress_bar(total: int | None, enabled: bool = True) -> Iterator[_Bar]:
    if not enabled:
        yield _Bar(None, None)
        return
    progress = Progress(
        TextColumn("indexing"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
        TextColumn("errors: {task.fields[errors]}"), TimeElapsedColumn(), console=err_console(),
    )
    with progress:
        task = progress.add_task("videos", total=total, rate="", errors=0)
        yield _Bar(progress, task)


def print_summary(manifest: dict[str, Any], out: Console | None = None) -> None:
    out = out or console()
    c = manifest["counts"]
    table = Table(title=f"run {manifest['run_id']} ({manifest['job']})", show_header=True)
    table.add_column("what")
    table.add_column("value", justify="right")
    gen = c.get("generations") or {}
    for key, label, value in (
            ("listed", "listed", None), ("skipped", "skipped (up to date)", None),
            ("known_bad", "skipped (known bad)", None), ("deferred", "left for later (--where)", None),
            ("indexed", "indexed (cells computed)", None), ("copies", "from cells already computed", None),
            ("errors", "errors", None), ("decoded", "videos decoded", None),
            ("visual_encodings", "visual encodings", None), ("caption", "captions generated", gen.get("caption")),
            ("answer", "answers generated", gen.get("answer")), ("cells_reused", "cells reused", None)):
        value = c.get(key) if value is None else value
        if value is not None and (value or key in ("listed", "indexed", "errors")):
            table.add_row(label, str(value))
    table.add_row("status", manifest.get("status", "?"))
    table.add_row("wall time", f"{manifest['wall_s']:.1f} s")
    if manifest.get("videos_per_s"):
        table.add_row("throughput", f"{manifest['videos_per_s']:.2f} videos/s")
    for stage, secs in manifest["stage_seconds"].items():
        table.add_row(f"{stage.removesuffix('_s')} (sum over videos)", f"{secs:.1f} s")
    table.add_row("engine", manifest["engine"])
    table.add_row("job spec", manifest["config_hash"][:16])
    for name, loc in manifest["outputs"].items():
        table.add_row(name, str(loc))
    out.print(table)
