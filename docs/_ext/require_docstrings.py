"""Griffe extension for the docs build: the API reference must not render an undocumented name.

mkdocstrings shows an object without a docstring as a bare signature and says nothing, so
this extension warns (through the ``mkdocs`` logger, which ``mkdocs build --strict`` turns
into a failed build) for every object named by a ``::: identifier`` line of the given pages
that has no docstring, and for each of its public members (functions, methods and
properties of a class; a module's ``__all__`` names, else its public classes and functions).
Attributes are not required to have their own docstring (a class docstring describes its
fields). Loaded by mkdocstrings' Python handler (``extensions`` in mkdocs.yml).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import griffe

log = logging.getLogger("mkdocs.plugins.vllm_steer.require_docstrings")

_IDENT = re.compile(r"^:::\s*([\w.]+)", re.M)


def _public_members(obj: Any) -> Iterator[Any]:
    if obj.is_module:
        exports = obj.exports
        names = [str(n) for n in exports] if exports is not None else [
            n for n, m in obj.members.items()
            if not n.startswith("_") and not m.is_alias and (m.is_class or m.is_function)]
        for name in names:
            yield obj.members[name]
    elif obj.is_class:
        for name, member in obj.members.items():
            if not name.startswith("_") and (member.is_function or "property" in member.labels):
                yield member


class RequireDocstrings(griffe.Extension):
    """Warn for every object the ``pages`` render (and its public members) without a
    docstring."""

    def __init__(self, pages: list[str] | None = None) -> None:
        super().__init__()
        self.pages = pages or ["docs/api.md"]

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Check the identifiers of ``pages`` that lie in the package just loaded."""
        for page in self.pages:
            for ident in _IDENT.findall(Path(page).read_text(encoding="utf-8")):
                if ident != pkg.path and not ident.startswith(pkg.path + "."):
                    continue
                try:
                    obj = pkg if ident == pkg.path else pkg[ident[len(pkg.path) + 1:]]
                    obj = obj.final_target if obj.is_alias else obj
                except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
                    continue  # mkdocstrings itself reports an identifier it cannot find
                for item in [obj, *_public_members(obj)]:
                    item = item.final_target if item.is_alias else item
                    if not (item.docstring and item.docstring.value.strip()):
                        log.warning("%s: %s (%s:%s) has no docstring", page, item.path,
                                    item.relative_filepath, item.lineno)
