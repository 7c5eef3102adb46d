"""Rewriting the server-sent events of a streamed OpenAI response."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any


def rewrite_events(text: str, edit: Callable[[Any], bool]) -> str:
    """``text`` (SSE events separated by blank lines) with each ``data:`` event's JSON
    passed to ``edit``, which changes it in place and says whether it did; a changed event
    is serialised again, every other one (``[DONE]``, not JSON, unchanged) is kept as it
    was."""
    out = []
    for event in text.split("\n\n"):
        if not event.startswith("data: ") or event == "data: [DONE]":
            out.append(event)
            continue
        try:
            obj = json.loads(event[6:])
        except ValueError:
            out.append(event)
            continue
        out.append("data: " + json.dumps(obj) if edit(obj) else event)
    return "\n\n".join(out)
