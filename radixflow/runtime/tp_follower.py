"""A tensor-parallel follower rank (`--tp-size N`, ranks 1..N-1; runtime/model/parallel.py has the design).

Rank 0 starts it with the engine config on stdin. It loads its shard of the model and a KV pool for its heads,
then runs every forward rank 0 broadcasts, until rank 0 sends None or the group breaks.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import sys

import torch
import torch.distributed as dist

from radixflow.runtime.cache.kv_pool import KVPool
from radixflow.runtime.engine_core import dtype_of, kv_pool_size, load_model
from radixflow.runtime.model.attention import AttentionInputs
from radixflow.runtime.model.parallel import init_group, to_device

logger = logging.getLogger(__name__)


def follower_main() -> None:
    """A follower rank: load this rank's shard, then run every forward rank 0 broadcasts until it sends None."""
    config, rank, port = pickle.loads(sys.stdin.buffer.read())
    logging.basicConfig(level="WARNING", format=f"%(asctime)s %(levelname)s tp-rank-{rank}: %(message)s")
    device = torch.device(config.model.device)
    if device.type == "cuda":  # one GPU per rank
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, device=str(device)))
    tp = init_group(rank, config.model.tp_size, port, device)
    loaded = load_model(config, tp)
    args = loaded.model.args
    kv = KVPool(kv_pool_size(config, args), args.num_layers, args.num_kv_heads, args.head_dim,
                dtype_of(config), device)
    parent = os.getppid()
    while True:
        box = [None]
        try:
            dist.broadcast_object_list(box, src=0)
        except RuntimeError:
            break  # rank 0 is gone
        if box[0] is None or os.getppid() != parent:
            break
        input_ids, positions, out_loc, groups, logits_rows = to_device(box[0], device)
        try:
            attn = AttentionInputs(kv.k, kv.v, out_loc, groups, logits_rows, loaded.model.paged_kernels)
            loaded.model(input_ids, positions, attn)
        except Exception:  # noqa: BLE001 - rank 0 failed the same forward, or the group broke: both are fatal
            logger.exception("forward failed")
            break
    os._exit(0)  # skip interpreter teardown: the group may be half gone
