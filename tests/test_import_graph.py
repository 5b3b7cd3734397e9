"""The shape of the library, read from its source with ``ast`` (nothing is imported):

* no import cycle among ``es_stream`` modules;
* the core (everything but ``es_stream.integrations`` and ``es_stream.cli``) never imports an
  integration, the CLI, the pipelines or the tools;
* no module over 600 lines.

Every import counts, at module level or inside a function, except those in an ``if
TYPE_CHECKING:`` block (never run) and imports inside a
module-level ``__getattr__`` (PEP 562) that warns the name moved (calls ``warn_moved``). Those
are the deprecated aliases of names that moved (e.g.
``es_stream.sources.mds.ESStreamingDataset``); they run only when the old name is looked up,
after both modules are fully initialised, so they can neither fail on a half-initialised module
nor make the core load an integration unless the caller asks for it by its old name. A lazy
``__getattr__`` that is not a deprecated alias is an import like any other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "es_stream"
MAX_LINES = 600
# Over the limit on this branch, split by another change: listed so the check stays on for
# every other module; the test below fails once one of them is short enough, to drop it here.
PENDING_SPLIT: set[str] = set()


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _target(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name of what ``from ... import`` reads from."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _is_deprecated_alias(node: ast.AST) -> bool:
    """A module-level ``def __getattr__`` that warns, through ``warn_moved``, that a name moved."""
    return isinstance(node, ast.FunctionDef) and node.name == "__getattr__" and any(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "warn_moved"
        for n in ast.walk(node))


def _is_type_checking_block(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` — imports for type checkers, never run."""
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and \
        node.test.id == "TYPE_CHECKING" and not node.orelse


def _imports(module: str, path: Path) -> set[str]:
    """Modules (of any package) ``module`` imports, outside deprecated aliases."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if node is tree and _is_deprecated_alias(child):
                continue  # see the module docstring
            if _is_type_checking_block(child):
                continue  # annotations only: never imported when the code runs
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = _target(module, is_package, child)
                found.add(base)
                # `from pkg import mod` imports the submodule pkg.mod
                found.update(f"{base}.{a.name}" for a in child.names
                             if f"{base}.{a.name}" in MODULES)
            visit(child)

    visit(tree)
    return found


GRAPH = {m: {t for t in _imports(m, p) if t in MODULES} for m, p in MODULES.items()}
ALL_IMPORTS = {m: _imports(m, p) for m, p in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module, or of one importing itself
    (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_the_graph_is_read():
    # the walk must see the edges that exist, or the checks below would pass on nothing
    assert "es_stream.corpus" in GRAPH["es_stream.dataset"]
    assert "es_stream.sources.mds" in GRAPH["es_stream.sources"]
    assert "es_stream.integrations.composer.common" in GRAPH[
        "es_stream.integrations.composer.infobatch"]
    assert "es_stream.corpus" in GRAPH["es_stream.cli"]  # imported inside a function
    assert "es_stream.integrations.streaming_dataset" not in GRAPH["es_stream.sources.mds"]


def test_cycle_detection_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles among es_stream modules: " + "; ".join(
        " <-> ".join(c) for c in cycles)


def _is_core(module: str) -> bool:
    return not (module == "es_stream.cli" or module.startswith("es_stream.integrations"))


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _is_core(m)))
def test_core_imports_no_integration_cli_or_pipeline(module):
    bad = sorted(t for t in ALL_IMPORTS[module]
                 if not _is_core(t) and t.startswith("es_stream")
                 or t.split(".")[0] in ("pipelines", "tools"))
    assert not bad, f"{module} (core) imports {bad}"


def test_no_module_over_600_lines():
    lengths = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
               for p in MODULES.values()}
    over = {name: n for name, n in lengths.items() if n > MAX_LINES}
    assert set(over) <= PENDING_SPLIT, (
        f"modules over {MAX_LINES} lines: {dict(sorted(over.items()))}; split them by concept")
    done = sorted(PENDING_SPLIT - set(over))
    assert not done, f"{done} now has at most {MAX_LINES} lines: remove it from PENDING_SPLIT"


def test_old_import_paths_still_work_and_warn():
    pytest.importorskip("streaming")
    from es_stream.integrations.streaming_dataset import ESStreamingDataset

    with pytest.deprecated_call(match="es_stream.integrations.streaming_dataset"):
        from es_stream.sources.mds import ESStreamingDataset as via_reader
    with pytest.deprecated_call(match="es_stream.integrations.streaming_dataset"):
        from es_stream.sources.streaming_dataset import ESStreamingDataset as via_old_module
    assert via_reader is via_old_module is ESStreamingDataset
    import es_stream._atomic as old_atomic
    import es_stream.atomic as atomic

    assert old_atomic.atomic_write is atomic.atomic_write


def test_old_composer_paths_still_work_and_warn():
    pytest.importorskip("composer")
    from es_stream.integrations import composer

    with pytest.deprecated_call(match="es_stream.integrations.composer"):
        from es_stream.integrations.composer_infobatch import InfoBatch
    assert InfoBatch is composer.InfoBatch
    for name in ("EvolvedSampling", "InfoBatch", "ScoreCheckpoint", "causal_lm_sample_loss",
                 "run_evolved_sampling_first"):  # what the README and tests import from there
        assert name in composer.__all__ and hasattr(composer, name)


@pytest.mark.parametrize("old, new, name", [("es_stream.band", "es_stream.reference_policy", "BandPolicy"),
                                            ("es_stream.score", "es_stream.reference_scoring", "score_corpus")])
def test_renamed_modules_still_import_and_warn(old, new, name):
    import importlib
    import sys

    sys.modules.pop(old, None)
    with pytest.deprecated_call(match=f"{old} is deprecated"):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)
