"""Engine features end to end on the tiny random model: stops, lengths, seeds, streaming, logprobs, n, abort."""

from __future__ import annotations

import pytest

from radixflow.errors import InvalidRequestError
from tests.helpers.models import GREEDY

PROMPT = "Once upon a time in a land far away"


def greedy(engine, n=32, **extra):
    return engine.generate(PROMPT, {"max_new_tokens": n, "ignore_eos": True, **GREEDY, **extra})


def test_length_finish_and_counts(tiny_engine):
    out = greedy(tiny_engine, 10)
    meta = out["meta_info"]
    assert len(out["output_ids"]) == 10 == meta["completion_tokens"]
    assert meta["finish_reason"] == {"type": "length", "matched": None}
    assert meta["prompt_tokens"] == len(tiny_engine.tokenizer.encode(PROMPT))


def test_stop_string_across_token_boundary_is_trimmed(tiny_engine):
    base = greedy(tiny_engine, 32)
    ids = base["output_ids"]
    pieces = [tiny_engine.tokenizer.decode(ids[:i]) for i in range(len(ids) + 1)]
    # A stop string that starts inside token k and ends inside token k+1.
    k = next(i for i in range(5, len(ids) - 1) if len(pieces[i + 1]) - len(pieces[i]) >= 2
             and len(pieces[i + 2]) - len(pieces[i + 1]) >= 2)
    stop = pieces[k + 2][len(pieces[k + 1]) - 1: len(pieces[k + 1]) + 1]
    assert pieces[k + 2].find(stop) == len(pieces[k + 1]) - 1 or stop in pieces[k + 2]
    out = greedy(tiny_engine, 32, stop=[stop])
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["text"] == base["text"][: base["text"].find(stop)]
    assert stop not in out["text"]


def test_stop_token_id_and_min_new_tokens(tiny_engine):
    ids = greedy(tiny_engine, 16)["output_ids"]
    target = ids[5]
    first = ids.index(target)
    out = greedy(tiny_engine, 16, stop_token_ids=[target])
    assert out["output_ids"] == ids[: first + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": target}
    # min_new_tokens masks the stop token until reached, so the output differs from plain greedy there.
    out = greedy(tiny_engine, 16, stop_token_ids=[target], min_new_tokens=first + 2)
    assert len(out["output_ids"]) >= first + 2
    assert target not in out["output_ids"][: first + 2]


def test_seed_reproduces_across_batches(tiny_engine):
    params = {"max_new_tokens": 16, "temperature": 1.0, "seed": 1234, "ignore_eos": True}
    alone = tiny_engine.generate(PROMPT, params)["output_ids"]
    batch = tiny_engine.generate(["other prompt here", PROMPT, "and a third one"],
                                 [{"max_new_tokens": 16, "temperature": 1.0}, params, {"max_new_tokens": 8}])
    assert batch[1]["output_ids"] == alone
    different = tiny_engine.generate(PROMPT, {**params, "seed": 99})["output_ids"]
    assert different != alone


def test_top_k_one_equals_greedy(tiny_engine):
    assert greedy(tiny_engine, 16)["output_ids"] == \
        tiny_engine.generate(PROMPT, {"max_new_tokens": 16, "top_k": 1, "temperature": 1.0,
                                      "ignore_eos": True})["output_ids"]


def test_streaming_increments_add_up(tiny_engine):
    full = greedy(tiny_engine, 24)
    chunks = list(tiny_engine.generate(PROMPT, {"max_new_tokens": 24, "ignore_eos": True, **GREEDY}, stream=True))
    assert len(chunks) >= 2
    assert "".join(c["text"] for c in chunks) == full["text"]
    assert sum((c["output_ids"] for c in chunks), []) == full["output_ids"]
    assert chunks[-1]["finished"] and not any(c["finished"] for c in chunks[:-1])


def test_abandoned_stream_releases_kv(tiny_engine):
    stream = tiny_engine.generate(PROMPT, {"max_new_tokens": 200, "ignore_eos": True}, stream=True)
    next(stream)
    stream.close()
    import time

    deadline = time.monotonic() + 10
    while tiny_engine.stats()["num_running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert tiny_engine.stats()["num_running"] == 0
    tiny_engine.check_integrity()


def test_output_and_prompt_logprobs(tiny_engine):
    out = tiny_engine.generate(PROMPT, {"max_new_tokens": 6, "ignore_eos": True, **GREEDY}, return_logprob=True,
                               logprob_start_len=3, top_logprobs_num=3)
    meta = out["meta_info"]
    prompt_len = meta["prompt_tokens"]
    assert len(meta["input_token_logprobs"]) == prompt_len - 3
    assert len(meta["output_token_logprobs"]) == 6
    for (lp, tok, _), top in zip(meta["output_token_logprobs"], meta["output_top_logprobs"]):
        assert len(top) == 3
        assert top[0][1] == tok  # greedy: the sampled token is the most likely one
        assert lp == pytest.approx(top[0][0])
        assert top[0][0] >= top[1][0] >= top[2][0]
    # The same prompt logprobs come back when the prefix is cached (the cache must not hide positions).
    again = tiny_engine.generate(PROMPT, {"max_new_tokens": 1, **GREEDY}, return_logprob=True, logprob_start_len=3)
    assert [x[0] for x in again["meta_info"]["input_token_logprobs"]] == \
        pytest.approx([x[0] for x in meta["input_token_logprobs"]], abs=1e-4)


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_logprobs_of_a_chunked_prefill_all_come_back(tiny_model_dir, tiny_engine, stream):
    """A 70-token prompt in chunks of 16 is scored over five steps; every position comes back, equal to the
    unchunked scores (the chunks before the last used to be kept but never sent)."""
    from radixflow import Engine

    ids = list(range(1000, 1070))
    params = {"max_new_tokens": 2, "ignore_eos": True, **GREEDY}
    whole = tiny_engine.generate(input_ids=ids, sampling_params=params, return_logprob=True, logprob_start_len=5)
    with Engine(model_path=str(tiny_model_dir), max_total_tokens=4096, chunked_prefill_size=16) as engine:
        if stream:
            chunks = list(engine.generate(input_ids=ids, sampling_params=params, return_logprob=True,
                                          logprob_start_len=5, stream=True))
            # meta_info is cumulative (as SGLang streams it): complete from the first token on.
            scored = chunks[0]["meta_info"]["input_token_logprobs"]
            assert chunks[-1]["meta_info"]["input_token_logprobs"] == scored
        else:
            scored = engine.generate(input_ids=ids, sampling_params=params, return_logprob=True,
                                     logprob_start_len=5)["meta_info"]["input_token_logprobs"]
    expected = whole["meta_info"]["input_token_logprobs"]
    assert len(expected) == len(ids) - 5 and [t for _, t, _ in scored] == [t for _, t, _ in expected]
    assert [lp for lp, _, _ in scored] == pytest.approx([lp for lp, _, _ in expected], abs=1e-4)


def test_n_returns_independent_samples(tiny_engine):
    outs = tiny_engine.generate(PROMPT, {"max_new_tokens": 12, "temperature": 1.0, "n": 3, "ignore_eos": True})
    assert isinstance(outs, list) and len(outs) == 3
    assert len({tuple(o["output_ids"]) for o in outs}) > 1


def test_batch_with_n_has_the_http_shape(tiny_engine):
    """Flat and prompt-major, with `{rid}_{j}` per sample: what `POST /generate` returns (test_native_api.py)."""
    params = {"max_new_tokens": 4, "n": 2, "ignore_eos": True, **GREEDY}
    outs = tiny_engine.generate(["Alpha", "Beta gamma"], params, rid=["p", "q"])
    assert [o["meta_info"]["id"] for o in outs] == ["p_0", "p_1", "q_0", "q_1"]
    alone = tiny_engine.generate("Beta gamma", {**params, "n": 1})
    assert outs[2]["output_ids"] == outs[3]["output_ids"] == alone["output_ids"]
    with pytest.raises(InvalidRequestError) as info:
        tiny_engine.generate(["a", "b", "c"], params, rid=["p", "q"])
    assert info.value.field == "rid"


def test_no_kv_leak_after_everything(tiny_engine):
    tiny_engine.check_integrity()
    assert tiny_engine.flush_cache()
    stats = tiny_engine.stats()
    assert stats["kv_free_tokens"] == stats["kv_total_tokens"]


def test_stop_regex_ends_the_request_at_the_first_match_and_keeps_it(tiny_engine):
    base = greedy(tiny_engine, 32)
    text = base["text"]
    target = next(ch for ch in text[8:] if ch.isalpha())  # a character the greedy text reaches after a while
    out = greedy(tiny_engine, 32, stop_regex=[f"{target}+"])
    reason = out["meta_info"]["finish_reason"]
    assert reason["type"] == "stop" and reason["matched"].startswith(target)
    cut = text.index(target)
    assert out["text"].startswith(text[:cut + 1]) and len(out["output_ids"]) < len(base["output_ids"])
    with pytest.raises(InvalidRequestError, match="stop_regex"):
        greedy(tiny_engine, 4, stop_regex="(unclosed")


def test_return_text_in_logprobs_fills_the_token_texts(tiny_engine):
    out = tiny_engine.generate(PROMPT, {"max_new_tokens": 3, **GREEDY}, return_logprob=True, top_logprobs_num=2,
                               return_text_in_logprobs=True)
    entries = out["meta_info"]["output_token_logprobs"]
    assert [text for _, _, text in entries] == [tiny_engine.tokenizer.decode([t]) for _, t, _ in entries]
    assert all(text is not None for row in out["meta_info"]["output_top_logprobs"] for _, _, text in row)
    plain = tiny_engine.generate(PROMPT, {"max_new_tokens": 3, **GREEDY}, return_logprob=True)
    assert all(text is None for _, _, text in plain["meta_info"]["output_token_logprobs"])
