"""What the engine loop takes from its inbox (`EngineCore.serve_forever`), from any thread.

The in-process `Engine` and the scheduler process's receiver thread put these; the last two also cross the
process boundary as they are (server/messages.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from radixflow.runtime.request import Req


@dataclass
class AddRequest:
    req: Req


@dataclass
class AbortRequest:
    rid: str


@dataclass
class Call:
    """Run `fn` on the engine thread between steps (stats, flush, integrity check, control replies)."""

    fn: Callable[[], None]


InboxItem = AddRequest | AbortRequest | Call
