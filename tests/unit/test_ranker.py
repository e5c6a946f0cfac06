"""The output-length ranker (runtime/scheduler/ranker.py) without the served model: ListMLE, training, Kendall's
tau, and the checks on a weights file."""

from __future__ import annotations

import itertools

import pytest
import torch

from radixflow.runtime.scheduler.ranker import (
    LengthRanker,
    RankerLoadError,
    embedding_identity,
    kendall_tau,
    list_mle_loss,
    load_ranker,
    prompt_features,
    train_ranker,
)


def brute_tau(a, b) -> float:
    pairs = list(itertools.combinations(range(len(a)), 2))
    sign = lambda x: (x > 0) - (x < 0)  # noqa: E731
    concordant = sum(sign(a[i] - a[j]) * sign(b[i] - b[j]) for i, j in pairs)
    ties_free_a = sum(a[i] != a[j] for i, j in pairs)
    ties_free_b = sum(b[i] != b[j] for i, j in pairs)
    return concordant / (ties_free_a * ties_free_b) ** 0.5


def test_kendall_tau_matches_its_definition_with_ties():
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        a = torch.randint(0, 5, (30,), generator=gen).tolist()
        b = torch.randint(0, 5, (30,), generator=gen).tolist()
        assert kendall_tau(a, b) == pytest.approx(brute_tau(a, b))
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_list_mle_prefers_scores_in_the_true_order():
    lengths = torch.tensor([[5.0, 1.0, 3.0]])
    right = list_mle_loss(torch.tensor([[2.0, 0.0, 1.0]]), lengths)
    wrong = list_mle_loss(torch.tensor([[0.0, 2.0, 1.0]]), lengths)
    assert right < wrong


def synthetic(n: int, seed: int):
    """Features whose third column, with noise, decides the length."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(n, 8, generator=gen)
    lengths = (50 + 20 * features[:, 2] + 5 * torch.randn(n, generator=gen)).clamp(min=1).round()
    return features, lengths


def test_training_is_deterministic_for_a_seed_and_ranks_unseen_data():
    features, lengths = synthetic(400, seed=1)
    a = train_ranker(features, lengths, "id", seed=3, steps=150)
    b = train_ranker(features, lengths, "id", seed=3, steps=150)
    c = train_ranker(features, lengths, "id", seed=4, steps=150)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key])
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())
    test_features, test_lengths = synthetic(200, seed=2)
    with torch.inference_mode():
        assert kendall_tau(a(test_features), test_lengths) > 0.6


def test_features_see_the_prompt_its_end_and_its_length():
    embedding = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    f = prompt_features(embedding, [1, 2, 3])
    assert f.shape == (9,)
    assert torch.equal(f[:4], embedding[[1, 2, 3]].mean(0))
    assert f[-1] == pytest.approx(torch.log1p(torch.tensor(3.0)))


def test_a_weights_file_must_exist_be_readable_and_match_the_model(tmp_path):
    embedding = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RankerLoadError, match="ltr_ranker_path: no ranker weights"):
        load_ranker(tmp_path / "missing.safetensors", embedding)
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(RankerLoadError, match="not a readable ranker file"):
        load_ranker(tmp_path / "junk.safetensors", embedding)
    ranker = LengthRanker(9, embedding_identity(embedding))
    ranker.save(tmp_path / "r.safetensors")
    loaded = load_ranker(tmp_path / "r.safetensors", embedding)
    ids = [1, 5, 7]
    assert loaded.score(embedding, ids) == pytest.approx(ranker.score(embedding, ids))
    other = torch.randn(50, 4, generator=torch.Generator().manual_seed(1))
    with pytest.raises(RankerLoadError, match="trained on another model's embeddings"):
        load_ranker(tmp_path / "r.safetensors", other)
