"""The README's and docs' examples run, their links resolve, and their reference tables match the code.

Every fenced block in README.md and docs/*.md says what it is (```bash, ```python, ```yaml or ```text), and:
- ```yaml blocks are validated: a job (`name` + `source`) by `pipeline.jobs.parse_job`; a fragment of one
  (`segments:` alone, say) merged into the embedded default job first; a training config (`model`, `manifest`,
  `output`, no `source`) by `TrainConfig`. A yaml block whose first line names a file (`# my-job.yaml: ...`) is
  also written under that name where the bash blocks run, so they can use it.
- ```bash blocks run, in the order of the document, in one working folder shared by all documents (README first:
  its example builds the index `my-index/` that later examples search). A block is a sequence of simple commands,
  one per line (`\\` continues a line; `# comments`; `NAME=value` sets a variable); `stllm-index ...` runs
  in this process (`pipeline.cli.main`: the imports and one Ray cluster are shared), anything else in bash.
  Every command must exit 0. A block whose first line is `# not run by the docs test: <reason>` (GPU, hub, S3,
  a server that runs until stopped) is not run, but its `stllm-index` lines are still parsed by the CLI's own
  parser, so a command or flag that does not exist fails the test.
- ```python blocks run in a fresh interpreter in the same folder.
- ```text blocks are output (and pictures): not run; a `$ stllm-index ...` line in one is parsed as above.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LANGS = {"bash", "python", "yaml", "text"}
SKIP = re.compile(r"^#\s*not run by the docs test:\s*(\S.*)$")
NAMES_FILE = re.compile(r"^#\s*([\w.-]+\.ya?ml)\b")
FENCE = re.compile(r"^(\s*)```(.*)$")


@dataclass
class Block:
    doc: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"

    @property
    def skip_reason(self) -> str | None:
        first = self.text.lstrip().splitlines()[0] if self.text.strip() else ""
        m = SKIP.match(first.strip())
        return m.group(1) if m else None


def blocks(doc: Path) -> list[Block]:
    out, lines, i = [], doc.read_text().splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang = m.group(1), m.group(2).strip()
        start, body = i, []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        assert i < len(lines), f"{doc.relative_to(ROOT)}:{start + 1}: a code block is never closed"
        out.append(Block(doc, start + 1, lang, "\n".join(body) + "\n"))
        i += 1
    return out


def all_blocks() -> list[Block]:
    return [b for doc in (README, *DOCS) for b in blocks(doc)]


# ---------------------------------------------------------------- what each block is


def test_every_block_says_what_it_is() -> None:
    unnamed = [f"{b.where}: ```{b.lang}" for b in all_blocks() if b.lang not in LANGS]
    assert not unnamed, f"use ```bash, ```python, ```yaml or ```text: {unnamed}"


def test_the_readme_is_short_and_holds_the_two_commands() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    assert re.search(r"^make demo\b", text, re.M) and re.search(r"^make test\b", text, re.M)


# ---------------------------------------------------------------- yaml


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def check_yaml(block: Block) -> None:
    from pipeline.jobs import JobError, default_job_text, parse_job
    from stllm.training.config import TrainConfig

    try:
        data = yaml.safe_load(block.text)
    except yaml.YAMLError as e:
        pytest.fail(f"{block.where}: not valid YAML:\n{e}")
    assert isinstance(data, dict), f"{block.where}: a yaml block must be a mapping"
    try:
        if {"model", "manifest", "output"} <= data.keys() and "source" not in data:
            TrainConfig.model_validate(data)
        elif {"name", "source"} <= data.keys():
            parse_job(data)
        else:  # a fragment: valid once merged into a whole job
            parse_job(_merge(yaml.safe_load(default_job_text()), data))
    except (JobError, ValueError) as e:
        pytest.fail(f"{block.where}: invalid yaml example:\n{e}")


@pytest.mark.parametrize("block", [b for b in all_blocks() if b.lang == "yaml"], ids=lambda b: b.where)
def test_yaml_blocks_are_valid(block: Block) -> None:
    check_yaml(block)


# ---------------------------------------------------------------- bash and python


def commands(text: str) -> list[str]:
    """Lines joined at a trailing backslash; blank and comment-only lines dropped."""
    out, pending = [], ""
    for raw in text.splitlines():
        line = pending + raw
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1] + " "
            continue
        pending = ""
        if line.strip() and not line.strip().startswith("#"):
            out.append(line.strip())
    return out


def _argv(command: str, variables: dict[str, str]) -> list[str]:
    words = shlex.split(command, comments=True)
    expanded = []
    for w in words:
        for name, value in variables.items():
            w = w.replace(f"${{{name}}}", value).replace(f"${name}", value)
        expanded.append(os.path.expanduser(w))
    return expanded


def parse_cli(argv: list[str], where: str) -> None:
    """The CLI's own parser: a command or a flag that does not exist is an error (argparse exits 2)."""
    from pipeline.cli import build_parser

    try:
        build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{where}: `stllm-index {' '.join(argv)}` is not a valid command line (exit {e.code})")


ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(\S.*)$")


@dataclass
class Session:
    folder: Path
    variables: dict[str, str]
    seconds: dict[str, float]


def run_block(block: Block, session: Session) -> None:
    t0 = time.perf_counter()
    try:
        _run_block(block, session)
    finally:
        session.seconds[block.where] = time.perf_counter() - t0


def _run_block(block: Block, session: Session) -> None:
    if block.lang == "yaml":
        first = block.text.lstrip().splitlines()[0]
        if m := NAMES_FILE.match(first):
            (session.folder / m.group(1)).write_text(block.text)
        return
    if block.lang == "text":
        for line in block.text.splitlines():
            if line.startswith("$ stllm-index "):
                parse_cli(_argv(line[len("$ stllm-index "):], session.variables), block.where)
        return
    if block.skip_reason:
        for command in commands(block.text) if block.lang == "bash" else []:
            if command.startswith("stllm-index "):
                parse_cli(_argv(command, session.variables)[1:], block.where)
        return
    if block.lang == "python":
        done = subprocess.run([sys.executable, "-c", block.text], cwd=session.folder, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert done.returncode == 0, f"{block.where}: python block failed:\n{done.stdout}\n{done.stderr}"
        return
    from pipeline.cli import main

    for command in commands(block.text):
        if m := ASSIGNMENT.match(command):
            session.variables[m.group(1)] = _argv(m.group(2), session.variables)[0]
            continue
        argv = _argv(command, session.variables)
        if argv[0] == "stllm-index":
            here = os.getcwd()
            os.chdir(session.folder)
            try:
                code = main(argv[1:])
            finally:
                os.chdir(here)
            assert code == 0, f"{block.where}: `{command}` exited {code}"
        else:
            done = subprocess.run(["bash", "-c", command], cwd=session.folder, capture_output=True, text=True,
                                  timeout=300, env={**os.environ, **session.variables})
            assert done.returncode == 0, f"{block.where}: `{command}` exited {done.returncode}:\n{done.stderr}"


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory):
    """One working folder for every document's examples; the README's first (they build `my-index/`)."""
    import ray

    ray.shutdown()  # the examples' first `run` starts a local cluster the later ones share
    folder = tmp_path_factory.mktemp("docs")
    for name in ("jobs", "stllm"):  # examples name the repository's job files and the shipped model by path
        (folder / name).symlink_to(ROOT / name)
    s = Session(folder, {"PWD": str(folder)}, {})
    failure = None
    for block in blocks(README):
        try:
            run_block(block, s)
        except BaseException as e:  # noqa: BLE001 — reported by test_readme_examples_run
            failure = e
            break
    yield s, failure
    ray.shutdown()
    slow = sorted(s.seconds.items(), key=lambda kv: -kv[1])[:5]
    print("docs examples, slowest blocks: " + ", ".join(f"{w} {t:.1f}s" for w, t in slow))


def test_readme_examples_run(session) -> None:
    s, failure = session
    if failure is not None:
        raise failure


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_docs_examples_run(doc: Path, session) -> None:
    s, failure = session
    if failure is not None:
        pytest.skip("the README's examples failed (test_readme_examples_run)")
    for block in blocks(doc):
        run_block(block, s)


# ---------------------------------------------------------------- links


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(doc: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces → hyphens."""
    out = set()
    in_block = False
    for line in doc.read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_block = not in_block
        elif not in_block and (m := re.match(r"^#{1,6}\s+(.*)$", line)):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(slug)
    return out


def test_relative_links_resolve() -> None:
    broken = []
    for doc in (README, *DOCS):
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for target in LINK.findall(text):
            if re.match(r"^[a-z]+://|^mailto:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


# ---------------------------------------------------------------- reference tables


def test_the_performance_table_is_generated_from_the_results() -> None:
    from benchmarks.record import RESULTS, load
    from benchmarks.table import readme_block

    data = load(RESULTS)
    assert readme_block(data) in README.read_text(), \
        "README's performance table differs from benchmarks/results.json: python -m benchmarks.table --readme"
    performance = (ROOT / "docs" / "performance.md").read_text()
    undescribed = [name for name in data.get("benchmarks", {}) if f"`{name}`" not in performance]
    assert not undescribed, f"docs/performance.md does not say what these measure: {undescribed}"


def test_the_readme_cli_lists_every_command() -> None:
    from pipeline.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    listed = set(re.findall(r"^stllm-index ([a-z-]+)", README.read_text(), re.M))
    assert listed == set(sub.choices), f"README's CLI section vs the parser: {listed ^ set(sub.choices)}"


def _default(field: Any) -> str:
    """A field's default as docs/jobs.md writes it."""
    from pydantic_core import PydanticUndefined

    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=1000).splitlines()[0]  # true, null, [mp4, mkv]


def job_fields() -> dict[str, tuple[str, str]]:
    """Every job-file field as `section.field` → (default, pydantic description); S3 options once, as `s3.*`."""
    from pydantic import BaseModel

    from pipeline.io.sources import S3Options
    from pipeline.jobs import JobConfig

    out: dict[str, tuple[str, str]] = {}

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            sub = next((c for c in (field.annotation, *typing.get_args(field.annotation))
                        if isinstance(c, type) and issubclass(c, BaseModel)), None)
            if sub is S3Options:
                out[f"{prefix}{name}"] = ("null", "")
            elif sub is not None:
                walk(sub, f"{prefix}{name}.")
            else:
                out[f"{prefix}{name}"] = (_default(field), field.description or "")

    walk(JobConfig, "")
    walk(S3Options, "s3.")
    return out


def test_jobs_md_documents_every_field_with_its_default() -> None:
    rows = {}
    for line in (ROOT / "docs" / "jobs.md").read_text().splitlines():
        if m := re.match(r"^\|\s*`([\w.]+)`\s*\|\s*([^|]*?)\s*\|", line):
            rows[m.group(1)] = m.group(2).strip("` ")
    fields = job_fields()
    missing = sorted(set(fields) - set(rows))
    assert not missing, f"docs/jobs.md does not document: {missing}"
    wrong = {k: (rows[k], d) for k, (d, _) in fields.items() if rows[k] != d}
    assert not wrong, f"docs/jobs.md defaults (documented, actual): {wrong}"
    unknown = sorted(k for k in set(rows) - set(fields) if "." in k or k in ("name", "questions"))
    assert not unknown, f"docs/jobs.md documents fields the job has not: {unknown}"


def test_catalog_md_describes_every_column_of_the_view() -> None:
    from schemas import video_schema

    text = (ROOT / "docs" / "catalog.md").read_text()
    section = text[text.index("## The view's columns"):text.index("## Search")]
    documented = {c for line in section.splitlines() if line.startswith("| `")
                  for c in re.findall(r"`(\w+)`", line.split("|")[1])}
    columns = set(video_schema().names)
    assert columns <= documented, f"docs/catalog.md lacks the view's columns {sorted(columns - documented)}"
    assert documented <= columns, f"docs/catalog.md names columns the view has not: {sorted(documented - columns)}"
