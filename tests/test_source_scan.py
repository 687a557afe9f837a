"""Rules read off the project's source (no engine starts here):

- no private attribute of a vLLM object is read or written, and nothing private is imported from vLLM: the
  project stays on vLLM's public API, so a vLLM release that keeps that API keeps the project working;
- no import cycles between the project's modules.

The scans parse the source with `ast`. Each has a test on snippets that must be caught, so a scan that
silently stopped finding anything fails too.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("stllm", "pipeline", "benchmarks", "tests")

# vLLM's engine internals: reaching them means depending on how a release is built, not on its API.
ENGINE_INTERNALS = frozenset({
    "engine_core", "llm_engine", "outputs_queue", "utility_results", "output_processor", "input_processor",
    "output_handler", "model_executor",
})
# The model-author interface of vLLM's multimodal plugin classes is underscore-named by vLLM: a processor must
# override the first three, a dummy-input builder and a model call the others (vLLM's own models do the same).
# These hooks in our subclasses (stllm/vllm/processor.py, model.py) are the only private vLLM names allowed.
PLUGIN_HOOKS = frozenset({
    "_call_hf_processor", "_get_mm_fields_config", "_get_prompt_updates",  # BaseMultiModalProcessor
    "_get_dummy_videos",  # BaseDummyInputsBuilder
    "_mark_tower_model", "_mark_language_model",  # SupportsMultiModal
})


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _sources() -> Iterator[Path]:
    for top in SCANNED:
        yield from sorted((ROOT / top).rglob("*.py"))
    yield ROOT / "conftest.py"


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


# ---- private vLLM attributes ---------------------------------------------------------------------------------


def _root(node: ast.AST) -> ast.AST:
    while isinstance(node, ast.Attribute | ast.Call | ast.Subscript):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node


def _annotation_names(node: ast.AST | None) -> set[str]:
    if node is None:
        return set()
    if isinstance(node, ast.Constant) and isinstance(node.value, str):  # a quoted annotation
        try:
            node = ast.parse(node.value, mode="eval")
        except SyntaxError:
            return set()
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


@dataclass
class _Module:
    path: str
    tree: ast.Module
    vllm_names: dict[str, str] = field(default_factory=dict)  # local name → dotted vLLM path


def _vllm_imports(mod: _Module) -> list[str]:
    """Record the names bound to vLLM modules and objects; return the private imports."""
    bad = []
    for node in ast.walk(mod.tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "vllm" or a.name.startswith("vllm."):
                    mod.vllm_names[(a.asname or a.name).split(".")[0]] = a.name if a.asname else "vllm"
                    if any(_private(p) for p in a.name.split(".")):
                        bad.append(f"{mod.path}:{node.lineno}: import {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and (
                node.module == "vllm" or node.module.startswith("vllm.")):
            for a in node.names:
                mod.vllm_names[a.asname or a.name] = f"{node.module}.{a.name}"
                if any(_private(p) for p in node.module.split(".")) or _private(a.name):
                    bad.append(f"{mod.path}:{node.lineno}: from {node.module} import {a.name}")
    return bad


def _resolve(dotted: str) -> object | None:
    """The vLLM object a dotted path names (a module or a module's attribute), or None."""
    module, _, attr = dotted.rpartition(".")
    for name, rest in ((dotted, None), (module, attr)):
        try:
            obj = importlib.import_module(name)
        except ImportError:
            continue
        return getattr(obj, rest, None) if rest else obj
    return None


def _vllm_bases(mod: _Module, cls: ast.ClassDef) -> list[type]:
    bases = []
    for b in cls.bases:
        root = _root(b)
        if isinstance(root, ast.Name) and root.id in mod.vllm_names:
            obj = _resolve(mod.vllm_names[root.id])
            if isinstance(obj, type):
                bases.append(obj)
    return bases


def private_vllm_uses(source: str, path: str = "<snippet>") -> list[str]:
    """Every private vLLM access in `source`: private imports from vLLM, vLLM's engine internals, `x._y` where x
    is a vLLM object (bound to a vLLM import, assigned from one, or annotated with a vLLM type), and `self._y`
    or `def _y` in a subclass of a vLLM class where `_y` is vLLM's (outside `PLUGIN_HOOKS`)."""
    mod = _Module(path, ast.parse(source))
    bad = _vllm_imports(mod)
    vllm = set(mod.vllm_names)
    # attribute names that hold vLLM objects anywhere in this module (`self.llm: AsyncLLM = ...`)
    held: set[str] = set()
    tainted_names: set[str] = set(vllm)

    def tainted(node: ast.AST) -> bool:
        cur = node
        while isinstance(cur, ast.Attribute | ast.Call | ast.Subscript | ast.Await):
            if isinstance(cur, ast.Attribute) and cur.attr in held:
                return True
            cur = cur.func if isinstance(cur, ast.Call) else cur.value
        return isinstance(cur, ast.Name) and cur.id in tainted_names

    for _ in range(3):  # assignments can chain; a few passes reach a fixed point for this code base
        for node in ast.walk(mod.tree):
            targets: list[ast.AST] = []
            if isinstance(node, ast.Assign) and tainted(node.value):
                targets = node.targets
            elif isinstance(node, ast.AnnAssign) and (_annotation_names(node.annotation) & vllm or (
                    node.value is not None and tainted(node.value))):
                targets = [node.target]
            elif isinstance(node, ast.arg) and _annotation_names(node.annotation) & vllm:
                tainted_names.add(node.arg)
            elif isinstance(node, ast.For | ast.comprehension) and tainted(node.iter):
                targets = [node.target]
            elif isinstance(node, ast.withitem) and node.optional_vars is not None and tainted(node.context_expr):
                targets = [node.optional_vars]
            while targets:
                t = targets.pop()
                if isinstance(t, ast.Name):
                    tainted_names.add(t.id)
                elif isinstance(t, ast.Attribute):  # `self.llm = ...`: the attribute holds it, not `self`
                    held.add(t.attr)
                elif isinstance(t, ast.Tuple | ast.List | ast.Starred):
                    targets += t.elts if not isinstance(t, ast.Starred) else [t.value]

    def attribute(obj: ast.AST, name: str, line: int) -> None:
        if name in ENGINE_INTERNALS:
            bad.append(f"{path}:{line}: .{name} (a vLLM engine internal)")
        elif _private(name) and tainted(obj):
            bad.append(f"{path}:{line}: .{name} of a vLLM object")

    for node in ast.walk(mod.tree):
        if isinstance(node, ast.Attribute):
            attribute(node.value, node.attr, node.lineno)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            attribute(node.args[0], node.args[1].value, node.lineno)
        elif isinstance(node, ast.ClassDef) and (bases := _vllm_bases(mod, node)):
            def theirs(name: str, bases: list[type] = bases) -> bool:
                return _private(name) and name not in PLUGIN_HOOKS and any(hasattr(b, name) for b in bases)

            for sub in ast.walk(node):
                if isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef) and theirs(sub.name):
                    bad.append(f"{path}:{sub.lineno}: {node.name}.{sub.name} overrides vLLM's private {sub.name}")
                elif (isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name)
                      and sub.value.id in ("self", "cls") and theirs(sub.attr)):
                    bad.append(f"{path}:{sub.lineno}: self.{sub.attr} is vLLM's private {sub.attr}")
    return sorted(set(bad))


def test_no_private_vllm_attribute_is_used_anywhere():
    found = []
    for p in _sources():
        found += private_vllm_uses(p.read_text(), str(p.relative_to(ROOT)))
    assert not found, "private vLLM names used (docs/engine.md: the public API the project uses):\n" + "\n".join(found)


def test_the_scan_catches_private_vllm_access():
    snippet = '''
from vllm import LLM, AsyncEngineArgs
from vllm.v1.engine._private import thing
from vllm.v1.engine.async_llm import _helper
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.multimodal.processing import BaseMultiModalProcessor
from vllm.v1.metrics.stats import SchedulerStats

class Engine:
    def __init__(self, args):
        self.llm: AsyncLLM = build(args)
        self.sync = LLM(model="m")
        core = self.sync.llm_engine.engine_core
        core.outputs_queue.put_nowait(None)

    def dead(self):
        return self.llm._client.resources.engine_dead or self.sync._cached_repr

    def stats(self, s: SchedulerStats):
        return s._private_count, s.num_running_reqs

class Processor(BaseMultiModalProcessor):
    def _call_hf_processor(self, data, kwargs):  # a plugin hook: allowed
        return self._apply_hf_processor_main(data, kwargs)

    def _get_hf_mm_text(self):
        return self._mine

engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model="m"))
engine._run_output_handler()
ok = engine.errored
queue = getattr(engine.engine, "outputs_queue", None) or getattr(engine, "_errored_with", None)
'''
    found = "\n".join(private_vllm_uses(snippet))
    for expected in (":3: from vllm.v1.engine._private import thing",
                     ":4: from vllm.v1.engine.async_llm import _helper", ":13: .engine_core", ":13: .llm_engine",
                     ":14: .outputs_queue", ":17: ._client of a vLLM",
                     ":17: ._cached_repr of a vLLM", ":20: ._private_count of a vLLM",
                     ":24: self._apply_hf_processor_main", ":26: Processor._get_hf_mm_text overrides",
                     ":30: ._run_output_handler of a vLLM", ":32: .outputs_queue", ":32: ._errored_with of a vLLM"):
        assert expected in found, (expected, found)
    for allowed in ("_call_hf_processor", "._mine", ".errored ", ".num_running_reqs"):
        assert allowed not in found, (allowed, found)


# ---- import cycles -------------------------------------------------------------------------------------------


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.Module, name: str, is_package: bool) -> Iterator[tuple[str, int]]:
    """(imported module or `module.name`, line) of every import statement — at module level and inside
    functions — except under `if TYPE_CHECKING:`."""
    package = name if is_package else name.rpartition(".")[0]

    def visit(node: ast.AST) -> Iterator[tuple[str, int]]:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                yield from visit(child)
            return
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for a in node.names:
                yield f"{base}.{a.name}", node.lineno  # a submodule, or a name of `base`
        for child in ast.iter_child_nodes(node):
            yield from visit(child)

    yield from visit(tree)


def import_graph(files: dict[str, tuple[str, bool]]) -> dict[str, dict[str, int]]:
    """{module: {imported project module: line}} from {module: (source, is_package)}. `from pkg import x` points
    at `pkg.x` when that is a module, else at `pkg`. Only written imports are edges: a submodule does not point
    at its package's `__init__` unless it imports from it, so a package's `__init__` importing its own
    submodules is no cycle."""
    graph: dict[str, dict[str, int]] = {}
    for name, (source, is_package) in files.items():
        edges = graph.setdefault(name, {})
        for target, line in _imports(ast.parse(source), name, is_package):
            while target and target not in files:
                target = target.rpartition(".")[0]
            if not target or target == name:
                continue
            edges.setdefault(target, line)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(found)


def _describe(graph: dict[str, dict[str, int]], component: list[str]) -> str:
    inside = set(component)
    return "; ".join(f"{a} -> {b} (line {line})" for a in component for b, line in sorted(graph[a].items())
                     if b in inside)


def test_no_import_cycles():
    files = {_module_name(p): (p.read_text(), p.name == "__init__.py") for p in _sources()}
    graph = import_graph(files)
    assert len(graph) > 100 and graph["stllm.vllm.engine"]  # the scan sees the project
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(_describe(graph, c) for c in found)


def test_the_cycle_scan_catches_function_level_imports_and_skips_type_checking():
    files = {
        "pkg": ("from pkg.a import f\n", True),  # a package's __init__ importing its submodule: no cycle alone
        "pkg.a": ("from pkg.b import g\ndef f():\n    return g()\n", False),
        "pkg.b": ("def g():\n    from pkg.a import f\n    return f\n", False),  # cycle a <-> b, in a function
        "pkg.c": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.d import D\n", False),
        "pkg.d": ("from . import c\n", False),  # c -> d only under TYPE_CHECKING: no cycle
        "pkg.e": ("from pkg import f\n", False),
        "pkg.f": ("import pkg.e\n", False),  # e -> f (`from pkg import f` names a module) -> e: a cycle
    }
    graph = import_graph(files)
    assert graph["pkg"] == {"pkg.a": 1} and graph["pkg.d"] == {"pkg.c": 1} and graph["pkg.c"] == {}
    assert cycles(graph) == [["pkg.a", "pkg.b"], ["pkg.e", "pkg.f"]]


@pytest.mark.parametrize("source", ["from pkg import helper\n", "import pkg\n"])
def test_a_submodule_importing_its_package_init_is_a_cycle_when_the_init_imports_it(source):
    files = {"pkg": ("from pkg.sub import x\ndef helper():\n    pass\n", True), "pkg.sub": (source + "x = 1\n", False)}
    assert cycles(import_graph(files)) == [["pkg", "pkg.sub"]]
