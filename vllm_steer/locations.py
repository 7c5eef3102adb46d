"""Where vllm-steer's files are: shipped data (read-only) and the user's writable state.

- Shipped configs (registry, trained vectors, vector recipes, question sets, experiments)
  are package data, ``vllm_steer/configs/``; the repository's top-level ``configs`` is a
  symlink to that directory, so a source checkout, an editable install and an installed
  wheel all read the same files.
- Writable state (vectors registered through the server and their overlay file, for the
  shipped registry; the self-check's stamps) goes to the data home, never into the
  installed package: ``$VLLMSTEER_HOME``, else ``$XDG_DATA_HOME/vllm-steer``, else
  ``~/.local/share/vllm-steer``.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from vllm_steer import envvars

#: The shipped registry's file name inside ``shipped_configs()``.
REGISTRY_NAME = "registry.yaml"


def shipped_configs() -> Path:
    """The package's ``configs`` directory (resolved)."""
    root = resources.files("vllm_steer") / "configs"
    path = Path(str(root))
    if not path.is_dir():  # a zip import or a wheel built without its package data
        raise FileNotFoundError(f"vllm-steer's shipped configs are missing ({root}); "
                                "reinstall the package")
    return path.resolve()


def shipped_registry() -> Path:
    """The registry shipped with the package (lists the vectors in ``configs/vectors``)."""
    return shipped_configs() / REGISTRY_NAME


def is_shipped_registry(path: str | os.PathLike[str]) -> bool:
    try:
        return Path(path).expanduser().resolve() == shipped_registry()
    except FileNotFoundError:
        return False


def in_a_package(path: str | os.PathLike[str]) -> bool:
    """True when ``path``, resolved (symlinks, ``..``, relative to the working directory),
    lies inside this running package or any ``vllm_steer`` package directory (one with an
    ``__init__.py``): an installed copy, another version's, a checkout's. Registries found
    there write their uploads to the data home (``Registry.from_yaml``), whichever code
    reads them."""
    try:
        p = Path(path).expanduser().resolve()
    except (OSError, RuntimeError):
        return False
    running = Path(__file__).resolve().parent
    return any(d == running or (d.name == "vllm_steer" and (d / "__init__.py").is_file())
               for d in p.parents)


def data_home() -> Path:
    """Root of writable state: ``$VLLMSTEER_HOME``, ``$XDG_DATA_HOME/vllm-steer`` or
    ``~/.local/share/vllm-steer`` (not created here)."""
    home = envvars.get(envvars.HOME)
    if home:
        return Path(home).expanduser().resolve()
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                         "share")
    return Path(xdg).expanduser().resolve() / "vllm-steer"


def selfcheck_dir() -> Path:
    """Where ``vllm-steer doctor --verify`` records its stamps (one JSON file per vLLM
    version, torch version, device and vllm-steer version), read by the version policy."""
    return data_home() / "selfcheck"


def shipped_upload_dir() -> Path:
    """Where the shipped registry stores vectors registered at run time."""
    return data_home() / "uploads"


def registry_path(explicit: str | os.PathLike[str] | None = None,
                  environ: dict[str, str] | None = None) -> Path:
    """The registry a command uses: ``explicit``, else ``$VLLMSTEER_REGISTRY``, else the
    shipped one. The one place this choice is made (``make_llm``, ``vllm-steer serve``)."""
    chosen = explicit or envvars.get(envvars.REGISTRY, environ)
    return Path(chosen).expanduser().resolve() if chosen else shipped_registry()


def find_config(path: str | os.PathLike[str]) -> Path:
    """``path`` when it exists; else, for a relative path starting with ``configs/`` (as the
    README writes them), the shipped file of that name, so those commands also run from an
    installed package in any directory."""
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute() or not p.parts or p.parts[0] != "configs":
        return p
    shipped = shipped_configs().joinpath(*p.parts[1:])
    return shipped if shipped.exists() else p


def in_installed_package(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` lies inside this package as installed (read-only by policy);
    always False in a source checkout, whose ``configs/`` is where vectors are trained."""
    if source_checkout() is not None:
        return False
    pkg = Path(__file__).resolve().parent
    p = Path(path).expanduser().resolve()
    return p == pkg or pkg in p.parents


def source_checkout() -> Path | None:
    """The repository root when this package runs from a source checkout (``pip install
    -e .`` or ``PYTHONPATH``), else None (an installed wheel)."""
    root = Path(__file__).resolve().parent.parent
    try:
        is_repo = 'name = "vllm-steer"' in (root / "pyproject.toml").read_text()
    except OSError:
        return None
    return root if is_repo else None
