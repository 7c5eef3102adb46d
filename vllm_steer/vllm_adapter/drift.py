"""How drift in a vLLM internal is described: ``VLLMDriftError`` and the row kinds of the
symbol table (``symbols.py``): ``Symbol`` and the checks a row lists (``Exists``,
``Signature``, ``Field``, ... ``Instance``). Running them is ``check.py``.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vllm_steer.compat import POLICY, TESTED_RANGE, UnsupportedVLLMError, installed_vllm_version

PATCHED, READ, CALLED = "patched", "read", "called"


class VLLMDriftError(UnsupportedVLLMError):
    """A vLLM symbol the plugin patches or reads is missing or changed.

    ``symbol``: the first failing symbol (``module:Owner.name``); ``failures``: every
    ``(symbol, problem)``; ``supported`` / ``installed``: the tested range and the
    installed vLLM version.
    """

    def __init__(self, symbol: str, problem: str,
                 more: Sequence[tuple[str, str]] = ()) -> None:
        self.failures = [(symbol, problem), *more]
        self.symbol = symbol
        self.supported = TESTED_RANGE
        self.installed = installed_vllm_version() or "none"
        lines = "\n".join(f"  - {s}: {p}" for s, p in self.failures)
        super().__init__(
            f"vllm-steer: vLLM symbol {symbol} {problem}.\n"
            f"vllm-steer accepts {POLICY}; installed: vLLM {self.installed}. "
            "The plugin patches and reads these vLLM internals and refuses to run when one "
            "is missing or changed (steering would be wrong or silently absent); "
            "`vllm-steer doctor` lists them all.\nFailing symbols:\n" + lines)


# -- helpers of the checks -------------------------------------------------------------------
_MISSING = object()


def _static(owner: Any, name: str) -> Any:
    try:
        return inspect.getattr_static(owner, name)
    except AttributeError:
        return _MISSING


def _qual(obj: Any) -> str:
    if inspect.ismodule(obj):
        return obj.__name__
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', obj)}"


def _fields(cls: Any) -> set[str]:
    names: set[str] = set()
    if dataclasses.is_dataclass(cls):
        names.update(f.name for f in dataclasses.fields(cls))
    names.update(getattr(cls, "__struct_fields__", ()))          # msgspec
    names.update(getattr(cls, "model_fields", None) or {})         # pydantic
    for klass in getattr(cls, "__mro__", ()):
        names.update(getattr(klass, "__annotations__", {}))
    return names


# -- checks ----------------------------------------------------------------------------------
# Each check gets the owner (module or class) and the attribute name of its symbol and
# returns None or what is wrong. ``describe`` is the "how it is checked" column.

@dataclass(frozen=True)
class Exists:
    """The attribute exists (module attribute, class, method)."""

    def describe(self) -> str:
        return "exists"

    def problem(self, owner: Any, name: str) -> str | None:
        return None if _static(owner, name) is not _MISSING else "does not exist"


@dataclass(frozen=True)
class Signature:
    """A callable whose parameters start with ``params`` (by name; ``self`` included for
    methods) and that accepts the keyword-only ``kwonly``."""

    params: tuple[str, ...]
    kwonly: tuple[str, ...] = ()

    def describe(self) -> str:
        if not self.params and not self.kwonly:
            return "callable"
        kw = f"*, {', '.join(self.kwonly)}, " if self.kwonly else ""
        pos = f"{', '.join(self.params)}, " if self.params else ""
        return f"callable({pos}{kw}...)"

    def problem(self, owner: Any, name: str) -> str | None:
        obj = _static(owner, name)
        if obj is _MISSING:
            return "does not exist"
        fn = obj.__func__ if isinstance(obj, classmethod | staticmethod) else obj
        if not callable(fn):
            return f"is not callable (a {type(fn).__name__})"
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return "has no inspectable signature"
        positional = [p.name for p in sig.parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if tuple(positional[:len(self.params)]) != self.params:
            return (f"changed signature: expected parameters ({', '.join(self.params)}, ...), "
                    f"found {sig}")
        accepts_kw = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
        missing = [k for k in self.kwonly if k not in sig.parameters and not accepts_kw]
        if missing:
            return f"changed signature: no keyword parameter {missing[0]!r} in {sig}"
        return None


@dataclass(frozen=True)
class Property:
    """A property (or other descriptor) on the class."""

    def describe(self) -> str:
        return "property"

    def problem(self, owner: Any, name: str) -> str | None:
        obj = _static(owner, name)
        if obj is _MISSING:
            return "does not exist"
        if not isinstance(obj, property) and not hasattr(obj, "__get__"):
            return f"is no longer a property (a {type(obj).__name__})"
        return None


@dataclass(frozen=True)
class Field:
    """A declared field: dataclass, msgspec struct, pydantic model or class annotation."""

    def describe(self) -> str:
        return "field"

    def problem(self, owner: Any, name: str) -> str | None:
        return None if name in _fields(owner) else f"is not a field of {_qual(owner)}"


@dataclass(frozen=True)
class Assigned:
    """An instance attribute: ``self.<name> = ...`` in ``__init__`` of the class or a base
    (read from source); its type is checked on the live object where the table says so."""

    def describe(self) -> str:
        return "set in __init__"

    def problem(self, owner: Any, name: str) -> str | None:
        pattern = re.compile(rf"\bself\.{re.escape(name)}\s*(?::[^=\n]+)?=(?!=)")
        sources = 0
        for klass in getattr(owner, "__mro__", ()):
            init = klass.__dict__.get("__init__")
            if init is None or klass is object:
                continue
            try:
                src = inspect.getsource(init)
            except (OSError, TypeError):
                continue
            sources += 1
            if pattern.search(src):
                return None
        if not sources:
            return f"cannot be verified: no source for {_qual(owner)}.__init__"
        return f"is no longer assigned in {_qual(owner)}.__init__"


@dataclass(frozen=True)
class Inherited:
    """The attribute is inherited unchanged from ``base`` (a class name in the MRO): the
    patch sits on ``base``, so an override would bypass it."""

    base: str

    def describe(self) -> str:
        return f"inherited from {self.base}"

    def problem(self, owner: Any, name: str) -> str | None:
        for klass in getattr(owner, "__mro__", ()):
            if name in klass.__dict__:
                if klass.__name__ == self.base:
                    return None
                return f"is overridden by {_qual(klass)}, bypassing the patch on {self.base}"
        return "does not exist"


@dataclass(frozen=True)
class Resolves:
    """A module attribute that exists only when read (a module ``__getattr__``, as vLLM's
    lazily resolved ``current_platform``): reading it must succeed."""

    def describe(self) -> str:
        return "resolves"

    def problem(self, owner: Any, name: str) -> str | None:
        try:
            getattr(owner, name)
        except Exception as e:  # noqa: BLE001 - any failure to resolve is drift
            return f"does not resolve ({type(e).__name__}: {e})"
        return None


@dataclass(frozen=True)
class EnvVar:
    """A variable vLLM reads from the environment (``vllm.envs.environment_variables``)."""

    def describe(self) -> str:
        return "env variable"

    def problem(self, owner: Any, name: str) -> str | None:
        known = getattr(owner, "environment_variables", None)
        if not isinstance(known, dict):
            return f"cannot be verified: {_qual(owner)}.environment_variables is gone"
        return None if name in known else "is no longer an environment variable vLLM reads"


@dataclass(frozen=True)
class ExtraAllowed:
    """A pydantic request model that keeps unknown top-level fields (``extra="allow"``):
    with ``ignore`` a body ``steering`` field would be dropped silently."""

    def describe(self) -> str:
        return 'pydantic extra="allow"'

    def problem(self, owner: Any, name: str) -> str | None:
        cls = _static(owner, name)
        if cls is _MISSING:
            return "does not exist"
        extra = (getattr(cls, "model_config", None) or {}).get("extra")
        return None if extra == "allow" else f"has pydantic extra={extra!r}, not 'allow'"


@dataclass(frozen=True)
class Instance:
    """On the live object ``root`` (``runner``, ``processor``), ``path`` is an instance of
    ``types`` (with ``ndim`` dimensions for arrays). Checked at engine start."""

    root: str
    path: str
    types: tuple[type, ...] | None = None
    ndim: int | None = None

    def describe(self) -> str:
        what = "/".join(t.__name__ for t in self.types) if self.types else "present"
        dims = f" ({self.ndim}-D)" if self.ndim is not None else ""
        return f"at engine start: {self.root}.{self.path} is {what}{dims}"

    def problem_on(self, obj: Any) -> str | None:
        for attr in self.path.split("."):
            if not hasattr(obj, attr):
                return f"{self.root}.{self.path}: no attribute {attr!r}"
            obj = getattr(obj, attr)
        if self.types is not None and not isinstance(obj, self.types):
            want = "/".join(t.__name__ for t in self.types)
            return f"{self.root}.{self.path} is a {type(obj).__name__}, expected {want}"
        if self.ndim is not None and getattr(obj, "ndim", None) != self.ndim:
            return (f"{self.root}.{self.path} has {getattr(obj, 'ndim', '?')} dimensions, "
                    f"expected {self.ndim}")
        return None


Check = (Exists | Signature | Property | Field | Assigned | Inherited | Resolves | EnvVar
         | ExtraAllowed | Instance)


@dataclass(frozen=True)
class Symbol:
    """One row of the table: a vLLM symbol, what the plugin does with it, why, and how it
    is checked. ``platform``: required only on that vLLM platform (``device_type``).
    ``scope``: ``plugin`` rows are checked at plugin load in every vLLM process; ``api``
    rows (the OpenAI serving layer, whose modules take seconds to import) when the
    endpoint plugin installs its patches in the API-server process."""

    target: str
    kind: str
    why: str
    checks: tuple[Check, ...]
    platform: str | None = None
    scope: str = "plugin"

    @property
    def module(self) -> str:
        return self.target.partition(":")[0]

    @property
    def owner_path(self) -> list[str]:
        return self.target.partition(":")[2].split(".")[:-1]

    @property
    def name(self) -> str:
        return self.target.partition(":")[2].split(".")[-1]

    @property
    def how(self) -> str:
        return "; ".join(c.describe() for c in self.checks)


