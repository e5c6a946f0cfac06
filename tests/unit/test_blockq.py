"""radixflow's block-quant kernel (blockq.cpp), in the build for this CPU's instruction set, computes exactly what
its docstring says: the input rounded to two bytes per value with one scale per block of 32, times GGUF's weights,
summed in integers and scaled per block. Checked against that computation written out in float64, and against the
dequantized fp32 matmul."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from radixflow.runtime.model import blockq
from radixflow.runtime.model.quant import Int4Groups, int4_groups
from tests.unit.test_quant import _quantized

pytestmark = pytest.mark.skipif(blockq.cpu_isa() is None, reason="not an x86 CPU with AVX2 (the kernel's target)")


def test_the_kernel_builds_for_this_cpu():
    assert blockq.available()


def _rounded_input(x: torch.Tensor) -> torch.Tensor:
    """The kernel's view of x (float32 steps as blockq.cpp takes them): per block of 32, d = max|x| / 127, hi =
    round(x / d), lo = round(128 * (x / d - hi)), x ~ d / 128 * (128 * hi + lo)."""
    blocks = x.view(x.shape[0], -1, 32)
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    scaled = blocks * inv
    hi = torch.round(scaled)
    lo = torch.round((scaled - hi) * 128)
    return ((d.double() / 128) * (128 * hi.double() + lo.double())).view(x.shape)


def _groups(kind, shape, seed=0):
    blocks, reference = _quantized(kind, shape, seed)
    return int4_groups(blocks, kind, shape), reference


@pytest.mark.parametrize("kind", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 7, 10, 16, 23, 24])
def test_kernel_computes_the_rounded_input_times_the_weight(kind, rows):
    # 576 inputs: 9 pairs of blocks (4-bit) and 2 groups of 8 blocks plus 2 (Q8_0); 52 outputs: not a multiple of 16
    groups, reference = _groups(kind, (52, 576))
    assert blockq.supports(groups)
    x = torch.randn(rows, 576, generator=torch.Generator().manual_seed(rows)) * 3
    x[0, :32] = 0  # an all-zero block (scale 0)
    out = blockq.BlockWeight(groups)(x)
    # The offset term of a 4-bit block (m times the block's input sum) takes the exact sum.
    offset = torch.zeros_like(reference) if groups.repeat == 2 else \
        (groups.zeros - 8 * groups.scales).half().float().repeat_interleave(32, dim=1)
    exact = _rounded_input(x) @ (reference - offset).double().t() + x.double() @ offset.double().t()
    assert out.shape == (rows, 52) and out.dtype == torch.float32
    assert float((out.double() - exact).abs().max()) <= 1e-5 * float(exact.abs().max())
    # and so the dequantized model's matmul, to about 4 significant digits (torch's bf16 int4 kernel: about 2)
    plain = x @ reference.t()
    assert float((out - plain).abs().max()) <= 1e-3 * float(plain.abs().max())


def test_q8_extremes():
    """Weights of -128 and 127 and inputs at their block's maximum (the sign trick's edge cases)."""
    groups, reference = _groups(Q.Q8_0, (8, 64))
    q, d = blockq._q8_parts(groups)
    q[:, ::2], q[:, 1::2] = -128, 127
    lo, hi = (q.to(torch.int16) & 0x0F).to(torch.uint8), ((q.to(torch.int16) >> 4) + 8).to(torch.uint8)
    groups = Int4Groups(torch.cat([lo, hi], 1), groups.scales, groups.zeros, 2)
    x = torch.full((1, 64), -2.5)
    out = blockq.BlockWeight(groups)(x)
    expected = x.double() @ groups.dequantize().double().t()
    assert torch.allclose(out.double(), expected, rtol=1e-6)


def test_q4_extremes():
    """Every code 15 against inputs at their block's maximum: the largest 16-bit pair sums of the AVX2 build
    (2 * 2 * 15 * 127), which must not saturate."""
    groups, _ = _groups(Q.Q4_1, (8, 128))
    groups = Int4Groups(torch.full_like(groups.codes, 15), groups.scales, groups.zeros, 1)
    for value in (3.0, -3.0):
        x = torch.full((2, 128), value)
        expected = x.double() @ groups.dequantize().double().t()
        assert torch.allclose(blockq.BlockWeight(groups)(x).double(), expected, rtol=1e-5)


def test_layouts_it_cannot_hold_are_left_to_torchs_kernel():
    q41, _ = _groups(Q.Q4_1, (16, 64))
    q80, _ = _groups(Q.Q8_0, (16, 64))
    assert not blockq.supports(Int4Groups.cat([q41, q80]))  # a 4-bit part widened beside a Q8_0 one
    assert not blockq.supports(_groups(Q.Q4_1, (16, 96))[0])  # not whole pairs of blocks
    with pytest.raises(ValueError, match="Q8_0"):
        blockq.BlockWeight(Int4Groups.cat([q41, q80]))


def test_too_many_rows_and_wrong_inputs_are_refused():
    weight = blockq.BlockWeight(_groups(Q.Q4_1, (16, 64))[0])
    with pytest.raises(RuntimeError, match=f"at most {blockq.MAX_ROWS} rows"):
        weight(torch.randn(blockq.MAX_ROWS + 1, 64))
    with pytest.raises(RuntimeError, match=r"float32 \[rows, 64\]"):
        weight(torch.randn(2, 128))


def test_compiles_into_a_graph():
    groups, _ = _groups(Q.Q4_1, (32, 128))
    weight = blockq.BlockWeight(groups)
    x = torch.randn(3, 128)
    compiled = torch.compile(lambda t: torch.relu(weight(t * 2)), fullgraph=True, dynamic=True)
    assert torch.equal(compiled(x), torch.relu(weight(x * 2)))


def test_each_instruction_set_this_cpu_has_computes_the_same():
    """The best build runs above; the others this CPU can run (AVX2 beside AVX512-VNNI) pass the same test in a
    process of their own (one build per process: both register the same ops)."""
    for isa in blockq.cpu_isas()[1:]:
        env = {**os.environ, blockq.ISA_ENV: isa}
        test = f"{__file__}::test_kernel_computes_the_rounded_input_times_the_weight"
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], env=env,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0 and re.search(r"^15 passed", run.stdout, re.M), (isa, run.stdout[-2000:])


def test_an_instruction_set_the_cpu_lacks_is_refused_by_name(monkeypatch):
    monkeypatch.setenv(blockq.ISA_ENV, "sse2")
    with pytest.raises(ValueError, match="RADIXFLOW_BLOCKQ_ISA='sse2'"):
        blockq.cpu_isa()


def test_the_build_lives_under_torchs_extension_root(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    build = blockq.build_directory("avx2")
    assert build.parent == tmp_path and build.name == f"radixflow_blockq_avx2-torch{torch.__version__}"


def test_a_build_lock_left_by_a_killed_build_does_not_hang_the_next_start(tmp_path):
    """torch's loader waits for its lock file to go away, forever: a process killed while building the kernel hung
    every later start. A lock older than any build is removed (and a fresh one, a build in progress, is not). The
    lock is left in this process's own build, which the next start then finds up to date (a fresh build directory
    would cost a whole build)."""
    assert blockq.available()  # the build exists
    lock = blockq.build_directory(blockq.cpu_isa()) / "lock"
    lock.touch()
    os.utime(lock, (0, 0))  # left long ago
    code = "from radixflow.runtime.model import blockq; print(blockq.available())"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.stdout.strip() == "True", run.stderr[-2000:]
    assert not lock.exists() and "a build lock" in run.stderr

    fresh = tmp_path / "fresh.lock"
    fresh.touch()
    blockq._drop_stale_lock(fresh)
    assert fresh.exists()  # a build in progress keeps its lock
