"""What the user sees while a job runs: a progress bar, then a summary table."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


class _Bar:
    def __init__(self, progress: Progress | None, task: Any, total: int):
        self.progress, self.task, self.total = progress, task, total
        self.done, self.t0 = 0, time.perf_counter()

    def advance(self, n: int, errors: int = 0) -> None:
        self.done += n
        if self.progress is not None:
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            self.progress.update(self.task, advance=n, rate=f"{rate:.2f} videos/s", errors=errors)


@contextmanager
def progress_bar(total: int, enabled: bool = True) -> Iterator[_Bar]:
    if not enabled:
        yield _Bar(None, None, total)
        return
    progress = Progress(
        TextColumn("indexing"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
        TextColumn("errors: {task.fields[errors]}"), TimeElapsedColumn(), console=Console(stderr=True),
    )
    with progress:
        task = progress.add_task("videos", total=total, rate="", errors=0)
        yield _Bar(progress, task, total)


def print_summary(manifest: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    c = manifest["counts"]
    table = Table(title=f"run {manifest['run_id']} ({manifest['job']})", show_header=True)
    table.add_column("what")
    table.add_column("value", justify="right")
    for key in ("listed", "skipped", "indexed", "errors"):
        table.add_row(key, str(c[key]))
    table.add_row("wall time", f"{manifest['wall_s']:.1f} s")
    if manifest.get("videos_per_s"):
        table.add_row("throughput", f"{manifest['videos_per_s']:.2f} videos/s")
    for stage, secs in manifest["stage_seconds"].items():
        table.add_row(f"{stage.removesuffix('_s')} (sum over videos)", f"{secs:.1f} s")
    table.add_row("engine", manifest["engine"])
    table.add_row("config hash", manifest["config_hash"][:16])
    for name, loc in manifest["outputs"].items():
        table.add_row(name, str(loc))
    console.print(table)
