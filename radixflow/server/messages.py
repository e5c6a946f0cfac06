"""Every message that crosses the process boundary (HTTP process <-> scheduler process), and its serializer.

The scheduler process owns the model; the HTTP process tokenizes and validates. Requests travel as `AddRequest`
(a validated `Req`) and `AbortRequest`, the engine inbox's own messages (runtime/inbox.py); results as
`RequestOutput` deltas batched per step; control calls (flush, stats, ...) as `ControlRequest` answered by
`ControlReply`. One serializer (pickle: both ends are our own processes on one machine).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any

from radixflow.runtime.inbox import AbortRequest, AddRequest
from radixflow.runtime.scheduler.output import RequestOutput

__all__ = ["AbortRequest", "AddRequest", "ControlReply", "ControlRequest", "Message", "OutputBatch", "Ready", "dumps",
           "loads"]


@dataclass
class ControlRequest:
    call_id: int
    op: str  # a key of scheduler_process.CONTROL_OPS
    args: dict = field(default_factory=dict)  # its keyword arguments


@dataclass
class ControlReply:
    call_id: int
    result: Any = None
    error: str | None = None


@dataclass
class OutputBatch:
    """All request outputs of one engine step."""

    outputs: list[RequestOutput]


@dataclass
class Ready:
    """Sent once by the scheduler process when the model is loaded."""

    max_context: int
    pool_size: int
    vocab_size: int
    error: str | None = None  # set instead when the model failed to load


Message = AddRequest | AbortRequest | ControlRequest | ControlReply | Ready | OutputBatch


def dumps(message: Message) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def loads(data: bytes) -> Message:
    return pickle.loads(data)
