"""Engine options of the plugin: ``additional_config={"vllm_steer": {...}}`` (or the server's
``--additional-config``), read the same way by the frontend and the workers. vLLM-free.

- ``registry``: path of the vector registry (else ``$VLLMSTEER_REGISTRY``);
- ``max_projections``: ablate/clamp vectors per layer a request may use (default 1; 0
  steers by addition only: no projection tables, no projection work in the layers);
- ``transport``: how vector contents reach the workers: ``store`` (the content-addressed
  store under the data home, which every worker must see), ``inline`` (with every
  request) or ``auto`` (default: ``inline`` under the Ray executor, whose workers may run
  on other machines, else ``store``);
- ``layer_adapter``: force an adapter for decoder layers no adapter matches (at your own
  risk; see ``steering.layers``);
- ``capture``: hidden-state capture (default true; false leaves the capture op out of the
  layers); ``capture_max_bytes``: the most one request may capture (float32 values,
  default 64 MiB); ``capture_pending_bytes``: captures a worker keeps for collection
  before dropping finished, uncollected ones (default 1 GiB).
- ``conditions``: conditional steering (default true; false leaves the condition
  accumulation out of the layers, and conditioned requests are refused).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KEY = "vllm_steer"
TRANSPORTS = ("auto", "store", "inline")
DEFAULT_MAX_PROJECTIONS = 1
MAX_PROJECTIONS_LIMIT = 8
DEFAULT_CAPTURE_MAX_BYTES = 64 << 20
DEFAULT_CAPTURE_PENDING_BYTES = 1 << 30
_KNOWN = {"registry", "max_projections", "transport", "layer_adapter", "capture",
          "capture_max_bytes", "capture_pending_bytes", "conditions"}


class OptionError(ValueError):
    """A bad engine option; the message names it."""


@dataclass(frozen=True)
class EngineOptions:
    registry: str | None = None
    max_projections: int = DEFAULT_MAX_PROJECTIONS
    transport: str = "auto"
    layer_adapter: str | None = None
    capture: bool = True
    capture_max_bytes: int = DEFAULT_CAPTURE_MAX_BYTES
    capture_pending_bytes: int = DEFAULT_CAPTURE_PENDING_BYTES
    conditions: bool = True

    def resolved_transport(self, executor_backend: Any) -> str:
        """``store`` or ``inline`` for an engine with this distributed executor backend."""
        if self.transport != "auto":
            return self.transport
        return "inline" if str(executor_backend) == "ray" else "store"

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> EngineOptions:
        """The options in ``vllm_config.additional_config`` (defaults when absent)."""
        extra = getattr(vllm_config, "additional_config", None)
        raw = extra.get(KEY) if isinstance(extra, dict) else None
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise OptionError(f"additional_config.{KEY} must be a mapping")
        unknown = sorted(set(raw) - _KNOWN)
        if unknown:
            raise OptionError(f"additional_config.{KEY}.{unknown[0]}: unknown option (known: "
                              f"{', '.join(sorted(_KNOWN))})")
        k = raw.get("max_projections", DEFAULT_MAX_PROJECTIONS)
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_PROJECTIONS_LIMIT:
            raise OptionError(f"additional_config.{KEY}.max_projections must be an integer in "
                              f"0..{MAX_PROJECTIONS_LIMIT}, got {k!r}")
        transport = raw.get("transport", "auto")
        if transport not in TRANSPORTS:
            raise OptionError(f"additional_config.{KEY}.transport must be one of "
                              f"{', '.join(TRANSPORTS)}, got {transport!r}")
        reg, adapter = raw.get("registry"), raw.get("layer_adapter")
        capture = raw.get("capture", True)
        conditions = raw.get("conditions", True)
        for name, flag in (("capture", capture), ("conditions", conditions)):
            if not isinstance(flag, bool):
                raise OptionError(f"additional_config.{KEY}.{name} must be true or false, "
                                  f"got {flag!r}")
        sizes = {}
        for name, default in (("capture_max_bytes", DEFAULT_CAPTURE_MAX_BYTES),
                              ("capture_pending_bytes", DEFAULT_CAPTURE_PENDING_BYTES)):
            v = raw.get(name, default)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise OptionError(f"additional_config.{KEY}.{name} must be a positive "
                                  f"integer (bytes), got {v!r}")
            sizes[name] = v
        return cls(registry=str(reg) if reg else None, max_projections=k, transport=transport,
                   layer_adapter=str(adapter) if adapter else None, capture=capture,
                   conditions=conditions, **sizes)
