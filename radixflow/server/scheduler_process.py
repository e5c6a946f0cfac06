"""The scheduler process: owns the model and KV memory, runs `EngineCore.serve_forever`.

A receiver thread turns ZMQ messages into inbox items; the engine thread (this process's main thread) is the only
user of the output socket, so control replies are produced there too, as callables put in the inbox.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading

import zmq

from radixflow.runtime.config import EngineConfig
from radixflow.runtime.engine_core import EngineCore
from radixflow.runtime.inbox import Call
from radixflow.server.messages import (
    AbortRequest,
    AddRequest,
    ControlReply,
    ControlRequest,
    OutputBatch,
    Ready,
    dumps,
    loads,
)

logger = logging.getLogger(__name__)


def _check_integrity(core: EngineCore) -> bool:
    core.check_integrity()
    return True


def _cache_events(core: EngineCore, since: int) -> dict:
    """The radix cache's events from `since` on (tokens; the HTTP process decodes them)."""
    log = getattr(core.cache.prefix_cache, "events", None)
    if log is None:
        raise ValueError("cache events are off: start the server with --enable-cache-events")
    events, next_seq, lost = log.since(since)
    return {"events": [(e.op, e.tokens) for e in events], "next": next_seq, "lost": lost}


CONTROL_OPS = {
    "open_session": lambda core, session_id, ttl_s: core.cache.open_session(session_id, ttl_s),
    "close_session": lambda core, session_id: core.cache.close_session(session_id),
    "flush_cache": lambda core: core.scheduler.flush_cache(),
    "stats": EngineCore.stats,
    "check_integrity": _check_integrity,
    "cache_events": _cache_events,
}


def run_scheduler_process(config: EngineConfig, in_addr: str, out_addr: str, log_level: str) -> None:
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s scheduler: %(message)s")
    parent = os.getppid()
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.connect(in_addr)
    push = context.socket(zmq.PUSH)
    push.connect(out_addr)
    try:
        core = EngineCore(config)
    except Exception as exc:  # noqa: BLE001 - reported to the launcher, which prints it and exits
        logger.exception("model load failed")
        push.send(dumps(Ready(0, 0, 0, error=f"{type(exc).__name__}: {exc}")))
        return
    push.send(dumps(Ready(core.max_context, core.cache.kv.size, core.loaded.args.vocab_size)))
    inbox: queue.Queue = queue.Queue()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    receiver = threading.Thread(target=_receive, args=(pull, inbox, core, push, stop, parent), daemon=True)
    receiver.start()
    try:
        core.serve_forever(inbox, lambda outputs: push.send(dumps(OutputBatch(outputs))), stop)
    finally:
        core.close()
    logger.info("scheduler stopped")
    receiver.join(timeout=2)  # it polls with a timeout and sees `stop`; closing first would break its poll
    pull.close(linger=0)
    push.close(linger=0)
    context.term()


def _receive(pull, inbox: queue.Queue, core: EngineCore, push, stop: threading.Event, parent: int) -> None:
    while not stop.is_set():
        if os.getppid() != parent:  # the server died without telling us: do not linger as an orphan
            stop.set()
            return
        if not pull.poll(200):
            continue
        message = loads(pull.recv())
        match message:
            case AddRequest() | AbortRequest():
                inbox.put(message)
            case ControlRequest():
                inbox.put(_control_call(message, core, push))
            case _:
                logger.error("unexpected message %r", type(message).__name__)


def _control_call(message: ControlRequest, core: EngineCore, push) -> Call:
    def run() -> None:
        op = CONTROL_OPS.get(message.op)
        if op is None:
            push.send(dumps(ControlReply(message.call_id, error=f"unknown control op {message.op!r}")))
            return
        try:
            push.send(dumps(ControlReply(message.call_id, result=op(core, **message.args))))
        except Exception as exc:  # noqa: BLE001 - the caller gets the error; the engine keeps going
            push.send(dumps(ControlReply(message.call_id, error=f"{type(exc).__name__}: {exc}")))
    return Call(run)
