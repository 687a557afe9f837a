"""The README's performance table, generated from benchmarks/results.json (never typed by hand).

    python -m benchmarks.table [--results PATH]      # prints the markdown table
    python -m benchmarks.table --readme              # writes it into README.md, between its markers

Each row: the figure (median of its repetitions, with the range), its goal, whether it is met, the baseline it is
compared with and that baseline's own speed, and its run: the UTC date, the commit (+ if the tree was dirty) and
the load others put on the machine meanwhile. Figures measured on a busy machine, at quick scale, or whose code
changed since (`make bench-check`) say so; when the figures come from more than one run, the header says which.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from benchmarks.record import RESULTS, load, stale

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- performance:begin -->", "<!-- performance:end -->"


def _num(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def _value(fig: dict[str, Any]) -> str:
    unit = "" if fig["unit"] == "ratio" else f" {fig['unit']}"
    text = f"**{_num(fig['value'])}**{unit}"
    reps = fig.get("reps")
    if reps:
        text += f" ({_num(reps['min'])}–{_num(reps['max'])}, {reps['n']} reps)"
    return text


def _baseline(fig: dict[str, Any]) -> str:
    b = fig.get("baseline") or {}
    if not b:
        return ""
    what = b.get("what", "")
    speed = ", ".join(f"{k.replace('_', ' ')} {_num(v)}" for k, v in b.items()
                      if k != "what" and isinstance(v, (int, float)))
    return f"{what}{': ' + speed if speed else ''}"


def _run(fig: dict[str, Any]) -> str:
    run = fig.get("run") or {}
    commit = (run.get("commit") or "?")[:8] + ("+dirty" if run.get("dirty") else "")
    during = (run.get("load") or {}).get("during", {})
    others = during.get("others_busy_cores_mean")
    return f"{(run.get('measured_at') or '?')[:10]} {commit}, others {others} cores"


def _notes(name: str, fig: dict[str, Any], changed: dict[str, list[str]] | None) -> str:
    run = fig.get("run") or {}
    notes = []
    if run.get("scale") != "full":
        notes.append(f"{run.get('scale', '?')} scale")
    elif fig.get("detail", {}).get("scale") not in (None, "recipe"):  # e.g. the world suite at fewer steps
        notes.append(f"{fig['detail']['scale']} scale: {fig['detail'].get('note', 'not the product figure')}")
    if not run.get("quiet"):
        notes.append("busy machine: needs a quiet rerun")
    if changed is not None and name in changed:
        notes.append(f"code changed since ({len(changed[name])} files)")
    return "; ".join(notes)


def markdown(data: dict[str, Any], only_suites: list[str] | None = None, check_code: bool = True) -> str:
    """The table; `check_code`: note figures whose code changed since (`make bench-check`) — off for the README,
    whose table must depend on results.json alone."""
    figs = {k: v for k, v in data.get("benchmarks", {}).items() if only_suites is None or v["suite"] in only_suites}
    if not figs:
        return "(no figures yet: `make bench` measures them)"
    changed = stale(data) if check_code else None
    runs = sorted({(f["run"]["measured_at"][:10], (f["run"].get("commit") or "?")[:8]) for f in figs.values()})
    machines = sorted({f"{m.get('cpu_model')}, {m.get('cores')} cores, {m.get('memory_gib')} GiB"
                       for f in figs.values() if (m := f["run"].get("machine"))})
    lines = [f"Machine: {'; '.join(machines)}. "
             + (f"Figures from {len(runs)} runs: {', '.join(f'{d} ({c})' for d, c in runs)}." if len(runs) > 1
                else f"One run: {runs[0][0]} ({runs[0][1]})."),
             "",
             "| benchmark | goal | measured | met | baseline | run (UTC, commit, others' load) | notes |",
             "|---|---|---|---|---|---|---|"]
    for name, fig in figs.items():
        met = {True: "yes", False: "**no**", None: "—"}[fig.get("met")]
        if "met_count" in fig:
            met = fig["met_count"] if fig["met"] else f"**{fig['met_count']}**"
        goal = "—" if fig["goal"] == "info" else fig["goal"].replace(">=", "≥").replace("<=", "≤")
        lines.append(f"| `{name}` | {goal} | {_value(fig)} | {met} | {_baseline(fig)} | {_run(fig)} | "
                     f"{_notes(name, fig, changed)} |")
    return "\n".join(lines)


def print_results(path: Path = RESULTS, only_suites: list[str] | None = None) -> None:
    print(markdown(load(path), only_suites))


def _family(name: str) -> str:
    """Search figures of one kind across embeddings and mixtures share a README row."""
    return re.sub(r"_(caption|visual)(?=_)", "_*", re.sub(r"_(clustered|wide)(?=_1m$|_100k$)", "_*", name))


def readme_data(data: dict[str, Any]) -> dict[str, Any]:
    """The README's shorter table: figures with a goal; each search family in one row (values in name order)."""
    figs: dict[str, dict[str, Any]] = {}
    members: dict[str, list[str]] = {}
    for name, fig in data.get("benchmarks", {}).items():
        if fig["goal"] != "info":
            members.setdefault(_family(name), []).append(name)
    for family, names in members.items():
        if len(names) == 1:
            figs[names[0]] = data["benchmarks"][names[0]]
            continue
        group = [data["benchmarks"][n] for n in sorted(names)]
        met = [f.get("met") for f in group]
        figs[family] = {**group[0], "value": " · ".join(_num(f["value"]) for f in group), "reps": None,
                        "met": all(met), "met_count": f"{sum(bool(m) for m in met)} of {len(met)}",
                        "baseline": {}, "detail": {}, "members": sorted(names)}
    return {**data, "benchmarks": figs}


def readme_block(data: dict[str, Any]) -> str:
    """What README.md holds between its performance markers: `readme_data`'s table, without the code check (it
    must depend on results.json alone)."""
    return f"{BEGIN}\n{markdown(readme_data(data), check_code=False)}\n{END}"


def write_readme(data: dict[str, Any], readme: Path = README) -> None:
    text = readme.read_text()
    begin, end = text.index(BEGIN), text.index(END) + len(END)
    readme.write_text(text[:begin] + readme_block(data) + text[end:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--readme", action="store_true", help="write the table into README.md")
    args = p.parse_args(argv)
    if args.readme:
        write_readme(load(args.results))
    else:
        print(markdown(load(args.results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
