"""Helper threads that run torch ops beside the engine's thread.

torch runs its CPU ops on GNU OpenMP (as does llama.cpp's ggml, which loads the same libgomp.so.1). A thread that
has run one large op keeps a team of OpenMP workers for as long as it lives, and once the process holds more OpenMP
threads than cores, libgomp stops spinning between parallel regions: each of the engine's many small decode ops
then waits for its workers to wake. On the 2-core machine one helper thread that had run a `torch.cat` of KV pages
made the engine's greedy decode 1.55x slower for as long as it lived (bench/RESULTS.md, 2026-12-06). So the helper
threads (the storage tier's reader and writer, the KV senders of disaggregation) copy on one OpenMP thread: their
copies are small next to the engine's work, and the engine keeps its cores.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch


def single_omp_thread() -> None:
    """Run the calling thread's torch ops on one OpenMP thread, forming no team of workers. Call it first in a helper
    thread (a `ThreadPoolExecutor` initializer). OpenMP's thread count is per thread, so the engine's is unchanged
    (`torch.set_num_threads` would also change the count every later thread starts with)."""
    torch.get_num_threads()  # torch's per-thread OpenMP setup runs once, on first use: let it run before, not after
    set_threads = _omp_set_num_threads()
    if set_threads is not None:
        set_threads(1)


@functools.cache
def _omp_set_num_threads():
    """`omp_set_num_threads` of the OpenMP runtime torch loaded (its own copy in torch/lib in the pip wheels, else
    the system's), or None where torch has no GNU OpenMP (then there is no team to avoid)."""
    bundled = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    for name in [*map(str, bundled), "libgomp.so.1"]:
        try:
            return ctypes.CDLL(name).omp_set_num_threads
        except (OSError, AttributeError):
            continue
    return None
