"""The repository holds sources, not outputs, and cites nothing outside itself."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str, ok: tuple[int, ...] = (0,)) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode in ok, done.stderr
    return done.stdout


def test_no_tracked_file_is_ignored():
    # generated artefacts (training runs, clips, checkpoints, caches) stay out of git; .gitignore names them
    assert _git("ls-files", "-ci", "--exclude-standard").split() == []


def test_nothing_cites_a_document_outside_the_repository():
    # notes outside the repository (the design notes, the layout sketch): the code's facts are in docs/. The
    # character classes keep this line from matching itself.
    pattern = r"[D]ESIGN( §|\.md)|[L]AYOUT\.md|\.\./shared/"
    hits = _git("grep", "-n", "-I", "-E", pattern, "--", ".", ":!tests/test_repository.py", ok=(0, 1))  # 1: none
    assert hits == ""
