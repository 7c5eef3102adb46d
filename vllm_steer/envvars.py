"""vllm-steer's environment variables (``VLLMSTEER_*``), read in one place.

vLLM treats every ``VLLM_*`` variable as its own: an engine start logs "Unknown vLLM
environment variable detected" for each one it does not know, and refuses to start with
``--fail-on-environ-validation`` (``vllm/platforms/interface.py``, ``validate_environ``).
So vllm-steer's variables are spelled ``VLLMSTEER_*``. The earlier ``VLLM_STEER_*``
spellings are still read, with a deprecation warning, when the new name is unset.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

logger = logging.getLogger("vllm_steer")

PREFIX = "VLLMSTEER_"
LEGACY_PREFIX = "VLLM_STEER_"

#: Root of writable state (uploaded vectors, the overlay of the shipped registry).
HOME = "VLLMSTEER_HOME"
#: Registry YAML read by the engine's front end.
REGISTRY = "VLLMSTEER_REGISTRY"
#: Root of the cache (converted default model, test assets).
CACHE = "VLLMSTEER_CACHE"
#: Overrides a registry's ``upload_dir`` / ``max_upload_bytes``.
UPLOAD_DIR = "VLLMSTEER_UPLOAD_DIR"
MAX_UPLOAD_BYTES = "VLLMSTEER_MAX_UPLOAD_BYTES"
#: Most prompts a recipe may expand to on the server's training route.
MAX_TRAIN_PROMPTS = "VLLMSTEER_MAX_TRAIN_PROMPTS"
#: ``1`` keeps the plugin out of a vLLM process without uninstalling it.
DISABLE = "VLLMSTEER_DISABLE"
#: Grace period (seconds) of the vector store's collection (``steering.store``).
STORE_GRACE_S = "VLLMSTEER_STORE_GRACE_S"
#: Set by ``vllm-steer doctor --verify`` for its own engines (a run id whose token file
#: exists in the data home while the run lasts): lets a newer-than-tested vLLM load the
#: plugin for the self-check before any stamp exists. Not for users.
SELFCHECK_RUN = "VLLMSTEER_SELFCHECK_RUN"
#: The steering admin key (``vllm-steer serve --steering-admin-key``; ``server.auth``).
ADMIN_KEY = "VLLMSTEER_ADMIN_KEY"
#: Keys with ids and roles, YAML or JSON (``vllm-steer serve --steering-keys``).
KEYS_FILE = "VLLMSTEER_KEYS_FILE"
#: Also append every audit line (admin actions) to this file (``server.audit``).
AUDIT_LOG = "VLLMSTEER_AUDIT_LOG"
#: Largest inline vector (bytes of the base64-decoded file) a request may carry; unset:
#: inline vectors are refused (``vllm-steer serve --steering-inline-vectors BYTES``).
INLINE_VECTOR_MAX_BYTES = "VLLMSTEER_INLINE_VECTOR_MAX_BYTES"
#: Seconds between refreshes of the engine-side metrics (``server.metrics``).
METRICS_INTERVAL_S = "VLLMSTEER_METRICS_INTERVAL_S"
#: The training route's budget on the served engine (``extract.capture_budget``): the
#: share of time its capture requests may be in flight, and the prompt tokens of one
#: burst of them.
TRAIN_ENGINE_SHARE = "VLLMSTEER_TRAIN_ENGINE_SHARE"
TRAIN_BURST_TOKENS = "VLLMSTEER_TRAIN_BURST_TOKENS"
#: Where benchmark results go (default: ``benchmarks/results`` in a source checkout).
BENCH_RESULTS = "VLLMSTEER_BENCH_RESULTS"

_warned: set[str] = set()


def legacy_name(name: str) -> str:
    """``VLLMSTEER_X`` -> ``VLLM_STEER_X`` (the deprecated spelling)."""
    if not name.startswith(PREFIX):
        raise ValueError(f"{name!r} is not a vllm-steer variable")
    return LEGACY_PREFIX + name[len(PREFIX):]


def get(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The value of ``name`` (a ``VLLMSTEER_*`` constant above), else of its deprecated
    ``VLLM_STEER_*`` spelling (logged once per name), else None. Empty counts as unset."""
    env = os.environ if environ is None else environ
    value = env.get(name)
    if value:
        return value
    old = legacy_name(name)
    value = env.get(old)
    if not value:
        return None
    if old not in _warned:
        _warned.add(old)
        logger.warning("vllm-steer: %s is deprecated, use %s (vLLM warns about, or with "
                       "--fail-on-environ-validation refuses, unknown VLLM_* variables)",
                       old, name)
    return value
