"""The sampler, on hand-made logits (no model)."""

from __future__ import annotations

import pytest
import torch

from radixflow.runtime.model.sampler import SamplingRow, apply_penalties, sample
from radixflow.runtime.sampling_params import SamplingParams


def row(step: int = 0, prior=(), output=(), banned=frozenset(), **params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), list(prior), list(output), banned, step)


def draw_counts(logits: torch.Tensor, n: int, **params) -> torch.Tensor:
    """Histogram of n draws from one row of logits."""
    batch = logits.repeat(n, 1)
    tokens = sample(batch, [row(**params) for _ in range(n)], torch.Generator().manual_seed(0)).token_ids
    return torch.bincount(torch.tensor(tokens), minlength=logits.shape[1])


LOGITS = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0]])


def test_greedy_and_top_k_1_pick_the_argmax():
    assert sample(LOGITS, [row(temperature=0.0)]).token_ids == [0]
    counts = draw_counts(LOGITS, 200, temperature=1.0, top_k=1)
    assert counts[0] == 200


def test_top_k_limits_support():
    counts = draw_counts(LOGITS, 2000, temperature=1.0, top_k=2)
    assert counts[2:].sum() == 0 and counts[0] > 0 and counts[1] > 0


def test_top_p_keeps_smallest_set_over_p():
    probs = torch.softmax(LOGITS[0], -1)  # [0.43, 0.26, 0.16, 0.10, 0.06, 0.02]
    assert probs[0] < 0.5 < probs[0] + probs[1]
    counts = draw_counts(LOGITS, 2000, temperature=1.0, top_p=0.5)
    assert counts[2:].sum() == 0 and counts[1] > 0


def test_min_p_drops_tokens_below_fraction_of_max():
    counts = draw_counts(LOGITS, 2000, temperature=1.0, min_p=0.5)  # keeps p >= 0.5 * p_max: tokens 0, 1
    assert counts[2:].sum() == 0 and counts[1] > 0


def test_temperature_sharpens_and_flattens():
    cold = draw_counts(LOGITS, 3000, temperature=0.3)
    hot = draw_counts(LOGITS, 3000, temperature=3.0)
    assert cold[0] > hot[0]
    assert hot[5] > cold[5]


def test_frequency_and_presence_penalties_subtract_exact_amounts():
    logits = torch.zeros(1, 6)
    apply_penalties(logits, [row(output=[3, 3, 1], frequency_penalty=0.5, presence_penalty=0.25)])
    assert logits[0, 3].item() == pytest.approx(-(2 * 0.5 + 0.25))
    assert logits[0, 1].item() == pytest.approx(-(0.5 + 0.25))
    assert logits[0, 0].item() == 0.0


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 2.0]])
    apply_penalties(logits, [row(prior=[0, 1], repetition_penalty=2.0)])
    assert logits.tolist() == [[1.0, -4.0, 2.0]]


def test_penalty_changes_greedy_choice():
    logits = torch.tensor([[1.0, 0.9]])
    assert sample(logits, [row(temperature=0.0)]).token_ids == [0]
    assert sample(logits, [row(temperature=0.0, output=[0], frequency_penalty=0.5)]).token_ids == [1]


def test_banned_ids_are_never_drawn():
    counts = draw_counts(LOGITS, 500, temperature=1.0)
    assert counts[0] > 0
    tokens = sample(LOGITS.repeat(200, 1), [row(banned=frozenset({0})) for _ in range(200)]).token_ids
    assert 0 not in tokens


def test_seed_reproduces_regardless_of_batch():
    logits = torch.randn(1, 50)
    alone = [sample(logits, [row(step=s, seed=7)]).token_ids[0] for s in range(20)]
    mixed = [sample(torch.cat([torch.randn(3, 50), logits]), [row(), row(), row(), row(step=s, seed=7)],
                    torch.Generator().manual_seed(s)).token_ids[3] for s in range(20)]
    assert alone == mixed
    other = [sample(logits, [row(step=s, seed=8)]).token_ids[0] for s in range(20)]
    assert other != alone


def test_logprobs_are_the_models_own():
    result = sample(LOGITS, [row(temperature=0.5, top_k=2)])
    assert torch.allclose(result.logprobs, torch.log_softmax(LOGITS, -1))


@pytest.mark.parametrize("masked", [False, True])
def test_callers_logits_are_left_unmodified(masked):
    """The sampler works on a copy: with a grammar mask, penalties and banned ids all applied to it."""
    logits = torch.randn(2, 40)
    before = logits.clone()
    bitmask = torch.tensor([[0b1010, 0], [-1, 0]], dtype=torch.int32) if masked else None
    rows = [row(output=[1, 3], prior=[5], banned=frozenset({1}), temperature=0.7, frequency_penalty=0.5,
                repetition_penalty=1.3, seed=1), row(temperature=0.0, presence_penalty=1.0, output=[2])]
    tokens = sample(logits, rows, bitmask=bitmask).token_ids
    assert torch.equal(logits, before)
    if masked:
        assert tokens[0] == 3  # bits 1 and 3 allowed; 1 is banned
        assert tokens[1] < 32


@pytest.mark.parametrize("extreme", [{"temperature": 1e-300}, {"temperature": 1e-40, "frequency_penalty": -2.0},
                                     {"temperature": 1.0, "repetition_penalty": 1e-300},
                                     {"temperature": 1.0, "top_p": 1e-300}, {"temperature": 1.0, "min_p": 1.0}])
def test_extreme_parameters_sample_the_most_likely_token_instead_of_failing(extreme):
    """Found by the API fuzzer: such values overflowed the softmax into NaN (or dropped every token) and the
    draw raised, failing the whole batch."""
    params = SamplingParams(**extreme)
    params.validate()
    logits = torch.randn(3, 40) * 5
    rows = [SamplingRow(params, list(range(0, 40, 3)), list(range(0, 40, 5)), frozenset(), 0) for _ in range(3)]
    penalized = logits.clone()
    apply_penalties(penalized, rows)
    assert sample(logits, rows).token_ids == penalized.argmax(dim=-1).tolist()
