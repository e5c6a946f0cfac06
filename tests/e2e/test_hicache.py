"""The hierarchical cache and sessions in a running engine (the tiny model): storage that survives a restart,
damaged pages that are misses, sessions that survive pressure, TTL and close."""

from __future__ import annotations

import json
import time

import pytest

from radixflow import Engine
from tests.helpers.models import GREEDY

PROMPT = "Storage tier test. " + " ".join(f"fact {i} is {i * 7 % 13}." for i in range(60))
PARAMS = {"max_new_tokens": 8, "ignore_eos": True, **GREEDY}


def storage_engine(model_dir, directory, **extra) -> Engine:
    return Engine(model_path=str(model_dir), max_total_tokens=4096, enable_hierarchical_cache=True,
                  hicache_storage_backend="file",
                  hicache_storage_backend_extra_config=json.dumps({"dir": str(directory)}), page_size=16, **extra)


def test_a_restarted_engine_answers_a_known_prefix_from_disk(tiny_model_dir, tmp_path):
    first = storage_engine(tiny_model_dir, tmp_path)
    try:
        reference = first.generate(PROMPT, PARAMS)
    finally:
        first.shutdown()  # waits for the page writes
    assert list(tmp_path.rglob("*.kv"))
    second = storage_engine(tiny_model_dir, tmp_path)
    try:
        again = second.generate(PROMPT, PARAMS)
        stats = second.stats()
        second.check_integrity()
    finally:
        second.shutdown()
    prompt_len = reference["meta_info"]["prompt_tokens"]
    assert again["output_ids"] == reference["output_ids"]
    assert again["meta_info"]["cached_tokens"] == (prompt_len - 1) // 16 * 16  # whole pages before the last token
    assert stats["cache_hit_storage_tokens"] == again["meta_info"]["cached_tokens"]
    assert stats["hicache_storage_pages_loaded"] == (prompt_len - 1) // 16
    assert stats["hicache_storage_prefetches"] >= 1  # read while the request waited in the queue


def test_corrupt_pages_are_misses_not_wrong_answers(tiny_model_dir, tmp_path):
    first = storage_engine(tiny_model_dir, tmp_path)
    try:
        reference = first.generate(PROMPT, PARAMS)
    finally:
        first.shutdown()
    for page in tmp_path.rglob("*.kv"):
        raw = bytearray(page.read_bytes())
        raw[-5] ^= 0xFF
        page.write_bytes(bytes(raw))
    second = storage_engine(tiny_model_dir, tmp_path)
    try:
        again = second.generate(PROMPT, PARAMS)
        stats = second.stats()
    finally:
        second.shutdown()
    assert again["output_ids"] == reference["output_ids"]
    assert again["meta_info"]["cached_tokens"] == 0
    assert stats["hicache_storage_corrupt_pages"] >= 1


@pytest.mark.parametrize("hierarchical", [False, True])
def test_a_session_prefix_survives_traffic_that_evicts_everything_else(tiny_model_dir, hierarchical):
    extra = dict(enable_hierarchical_cache=True, hicache_ratio=1.0) if hierarchical else {}
    engine = Engine(model_path=str(tiny_model_dir), max_total_tokens=700, chunked_prefill_size=128, **extra)
    try:
        history = "Agent memory. " + " ".join(f"step {i}: looked at file {i}." for i in range(25))
        sid = engine.open_session()
        engine.generate(history, PARAMS, session_id=sid)
        plain = "Plain user. " + " ".join(f"note {i}: nothing." for i in range(25))
        engine.generate(plain, PARAMS)  # the same size, no session: the first to go
        for k in range(12):  # other traffic, several times what the pool (and the host tier) hold
            engine.generate(f"Other {k}. " + " ".join(f"item {k}-{i}." for i in range(40)), PARAMS)
            engine.check_integrity()
        resumed = engine.generate(history + " Next step?", PARAMS, session_id=sid)
        other = engine.generate(plain + " Next?", PARAMS)
        assert resumed["meta_info"]["cached_tokens"] >= len(engine.tokenizer.encode(history)) - 1
        assert other["meta_info"]["cached_tokens"] < 10
        stats = engine.stats()
        assert stats["sessions_open"] == 1 and stats["session_retained_tokens"] > 0
        assert engine.close_session(sid) is True
        assert engine.close_session(sid) is False  # closed already: says so
        assert engine.stats()["session_retained_tokens"] == 0
        engine.check_integrity()
    finally:
        engine.shutdown()


def test_a_session_idle_past_its_ttl_is_released(tiny_model_dir):
    engine = Engine(model_path=str(tiny_model_dir), max_total_tokens=2048)
    try:
        sid = engine.open_session(ttl_s=0.3)
        engine.generate("A short session turn.", PARAMS, session_id=sid)
        assert engine.stats()["sessions_open"] == 1
        time.sleep(0.5)
        engine.generate("Anything, so the scheduler runs a step.", PARAMS)
        stats = engine.stats()
        assert stats["sessions_open"] == 0 and stats["session_retained_tokens"] == 0
        # An id that is not open opens a session: a request is never refused for its session id.
        engine.generate("Again.", PARAMS, session_id=sid)
        assert engine.stats()["sessions_open"] == 1
        engine.check_integrity()
    finally:
        engine.shutdown()


def test_bad_hicache_options_are_refused_naming_the_flag(tiny_model_dir, tmp_path):
    cases = [(dict(hicache_write_policy="write_sometimes"), "hicache_write_policy"),
             (dict(hicache_storage_backend="s3"), "hicache_storage_backend"),
             (dict(hicache_storage_backend="file", hicache_storage_backend_extra_config="{dir"),
              "hicache_storage_backend_extra_config")]
    for options, flag in cases:
        with pytest.raises(ValueError, match=flag):
            Engine(model_path=str(tiny_model_dir), enable_hierarchical_cache=True, **options)
    with pytest.raises(ValueError, match="hicache_storage_backend: needs --enable-hierarchical-cache"):
        Engine(model_path=str(tiny_model_dir), hicache_storage_backend="file")


def test_a_program_state_holds_a_session_while_it_runs(tiny_engine):
    import radixflow as sgl

    seen = {}

    @sgl.function
    def program(s):
        s += "A program with a session. " * 8
        s += sgl.gen("first", max_tokens=4, temperature=0.0)
        assert s["first"] is not None  # waits for the gen
        seen["during"] = tiny_engine.stats()["sessions_open"]
        forks = s.fork(2)
        for i, f in enumerate(forks):
            f += f" Branch {i}:" + sgl.gen("branch", max_tokens=3, temperature=0.0)
        assert all(f["branch"] is not None for f in forks)
        seen["forked"] = tiny_engine.stats()["sessions_open"]
        forks.join()

    before = tiny_engine.stats()["sessions_open"]
    state = program.run(backend=tiny_engine)
    assert state["first"] is not None
    assert seen["during"] == before + 1  # this state's session retains its KV while it runs
    assert seen["forked"] == before + 3  # each fork is a state with its own session
    deadline = time.monotonic() + 10  # the states' workers close their sessions as they wind down, asynchronously
    while tiny_engine.stats()["sessions_open"] != before:
        assert time.monotonic() < deadline, "the program's sessions were not closed when it ended"
        time.sleep(0.02)
    tiny_engine.check_integrity()
