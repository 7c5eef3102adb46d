"""The kinds of steering a request uses, as the server's metrics count them.

``KINDS``: ``none`` (unsteered), the ops ``add``, ``ablate``, ``clamp``, ``normalize``
(steered tokens keep their norm) and ``thinking_phase`` (only the thinking or only the
answer section is steered). A steered request has one kind per op its vectors use (after
the registry's defaults), plus ``normalize`` and ``thinking_phase`` when they apply; an
unsteered one has none (the metric counts it as ``none``).

A new kind (``conditioned``, when conditional steering exists) is one more name in
``KINDS`` and one more clause in ``kinds_of``: the metric's ``kind`` label gains a value,
nothing else changes. vLLM-free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm_steer.steering.resolve import ResolvedSteering
    from vllm_steer.steering.spec import SteeringSpec

NONE = "none"
KINDS = (NONE, "add", "ablate", "clamp", "normalize", "thinking_phase")
_PHASES = ("thinking", "answer")


def kinds_of(spec: SteeringSpec | None, resolved: ResolvedSteering | None = None
             ) -> tuple[str, ...]:
    """The kinds of a request's steering (empty: unsteered), in ``KINDS`` order. From the
    resolved steering when given (ops after the registry's defaults), else from the spec
    (a vector without ``op`` counts as ``add``)."""
    if spec is None and resolved is None:
        return ()
    found: set[str] = set()
    if resolved is not None:
        found |= {p.op for p in resolved.program.parts}
        if resolved.program.normalize:
            found.add("normalize")
        if resolved.mode in _PHASES:
            found.add("thinking_phase")
    else:
        assert spec is not None
        found |= {v.op or "add" for v in spec.vectors}
        if spec.normalize:
            found.add("normalize")
        if spec.apply_to in _PHASES:
            found.add("thinking_phase")
    return tuple(k for k in KINDS if k in found)
