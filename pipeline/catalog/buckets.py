"""Shape and length buckets of a training export: a trainer batches clips of one bucket together (one aspect ratio,
one resolution band, similar lengths), so the WebDataset export writes each bucket's samples to shards of their own.

A spec names the edges of each dimension, e.g. `aspect=0.87,1.15,1.54,2.04;duration=5,15,60;res=480,720`:
- `aspect`: width / height of the decoded frames;
- `duration`: seconds;
- `res`: the shorter side in pixels (off unless given).
Edges cut a dimension into intervals [lo, hi): `duration=5,15,60` gives 0-5, 5-15, 15-60 and 60-inf seconds. A
dimension given empty (`res=`) or left out of the spec is not split, except that a spec leaving out aspect or
duration keeps its default (`DEFAULT`). A bucket's name joins its intervals: `ar1.54-2.04_dur0-5`; a video whose
size or length is unknown goes to `arNA` / `durNA`.

The default aspect edges lie between the common ratios (geometric means of the neighbours), so each lands mid-bucket:
9:16 and 3:4 → ar0-0.87, 1:1 → ar0.87-1.15, 4:3 → ar1.15-1.54, 16:9 → ar1.54-2.04, 21:9 → ar2.04-inf.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

DIMENSIONS = {"aspect": "ar", "duration": "dur", "res": "res"}  # spec key → the prefix in bucket names
DEFAULT = "aspect=0.87,1.15,1.54,2.04;duration=5,15,60"


@dataclass(frozen=True, order=True)
class Bucket:
    key: tuple[float, ...]  # buckets sort by their intervals (unknown last), then name
    name: str
    # dimension → [lo, hi) (hi None: open), or None: unknown
    intervals: dict[str, tuple[float, float | None] | None] = field(compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"bucket": self.name, **{d: None if i is None else list(i) for d, i in self.intervals.items()}}


@dataclass(frozen=True)
class Buckets:
    edges: dict[str, tuple[float, ...]]  # dimension → increasing positive edges (empty: not split)

    @classmethod
    def parse(cls, spec: str | None) -> Buckets:
        """`aspect=…;duration=…;res=…` on top of the defaults (None or '': the defaults)."""
        edges: dict[str, tuple[float, ...]] = {"aspect": (), "duration": (), "res": ()}
        for text in (DEFAULT, spec or ""):
            for part in filter(None, (p.strip() for p in text.split(";"))):
                dim, sep, values = part.partition("=")
                dim = dim.strip()
                if not sep or dim not in DIMENSIONS:
                    raise ValueError(f"--buckets: {part!r} is not DIMENSION=EDGES with DIMENSION one of "
                                     f"{', '.join(DIMENSIONS)} (e.g. {DEFAULT!r})")
                try:
                    cuts = tuple(float(v) for v in values.split(",") if v.strip())
                except ValueError:
                    raise ValueError(f"--buckets: {dim} edges must be numbers, got {values!r}") from None
                if any(c <= 0 for c in cuts) or any(b <= a for a, b in zip(cuts, cuts[1:], strict=False)):
                    raise ValueError(f"--buckets: {dim} edges must be positive and increasing, got {values!r}")
                edges[dim] = cuts
        return cls(edges)

    def of(self, width: int | None, height: int | None, duration_s: float | None) -> Bucket:
        """The bucket of a video of that size and length."""
        values = {"aspect": width / height if width and height else None, "duration": duration_s,
                  "res": min(width, height) if width and height else None}
        names, key, intervals = [], [], {}
        for dim, prefix in DIMENSIONS.items():
            cuts = self.edges[dim]
            if not cuts:
                continue
            value = values[dim]
            if value is None:
                names.append(f"{prefix}NA")
                key.append(float("inf"))
                intervals[dim] = None
                continue
            i = bisect.bisect_right(cuts, value)
            lo, hi = (cuts[i - 1] if i else 0.0), (cuts[i] if i < len(cuts) else None)
            names.append(f"{prefix}{lo:g}-{'inf' if hi is None else f'{hi:g}'}")
            key.append(lo)
            intervals[dim] = (lo, hi)
        return Bucket(tuple(key), "_".join(names) or "all", intervals)

    def to_json(self) -> dict[str, list[float]]:
        return {d: list(c) for d, c in self.edges.items() if c}


__all__ = ["Bucket", "Buckets", "DEFAULT", "DIMENSIONS"]
