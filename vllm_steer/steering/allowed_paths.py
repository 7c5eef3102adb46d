"""The path allow-list: which files a steering spec (or an upload by path) may name."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


def allowed_path(path: str | os.PathLike[str], allowed_dirs: Sequence[Path],
                 base: Path | None) -> Path | None:
    """The resolved path when it lies inside one of ``allowed_dirs`` (symlinks resolved),
    else None.

    A relative path is read relative to each allowed dir (``happy.safetensors``) and to
    ``base`` (the registry file's directory, the form the file itself uses:
    ``vectors/happy.safetensors``); the first of these that exists wins, else the first
    inside an allowed dir (so a missing file is reported as missing). Paths the OS cannot
    even look up (NUL bytes, lone surrogates, ``~nouser``) are None.
    """
    try:
        p = Path(path).expanduser()
        if p.is_absolute():
            candidates = [p]
        else:
            candidates = [d / p for d in allowed_dirs]
            if base is not None:
                candidates.append(base / p)
        inside = []
        for c in candidates:
            real = c.resolve()
            if any(real == d or d in real.parents for d in allowed_dirs):
                os.fsencode(real)  # raises for names the OS cannot encode
                if real.exists():
                    return real
                inside.append(real)
    except (OSError, ValueError, RuntimeError):
        return None
    return inside[0] if inside else None
