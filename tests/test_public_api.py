"""The declared public API: what ``vllm_steer.__all__`` and the public subpackages export,
what README and docs name, what error messages name, and the aliases of renamed modules.
No engine."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

import vllm_steer

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "vllm_steer"
#: Subpackages whose ``__all__`` is public.
PUBLIC_PACKAGES = ("vllm_steer.extract", "vllm_steer.probe", "vllm_steer.steering")
#: Renamed modules that keep an alias for one release: old -> new.
RENAMED = {"vllm_steer.engine": "vllm_steer.llm_factory",
           "vllm_steer.models": "vllm_steer.default_model",
           "vllm_steer.hf_reference": "vllm_steer.hf_steering",
           "vllm_steer.testing": "vllm_steer.fixtures",
           "vllm_steer.testing.tiny_models": "vllm_steer.fixtures.tiny_models",
           "vllm_steer.testing.thinking_tokenizer": "vllm_steer.fixtures.thinking_tokenizer",
           "vllm_steer.testing.vectors": "vllm_steer.fixtures.vectors",
           "vllm_steer.testing.engines": "vllm_steer.fixtures.engines"}
DOTTED = re.compile(r"(?<![\w.])vllm_steer(?:\.\w+)+")
FROM_IMPORT = re.compile(r"from (vllm_steer(?:\.\w+)*) import (?:\(([\w,\s]+)\)|([\w, ]+))")


def resolve(dotted: str) -> Any:
    """The object ``dotted`` names: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def is_public(dotted: str) -> bool:
    """A module, or reached from ``vllm_steer`` or a public subpackage through a name in
    its ``__all__`` (attributes of a public class included)."""
    target = resolve(dotted)
    if inspect.ismodule(target) or dotted.split(".")[-1] in ("__all__", "__version__"):
        return True
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        owner = ".".join(parts[:i])
        if owner == "vllm_steer" or owner in PUBLIC_PACKAGES:
            obj = importlib.import_module(owner)
            if parts[i] not in obj.__all__:
                return False
            try:
                for attr in parts[i:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                return False
            return obj is target
    return False


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def test_every_public_name_resolves_and_has_a_docstring():
    for name in vllm_steer.__all__:
        obj = getattr(vllm_steer, name)
        if name != "__version__":
            assert inspect.getdoc(obj), f"vllm_steer.{name} has no docstring"
    for pkg in PUBLIC_PACKAGES:
        mod = importlib.import_module(pkg)
        for name in mod.__all__:
            assert hasattr(mod, name), f"{pkg}.{name} is in __all__ but missing"


def test_importing_the_package_imports_no_heavy_module():
    """vLLM imports ``vllm_steer`` in every process: the names load when first used."""
    code = "import sys, vllm_steer; print(sorted(m for m in ('torch', 'vllm', 'transformers') " \
           "if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
    star = subprocess.run([sys.executable, "-c", "from vllm_steer import *; print(make_llm)"],
                          capture_output=True, text=True, check=True).stdout
    assert "function make_llm" in star


def test_the_version_is_the_projects():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert vllm_steer.__version__ == project["version"]


def test_the_subpackages_export_a_few_names():
    sizes = {pkg: len(importlib.import_module(pkg).__all__) for pkg in PUBLIC_PACKAGES}
    assert all(n <= 15 for n in sizes.values()), sizes


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_docs_name_only_public_names_that_exist(path):
    text = path.read_text()
    bad = []
    for m in FROM_IMPORT.finditer(text):
        module = m.group(1)
        names = [n.strip() for n in (m.group(2) or m.group(3)).split(",") if n.strip()]
        for n in names:
            if n.isupper() and len(n) == 1:
                continue   # a placeholder: from vllm_steer import X
            try:
                resolve(f"{module}.{n}")
            except (ImportError, AttributeError) as e:
                bad.append(f"from {module} import {n}: {e}")
                continue
            if not is_public(f"{module}.{n}"):
                bad.append(f"from {module} import {n}: not public")
    for m in DOTTED.finditer(text):
        dotted = m.group(0)
        try:
            resolve(dotted)
        except (ImportError, AttributeError) as e:
            bad.append(f"{dotted}: {e}")
            continue
        if not is_public(dotted):
            bad.append(f"{dotted}: not public")
    assert not bad, "\n".join(bad)


def _string_constants() -> list[tuple[str, int, str]]:
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.append((str(path.relative_to(REPO)), node.lineno, node.value))
    return found


def test_messages_and_docstrings_name_modules_that_exist():
    bad = []
    for where, line, text in _string_constants():
        for m in DOTTED.finditer(text):
            dotted = m.group(0).rstrip(".")
            if any(part.isupper() for part in dotted.split(".")):
                continue   # a placeholder: vllm_steer.bench.NAME
            try:
                resolve(dotted)
            except (ImportError, AttributeError):
                bad.append(f"{where}:{line}: {dotted}")
    assert not bad, "\n".join(bad)


def test_messages_name_routes_that_exist():
    from vllm_steer.server.routes import ROUTERS, playground

    paths = {r.path for router in [*ROUTERS, playground.router] for r in router.routes}
    pattern = re.compile(r"\b(?:GET|POST|DELETE|PUT) (/v1/steering[\w/{}]*)")
    bad = [f"{where}:{line}: {m.group(1)}" for where, line, text in _string_constants()
           for m in pattern.finditer(text) if m.group(1) not in paths]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("old,new", sorted(RENAMED.items()))
def test_renamed_modules_warn_and_forward(old, new):
    code = (f"import warnings\nwith warnings.catch_warnings(record=True) as seen:\n"
            f"    warnings.simplefilter('always')\n    import {old}\n"
            f"print([str(w.message) for w in seen if w.category is DeprecationWarning])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert f"{old} was renamed {new};" in out, out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old_mod, new_mod = importlib.import_module(old), importlib.import_module(new)
    public = [n for n, v in vars(new_mod).items()
              if not n.startswith("_") and not inspect.ismodule(v)]
    assert all(getattr(old_mod, n) is getattr(new_mod, n) for n in public)
    assert public or inspect.ismodule(old_mod.tiny_models)   # the package
