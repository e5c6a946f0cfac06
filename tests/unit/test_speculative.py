"""Draft-free speculative decoding without a model: drafting (prompt lookup, radix-tree continuation), verification
(greedy and the exactness of speculative sampling), adaptivity, and the scheduler's KV accounting around drafts."""

from __future__ import annotations

import pytest
import torch

from radixflow.runtime.cache.radix_cache import RadixCache
from radixflow.runtime.config import SchedulerConfig
from radixflow.runtime.scheduler.speculative import Drafter, prompt_lookup, verify
from tests.unit.fake_runtime import Rig, expected_tokens, make_req

SPEC = dict(speculative_algorithm="ngram", speculative_num_draft_tokens=4)


# -- drafting ------------------------------------------------------------------------------------------------------
def test_prompt_lookup_continues_the_most_recent_occurrence_of_the_longest_suffix():
    tokens = [1, 2, 3, 10, 11, 9, 2, 3, 20, 21, 7, 1, 2, 3]
    # Suffix [1, 2, 3] occurred at 0 (followed by 10, 11); [2, 3] also at 6 (followed by 20), but longer wins.
    assert prompt_lookup(tokens, 2, 1, 8) == [10, 11]
    assert prompt_lookup(tokens, 6, 1, 2) == [20, 21, 7, 1, 2, 3]  # window 2: the most recent [2, 3]
    assert prompt_lookup(tokens, 8, 1, 2) == [20, 21, 7, 1, 2, 3, 20, 21]  # copying on through its own output
    assert prompt_lookup([5, 6, 7, 8], 3, 1, 8) == []  # 8 never occurred before
    assert prompt_lookup([4, 9, 4], 3, 2, 8) == []  # only a 1-token match, below the minimum window
    assert prompt_lookup([4, 9, 4], 3, 1, 8) == [9, 4, 9]
    assert prompt_lookup([7, 7, 7, 7], 3, 1, 8) == [7, 7, 7]  # a repeating run drafts its continuation in full


def test_radix_continuation_follows_the_path_and_then_the_most_recent_branch():
    cache = RadixCache(free_kv=lambda kv: None)
    cache.insert([1, 2, 3, 4, 5, 6], list(range(6)))
    cache.insert([1, 2, 3, 9, 9], list(range(10, 15)))  # more recent branch after [1, 2, 3]
    root = cache.root
    edges = sum(1 for _ in cache._nodes())
    assert cache.continuation(root, [1, 2], 3) == [3, 9, 9]
    assert cache.continuation(root, [1, 2, 3, 4], 5) == [5, 6]
    assert cache.continuation(root, [1, 2, 7], 3) == []  # the tree does not hold this path
    assert cache.continuation(root, [1, 2, 3, 4, 5, 6], 3) == []  # nothing after it
    assert sum(1 for _ in cache._nodes()) == edges  # read-only: no edge was split
    node = cache.match_prefix([1, 2, 3, 4]).last_node
    assert cache.continuation(node, [5], 2) == [6]  # from a request's locked node, through its own tokens


def test_drafter_backs_off_where_drafts_fail_and_skips_requests_it_cannot_serve_exactly():
    drafter = Drafter(SchedulerConfig(**SPEC), RadixCache(free_kv=lambda kv: None))
    prompt = [3, 4, 5, 6, 3, 4]
    req = make_req("a", prompt, max_new_tokens=16)
    req.tree_node = drafter.prefix_cache.root
    assert drafter.propose(req, 1) == (5, 6, 3, 4)
    drafter.record(req, 4, 0)
    drafter.record(req, 4, 0)  # two failures in a row: skip the next two steps
    assert [drafter.propose(req, 1) for _ in range(3)] == [(), (), (5, 6, 3, 4)]
    drafter.record(req, 4, 2)
    assert drafter.propose(req, 1) == (5, 6, 3, 4)  # success resets the backoff
    assert drafter.propose(req, 5) == ()  # more decodes than speculative_max_batch_size
    for params in ({"frequency_penalty": 0.5}, {"seed": 3}, {"min_new_tokens": 2}):
        other = make_req("b", prompt, max_new_tokens=16, **params)
        other.tree_node = drafter.prefix_cache.root
        assert drafter.propose(other, 1) == (), params
    short = make_req("c", prompt, max_new_tokens=3)
    short.tree_node = drafter.prefix_cache.root
    assert drafter.propose(short, 1) == (5, 6)  # never drafts past max_new_tokens (the own token is the last)
    assert drafter.stats.verify_steps == 3 and drafter.stats.accepted_tokens == 2


# -- verification --------------------------------------------------------------------------------------------------
def test_greedy_verification_accepts_the_drafts_the_argmax_agrees_with():
    def logits_for(targets):
        out = torch.zeros(len(targets), 10)
        out[torch.arange(len(targets)), torch.tensor(targets)] = 5.0
        return out

    assert verify(logits_for([4, 5, 6, 7]), (4, 5, 6), None, None) == [4, 5, 6, 7]  # all accepted, plus one
    assert verify(logits_for([4, 5, 1, 7]), (4, 5, 6), None, None) == [4, 5, 1]  # the model's token at the miss
    assert verify(logits_for([2, 5, 6, 7]), (4, 5, 6), None, None) == [2]


def test_speculative_sampling_keeps_each_tokens_distribution_exact():
    """Point-mass drafts, accepted with p(d) and otherwise replaced by a draw from p without d: the first token is
    distributed as p_0 whatever the draft, and the second, given the first draft was accepted, as p_1."""
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    gen = torch.Generator().manual_seed(0)
    n = 20000
    first = torch.zeros(4)
    second = torch.zeros(4)
    for _ in range(n):
        out = verify(torch.zeros(3, 4), (1, 3), p, gen)
        first[out[0]] += 1
        if out[0] == 1:
            second[out[1]] += 1
    for observed, expected in ((first / n, p[0]), (second / second.sum(), p[1])):
        assert torch.allclose(observed, expected, atol=0.02), (observed, expected)


# -- the scheduler around drafts -----------------------------------------------------------------------------------
def _copying_rig(**options) -> tuple[Rig, list[int]]:
    """A request whose fake model output copies a run of its prompt, so prompt lookup drafts it right."""
    prompt = list(range(100, 140))
    script = {"copy": prompt[10:30] + [7, 8, 9] + prompt[30:40]}
    return Rig(script=script, **SPEC, **options), prompt


@pytest.mark.parametrize("options", [{}, {"disable_radix_cache": True}])
def test_drafted_outputs_equal_plain_decoding_and_kv_stays_consistent(options):
    rig, prompt = _copying_rig(**options)
    rig.add("copy", prompt, max_new_tokens=30)
    rig.add("other", range(500, 520), max_new_tokens=12)  # unrelated text: no drafts, same outputs as without
    rig.run()  # every step checks KV integrity and the batch invariants
    assert rig.tokens["copy"] == rig.runner.script["copy"][:30]
    assert rig.tokens["other"] == expected_tokens("other", 12)
    stats = rig.scheduler.drafter.stats
    assert stats.accepted_tokens >= 15 and stats.verify_steps < 10
    plain = Rig(script=rig.runner.script)
    plain.add("copy", prompt, max_new_tokens=30)
    plain.add("other", range(500, 520), max_new_tokens=12)
    plain.run()
    assert plain.tokens == rig.tokens
    assert len(rig.steps) < len(plain.steps)
    assert rig.kv_free_when_idle() == rig.cache.kv.size


def test_a_draft_never_runs_past_max_new_tokens_or_a_stop_token():
    rig, prompt = _copying_rig()
    rig.add("copy", prompt, max_new_tokens=7)
    rig.run()
    assert rig.tokens["copy"] == prompt[10:17] and rig.finish["copy"].type == "length"
    rig, prompt = _copying_rig()
    rig.add("copy", prompt, max_new_tokens=30, stop_ids=[prompt[15]])  # a stop token inside an accepted draft
    rig.run()
    assert rig.tokens["copy"] == prompt[10:16] and rig.finish["copy"].matched == prompt[15]
    assert rig.kv_free_when_idle() == rig.cache.kv.size


def test_the_radix_tree_drafts_what_an_earlier_request_generated():
    rig = Rig(**SPEC)
    prompt = list(range(300, 330))  # nothing in it repeats: prompt lookup finds no draft
    rig.add("first", prompt, max_new_tokens=24)
    rig.run()
    first_steps = len(rig.steps)
    drafter = rig.scheduler.drafter
    assert drafter.stats.accepted_tokens == 0
    rig.runner.script["again"] = rig.tokens["first"]  # the same prompt asked again, answered the same way
    rig.add("again", prompt, max_new_tokens=24)
    rig.run()
    assert rig.tokens["again"] == rig.tokens["first"]
    assert drafter.stats.accepted_tokens >= 18
    assert len(rig.steps) - first_steps < first_steps // 2


def test_bad_speculative_settings_are_refused():
    with pytest.raises(ValueError, match="speculative_algorithm"):
        Rig(speculative_algorithm="eagle")
    with pytest.raises(ValueError, match="min_match_window"):
        Rig(speculative_algorithm="ngram", speculative_ngram_min_match_window_size=0)
    with pytest.raises(ValueError, match="speculative_num_draft_tokens must be >= 1, got 0"):
        Rig(speculative_algorithm="ngram", speculative_num_draft_tokens=0)


def test_drafts_stay_within_the_step_budget_and_free_memory():
    rig, prompt = _copying_rig(chunked_prefill_size=3)  # room for the decode and two drafts
    rig.add("copy", prompt, max_new_tokens=30)
    rig.run()  # the rig checks every step's tokens against the budget
    assert rig.tokens["copy"] == rig.runner.script["copy"][:30]
    assert max(c.num_new for step in rig.steps for c in step.chunks if c.samples_next) <= 3
