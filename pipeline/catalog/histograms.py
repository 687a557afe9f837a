"""Each curation score's histogram over an index's view (docs/curation.md), so a user picks thresholds by looking:
the page draws them (with min/max filter inputs beside each) and `stllm-index status` prints them as text bars.

Null scores (a signal turned off, a video not scored) are left out of the bins and counted apart. Bins are
fixed-width with round edges: scores that are fractions span [0, 1] in every index (histograms of two indexes
compare); the unbounded ones (motion, sharpness) start at 0 and end at the first round edge at or past the
largest value; cuts count in whole numbers. The last bin includes its upper edge.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.store.cells import SCORE_COLUMNS

# The view's numeric score columns (the OCR text left out), in display order.
NUMERIC_SCORES = tuple(c for c in SCORE_COLUMNS if c != "score_text")
FRACTIONS = {"score_brightness", "score_contrast", "score_static_fraction", "score_blank_fraction",
             "score_text_fraction"}
INTEGERS = {"score_cuts"}
BINS = 20
BARS = " ▁▂▃▄▅▆▇█"  # text bars: a space for an empty bin, ▁ for any count above none


@dataclass(frozen=True)
class Histogram:
    column: str
    edges: list[float]  # len(counts) + 1, increasing; empty when every value is null
    counts: list[int]
    nulls: int  # rows without this score (null or NaN), not in any bin
    min: float | None
    max: float | None

    @property
    def name(self) -> str:
        """The score's short name: `score_motion` → `motion` (the page's filter inputs use it)."""
        return self.column.removeprefix("score_")

    @property
    def values(self) -> int:
        return sum(self.counts)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "values": self.values}


def _nice(step: float) -> float:
    """The smallest of 1, 2, 2.5, 5 × 10^k that is ≥ step."""
    scale = 10.0 ** math.floor(math.log10(step))
    return next(m * scale for m in (1, 2, 2.5, 5, 10) if m * scale >= step * (1 - 1e-9))


def _edges(column: str, lo: float, hi: float, bins: int) -> list[float]:
    if column in FRACTIONS and lo >= 0 and hi <= 1:
        return [round(i / bins, 10) for i in range(bins + 1)]
    if column in INTEGERS:
        width = max(1, math.ceil((math.floor(hi) + 1 - min(lo, 0)) / bins))
        start = math.floor(min(lo, 0))
        n = max(1, math.ceil((math.floor(hi) + 1 - start) / width))
        return [float(start + i * width) for i in range(n + 1)]
    start = min(lo, 0.0)
    width = _nice((hi - start) / bins) if hi > start else 1.0
    start = math.floor(start / width) * width
    n = max(1, math.ceil((hi - start) / width - 1e-9))
    return [round(start + i * width, 10) for i in range(n + 1)]


def histogram(column: str, values: pa.Array | pa.ChunkedArray, bins: int = BINS) -> Histogram:
    """The histogram of one score column's values."""
    values = pc.cast(values, pa.float64())
    present = pc.drop_null(pc.if_else(pc.is_nan(values), None, values))
    nulls = len(values) - len(present)
    if not len(present):
        return Histogram(column, [], [], nulls, None, None)
    lo, hi = (float(v.as_py()) for v in pc.min_max(present).values())
    edges = _edges(column, lo, hi, bins)
    n = len(edges) - 1
    width = (edges[-1] - edges[0]) / n
    index = pc.floor(pc.divide(pc.subtract(present, edges[0]), width))
    index = pc.max_element_wise(pc.min_element_wise(index, n - 1), 0)  # the top edge belongs to the last bin
    counts = np.bincount(index.to_numpy(zero_copy_only=False).astype(np.int64), minlength=n)
    return Histogram(column, edges, [int(c) for c in counts], nulls, lo, hi)


def score_histograms(table: pa.Table, bins: int = BINS) -> list[Histogram]:
    """One histogram per numeric score column `table` holds (a view: `videos` or `segments`)."""
    return [histogram(c, table.column(c), bins) for c in NUMERIC_SCORES if c in table.column_names]


def score_columns(names: Sequence[str]) -> list[str]:
    """The numeric score columns among `names`, in display order: what to read for `score_histograms`."""
    return [c for c in NUMERIC_SCORES if c in names]


def table_histograms(names: Sequence[str], read: Callable[[list[str]], pa.Table | None]) -> list[Histogram]:
    """The histograms of a table with columns `names`, whose score columns `read(columns)` returns (None: no
    rows)."""
    columns = score_columns(names)
    table = read(columns) if columns else None
    return [] if table is None else score_histograms(table)


def text_bars(counts: Sequence[int]) -> str:
    """One character per bin, its height relative to the fullest bin (a non-empty bin shows at least ▁)."""
    top = max(counts, default=0)
    if not top:
        return " " * len(counts)
    return "".join(BARS[0] if c == 0 else BARS[max(1, round(c / top * (len(BARS) - 1)))] for c in counts)


def fmt(value: float | None) -> str:
    """An edge or a bound, short: 0.25, 1140, 2.5e-05."""
    return "" if value is None else f"{value:.4g}"


__all__ = ["BINS", "Histogram", "NUMERIC_SCORES", "fmt", "histogram", "score_columns", "score_histograms",
           "text_bars"]
