"""What job files share before validation and after it fails: `--set key.sub=value` overrides applied to the
parsed YAML (values read as YAML scalars or flow lists/maps), and pydantic's errors as one "field 'a.b': reason"
line each (`JobError`).
"""

from __future__ import annotations

import copy
import re
import typing
from collections.abc import Sequence
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError


class JobError(ValueError):
    """An invalid job file or override; the message lists every problem, one per line."""


def parse_value(raw: str) -> Any:
    """An override's value as a YAML scalar (true, 3, 0.5, null, "quoted"), or a flow list/map ([a, b],
    {k: v}); anything else stays the literal text (so 'a: b' or 'x #1' are strings, not YAML surprises)."""
    text = raw.strip()
    if not text:
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        if text[0] in "{[":
            raise ValueError(f"not a valid YAML flow list/map ({' '.join(str(e).split())[:120]}); "
                             "quote items with punctuation, e.g. [\"Why?\"]") from None
        return text
    if isinstance(value, str):
        return value if text[0] in "'\"" else text
    if isinstance(value, (dict, list)) and text[0] not in "{[":
        return text
    return value


def _parse(item: str, raw: str) -> Any:
    try:
        return parse_value(raw)
    except ValueError as e:
        raise JobError(f"--set {item!r}: {e}") from None


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`model.engine=vllm`, `questions.0=...`, `source.s3={endpoint_url: http://...}` on a copy of `data`."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise JobError(f"--set {item!r}: expected key.sub=value")
        node: Any = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) > len(node):
                    raise JobError(f"--set {item!r}: '{where}' is not an index of a list of {len(node)}")
                i = int(part)
                if last:
                    node[i:i + 1] = [_parse(item, raw)]
                else:
                    node = node[i]
            elif isinstance(node, dict):
                if last:
                    node[part] = _parse(item, raw)
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise JobError(f"--set {item!r}: '{'.'.join(parts[:depth])}' is not a section")
    return data


def _model_of(annotation: Any) -> type[BaseModel] | None:
    candidates = [annotation, *typing.get_args(annotation)]
    for c in candidates:
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c
    return None


def _allowed_fields(loc: Sequence[Any], root: type[BaseModel]) -> list[str] | None:
    model: type[BaseModel] | None = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if model else None
        model = _model_of(field.annotation) if field else None
        if model is None:
            return None
    return list(model.model_fields) if model else None


def format_errors(err: ValidationError, root: type[BaseModel]) -> str:
    """pydantic's errors as "field 'model.engine': Input should be 'hf' or 'vllm'" lines (`root`: the model
    validated, whose fields an "unknown field" error lists)."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = re.sub(r"^(Value error|Assertion failed), ", "", e["msg"])
        m = re.match(r"^([A-Za-z_][\w.]*): (.*)$", msg, re.S)
        if m and (not loc or m.group(1).startswith(loc + ".")):
            loc, msg = m.groups()  # a cross-field check names its own field
        if e["type"] == "extra_forbidden":
            allowed = _allowed_fields(e["loc"], root)
            msg = "unknown field" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
        elif e["type"] == "missing":
            msg = "required field is missing"
        lines.append(f"field '{loc or '<job>'}': {msg}")
    return "\n".join(lines)


__all__ = ["JobError", "apply_overrides", "format_errors", "parse_value"]
