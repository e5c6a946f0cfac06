"""GGUF block weights multiplied in integers on x86 CPUs (our kernel, blockq.cpp): AVX512-VNNI or AVX2.

torch's int4 kernel (quant.Int4Weight) dequantizes each weight to bf16 and multiplies in floating point; on the
2-core CPUs here that runs SmolLM2's layers at 10-15 GB/s, compute-bound on the dequantization. This kernel works
the way llama.cpp's does instead: each call rounds its input with one scale per block of 32, and a block's dot
product is integer multiply-adds scaled once (vpdpbusd on AVX512-VNNI; vpmaddubsw and vpmaddwd on AVX2, the same
integers). Layouts, per weight row:

- Q4_0 / Q4_1 (`Int4Groups` with repeat 1, `w = d * code + m`): the 4-bit codes two to a byte as GGUF stores them
  (byte j of a block holds codes j and j + 16), and (d, m) per block as fp16, as in the file;
- Q8_0 (`Int4Groups` with repeat 2, rebuilt exactly from its two 4-bit halves): the signed bytes and d as fp16.

Numerics: llama.cpp rounds each input value to one byte (its Q8_0 / Q8_1 activations); this kernel rounds to two,
a high byte and the remainder in a low byte (about 15 significant bits; two chains of byte products joined by a
shift), and Q4's offset term uses the block's exact fp32 input sum. Outputs match the dequantized fp32 model to
about 4 significant digits, closer than torch's bf16 kernel: on SmolLM2 the greedy text of the dequantized model
(bench/RESULTS.md, 2026-12-06). One byte was about 10% faster per layer and moved logprobs by up to 0.38 nat. Both
instruction sets compute the same integers; only the order of float sums differs.

The kernel is built from source with torch's C++ extension loader the first time it is needed (about 10-20 s on 2
cores, then cached under ~/.cache/torch_extensions), once per instruction set with that set's compiler flags, and
used only where the CPU has that set; `available()` is False otherwise (and when the build fails, e.g. without a
compiler or ninja), and callers use torch's int4 kernel. The same extension holds the paged decode attention kernel
(decode_attention.cpp, attention.decode_kernel), which needs the same instruction sets; without it, SDPA.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import time
from pathlib import Path

import torch

from radixflow.runtime.model.quant import GROUP, Int4Groups

logger = logging.getLogger(__name__)

MAX_ROWS = 24  # blockq.cpp's kMaxRows
_OUT_MULTIPLE = 4  # blockq.cpp's kCols: output features computed together
# Built into one extension: this kernel, and the paged decode attention (attention.py's decode_kernel), which needs
# the same instruction sets.
_SOURCES = [Path(__file__).with_name("blockq.cpp"), Path(__file__).with_name("decode_attention.cpp")]
_AVX2 = ["-mavx2", "-mfma", "-mf16c"]
# Per instruction set, best first: the /proc/cpuinfo flags it needs and the compiler flags it is built with.
ISAS = {
    "avx512_vnni": ({"avx512_vnni", "avx512vl", "avx512bw", "f16c"},
                    [*_AVX2, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]),
    "avx2": ({"avx2", "fma", "f16c"}, _AVX2),
}


ISA_ENV = "RADIXFLOW_BLOCKQ_ISA"  # names one of ISAS to build instead of the best one the CPU has (tests, benches)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as /proc/cpuinfo lists them (empty where there is none)."""
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return frozenset()


def cpu_isas() -> list[str]:
    """The instruction sets of ISAS that this CPU has, best first."""
    return [isa for isa, (needs, _) in ISAS.items() if needs <= cpu_flags()]


def cpu_isa() -> str | None:
    """The instruction set the kernel is built for here: the best this CPU has, or the one ISA_ENV names."""
    isas = cpu_isas()
    chosen = os.environ.get(ISA_ENV)
    if not chosen:
        return isas[0] if isas else None
    if chosen not in isas:
        raise ValueError(f"{ISA_ENV}={chosen!r}: this CPU runs {', '.join(isas) or 'none'} of {', '.join(ISAS)}")
    return chosen


@functools.cache
def available() -> bool:
    """Whether the kernel runs here: the CPU has one of ISAS and that build of the extension loads (once per
    process)."""
    isa = cpu_isa()
    if isa is None:
        return False
    try:
        from torch.utils import cpp_extension

        build = build_directory(isa)
        build.mkdir(parents=True, exist_ok=True)
        _drop_stale_lock(build / "lock")
        cpp_extension.load(name=f"radixflow_blockq_{isa}", sources=[str(path) for path in _SOURCES],
                           extra_cflags=["-O3", "-fopenmp", *ISAS[isa][1]], extra_ldflags=["-fopenmp"],
                           build_directory=str(build), is_python_module=False, verbose=False)
    except (OSError, RuntimeError, ImportError, subprocess.CalledProcessError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        logger.warning("CPU kernels (%s) not built (%s); using torch's int4 kernel and SDPA", isa, first_line)
        return False
    _register_fakes()
    return True


def build_directory(isa: str) -> Path:
    """Where the build for `isa` lives: torch's extension root (TORCH_EXTENSIONS_DIR, else its cache folder), one
    folder per instruction set and torch version."""
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return Path(root) / f"radixflow_blockq_{isa}-torch{torch.__version__}"


# A build takes 10-20 s; torch's build lock older than this was left by a process killed while building.
STALE_LOCK_S = 300


def _drop_stale_lock(lock: Path) -> None:
    """Remove a build lock that no running build holds: torch's loader waits for the lock file to go away, forever,
    so one process killed mid-build would hang every later start (seen here: a test run stopped during the build
    left the next run waiting)."""
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_S:
        logger.warning("removing %s, a build lock %.0f s old (a build stopped midway)", lock, age)
        lock.unlink(missing_ok=True)


def _register_fakes() -> None:
    """Shapes for torch.compile, which traces the ops without running them."""

    def fake(x, weight, scales):
        return x.new_empty(x.shape[0], weight.shape[0])

    for op in ("q4_mm", "q8_mm"):
        torch.library.register_fake(f"radixflow_blockq::{op}")(fake)
    for op in ("decode_attention", "extend_attention"):
        torch.library.register_fake(f"radixflow_attention::{op}")(
            lambda q, *args: torch.empty_like(q, memory_format=torch.contiguous_format))


def supports(groups: Int4Groups) -> bool:
    """Whether `groups` has a layout this kernel holds exactly: 4-bit codes (repeat 1) over whole pairs of blocks,
    or a pure Q8_0 weight (repeat 2, as `quant.int4_groups` writes it)."""
    inp = groups.shape[1]
    if groups.repeat == 1:
        return inp % (2 * GROUP) == 0
    return groups.repeat == 2 and inp % GROUP == 0 and _q8_parts(groups) is not None


def _q8_parts(groups: Int4Groups) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(q int8 [out, in], d fp32 [out, in/32]) if `groups` is a Q8_0 weight split into two 4-bit halves: codes lo with
    (d, 8d), then hi + 8 with (16d, 0); None for anything else (e.g. a Q4 part widened to sit beside a Q8_0 one)."""
    out, wide = groups.codes.shape
    half, nb = wide // 2, wide // 2 // GROUP
    d = groups.scales[:, :nb]
    if not (torch.equal(groups.zeros[:, :nb], 8 * d) and torch.equal(groups.scales[:, nb:], 16 * d)
            and not groups.zeros[:, nb:].any()):
        return None
    lo, hi = groups.codes[:, :half].to(torch.int16), groups.codes[:, half:].to(torch.int16)
    return (lo + 16 * (hi - 8)).to(torch.int8), d


class BlockWeight:
    """`x @ W^T` for fp32 x of at most MAX_ROWS rows, through blockq.cpp; the same interface as quant.Int4Weight."""

    # Up to the kernel's limit, whole SmolLM2 steps run faster on it than on oneDNN's fp32 GEMM, whose weights
    # stream from memory: 1.18x at 20 rows, 1.11x at 24, 0.98x at 32 on the AVX2 build (bench/RESULTS.md,
    # 2026-12-07, night 2). Calls of 11 to 24 rows: the extend of a short question behind a cached prefix, verify
    # steps, mid-sized batches.
    max_rows = MAX_ROWS

    def __init__(self, groups: Int4Groups):
        if not available():
            raise RuntimeError("BlockWeight: the block-quant kernel does not run on this machine (see the log)")
        out, inp = groups.shape
        self.out_features = out
        padded = -(-out // _OUT_MULTIPLE) * _OUT_MULTIPLE
        if padded != out:  # zero rows; their outputs are dropped
            groups = Int4Groups.cat([groups, Int4Groups.zero(padded - out, groups.codes.shape[1], groups.repeat)])
        if groups.repeat == 1:
            codes = groups.codes.view(padded, inp // GROUP, 2, GROUP // 2)  # GGUF's order: j and j + 16 in byte j
            self.weight = (codes[:, :, 0] | (codes[:, :, 1] << 4)).reshape(padded, inp // 2).contiguous()
            m = groups.zeros - 8 * groups.scales
            self.scales = torch.stack([groups.scales, m], dim=-1).half().contiguous()  # [out, blocks, (d, m)]
            self.op = torch.ops.radixflow_blockq.q4_mm
        else:
            parts = _q8_parts(groups)
            if parts is None:
                raise ValueError("BlockWeight: a repeat-2 weight that is not pure Q8_0")
            self.weight, d = parts[0].contiguous(), parts[1]
            self.scales = d.half().contiguous()
            self.op = torch.ops.radixflow_blockq.q8_mm

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.op(x, self.weight, self.scales)
        return out if out.shape[1] == self.out_features else out[:, :self.out_features]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.weight, self.scales

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())
