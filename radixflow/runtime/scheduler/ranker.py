"""Output-length ranking for shortest-job-first scheduling (`--schedule-policy ltr`), after "Efficient LLM
Scheduling by Learning to Rank" (Fu et al., 2024).

A request's output length cannot be predicted exactly, but which of two requests will answer longer mostly can.
`LengthRanker` scores a prompt so that a higher score means a longer expected answer; the scheduler admits the
lowest scores first. It reads only the prompt, through the served model's own input embeddings (no extra forward,
no second model): the features are the mean embedding of the whole prompt, the mean of its last `TAIL` tokens
(where a chat prompt's request sits, before the template's assistant header) and the log of its length; a small
MLP maps them to the score. Its cost is one embedding gather and a 1,153 x 64 matmul for SmolLM2, far under 1% of
the prompt's prefill (bench/RESULTS.md).

Trained with ListMLE, the listwise loss the paper uses (`radixflow.tools.train_ranker`). A weights file carries the
identity of the embedding it was trained on; loading it for another model is a `RankerLoadError`, and the engine
then falls back to fcfs with a warning.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

TAIL = 32  # prompt tokens at the end whose mean is a feature of its own
HIDDEN = 64
EMBEDDED_RANKER = Path(__file__).parent / "rankers" / "smollm2-135m-instruct.safetensors"


class RankerLoadError(ValueError):
    pass


def embedding_identity(embedding: torch.Tensor) -> str:
    """A fingerprint of an embedding matrix: its shape and a hash of a few of its rows."""
    rows = embedding[:: max(1, embedding.shape[0] // 64)][:64].float().contiguous()
    digest = hashlib.sha256(rows.numpy().round(4).tobytes()).hexdigest()[:16]
    return f"{tuple(embedding.shape)}:{digest}"


def prompt_features(embedding: torch.Tensor, ids) -> torch.Tensor:
    """[2 * hidden + 1] features of one prompt (token ids) over `embedding` ([vocab, hidden])."""
    ids = torch.as_tensor(list(ids), dtype=torch.long)
    vectors = embedding.index_select(0, ids).float()
    return torch.cat([vectors.mean(0), vectors[-TAIL:].mean(0), torch.tensor([math.log1p(len(ids))])])


class LengthRanker(nn.Module):
    def __init__(self, num_features: int, identity: str = ""):
        super().__init__()
        self.identity = identity
        self.net = nn.Sequential(nn.Linear(num_features, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, 1))
        # Features are standardised with the training set's statistics (kept with the weights).
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.mean) / self.std).squeeze(-1)

    @torch.inference_mode()
    def score(self, embedding: torch.Tensor, ids) -> float:
        return float(self(prompt_features(embedding, ids)[None])[0])

    def save(self, path: Path, metadata: dict[str, str] | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"identity": self.identity, **(metadata or {})})


def load_ranker(path: Path, embedding: torch.Tensor) -> LengthRanker:
    """The ranker at `path`, checked against the served model's embedding."""
    path = Path(path)
    if not path.is_file():
        raise RankerLoadError(f"ltr_ranker_path: no ranker weights at {str(path)!r} (train one with "
                              "`python -m radixflow.tools.train_ranker --model-path MODEL --out FILE`)")
    try:
        with safe_open(str(path), "pt") as f:
            identity = (f.metadata() or {}).get("identity", "")
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises assorted errors on a damaged file
        raise RankerLoadError(f"ltr_ranker_path: {str(path)!r} is not a readable ranker file ({exc})") from exc
    served = embedding_identity(embedding)
    if identity != served:
        raise RankerLoadError(f"ltr_ranker_path: {str(path)!r} was trained on another model's embeddings "
                              f"({identity or 'unknown'}; this model: {served})")
    ranker = LengthRanker(state["mean"].shape[0], identity)
    ranker.load_state_dict(state)
    return ranker.eval()


def list_mle_loss(scores: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """ListMLE: the negative log-likelihood of the true order (longest first) under the Plackett-Luce model of
    the scores. `scores`, `lengths`: [lists, items]. Ties in `lengths` are ordered at random by the caller's
    shuffle."""
    order = lengths.argsort(dim=-1, descending=True, stable=True)
    ordered = scores.gather(-1, order)
    # log sum_{j >= i} exp(s_j), from the end of the list backwards.
    tail_logsumexp = ordered.flip(-1).logcumsumexp(-1).flip(-1)
    return (tail_logsumexp - ordered).sum(-1).mean()


def train_ranker(features: torch.Tensor, lengths: torch.Tensor, identity: str, seed: int = 0,
                 steps: int = 600, list_size: int = 32, lr: float = 3e-3) -> LengthRanker:
    """A ranker fitted to (features, true output lengths) with ListMLE over random lists; deterministic for a
    seed."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ranker = LengthRanker(features.shape[1], identity)
    ranker.mean.copy_(features.mean(0))
    ranker.std.copy_(features.std(0).clamp(min=1e-6))
    optimizer = torch.optim.AdamW(ranker.parameters(), lr=lr, weight_decay=1e-2)
    list_size = min(list_size, len(features))
    for _ in range(steps):
        picks = torch.stack([torch.randperm(len(features), generator=gen)[:list_size] for _ in range(16)])
        loss = list_mle_loss(ranker(features[picks]), lengths[picks].float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return ranker.eval()


def kendall_tau(a, b) -> float:
    """Kendall's tau-b between two sequences (ties counted as neither concordant nor discordant)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    da, db = (a[:, None] - a[None, :]).sign(), (b[:, None] - b[None, :]).sign()
    upper = torch.triu(torch.ones_like(da, dtype=torch.bool), diagonal=1)
    concordance = (da * db)[upper].sum()
    pairs_a, pairs_b = (da[upper] != 0).sum(), (db[upper] != 0).sum()
    return float(concordance / (pairs_a * pairs_b).sqrt()) if pairs_a and pairs_b else 0.0
