"""Tensor parallelism (`--tp-size N`): one model split over N processes of one torch.distributed group (gloo on
the CPU, NCCL on a GPU), in the Megatron layout.

* attention: each rank holds `heads / N` query heads and `kv_heads / N` KV heads (q/k/v column-split, o_proj
  row-split), and its KV pool holds only its KV heads;
* MLP: gate/up column-split, down row-split;
* one all-reduce after o_proj and one after down_proj per layer; the embedding and lm_head split by vocabulary
  (each rank looks up / scores its own rows; a masked lookup plus an all-reduce, an all-gather of the logits).

Rank 0 is the scheduler process: it schedules, samples and owns the radix cache and the KV pool's allocator. For
each forward it broadcasts the batch's model inputs (token ids, positions, KV slots, attention plan), so every
rank runs the same forward on its shard and writes its heads' K/V at the same pool slots. The other ranks are
followers (runtime/tp_follower.py, in processes rank 0 starts) that loop on that broadcast. A rank
that dies breaks the group's next collective: rank 0 then raises `TensorParallelError`, which ends the scheduler
process, and the server answers 503 (and restarts it, with new followers) as for any scheduler death.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import socket
import subprocess
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# A follower waits in a broadcast for as long as the server is idle: no collective may time out.
_NO_TIMEOUT = timedelta(days=3650)
_RENDEZVOUS_TIMEOUT = timedelta(seconds=300)  # all ranks must have joined by then (model loads come after)


class TensorParallelError(RuntimeError):
    """A collective of the tensor-parallel group failed (a rank died): fatal for the scheduler process."""


@dataclasses.dataclass
class TensorParallel:
    rank: int
    size: int

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def vocab_range(self, vocab_size: int) -> tuple[int, int]:
        """This rank's rows of the embedding and lm_head (the last rank's shard is padded with zero rows)."""
        shard = -(-vocab_size // self.size)
        return self.rank * shard, (self.rank + 1) * shard


def check_divisible(args, size: int) -> None:
    for name in ("num_heads", "num_kv_heads", "intermediate_size"):
        value = getattr(args, name)
        if value % size:
            raise ValueError(f"tp_size: {size} does not divide the model's {name} ({value}); tensor parallelism "
                             "splits heads and MLP columns evenly")


def shard_weights(weights: dict[str, torch.Tensor], args, tp: TensorParallel) -> dict[str, torch.Tensor]:
    """This rank's part of Hugging Face-named weights ([out, in] matrices)."""
    hd, r, n = args.head_dim, tp.rank, tp.size
    q, kv, inter = args.num_heads * hd // n, args.num_kv_heads * hd // n, args.intermediate_size // n
    start, end = tp.vocab_range(args.vocab_size)
    out = {}
    for name, w in weights.items():
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            w = w[r * q:(r + 1) * q]
        elif name.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")):
            w = w[r * kv:(r + 1) * kv]
        elif name.endswith("o_proj.weight"):
            w = w[:, r * q:(r + 1) * q]
        elif name.endswith(("gate_proj.weight", "up_proj.weight")):
            w = w[r * inter:(r + 1) * inter]
        elif name.endswith("down_proj.weight"):
            w = w[:, r * inter:(r + 1) * inter]
        elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
            w = w[start:end]
            if w.shape[0] < end - start:
                w = torch.cat([w, w.new_zeros(end - start - w.shape[0], w.shape[1])])
        out[name] = w.contiguous()
    return out


_FOLLOWER = "from radixflow.runtime.tp_follower import follower_main; follower_main()"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_group(rank: int, size: int, port: int, device: torch.device) -> TensorParallel:
    store = dist.TCPStore("127.0.0.1", port, size, is_master=rank == 0, timeout=_RENDEZVOUS_TIMEOUT)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=_NO_TIMEOUT)
    return TensorParallel(rank, size)


def start_leader(config) -> tuple[TensorParallel, list[subprocess.Popen]]:
    """Rank 0: start the followers (each gets the engine config on stdin) and join the group with them."""
    size = config.model.tp_size
    port = _free_port()
    followers = []
    for rank in range(1, size):
        proc = subprocess.Popen([sys.executable, "-c", _FOLLOWER], stdin=subprocess.PIPE)
        proc.stdin.write(pickle.dumps((config, rank, port)))
        proc.stdin.close()
        followers.append(proc)
    try:
        tp = init_group(0, size, port, torch.device(config.model.device))
    except Exception:
        for proc in followers:
            proc.kill()
        raise
    return tp, followers


class LeaderForward:
    """Rank 0's forward: send the batch's model inputs to the followers, then run its own shard."""

    def __init__(self, model, tp: TensorParallel):
        self.model, self.tp = model, tp

    def __call__(self, input_ids, positions, attn):
        payload = (input_ids, positions, attn.out_cache_loc, attn.groups, attn.logits_rows)
        try:
            dist.broadcast_object_list([payload], src=0)
            return self.model(input_ids, positions, attn)
        except Exception as exc:  # noqa: BLE001 - after a failure mid-forward the ranks' collectives no longer pair
            raise TensorParallelError(f"tensor-parallel forward failed (a rank died?): {exc}") from exc

    def shutdown(self) -> None:
        try:
            dist.broadcast_object_list([None], src=0)
        except RuntimeError:
            pass  # a follower is already gone; the rest see the group break and exit
        dist.destroy_process_group()


def to_device(obj, device: torch.device):
    """The broadcast inputs on this rank's device (they arrive on rank 0's)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, list | tuple):
        return type(obj)(to_device(x, device) for x in obj)
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: to_device(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj)})
    return obj

