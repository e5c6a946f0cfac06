"""The router's pieces without a model or a network: its per-worker prefix tree, each policy's decisions on
scripted traffic, the text it routes by, and the radix cache's event log a router can build its trees from."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from radixflow.router.policy import CacheAware, PowerOfTwo, Random, RoundRobin, Worker, make_policy
from radixflow.router.tree import PrefixTree
from radixflow.runtime.cache.events import CacheEventLog
from radixflow.runtime.cache.radix_cache import RadixCache

texts = st.lists(st.text(alphabet="abc", max_size=12), max_size=12)


@settings(max_examples=200, deadline=None)
@given(stored=texts, queries=texts)
def test_tree_matches_the_longest_stored_prefix(stored, queries):
    tree = PrefixTree()
    for t in stored:
        tree.insert(t)
    for q in queries + stored:
        expected = max((len(os.path.commonprefix([q, t])) for t in stored), default=0)
        assert tree.match(q) == expected
    assert tree.size == _distinct_chars(stored)


def _distinct_chars(stored: list[str]) -> int:
    """Characters a trie of `stored` holds: one per distinct non-empty prefix."""
    return len({t[:i] for t in stored for i in range(1, len(t) + 1)})


@settings(max_examples=100, deadline=None)
@given(stored=texts, limit=st.integers(0, 40))
def test_eviction_bounds_the_tree_and_keeps_its_count(stored, limit):
    tree = PrefixTree()
    for t in stored:
        tree.insert(t)
    before = tree.size
    assert tree.evict(limit) == before - tree.size
    assert tree.size <= limit
    assert tree.size == sum(len(n.label) for n in tree._nodes())
    if limit >= before:
        assert all(tree.match(t) == len(t) for t in stored)


def test_eviction_drops_the_least_recently_matched_first():
    tree = PrefixTree()
    for t in ("system-A question one", "system-B question two"):
        tree.insert(t)
    tree.match("system-A question one")  # A is used again: B is now the least recently used
    tree.evict(tree.size - 5)
    assert tree.match("system-A question one") == len("system-A question one")
    assert tree.match("system-B question two") < len("system-B question two")


def test_remove_drops_what_a_text_does_not_share():
    tree = PrefixTree()
    tree.insert("shared prefix, then one")
    tree.insert("shared prefix, then two")
    assert tree.remove("shared prefix, then one") == len("one")
    assert tree.match("shared prefix, then one") == len("shared prefix, then ")
    assert tree.match("shared prefix, then two") == len("shared prefix, then two")
    assert tree.remove("not stored") == 0


def workers(n: int) -> list[Worker]:
    return [Worker(f"http://w{i}") for i in range(n)]


def test_round_robin_cycles():
    policy, ws = RoundRobin(), workers(3)
    assert [policy.select(ws, "x").worker.url for _ in range(6)] == [w.url for w in ws] * 2


def test_random_reaches_every_worker():
    policy, ws = Random(seed=0), workers(3)
    assert {policy.select(ws, "x").worker.url for _ in range(100)} == {w.url for w in ws}


def test_power_of_two_never_picks_the_busier_of_two():
    policy, ws = PowerOfTwo(seed=0), workers(2)
    ws[0].load, ws[1].load = 5, 1
    assert {policy.select(ws, "x").worker.url for _ in range(20)} == {"http://w1"}


def test_cache_aware_sends_a_shared_prefix_where_it_went_before():
    policy, ws = CacheAware(cache_threshold=0.5), workers(2)
    tenants = [f"tenant {i} system prompt " * 10 for i in range(4)]
    homes = {}
    for round_ in range(3):
        for i, prompt in enumerate(tenants):
            decision = policy.select(ws, prompt + f"question {round_}")
            homes.setdefault(i, decision.worker.url)
            assert decision.worker.url == homes[i]  # every later request of a tenant goes home
            assert decision.reason == ("cache_miss" if round_ == 0 else "cache_hit")
            decision.worker.load += 1  # requests stay in flight: the misses spread by load
    assert set(homes.values()) == {"http://w0", "http://w1"}  # new tenants went to the least loaded worker


def test_cache_aware_below_the_threshold_goes_to_the_least_loaded():
    policy, ws = CacheAware(cache_threshold=0.5), workers(2)
    ws[0].tree.insert("abcdef")
    ws[0].load = 3
    decision = policy.select(ws, "abcXXXXXXXXX")  # 3 of 12 characters match on w0: a miss
    assert (decision.worker.url, decision.reason, decision.matched_chars) == ("http://w1", "cache_miss", 3)


def test_cache_aware_imbalance_overrides_the_cache():
    policy, ws = CacheAware(cache_threshold=0.1, balance_abs_threshold=4, balance_rel_threshold=1.5), workers(2)
    ws[0].tree.insert("the prompt")
    ws[0].load, ws[1].load = 10, 5  # 5 more and 2x: imbalanced
    assert policy.select(ws, "the prompt").reason == "imbalanced"
    ws[1].tree = PrefixTree()  # (the imbalanced request taught w1 the prompt too)
    ws[0].load = 9  # 4 more: within the absolute threshold
    decision = policy.select(ws, "the prompt")
    assert (decision.worker.url, decision.reason) == ("http://w0", "cache_hit")


def test_cache_aware_from_events_does_not_learn_from_requests():
    policy, ws = CacheAware(learn_from_requests=False), workers(2)
    policy.select(ws, "a prompt")
    assert all(w.tree.size == 0 for w in ws)


def test_unknown_policy_is_a_clear_error():
    try:
        make_policy("fastest")
    except ValueError as exc:
        assert "policy" in str(exc) and "cache_aware" in str(exc)
    else:
        raise AssertionError("no error")


def test_routing_text_of_each_endpoint():
    from radixflow.router.app import routing_text

    assert routing_text("/generate", {"text": "hello"}) == "hello"
    assert routing_text("/generate", {"text": ["first", "second"]}) == "first"
    assert routing_text("/generate", {"input_ids": [1, 2, 3]}) == "1 2 3"
    assert routing_text("/v1/completions", {"prompt": ["p1", "p2"]}) == "p1"
    chat = routing_text("/v1/chat/completions", {"messages": [{"role": "system", "content": "S"},
                                                              {"role": "user", "content": "U"}]})
    longer = routing_text("/v1/chat/completions", {"messages": [{"role": "system", "content": "S"},
                                                                {"role": "user", "content": "U"},
                                                                {"role": "assistant", "content": "A"}]})
    assert longer.startswith(chat[:-1])  # a conversation's next turn extends its text
    assert routing_text("/v1/messages", {"system": "S", "messages": []}).startswith('"S"')


def test_event_log_reports_what_a_reader_missed():
    log = CacheEventLog(capacity=3)
    for i in range(5):
        log.record("insert", [i])
    events, next_seq, lost = log.since(0)  # events 0 and 1 were dropped
    assert lost and [e.tokens for e in events] == [(2,), (3,), (4,)] and next_seq == 5
    events, _, lost = log.since(4)
    assert not lost and [e.seq for e in events] == [4]
    assert log.since(99)[2]  # a number from before a restart


def test_radix_cache_logs_inserts_evictions_and_flushes():
    freed = []
    log = CacheEventLog()
    cache = RadixCache(freed.extend, log)
    cache.insert([1, 2, 3], [10, 11, 12])
    cache.insert([1, 2, 4], [10, 11, 13])
    cache.insert([1, 2], [10, 11])  # nothing new: no event
    cache.evict(1)
    cache.reset()
    ops = [(e.op, e.tokens) for e in log.since(0)[0]]
    assert ops[0] == ("clear", ())  # the tree starts empty
    assert ops[1:3] == [("insert", (1, 2, 3)), ("insert", (1, 2, 4))]
    assert ops[3][0] == "evict" and ops[3][1] in ((1, 2, 3), (1, 2, 4))
    assert ops[-1] == ("clear", ())
