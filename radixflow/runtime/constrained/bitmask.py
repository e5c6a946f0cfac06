"""Token masks for a batch: llguidance fills one int32 bitmask row per constrained request; one vectorised
`masked_fill` applies all of them to the batch's logits."""

from __future__ import annotations

import os

import llguidance
import numpy as np
import torch

_executor: llguidance.LLExecutor | None = None


def _parallel() -> llguidance.LLExecutor:
    """llguidance's thread pool, one per process: the model is idle while masks are filled, so every core helps."""
    global _executor
    if _executor is None:
        _executor = llguidance.LLExecutor(num_threads=max(os.cpu_count() or 1, 1))
    return _executor


def fill_bitmask(matchers: list, vocab_size: int) -> torch.Tensor:
    """[len(matchers), ceil(vocab / 32)] int32; a None matcher leaves its row all-allowed."""
    words = (vocab_size + 31) // 32
    bitmask = torch.full((len(matchers), words), -1, dtype=torch.int32)
    rows = [(m, i) for i, m in enumerate(matchers) if m is not None]
    if len(rows) == 1:
        matcher, i = rows[0]
        row = bitmask[i]
        matcher.unsafe_compute_mask_ptr(row.data_ptr(), words * 4)
    elif rows:
        _parallel().unsafe_compute_mask_ptr(rows, bitmask.data_ptr(), words * 4, len(matchers))
    return bitmask


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, vocab] bool from the packed bitmask (bit j of word w allows token 32*w + j). numpy's unpackbits on
    the little-endian bytes: much faster than shifting and masking 32 bits per word in torch (bench/RESULTS.md)."""
    words = bitmask.contiguous().numpy().astype("<i4", copy=False).view(np.uint8)
    bits = np.unpackbits(words, axis=1, bitorder="little")[:, :vocab_size]
    return torch.from_numpy(bits).bool()


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: disallowed tokens get -inf. logits: [rows, vocab] on any device; bitmask on the CPU."""
    allowed = allowed_tokens(bitmask, logits.shape[1]).to(logits.device, non_blocking=True)
    logits.masked_fill_(~allowed, float("-inf"))
