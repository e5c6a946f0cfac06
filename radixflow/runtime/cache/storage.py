"""The storage tier (L3) of the hierarchical cache: pages of KV in a store that outlives the server and can be
shared between servers.

A page is `page_size` consecutive tokens' K and V, keyed by a hash chain: page i's key hashes page i-1's key and
page i's tokens, and the chain starts from the model and KV layout's identity. So a key names a whole prefix, a
restarted server (or another server of the same model) finds its pages, and a different model never matches.
Only whole pages are stored.

Each stored value carries the identity digest and a SHA-256 checksum of its payload; a page that is missing,
truncated, corrupt or from another layout is a miss (the tokens are computed again), never a wrong answer.

Writes are queued to one background thread (the KV is copied out of the pool first, so the pool's indices can be
reused at once). Reads run on another thread while the request waits in the queue (`prefetch`), or synchronously at
admission for what a prefetch could not know about.

Backends (`StorageBackend`: batched exists / get / set): `file` (a directory: one file per page, written
atomically) and `redis` (a Redis server, shared by every server pointed at it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from radixflow.runtime.threads import single_omp_thread

logger = logging.getLogger(__name__)

MAGIC = b"RFKV\x01"
DIGEST = 32
DEFAULT_DIR = "~/.cache/radixflow/hicache"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
KNOWN_KEYS = 200_000  # keys this server knows are stored (skips asking the store again), LRU


class StorageBackend(ABC):
    """A key-value store for pages; keys are hex strings, values bytes."""

    @abstractmethod
    def exists(self, keys: Sequence[str]) -> list[bool]: ...

    @abstractmethod
    def get(self, keys: Sequence[str]) -> list[bytes | None]: ...

    @abstractmethod
    def set(self, items: Sequence[tuple[str, bytes]]) -> None: ...

    def close(self) -> None:  # noqa: B027 - most backends hold nothing to close
        pass


class FileBackend(StorageBackend):
    """One file per page under `dir` (two-character fan-out), written to a temporary file and renamed into place,
    so a reader never sees half a page."""

    def __init__(self, dir: str = DEFAULT_DIR):
        self.dir = Path(dir).expanduser()
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.kv"

    def exists(self, keys: Sequence[str]) -> list[bool]:
        return [self._path(k).is_file() for k in keys]

    def get(self, keys: Sequence[str]) -> list[bytes | None]:
        out = []
        for k in keys:
            try:
                out.append(self._path(k).read_bytes())
            except OSError:
                out.append(None)
        return out

    def set(self, items: Sequence[tuple[str, bytes]]) -> None:
        for key, value in items:
            path = self._path(key)
            path.parent.mkdir(exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(value)
            os.replace(tmp, path)


class RedisBackend(StorageBackend):
    """Pages in a Redis server (`url`, as redis-py takes it), under `prefix`; pipelined batches."""

    def __init__(self, url: str = DEFAULT_REDIS_URL, prefix: str = "radixflow:kv:", ttl_s: int | None = None):
        import redis  # an optional dependency: only this backend needs it

        self.client = redis.Redis.from_url(url)
        self.client.ping()  # fail at startup, naming the store, rather than at the first page
        self.prefix, self.ttl_s = prefix, ttl_s

    def exists(self, keys: Sequence[str]) -> list[bool]:
        pipe = self.client.pipeline(transaction=False)
        for k in keys:
            pipe.exists(self.prefix + k)
        return [bool(n) for n in pipe.execute()]

    def get(self, keys: Sequence[str]) -> list[bytes | None]:
        return self.client.mget([self.prefix + k for k in keys]) if keys else []

    def set(self, items: Sequence[tuple[str, bytes]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for key, value in items:
            pipe.set(self.prefix + key, value, ex=self.ttl_s)
        pipe.execute()

    def close(self) -> None:
        self.client.close()


BACKENDS = {"file": FileBackend, "redis": RedisBackend}


def make_backend(name: str, extra_config: str | None) -> StorageBackend:
    """`--hicache-storage-backend` and `--hicache-storage-backend-extra-config` (JSON: file takes `dir`; redis
    takes `url`, `prefix`, `ttl_s`)."""
    if name not in BACKENDS:
        raise ValueError(f"hicache_storage_backend: {name!r} is not one of {', '.join(BACKENDS)}")
    try:
        options = json.loads(extra_config) if extra_config else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"hicache_storage_backend_extra_config: not valid JSON ({exc})") from None
    if not isinstance(options, dict):
        raise ValueError("hicache_storage_backend_extra_config: must be a JSON object")
    try:
        return BACKENDS[name](**options)
    except TypeError as exc:
        raise ValueError(f"hicache_storage_backend_extra_config: {exc}") from None


class KVPageStore:
    """Pages of KV in a `StorageBackend`, keyed by the hash chain of their tokens under `identity`."""

    def __init__(self, backend: StorageBackend, page_size: int, identity: str, shape: tuple[int, ...],
                 dtype: torch.dtype):
        if page_size < 1:
            raise ValueError(f"page_size: must be >= 1, got {page_size}")
        self.backend, self.page_size = backend, page_size
        self.shape, self.dtype = shape, dtype  # one page: [2, layers, page_size, kv_heads, head_dim]
        self.identity = hashlib.sha256(identity.encode()).digest()
        self._known: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self.writes = self.write_bytes = self.loads = self.load_bytes = self.misses = self.corrupt = 0
        self.failures = 0  # store errors on reading (each one a miss)
        self.write_seconds = self.load_seconds = 0.0
        self._queue: queue.Queue[list[tuple[str, torch.Tensor]] | None] = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="kv-storage-writer", daemon=True)
        self._writer.start()
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="kv-storage-reader", initializer=single_omp_thread)
        self.prefetches = 0

    # ---- keys ----

    def keys(self, tokens: Sequence[int], num_pages: int) -> list[str]:
        """The keys of the first `num_pages` whole pages of `tokens`."""
        out, h = [], self.identity
        for p in range(num_pages):
            page = tokens[p * self.page_size:(p + 1) * self.page_size]
            h = hashlib.sha256(h + b"".join(int(t).to_bytes(4, "little") for t in page)).digest()
            out.append(h.hex())
        return out

    def _remember(self, keys: Sequence[str]) -> None:
        with self._lock:
            for k in keys:
                self._known[k] = None
                self._known.move_to_end(k)
            while len(self._known) > KNOWN_KEYS:
                self._known.popitem(last=False)

    # ---- writing ----

    def save(self, pool, tokens: Sequence[int], kv_indices: Sequence[int], start: int) -> None:
        """Queue the whole pages of `tokens` that end after position `start` (those before were saved when they
        entered the tree) and are not known to be stored; `kv_indices` are their indices in `pool`."""
        num_pages = len(tokens) // self.page_size
        first = start // self.page_size
        if first >= num_pages:
            return
        keys = self.keys(tokens, num_pages)
        with self._lock:
            todo = [p for p in range(first, num_pages) if keys[p] not in self._known]
        if not todo:
            return
        P = self.page_size
        index = torch.tensor([i for p in todo for i in kv_indices[p * P:(p + 1) * P]], dtype=torch.int64)
        data = pool.gather(index).to("cpu")  # a copy: the pool's indices may be reused once this returns
        self._remember([keys[p] for p in todo])
        self._queue.put([(keys[p], data[:, :, j * P:(j + 1) * P]) for j, p in enumerate(todo)])

    def _write_loop(self) -> None:
        single_omp_thread()
        while (batch := self._queue.get()) is not None:
            try:
                start = time.perf_counter()
                present = self.backend.exists([k for k, _ in batch])
                items = [(k, self._encode(t)) for (k, t), there in zip(batch, present) if not there]
                if items:
                    self.backend.set(items)
                self.writes += len(items)
                self.write_bytes += sum(len(v) for _, v in items)
                self.write_seconds += time.perf_counter() - start
            except Exception:  # noqa: BLE001 - a store that fails costs cache hits, not the server
                logger.exception("writing %d KV pages to storage failed", len(batch))
                with self._lock:
                    for k, _ in batch:
                        self._known.pop(k, None)
            finally:
                self._queue.task_done()

    def flush(self) -> None:
        """Wait until every queued page is written (tests, shutdown)."""
        self._queue.join()

    def close(self) -> None:
        self._reader.shutdown(wait=True, cancel_futures=True)
        self.flush()
        self._queue.put(None)
        self._writer.join(timeout=10)
        self.backend.close()

    def _encode(self, page: torch.Tensor) -> bytes:
        payload = page.contiguous().view(torch.uint8).numpy().tobytes()
        return MAGIC + self.identity + hashlib.sha256(payload).digest() + payload

    def _decode(self, raw: bytes | None) -> torch.Tensor | None:
        if raw is None:
            return None
        head = len(MAGIC) + 2 * DIGEST
        payload = raw[head:]
        expected = torch.Size(self.shape).numel() * torch.empty(0, dtype=self.dtype).element_size()
        if (raw[:len(MAGIC)] != MAGIC or raw[len(MAGIC):len(MAGIC) + DIGEST] != self.identity
                or len(payload) != expected or hashlib.sha256(payload).digest() != raw[head - DIGEST:head]):
            with self._lock:
                self.corrupt += 1
            return None
        return torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(self.dtype).reshape(self.shape)

    # ---- reading ----

    def prefetch(self, tokens: Sequence[int], start: int) -> Future:
        """`load(tokens, start)` on the reader thread: a future of (start, what `load` returns)."""
        tokens = list(tokens)
        with self._lock:
            self.prefetches += 1
        return self._reader.submit(lambda: (start, self.load(tokens, start)))

    def load(self, tokens: Sequence[int], start: int) -> tuple[int, torch.Tensor] | None:
        """The stored KV of positions [start, end) of `tokens`, for the longest run of stored whole pages from the
        one holding `start` on: (end, tensor [2, layers, end - start, kv_heads, head_dim]), or None if there is no
        page past `start`."""
        P = self.page_size
        num_pages, first = len(tokens) // P, start // P
        if first >= num_pages:
            return None
        t0 = time.perf_counter()
        keys = self.keys(tokens, num_pages)[first:]
        try:
            present = self.backend.exists(keys)
            run = next((i for i, there in enumerate(present) if not there), len(keys))
            pages = [self._decode(raw) for raw in self.backend.get(keys[:run])] if run else []
        except Exception as exc:  # noqa: BLE001 - a store that fails costs cache hits, not the request
            with self._lock:
                self.failures += 1
            logger.warning("reading KV pages from storage failed (%s: %s); computing them instead",
                           type(exc).__name__, exc)
            return None
        good = next((i for i, page in enumerate(pages) if page is None), len(pages))
        if good == 0:
            with self._lock:
                self.misses += 1
            return None
        self._remember(keys[:good])
        data = torch.cat(pages[:good], dim=2)[:, :, start - first * P:]
        with self._lock:
            self.loads += good
            self.load_bytes += good * pages[0].numel() * pages[0].element_size()
            self.load_seconds += time.perf_counter() - t0
        return (first + good) * P, data

    def stats(self) -> dict:
        return {"hicache_storage_pages_written": self.writes, "hicache_storage_write_bytes": self.write_bytes,
                "hicache_storage_write_seconds": self.write_seconds, "hicache_storage_pages_loaded": self.loads,
                "hicache_storage_load_bytes": self.load_bytes, "hicache_storage_load_seconds": self.load_seconds,
                "hicache_storage_misses": self.misses, "hicache_storage_corrupt_pages": self.corrupt,
                "hicache_storage_read_failures": self.failures, "hicache_storage_prefetches": self.prefetches,
                "hicache_storage_queued_writes": self._queue.qsize()}
