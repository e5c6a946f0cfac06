"""The hierarchical radix cache (device -> host -> storage) on small real pools, without a model.

Every KV entry written here encodes the prefix it belongs to, so a test can tell that what a match hands out
after demotion, reload or a storage round trip is the KV of exactly those tokens, not merely some indices.
"""

from __future__ import annotations

import hashlib

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from radixflow.runtime.cache.hiradix_cache import HiRadixCache
from radixflow.runtime.cache.kv_pool import KVPool
from radixflow.runtime.cache.storage import FileBackend, KVPageStore

LAYERS, HEADS, DIM = 2, 1, 2


def pool(size: int) -> KVPool:
    return KVPool(size, LAYERS, HEADS, DIM, torch.float32, torch.device("cpu"))


def fingerprint(prefix) -> float:
    """A number standing for the KV of the last token of `prefix` (it depends on the whole prefix)."""
    return int.from_bytes(hashlib.sha256(repr(tuple(prefix)).encode()).digest()[:3], "little") / 7.0


def compute(device: KVPool, tokens: list[int], indices: list[int], start: int = 0) -> None:
    """Write the KV 'the model computes' for positions [start, len(tokens)) into `indices[start:]`."""
    for pos in range(start, len(tokens)):
        value = fingerprint(tokens[:pos + 1])
        for layer in range(LAYERS):
            device.k[layer][indices[pos]] = torch.tensor([[value, layer]])
            device.v[layer][indices[pos]] = torch.tensor([[-value, layer]])


def assert_kv_is(device: KVPool, tokens: list[int], indices: list[int]) -> None:
    for pos, index in enumerate(indices):
        value = fingerprint(tokens[:pos + 1])
        for layer in range(LAYERS):
            assert device.k[layer][index].tolist() == [[pytest.approx(value), layer]], f"K of position {pos}"
            assert device.v[layer][index].tolist() == [[pytest.approx(-value), layer]], f"V of position {pos}"


def serve(cache: HiRadixCache, device: KVPool, tokens: list[int], prefetch: bool = False) -> tuple[int, list[int]]:
    """What the scheduler does for one request: (prefetch from storage while it waits,) match (loading from the
    slower tiers), check the KV it got, lock, allocate and compute the rest, offer it all to the cache, free
    duplicates, unlock. Returns (cached tokens, the cache's indices for `tokens`), or (-1, []) if the pool had no
    room."""
    prefetched = cache.prefetch(tokens) if prefetch else None
    if prefetched is not None:
        prefetched.result()
    match = cache.match_and_load(tokens, prefetched)
    assert_kv_is(device, tokens, match.kv_indices)
    cache.lock(match.last_node)
    need = len(tokens) - len(match)
    if need > device.free_count():
        cache.evict(need - device.free_count())
    fresh = device.alloc(need)
    if fresh is None:
        cache.unlock(match.last_node)
        return -1, []
    mine = match.kv_indices + fresh.tolist()
    compute(device, tokens, mine, len(match))
    held = cache.insert(tokens, mine)
    device.free([m for m, kept in zip(mine, held.kv_indices) if m != kept])
    cache.unlock(match.last_node)
    return len(match), held.kv_indices


def check(cache: HiRadixCache, device: KVPool) -> None:
    cache.check_integrity(device.free_count(), device.size)


@pytest.mark.parametrize("policy", ["write_through", "write_back", "write_through_selective"])
def test_evicted_prefix_is_demoted_to_host_and_comes_back(policy):
    device, host = pool(8), pool(32)
    cache = HiRadixCache(device, host, policy)
    a = [1, 2, 3, 4, 5, 6]
    serve(cache, device, a)
    if policy == "write_through_selective":  # cold entries are dropped, not demoted: make this one hot first
        serve(cache, device, a + [7])
        serve(cache, device, a + [8])
    check(cache, device)
    cache.evict(device.size)  # as if other traffic needed the whole pool
    assert cache.match_prefix(a).kv_indices == [] and cache.host_size() >= len(a)
    check(cache, device)
    cached, held = serve(cache, device, a + [9])
    assert cached == len(a)
    assert cache.host_loads.tokens >= len(a)
    assert_kv_is(device, a + [9], held)
    check(cache, device)


def test_write_through_copies_on_insert_and_write_back_on_eviction():
    for policy, copied_at_insert in (("write_through", 4), ("write_back", 0)):
        device, host = pool(8), pool(16)
        cache = HiRadixCache(device, host, policy)
        serve(cache, device, [1, 2, 3, 4])
        assert cache.host_size() == copied_at_insert, policy
        cache.evict(4)
        assert cache.host_size() == 4 and cache.host_writes.tokens == 4, policy
        check(cache, device)


def test_selective_policy_drops_cold_entries_instead_of_copying():
    device, host = pool(8), pool(16)
    cache = HiRadixCache(device, host, "write_through_selective")
    serve(cache, device, [1, 2, 3, 4])
    cache.evict(8)
    assert cache.host_size() == 0 and cache.total_size() == 0
    check(cache, device)


def test_insert_over_a_host_only_node_takes_the_callers_fresh_indices():
    device, host = pool(8), pool(16)
    cache = HiRadixCache(device, host, "write_back")
    serve(cache, device, [1, 2, 3, 4])
    cache.evict(8)
    fresh = device.alloc(5).tolist()
    compute(device, [1, 2, 3, 4, 5], fresh)
    held = cache.insert([1, 2, 3, 4, 5], fresh)
    assert held.kv_indices == fresh  # nothing freed, nothing copied: the recomputed KV becomes L1's
    assert cache.host_loads.tokens == 0
    check(cache, device)


def test_selective_backup_of_a_hot_prefix_does_not_drop_the_host_nodes_being_loaded():
    device, host = pool(8), pool(4)
    cache = HiRadixCache(device, host, "write_back")
    serve(cache, device, [1, 2])
    serve(cache, device, [1, 2, 3, 4, 5, 6])
    cache.evict(4)  # [3..6] demoted: the host pool is full; [1, 2] stays in L1 without a host copy
    hot = cache.match_prefix([1, 2]).last_node
    hot.hit_count = 5
    cache.write_policy = "write_through_selective"
    match = cache.match_and_load([1, 2, 3, 4, 5, 6])
    assert len(match) == 6 and match.from_host == 4
    assert_kv_is(device, [1, 2, 3, 4, 5, 6], match.kv_indices)
    assert hot.host_value is not None  # backed up after the load, making room from the loaded node's copy
    check(cache, device)


def test_a_full_host_tier_drops_its_oldest_host_only_entries():
    device, host = pool(4), pool(4)
    cache = HiRadixCache(device, host, "write_back")
    serve(cache, device, [1, 2, 3, 4])
    cache.evict(4)
    serve(cache, device, [5, 6, 7, 8])  # evicting [1..4]'s L1 copy is not needed (it has none); L2 is full
    cache.evict(4)  # demoting [5..8] needs L2 room: [1..4] (least recently used) goes
    assert cache.match_and_load([1, 2, 3, 4]).kv_indices == []
    assert cache.host_drops == 4
    check(cache, device)


def test_session_prefix_is_evicted_last_and_demoted_not_dropped():
    device, host = pool(12), pool(12)
    cache = HiRadixCache(device, host, "write_back")
    _, held = serve(cache, device, [1, 2, 3, 4])
    cache.pin_session("s", cache.match_prefix([1, 2, 3, 4]).last_node)
    for k in range(10, 40, 4):  # other traffic, more than both tiers hold
        serve(cache, device, [k, k + 1, k + 2, k + 3])
        check(cache, device)
    cached, _ = serve(cache, device, [1, 2, 3, 4, 5])
    assert cached == 4
    assert cache.session_sizes() == {"s": 4}
    cache.pin_session("s", None)
    assert cache.session_sizes() == {}
    check(cache, device)


def test_flush_empties_every_tier():
    device, host = pool(8), pool(16)
    cache = HiRadixCache(device, host, "write_through")
    serve(cache, device, [1, 2, 3, 4])
    cache.flush()
    assert cache.total_size() == 0 and cache.host_size() == 0 and device.free_count() == 8
    check(cache, device)


# ---- storage (L3) ----

def store(tmp_path, page_size: int = 4) -> KVPageStore:
    return KVPageStore(FileBackend(str(tmp_path)), page_size, "test-model", (2, LAYERS, page_size, HEADS, DIM),
                       torch.float32)


def restarted(tmp_path, tokens: list[int], device_size: int = 16) -> tuple[KVPool, HiRadixCache]:
    """A cache that served `tokens` (its page writes finished), then a new one over the same directory: a restarted
    server, with empty pools (a device pool of `device_size`)."""
    device = pool(32)
    first = HiRadixCache(device, pool(32), storage=store(tmp_path))
    serve(first, device, tokens)
    first.storage.close()
    device = pool(device_size)
    return device, HiRadixCache(device, pool(16), storage=store(tmp_path))


def test_storage_pages_survive_a_restart(tmp_path):
    tokens = list(range(100, 111))  # 11 tokens: two whole pages of 4
    device, second = restarted(tmp_path, tokens)
    match = second.match_and_load(tokens)
    assert len(match) == 8 and match.from_storage == 8
    assert_kv_is(device, tokens, match.kv_indices)
    check(second, device)
    cached, held = serve(second, device, tokens)
    assert cached == 8
    assert_kv_is(device, tokens, held)


def test_storage_continues_a_match_that_ends_mid_page(tmp_path):
    tokens = list(range(200, 212))
    device = pool(32)
    cache = HiRadixCache(device, pool(32), storage=store(tmp_path))
    serve(cache, device, tokens)
    cache.storage.flush()
    cache.flush()
    serve(cache, device, tokens[:6])  # recomputed: the tree now holds 6 tokens, page 1 half of them
    match = cache.match_and_load(tokens)
    assert len(match) == 12 and match.from_storage == 6
    assert_kv_is(device, tokens, match.kv_indices)
    check(cache, device)


def test_a_prefetch_reads_the_pages_while_the_request_waits(tmp_path):
    tokens = list(range(500, 511))
    device, second = restarted(tmp_path, tokens)
    future = second.prefetch(tokens)
    assert future is not None and future.result()[0] == 0
    loads = second.storage.loads
    match = second.match_and_load(tokens, future)
    assert len(match) == 8 and match.from_storage == 8
    assert second.storage.loads == loads  # placed from the prefetch: nothing read at admission
    assert_kv_is(device, tokens, match.kv_indices)
    check(second, device)
    assert second.prefetch(tokens) is None  # everything in whole pages is held now: nothing to read


def test_a_prefetch_that_started_past_a_shrunken_match_is_not_trusted(tmp_path):
    tokens = list(range(600, 612))
    device = pool(32)
    cache = HiRadixCache(device, pool(32), storage=store(tmp_path))
    serve(cache, device, tokens)
    cache.storage.flush()
    cache.flush()
    serve(cache, device, tokens[:6])
    future = cache.prefetch(tokens)  # starts at token 6
    assert future.result()[0] == 6
    cache.flush()  # the tree loses those 6 tokens before the request is admitted
    match = cache.match_and_load(tokens, future)
    assert len(match) == 12 and match.from_storage == 12  # read again from token 0, synchronously
    assert_kv_is(device, tokens, match.kv_indices)
    check(cache, device)


def test_storage_pages_larger_than_the_device_pool_load_as_far_as_it_has_room(tmp_path):
    tokens = list(range(700, 724))
    device, second = restarted(tmp_path, tokens, device_size=10)  # a smaller server
    match = second.match_and_load(tokens)
    assert len(match) == 10 and match.from_storage == 10
    assert_kv_is(device, tokens, match.kv_indices)
    check(second, device)


@pytest.mark.parametrize("damage", ["truncate", "flip", "other-model"])
def test_a_damaged_page_is_a_miss(tmp_path, damage):
    tokens = list(range(300, 309))
    device = pool(16)
    cache = HiRadixCache(device, pool(16), storage=store(tmp_path))
    serve(cache, device, tokens)
    cache.storage.close()
    files = sorted(tmp_path.rglob("*.kv"), key=lambda p: p.stat().st_mtime)
    assert len(files) == 2
    second_key = store(tmp_path).keys(tokens, 2)[1]
    victim = next(p for p in files if p.stem == second_key)
    raw = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(raw[:-3])
    elif damage == "flip":
        victim.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    device = pool(16)
    other = store(tmp_path) if damage != "other-model" else KVPageStore(
        FileBackend(str(tmp_path)), 4, "another-model", (2, LAYERS, 4, HEADS, DIM), torch.float32)
    restarted = HiRadixCache(device, pool(16), storage=other)
    match = restarted.match_and_load(tokens)
    assert len(match) == (0 if damage == "other-model" else 4)  # the damaged second page is not used
    assert_kv_is(device, tokens, match.kv_indices)
    if damage != "other-model":
        assert other.corrupt == 1


class BrokenStore(FileBackend):
    """A store that is down: every call fails, as a Redis that went away would."""

    def exists(self, keys):
        raise ConnectionError("store unreachable")

    get = set = exists


def test_a_store_that_fails_costs_hits_not_requests(tmp_path):
    device = pool(16)
    broken = KVPageStore(BrokenStore(str(tmp_path)), 4, "test-model", (2, LAYERS, 4, HEADS, DIM), torch.float32)
    cache = HiRadixCache(device, pool(16), storage=broken)
    tokens = list(range(400, 410))
    cached, held = serve(cache, device, tokens)  # the write fails in the background; the read fails here
    assert cached == 0
    cache.flush()
    cached, held = serve(cache, device, tokens)
    assert cached == 0 and broken.failures >= 1
    assert_kv_is(device, tokens, held)
    check(cache, device)
    broken.close()


# ---- the state machine ----

class HiCacheMachine(RuleBasedStateMachine):
    """Requests over a small vocabulary through a small device pool, a smaller host pool and storage; every step
    keeps both pools' accounting exact and every match hands out the KV of exactly its tokens."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.dir = tempfile.TemporaryDirectory()
        self.device = pool(24)
        self.cache = HiRadixCache(self.device, pool(10), "write_back", storage=store(self.dir.name))
        self.sessions: set[str] = set()

    @rule(tokens=st.lists(st.integers(1, 4), min_size=1, max_size=14),
          policy=st.sampled_from(["write_through", "write_back", "write_through_selective"]),
          prefetch=st.booleans())
    def request(self, tokens, policy, prefetch):
        self.cache.write_policy = policy
        self.cache.storage.flush()  # earlier requests' pages are written (the writer thread is asynchronous)
        serve(self.cache, self.device, tokens, prefetch)

    @rule(tokens=st.lists(st.integers(1, 4), min_size=1, max_size=14))
    def look(self, tokens):
        assert_kv_is(self.device, tokens, self.cache.match_prefix(tokens).kv_indices)

    @rule(n=st.integers(1, 24))
    def evict(self, n):
        self.cache.evict(n)

    @rule(n=st.integers(1, 16))
    def evict_host(self, n):
        self.cache._evict_host(n)

    @rule(tokens=st.lists(st.integers(1, 4), min_size=1, max_size=10), sid=st.sampled_from("abc"))
    def pin(self, tokens, sid):
        match = self.cache.match_prefix(tokens)
        self.cache.pin_session(sid, match.last_node)
        self.sessions.add(sid)

    @precondition(lambda self: self.sessions)
    @rule(data=st.data())
    def close(self, data):
        sid = data.draw(st.sampled_from(sorted(self.sessions)))
        self.cache.pin_session(sid, None)
        self.sessions.discard(sid)

    @rule()
    def flush(self):
        self.cache.flush()

    @invariant()
    def accounts_exactly(self):
        check(self.cache, self.device)

    def teardown(self):
        self.cache.storage.close()
        self.dir.cleanup()


HiCacheMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)
test_hicache_state_machine = HiCacheMachine.TestCase
