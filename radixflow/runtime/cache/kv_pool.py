"""KV memory: the request-to-token table and the token-level K/V pool.

`ReqToTokenPool.table[slot, position]` holds the pool index of that token's K/V; `KVPool` holds per-layer K and
V buffers indexed by pool index. Any free index serves any token, so allocation is a slice of the free list
and there is no fragmentation; the radix cache shares indices between requests through the table.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class OutOfSlotsError(RuntimeError):
    pass


class ReqToTokenPool:
    """Request slots: one row of the table per running request."""

    def __init__(self, num_slots: int, max_context: int, device: torch.device):
        self.num_slots = num_slots
        self.table = torch.zeros(num_slots, max_context, dtype=torch.int64, device=device)
        self._free = list(range(num_slots - 1, -1, -1))

    def alloc(self) -> int:
        if not self._free:
            raise OutOfSlotsError("no free request slot")
        return self._free.pop()

    def free(self, slot: int) -> None:
        self._free.append(slot)

    def write(self, slot: int, start: int, kv_indices: Sequence[int] | torch.Tensor) -> None:
        """Point positions [start, start + len(kv_indices)) of `slot` at those pool indices."""
        if len(kv_indices):
            values = torch.as_tensor(kv_indices, dtype=torch.int64)
            self.table[slot, start:start + len(values)] = values.to(self.table.device)

    def free_count(self) -> int:
        return len(self._free)


class KVPool:
    """K and V buffers of `size` tokens for every layer, plus the free list of pool indices."""

    def __init__(self, size: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, pin_memory: bool = False):
        self.size = size
        # One buffer [K/V, layer, token, kv_heads, head_dim]: a layer's K (or V) is a contiguous view of it, and
        # moving tokens between pools (host tier, storage, disaggregation) is one index_select / index_copy_ over
        # every layer at once, not one small copy per layer. pin_memory: a host tier in front of a GPU pool
        # (page-locked, so copies to and from the GPU can overlap).
        self.buffer = torch.zeros((2, num_layers, size, num_kv_heads, head_dim), dtype=dtype, device=device,
                                  pin_memory=pin_memory)
        self.k = list(self.buffer[0])
        self.v = list(self.buffer[1])
        self._free = torch.arange(size, dtype=torch.int64)
        self._pending_free: list[torch.Tensor] = []
        self._pending_count = 0  # tokens in _pending_free (the list can grow long between merges)

    def free_count(self) -> int:
        return len(self._free) + self._pending_count

    def alloc(self, n: int) -> torch.Tensor | None:
        """`n` free indices, or None if fewer are free (the caller evicts or retracts, then retries)."""
        if n > len(self._free) and self._pending_free:
            self._free = torch.cat([self._free, *self._pending_free])
            self._pending_free.clear()
            self._pending_count = 0
        if n > len(self._free):
            return None
        out, self._free = self._free[:n], self._free[n:]
        return out

    def free(self, indices: Sequence[int] | torch.Tensor) -> None:
        # Frees are batched and merged lazily: concatenating the whole free list on every finished request would
        # make freeing O(pool size) instead of O(tokens).
        if isinstance(indices, torch.Tensor):
            tensor = indices.detach().to("cpu", torch.int64, copy=True).reshape(-1)  # may be a view of the table
        else:
            tensor = torch.tensor(list(indices), dtype=torch.int64)
        if len(tensor):
            self._pending_free.append(tensor)
            self._pending_count += len(tensor)

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        """The K and V of pool `indices` as one contiguous tensor [2, layers, n, kv_heads, head_dim], on this pool's
        device."""
        idx = torch.as_tensor(indices, dtype=torch.int64).to(self.buffer.device)
        return self.buffer.index_select(2, idx)

    def scatter(self, indices: torch.Tensor, data: torch.Tensor) -> None:
        """Write `data` (as `gather` makes it, from any device) into pool `indices`."""
        idx = torch.as_tensor(indices, dtype=torch.int64).to(self.buffer.device)
        self.buffer.index_copy_(2, idx, data.to(self.buffer.device, self.buffer.dtype))

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()
