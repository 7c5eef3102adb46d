"""A fresh vLLM cache root for the tests that must compile, never load, a graph."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def current_cache_root() -> Path:
    """The ``VLLM_CACHE_ROOT`` vLLM uses in this environment (its own default rule)."""
    default = Path(os.getenv("XDG_CACHE_HOME", Path.home() / ".cache")) / "vllm"
    return Path(os.path.expanduser(os.getenv("VLLM_CACHE_ROOT", str(default))))


def fresh_cache_root(path: Path) -> Path:
    """``path`` as a new ``VLLM_CACHE_ROOT`` holding no compiled graph (no
    ``torch_compile_cache``), with a copy of the current root's ``modelinfos``: vLLM's
    metadata per model class, keyed by a hash of the model's source file. Without it
    vLLM inspects the class in a new Python process at every engine start (~10 s here);
    it holds nothing compiled and nothing that depends on the plugin."""
    path.mkdir(parents=True, exist_ok=True)
    infos = current_cache_root() / "modelinfos"
    if infos.is_dir() and current_cache_root().resolve() != path.resolve():
        shutil.copytree(infos, path / "modelinfos", dirs_exist_ok=True)
    return path
