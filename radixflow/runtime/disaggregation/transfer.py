"""KV transfer between a prefill server and its decode servers, over torch.distributed point-to-point (gloo).

Rendezvous. The prefill server's scheduler process hosts a TCPStore on `--disaggregation-bootstrap-port`. A decode
server that meets a prefill server for the first time (through a request's `bootstrap_host` / `bootstrap_port`)
joins it: it takes a number from the store's `joins` counter, writes a fresh pair id under `join/<n>`, and both
sides build a two-rank gloo group over the store, under that pair id (rank 0: the prefill side). Groups are kept
and reused; a group whose transfer failed is dropped, and the next request joins again.

One request (`bootstrap_room`: the router draws it and sends it to both servers with the request):

    decode   allocate pool slots for the prompt positions past its own cached prefix (a transfer never lands
             without room), then  store[room/<room>] = {pair, tag, skip}  with a fresh tag
    prefill  prefill the prompt and sample the first token; copy the prompt's KV (from `skip`) out of the pool
             (the request then ends as usual: its KV stays in the prefill server's radix tree); wait for
             room/<room> and claim it (compare-and-set to "taken"); store[room/<room>/meta] = the first token
             and its logprobs; send the KV with the tag
    decode   see the meta, post the receive (gloo holds a send until its receive is posted) -> the KV is written
             into the allocated slots -> the request decodes

Timeouts (`--disaggregation-transfer-timeout-s`) bound what should be quick: the prefill side's wait for the
decode side's registration once the prefill is done (it holds the KV in host memory meanwhile; on timeout it
sends an error as the meta, so a decode server that registers late is not left waiting) and the send / receive of
the KV itself. The decode side's wait for the meta is not bounded by it: that is the prompt queueing and computing
on the prefill server, which takes as long as the load there makes it. It ends when the meta comes, when the
prefill server's store goes away (the server died or restarted), or when the request ends (`cancel`: an abort,
its deadline, the client gone). A cancelled room is marked "cancelled" with the same compare-and-set, so exactly
one of the two happens: the prefill side sees the mark and drops its KV, or it had claimed the room and the
decode side still receives the KV (into a buffer it then drops), which keeps the pair's gloo traffic in step.

Blocking calls (store waits, gloo sends and receives) run on worker threads; the scheduler hands work over and
picks up results between steps, and never waits. A peer that dies fails its pending transfers at once (gloo sees
the connection close). On a GPU the KV is staged through host memory (gloo moves CPU tensors); an NCCL or RDMA
engine would implement the same two classes.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from radixflow.runtime.request import Bootstrap, TokenLogprobs
from radixflow.runtime.threads import single_omp_thread

logger = logging.getLogger(__name__)

TRANSFER_BACKENDS = ("gloo",)
MAX_CONCURRENT_SENDS = 64  # prefill side's worker threads; each mostly sleeps in a blocking wait
TAKEN, CANCELLED = "taken", "cancelled"  # what a room's registration becomes once one side has decided
# Fault injection for the test suite: `exit_in_kv_send` ends the prefill server's scheduler process in the middle of
# a transfer (the first token is out, the KV is not), as a crash would.
FAULT_ENV = "RADIXFLOW_FAULT_INJECT"


class KVTransferError(RuntimeError):
    pass


@dataclass
class TransferStats:
    transfers: int = 0
    failures: int = 0
    bytes: int = 0
    seconds: float = 0.0  # send (prefill) or receive (decode) time, summed

    def record(self, nbytes: int, seconds: float) -> None:
        self.transfers += 1
        self.bytes += nbytes
        self.seconds += seconds


@dataclass
class FirstToken:
    """What the prefill side sampled, sent with the KV: the decode side continues from it."""

    token: int | None  # None for a request with max_new_tokens 0 (prompt logprobs only)
    logprob: TokenLogprobs | None
    prompt_logprobs: list[TokenLogprobs]
    cached_tokens: int  # prompt tokens the prefill server had cached (reported to the client as cached)
    error: str | None = None  # the prefill side failed the request; no KV follows

    def dumps(self) -> str:
        lp = lambda t: None if t is None else [t.logprob, [list(x) for x in t.top]]  # noqa: E731
        return json.dumps({"token": self.token, "logprob": lp(self.logprob), "cached": self.cached_tokens,
                           "prompt_logprobs": [lp(t) for t in self.prompt_logprobs], "error": self.error})

    @classmethod
    def loads(cls, raw: bytes) -> FirstToken:
        d = json.loads(raw)
        lp = lambda x: None if x is None else TokenLogprobs(x[0], tuple((int(i), v) for i, v in x[1]))  # noqa: E731
        return cls(d["token"], lp(d["logprob"]), [lp(x) for x in d["prompt_logprobs"]], d["cached"], d["error"])


def _wait_key(store: dist.Store, key: str, timeout_s: float = float("inf"),
              cancelled: threading.Event | None = None) -> bytes | None:
    """The value of `key` once it is set (None if `cancelled` is set first). Polls (`check` is one round trip; a
    timed-out `store.wait` would log a warning from C++ each time), backing off to 5 ms, and to 50 ms after a
    second of waiting: a request that waits that long is queued behind other prompts, and hundreds of them polling
    every 5 ms would cost the store real CPU."""
    start, pause = time.monotonic(), 0.0005
    while not store.check([key]):
        waited = time.monotonic() - start
        if waited > timeout_s:
            raise KVTransferError(f"{key} not set within {timeout_s:.0f} s")
        if cancelled is not None and cancelled.is_set():
            return None
        time.sleep(pause)
        pause = min(pause * 2, 0.005 if waited < 1.0 else 0.05)
    return store.get(key)


def _room_key(room: int) -> str:
    return f"room/{room}"


def _meta_key(room: int) -> str:
    return f"room/{room}/meta"


class KVSender:
    """The prefill side: hosts the bootstrap store, accepts decode servers, sends each request's KV."""

    def __init__(self, port: int, timeout_s: float, host: str = "0.0.0.0"):
        self.timeout = timedelta(seconds=timeout_s)
        self.timeout_s = timeout_s
        try:
            self.store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=self.timeout)
        except Exception as exc:  # noqa: BLE001 - the port is taken or cannot be bound: a startup error
            raise KVTransferError(f"disaggregation_bootstrap_port: cannot listen on {port}: {exc}") from exc
        self.port = port
        self.stats = TransferStats()
        self._pairs: dict[str, dist.ProcessGroup] = {}
        self._pair_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(MAX_CONCURRENT_SENDS, thread_name_prefix="kv-send",
                                        initializer=single_omp_thread)
        self._accepter = threading.Thread(target=self._accept, name="kv-accept", daemon=True)
        self._accepter.start()

    def registration(self, room: int) -> dict | None:
        """The decode side's registration of `room` if it is there already (a store round trip)."""
        key = _room_key(room)
        if not self.store.check([key]):
            return None
        raw = self.store.get(key)
        return None if raw in (TAKEN.encode(), CANCELLED.encode()) else json.loads(raw)

    def send(self, boot: Bootstrap, first: FirstToken, kv: torch.Tensor | None, skip: int) -> None:
        """Hand over one finished prefill: `kv` holds the prompt's KV from position `skip` (None after a failure:
        only `first.error` goes out)."""
        self._pool.submit(self._send, boot.room, first, kv, skip)

    def _send(self, room: int, first: FirstToken, kv: torch.Tensor | None, skip: int) -> None:
        key = _room_key(room)
        try:
            raw = _wait_key(self.store, key, self.timeout_s)
        except Exception:  # noqa: BLE001 - the decode side never registered: it is full, gone, or was never there
            self.stats.failures += 1
            logger.warning("room %d: no decode server registered within %.0f s; its KV is dropped", room,
                           self.timeout_s)
            error = f"the decode server did not register within {self.timeout_s:.0f} s of the prefill"
            self.store.set(_meta_key(room), FirstToken(None, None, [], 0, error=error).dumps())
            return
        if self.store.compare_set(key, raw.decode(), TAKEN) != TAKEN.encode():  # the decode side cancelled it
            self.store.delete_key(key)
            return
        reg = {}
        try:
            reg = json.loads(raw)
            if first.error is not None or kv is None:
                self.store.set(_meta_key(room), first.dumps())
                return
            data = kv[:, :, reg["skip"] - skip:].contiguous()  # the decode side may hold more than we knew
            group, lock = self._pair(reg["pair"])
            self.store.set(_meta_key(room), first.dumps())
            if os.environ.get(FAULT_ENV) == "exit_in_kv_send":
                os._exit(70)
            start = time.monotonic()
            with lock:
                group.send([data], 1, reg["tag"]).wait(self.timeout)
            self.stats.record(data.numel() * data.element_size(), time.monotonic() - start)
        except Exception as exc:  # noqa: BLE001 - the decode side sees its receive fail and ends the request
            self.stats.failures += 1
            self._drop(reg.get("pair"))
            logger.warning("room %d: KV transfer failed: %s", room, exc)

    def _pair(self, pair: str) -> tuple[dist.ProcessGroup, threading.Lock]:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:  # the group is built by the accept thread as the decode side joins
            with self._lock:
                if pair in self._pairs:
                    return self._pairs[pair], self._pair_locks[pair]
            time.sleep(0.005)
        raise KVTransferError(f"decode server {pair} registered but never connected")

    def _drop(self, pair: str | None) -> None:
        with self._lock:
            self._pairs.pop(pair, None)

    def _accept(self) -> None:
        """Build a gloo group with every decode server that joins (each in its own thread: building blocks
        until the other side is there)."""
        joined = 0
        while not self._stop.is_set():
            try:
                count = self.store.add("joins", 0)
            except Exception:  # noqa: BLE001 - the store is closing
                return
            for n in range(joined, count):
                self._pool.submit(self._connect, n)
            joined = count
            self._stop.wait(0.01)

    def _connect(self, n: int) -> None:
        try:
            pair = _wait_key(self.store, f"join/{n}", self.timeout_s).decode()
            group = dist.ProcessGroupGloo(dist.PrefixStore(pair, self.store), 0, 2, self.timeout)
        except Exception as exc:  # noqa: BLE001 - a decode server that died while joining
            logger.warning("decode server %d did not connect: %s", n, exc)
            return
        with self._lock:
            self._pairs[pair] = group
            self._pair_locks[pair] = threading.Lock()
        logger.info("decode server %s connected", pair)

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class Received:
    """A finished transfer, handed back to the decode side's scheduler: the KV [2, layers, n, heads, dim] for the
    prompt positions from `skip`, and the first token; or the error that ended it."""

    token: object  # the caller's handle (its request)
    skip: int
    kv: torch.Tensor | None
    first: FirstToken | None
    error: str | None = None


class KVReceiver:
    """The decode side: joins prefill servers and receives each request's KV into a host buffer."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, timeout_s: float,
                 max_pending: int = 64):
        """`max_pending`: requests that may wait for their KV at once (the scheduler's slots); each waits on a
        thread of its own."""
        self.shape = (num_layers, num_kv_heads, head_dim)
        self.dtype = dtype
        self.timeout = timedelta(seconds=timeout_s)
        self.timeout_s = timeout_s
        self.stats = TransferStats()
        self.done: queue.SimpleQueue[Received] = queue.SimpleQueue()
        self._arrived = threading.Event()  # set with each `done` entry, cleared by `poll`
        self._peers: dict[tuple[str, int], _Peer] = {}
        # id(handle) -> (handle, event set when the request ended meanwhile); holding the handle keeps its id unique
        self._cancel: dict[int, tuple[object, threading.Event]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_pending + 8, thread_name_prefix="kv-recv")  # + cancelled ones draining

    def expect(self, handle: object, boot: Bootstrap, skip: int, num: int) -> None:
        """Receive KV for prompt positions [skip, skip + num) of room `boot.room` from the prefill server at
        `boot.host:boot.port`; the outcome arrives on `done` as a `Received` carrying `handle`."""
        cancelled = threading.Event()
        with self._lock:
            self._cancel[id(handle)] = (handle, cancelled)
        self._pool.submit(self._receive, handle, boot, skip, num, cancelled)

    def cancel(self, handle: object) -> None:
        """The request ended before its KV came: stop waiting. A transfer the prefill side had already claimed
        still completes (keeping the pair's gloo traffic in step) and arrives on `done` for the ended request."""
        with self._lock:
            _, cancelled = self._cancel.pop(id(handle), (None, None))
        if cancelled is not None:
            cancelled.set()

    def wait(self, timeout: float) -> None:
        """Sleep until a transfer ends (or `timeout`): a decode server with nothing to run but KV on the way."""
        self._arrived.wait(timeout)

    def poll(self) -> list[Received]:
        self._arrived.clear()
        out = []
        while True:
            try:
                out.append(self.done.get_nowait())
            except queue.Empty:
                return out

    def _receive(self, handle: object, boot: Bootstrap, skip: int, num: int, cancelled: threading.Event) -> None:
        peer = None
        try:
            if cancelled.is_set():
                return
            peer = self._peer(boot.host, boot.port)
            tag = peer.next_tag()
            reg = json.dumps({"pair": peer.pair, "tag": tag, "skip": skip})
            peer.store.set(_room_key(boot.room), reg)
            raw = _wait_key(peer.store, _meta_key(boot.room), cancelled=cancelled)
            if raw is None:  # cancelled: unless the prefill side has claimed the room already, that is all
                if peer.store.compare_set(_room_key(boot.room), reg, CANCELLED) == CANCELLED.encode():
                    return
                raw = _wait_key(peer.store, _meta_key(boot.room), self.timeout_s)  # it is sending: take it
            first = FirstToken.loads(raw)
            peer.store.delete_key(_meta_key(boot.room))
            peer.store.delete_key(_room_key(boot.room))
            if first.error is not None:
                self._deliver(cancelled, Received(handle, skip, None, None, f"the prefill server failed it: "
                                                                         f"{first.error}"))
                return
            layers, heads, dim = self.shape
            buf = torch.empty((2, layers, num, heads, dim), dtype=self.dtype)
            start = time.monotonic()
            if num:
                peer.group.recv([buf], 0, tag).wait(self.timeout)
            self.stats.record(buf.numel() * buf.element_size(), time.monotonic() - start)
            self._deliver(cancelled, Received(handle, skip, buf, first))
        except Exception as exc:  # noqa: BLE001 - every failure ends this request only, with what happened
            self.stats.failures += 1
            if peer is not None:
                self._forget(peer)
            where = f"{boot.host}:{boot.port}"
            self._deliver(cancelled, Received(handle, skip, None, None, f"KV transfer from the prefill server at "
                                                                     f"{where} failed: {exc}"))

    def _deliver(self, cancelled: threading.Event, received: Received) -> None:
        with self._lock:
            if self._cancel.get(id(received.token), (None, None))[1] is cancelled:
                del self._cancel[id(received.token)]
        self.done.put(received)
        self._arrived.set()

    def _peer(self, host: str, port: int) -> _Peer:
        with self._lock:
            peer = self._peers.get((host, port))
            connect = peer is None
            if connect:
                peer = self._peers[(host, port)] = _Peer(host, port)
        if connect:
            peer.connect(self.timeout)
        peer.connected.wait()  # another thread may be connecting it
        if peer.error is not None:
            self._forget(peer)
            raise KVTransferError(peer.error)
        return peer

    def _forget(self, peer: _Peer) -> None:
        with self._lock:
            if self._peers.get((peer.host, peer.port)) is peer:
                del self._peers[(peer.host, peer.port)]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class _Peer:
    """One prefill server as the decode side sees it: the store client and the gloo group (built on first use)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.pair = uuid.uuid4().hex
        self.connected = threading.Event()
        self.error: str | None = None
        self._tag = 0
        self._tag_lock = threading.Lock()

    def connect(self, timeout: timedelta) -> None:
        try:
            self.store = dist.TCPStore(self.host, self.port, is_master=False, timeout=timeout)
            n = self.store.add("joins", 1) - 1
            self.store.set(f"join/{n}", self.pair)
            self.group = dist.ProcessGroupGloo(dist.PrefixStore(self.pair, self.store), 1, 2, timeout)
        except Exception as exc:  # noqa: BLE001 - reported to every request waiting on this peer
            self.error = f"cannot connect to the prefill server's bootstrap port {self.host}:{self.port}: {exc}"
        finally:
            self.connected.set()

    def next_tag(self) -> int:
        with self._tag_lock:
            self._tag += 1
            return self._tag
