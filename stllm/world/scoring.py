"""Grade a model's answers against the world's truth: accuracy per question type, caption exact match."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

_WORD = re.compile(r"[a-z]+")


def normalise(text: str) -> str:
    """Lower case, words only, single spaces ('A red circle.' → 'a red circle')."""
    return " ".join(_WORD.findall(text.lower()))


def answer_is_right(qtype: str, answer: str, truth: str) -> bool:
    """Captions must match exactly (after `normalise`); another answer counts when it STARTS with the truth's
    words ('left', 'left.', 'Left, slowly' are right for 'left'; 'it moves left' is not: no credit for
    listing options)."""
    got = normalise(answer)
    if qtype == "caption":
        return got == normalise(truth)
    want = normalise(truth).split()
    return bool(want) and got.split()[: len(want)] == want


@dataclass
class Report:
    right: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    total: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, qtype: str, answer: str, truth: str) -> bool:
        ok = answer_is_right(qtype, answer, truth)
        self.right[qtype] += ok
        self.total[qtype] += 1
        return ok

    def accuracy(self) -> dict[str, float]:
        return {k: self.right[k] / n for k, n in sorted(self.total.items()) if n}

    def as_dict(self) -> dict[str, object]:
        return {"accuracy": self.accuracy(), "counts": dict(sorted(self.total.items()))}


def grade(rows: Iterable[dict[str, str]]) -> Report:
    """rows: {qtype, answer (the model's), truth}."""
    report = Report()
    for r in rows:
        report.add(r["qtype"], r["answer"], r["truth"])
    return report


__all__ = ["Report", "answer_is_right", "grade", "normalise"]
