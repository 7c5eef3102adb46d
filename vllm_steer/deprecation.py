"""Aliases that keep renamed public modules importable for one release.

A renamed module leaves a file at its old path whose whole body is
``__getattr__ = moved_module(__name__, "new.path")``: importing it warns
(``DeprecationWarning`` naming the new path) and every attribute comes from the new module.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

#: When the aliases go.
REMOVED_IN = "the release after 0.1"


def moved_module(old: str, new: str) -> Callable[[str], Any]:
    """Warn that ``old`` moved to ``new`` and return a module ``__getattr__`` forwarding
    every name to ``new``."""
    warnings.warn(f"{old} was renamed {new}; the old name is removed in {REMOVED_IN}",
                  DeprecationWarning, stacklevel=3)
    module = importlib.import_module(new)

    def __getattr__(name: str) -> Any:
        return getattr(module, name)

    return __getattr__
