"""The decode step compiled with torch.compile (`--enable-torch-compile`), as GPU engines capture CUDA graphs.

At batch 1 a decode step of a small model is about 1,000 tiny torch ops, and on a CPU their Python and dispatch
overhead costs as much as streaming the weights (bench/RESULTS.md). Inductor turns the norms, RoPE, residuals,
activations and dtype conversions between the matmuls into a few fused C++ loops; the matmuls (the int4 kernel,
MKL, oneDNN) stay the library calls they are in eager mode. On a GPU the same path compiles to Triton kernels.

Only pure-decode batches of up to `max_bs` requests with no shared-prefix attention take this path (the common
case of every step after the prompts are in); everything else runs the eager forward. Shapes are dynamic, so a
new context length never recompiles; there is one graph per batch-size class (`CompiledDecode.shape_class`), all
compiled by `warmup` at startup so that no request waits for the compiler. Inductor's on-disk cache makes later
starts faster. docs/architecture.md has the design and what it measured.

Numerics: the fused loops sum in a different order than eager, so logits differ in the last bits (about 1e-6
relative with fp32 weights); on the int4 kernel (bf16 inside) those bits can round a bf16 activation the other
way, which moves logits by bf16 noise, as a different batch size does.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.fx.experimental._config

from radixflow.runtime.cache.kv_pool import KVPool
from radixflow.runtime.model.attention import AttentionInputs, DecodeStepInputs
from radixflow.runtime.model.llama import Linear, LlamaModel
from radixflow.runtime.model.quant import Int4Weight

logger = logging.getLogger(__name__)

_WARMUP_CONTEXT = 7


def decode_step(model: LlamaModel, input_ids: torch.Tensor, positions: torch.Tensor, kv_buffer: torch.Tensor,
                kv_indices: torch.Tensor, out_cache_loc: torch.Tensor, mask: torch.Tensor | None):
    """Logits of a pure-decode batch and the new K/V of every layer, [2, layers, requests, kv_heads, head_dim]."""
    inputs = DecodeStepInputs(kv_buffer, kv_indices, out_cache_loc, mask, model.paged_kernels)
    logits = model.logits(input_ids, positions, inputs)
    return logits, torch.stack(inputs.new_kv, dim=1)


class CompiledDecode:
    """One compiled graph per batch-size class, chosen here by batch size, as GPU engines keep one CUDA graph per
    captured batch size. Each graph is compiled ahead of time at startup (`warmup`) and then called with no guard
    checks: `takes` admits only batches of the classes compiled, and nothing a guard would check changes between
    steps (the model and the pool are fixed; inputs are fresh contiguous int64/bool tensors). Dynamo's guards on
    a 30-layer model's modules otherwise cost about 1 ms a step at batch 1."""

    def __init__(self, model: LlamaModel, kv: KVPool, max_bs: int):
        if max_bs < 1:
            raise ValueError(f"torch_compile_max_bs: must be at least 1, got {max_bs}")
        self.model = model
        self.kv = kv
        self.max_bs = max_bs
        # Sizes that happen to be equal when a graph is traced (a batch of 2 and the pool's K/V axis, a context
        # of 7 and a stride) would otherwise share one symbol, and the graph would assume they stay equal.
        # Process-wide, but it only changes how torch.compile names sizes.
        torch.fx.experimental._config.use_duck_shape = False
        # The pool's and the int4 weights' sizes are fixed: static sizes give simpler loops.
        torch._dynamo.mark_static(kv.buffer)
        kernels = [module.int4 for module in model.modules() if isinstance(module, Linear) and module.int4 is not None]
        for kernel in kernels:
            for tensor in kernel.tensors():
                torch._dynamo.mark_static(tensor)
        # The linear layers branch on the row count: a graph serves batch sizes on one side of every branch.
        self.kernel_rows = sorted({kernel.max_rows for kernel in kernels}) or [Int4Weight.max_rows]
        # dynamic=True: the context length (and the batch size within a class) is symbolic, so a new length never
        # needs another graph. cpp_wrapper: the graph's kernel launches run from C++, not a Python wrapper.
        # No guards are kept at all: `takes` and `shape_class` do their job.
        self._compiler = torch.compile(decode_step, dynamic=True, fullgraph=True, options={
            "cpp_wrapper": True, "guard_filter_fn": lambda entries: [False] * len(entries)})
        self.graphs: dict[int, object] = {}  # by the smallest batch size of the class
        self.steps = 0  # steps run compiled (the rest ran eager)

    def shape_class(self, batch: int) -> int:
        """Batch sizes that share a graph: 1 (the compiler specialises size 1), then from 2 up to each 4-bit kernel's
        row limit in turn (the linear layers branch on it), and the rest."""
        if batch == 1:
            return 1
        first = 2
        for limit in self.kernel_rows:
            if batch <= limit:
                return first
            first = limit + 1
        return first

    def takes(self, num_tokens: int, attn: AttentionInputs) -> bool:
        """Whether this batch is a pure-decode one a compiled graph computes."""
        if num_tokens > self.max_bs or len(attn.groups) != 1 or self.shape_class(num_tokens) not in self.graphs:
            return False
        group = attn.groups[0]
        whole_batch = group.rows is None and group.valid is None and not group.prefixes and not group.is_causal
        if num_tokens == 1 and group.mask is not None:  # a sliding window cuts the context: the graph has no mask
            return False
        return whole_batch and (attn.logits_rows is None or len(attn.logits_rows) == num_tokens)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        group = attn.groups[0]
        batch = len(input_ids)
        mask = group.mask
        if mask is None and batch > 1:
            # The graphs for several requests always take a mask (padding), so unpadded batches pass all-true.
            mask = torch.ones((batch, 1, 1, group.kv_indices.shape[1]), dtype=torch.bool, device=input_ids.device)
        graph = self.graphs[self.shape_class(batch)]
        with torch.inference_mode():
            logits, new_kv = graph(self.model, input_ids, positions, self.kv.buffer, group.kv_indices,
                                   attn.out_cache_loc, mask)
        self.kv.buffer.index_copy_(2, attn.out_cache_loc, new_kv)
        self.steps += 1
        return logits

    def warmup(self) -> None:
        """Compile the graph of every class up to `max_bs` on a throwaway batch (nothing is written to the pool)."""
        device = self.kv.buffer.device
        start = time.perf_counter()
        for batch in sorted({self.shape_class(b) for b in range(1, self.max_bs + 1)}):
            # Fresh contiguous tensors, as the runner's are, and a context length that is no batch size.
            ids = torch.zeros(batch, dtype=torch.int64, device=device)
            positions = torch.full((batch,), _WARMUP_CONTEXT - 1, dtype=torch.int64, device=device)
            kv_indices = torch.arange(_WARMUP_CONTEXT, device=device).repeat(batch, 1)
            out_loc = torch.full((batch,), _WARMUP_CONTEXT - 1, dtype=torch.int64, device=device)
            mask = None if batch == 1 else torch.ones((batch, 1, 1, _WARMUP_CONTEXT), dtype=torch.bool,
                                                      device=device)
            # specialize_float: the model's float constants (norm eps, RoPE) stay constants; traced as symbolic
            # floats they need a second analysis pass that ahead-of-time compilation does not run.
            with torch.inference_mode(), torch._dynamo.config.patch(specialize_float=True):
                graph = self._compiler.aot_compile(((self.model, ids, positions, self.kv.buffer, kv_indices, out_loc,
                                                     mask), {}))
            graph.disable_guard_check()
            self.graphs[batch] = graph
        logger.info("compiled the decode step for batch classes %s (up to %d) in %.1f s", sorted(self.graphs),
                    self.max_bs, time.perf_counter() - start)
