"""Faults injected into the decode worker (test-only; picklable, imported by the worker by module path)."""

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
