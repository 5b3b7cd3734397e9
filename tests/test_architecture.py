"""docs/architecture.md names modules that exist: every `es_stream.x` / `pipelines.x` it names
imports, and every module of the library is named there (a new module gets a line)."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import re
from pathlib import Path

import pytest

import es_stream

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
OPTIONAL = {"es_stream.integrations.composer": "composer", "es_stream.remote": "obstore"}


def named_modules() -> set[str]:
    return set(re.findall(r"`((?:es_stream|pipelines)(?:\.[a-z_]+)+|es_stream\.[a-z_]+)`",
                          DOC.read_text()))


@pytest.mark.parametrize("name", sorted(named_modules()))
def test_every_module_the_page_names_imports(name):
    needs = next((extra for mod, extra in OPTIONAL.items() if name.startswith(mod)), None)
    if needs is not None:
        pytest.importorskip(needs)
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        # a name such as `es_stream.sources.READERS` is an attribute of a module it names
        module, _, attr = name.rpartition(".")
        assert hasattr(importlib.import_module(module), attr), name


def _deprecated_shim(name: str) -> bool:
    """An old import path kept working with a warning: its docstring starts "Deprecated"."""
    spec = importlib.util.find_spec(name)
    return Path(spec.origin).read_text().lstrip('"').startswith("Deprecated")


def test_every_library_module_is_on_the_page():
    named = named_modules()
    missing = []
    for info in pkgutil.walk_packages(es_stream.__path__, "es_stream."):
        leaf = info.name.rsplit(".", 1)[1]
        if leaf.startswith("_") or _deprecated_shim(info.name):
            continue
        if info.ispkg and any(n.startswith(info.name + ".") for n in named):
            continue  # a package whose modules the page places
        if not any(info.name == n or info.name.startswith(n + ".") for n in named):
            missing.append(info.name)
    assert not missing, f"modules docs/architecture.md does not place in a layer: {missing}"
