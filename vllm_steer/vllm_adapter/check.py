"""Checking the vLLM symbols of ``symbols.SYMBOLS`` against the installed vLLM.

Each table entry names a symbol as ``module:Owner.name`` and lists how it is checked:

- at plugin load (``check_all``): it imports, has the right kind (method, property,
  dataclass/struct/pydantic field, attribute assigned in ``__init__``, env variable) and
  the leading parameters the patch relies on;
- at engine start (``check_instance``): attributes that exist only on live objects (the
  model runner, the input processor), with their types.

A missing or changed symbol raises ``VLLMDriftError`` naming it, the supported vLLM range
and the installed version: the plugin refuses to load rather than steer wrongly or not at
all.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

from vllm_steer.vllm_adapter.drift import Instance, Symbol, VLLMDriftError
from vllm_steer.vllm_adapter.symbols import SYMBOLS

__all__ = ["VLLMDriftError", "check_all", "check_instance", "report", "symbol_problem"]

_ABSENT = object()


# -- running the checks --------------------------------------------------------------------
def _platform() -> str | None:
    try:
        from vllm.platforms import current_platform

        return str(current_platform.device_type)
    except Exception:
        return None


def symbol_problem(sym: Symbol) -> str | None:
    """What is wrong with ``sym`` in the installed vLLM (plugin-load checks), or None."""
    try:
        obj: Any = importlib.import_module(sym.module)
    except Exception as e:  # noqa: BLE001 - any import failure is drift
        return f"cannot be imported ({type(e).__name__}: {e})"
    for i, attr in enumerate(sym.owner_path):
        nxt = getattr(obj, attr, _ABSENT)
        if nxt is _ABSENT:
            owner = ".".join(sym.owner_path[:i + 1])
            return f"does not exist ({sym.module}:{owner} is missing)"
        obj = nxt
    for check in sym.checks:
        if isinstance(check, Instance):
            continue
        problem = check.problem(obj, sym.name)
        if problem:
            return problem
    return None


def applies(sym: Symbol, platform: str | None) -> bool:
    return sym.platform is None or sym.platform == platform


def check_all(symbols: Iterable[Symbol] | None = None, scope: str = "plugin") -> list[Symbol]:
    """Check every symbol of ``scope`` (plugin-load checks) that applies to this platform;
    raise ``VLLMDriftError`` listing every failure. Returns the symbols checked."""
    if symbols is None:
        symbols = SYMBOLS
    platform = _platform()
    checked, failures = [], []
    for sym in symbols:
        if not applies(sym, platform) or sym.scope != scope:
            continue
        checked.append(sym)
        problem = symbol_problem(sym)
        if problem:
            failures.append((sym.target, problem))
    if failures:
        raise VLLMDriftError(*failures[0], more=failures[1:])
    return checked


def check_instance(root: str, obj: Any, symbols: Iterable[Symbol] | None = None) -> None:
    """Run the engine-start checks of ``root`` (``runner``/``processor``) on the live
    ``obj``; raise ``VLLMDriftError`` naming the symbol."""
    if symbols is None:
        symbols = SYMBOLS
    failures = []
    for sym in symbols:
        for check in sym.checks:
            if isinstance(check, Instance) and check.root == root:
                problem = check.problem_on(obj)
                if problem:
                    failures.append((sym.target, problem))
    if failures:
        raise VLLMDriftError(*failures[0], more=failures[1:])


def report(symbols: Iterable[Symbol] | None = None) -> list[dict[str, str]]:
    """Every row of the table with its check result (``ok``, ``FAIL: ...``, ``n/a on ...``):
    what ``vllm-steer doctor`` prints. Engine-start checks are listed, not run."""
    if symbols is None:
        symbols = SYMBOLS
    platform = _platform()
    rows = []
    for sym in symbols:
        if not applies(sym, platform):
            status = f"n/a on {platform} (needed on {sym.platform})"
        else:
            problem = symbol_problem(sym)
            status = f"FAIL: {problem}" if problem else "ok"
        rows.append({"symbol": sym.target, "kind": sym.kind, "status": status,
                     "checked": sym.how, "why": sym.why})
    return rows
