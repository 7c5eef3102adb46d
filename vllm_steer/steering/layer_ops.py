"""The opaque per-layer ops of the layer forwards (capture, condition reading). vLLM-free.

An op is opaque to torch.compile, so the compiled graph calls its Python body at run time;
its body reads host state (a plan for the current step) and returns at once without one.
An op's Python body does not run inside a replayed CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

OP_NAMESPACE = "vllm_steer"
_LIBS: list[Any] = []   # keeps the registrations alive


def define_layer_op(name: str, schema: str, impl: Callable[..., None]) -> Any:
    """``torch.ops.vllm_steer.<name>`` (``schema``: its arguments, returning ``()``),
    implemented by ``impl``; defined once per process (an earlier import's op is
    returned). torch.library.Library + impl (as vLLM registers its own ops), not
    custom_op: the latter's Python wrapper costs ~50 us a call, this ~3 us."""
    ns = getattr(torch.ops, OP_NAMESPACE)
    if hasattr(ns, name):
        return getattr(ns, name).default
    lib = torch.library.Library(OP_NAMESPACE, "FRAGMENT")
    lib.define(f"{name}({schema}) -> ()")
    lib.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{OP_NAMESPACE}::{name}", lambda *args, **kwargs: None, lib=lib)
    _LIBS.append(lib)
    return getattr(ns, name).default
