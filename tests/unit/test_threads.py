"""Helper threads that copy tensors beside the engine form no OpenMP team of their own (radixflow/runtime/threads.py):
one that did made the engine's decode 1.55x slower for as long as it lived. A team shows as an extra OS thread of the
process, a worker that outlives the op."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from radixflow.runtime.cache.kv_pool import KVPool
from radixflow.runtime.cache.storage import FileBackend, KVPageStore
from radixflow.runtime.threads import single_omp_thread

LARGE = torch.randn(64, 65536)  # copying it is a parallel op (torch's grain is 32,768 elements)


def os_threads() -> set[str]:
    """The OS thread ids of the process: tests compare sets, since a thread an earlier test left may end meanwhile."""
    return set(os.listdir("/proc/self/task"))


@pytest.fixture
def two_omp_threads():
    """Two OpenMP threads per team, as the engine runs on this machine, whatever the test process had."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def threads_started_by_a_copy(setup) -> int:
    """OS threads that a new thread's large copy starts and leaves behind, seen from inside that thread after
    `setup()`."""
    counts = {}

    def run():
        setup()
        counts["before"] = os_threads()
        torch.cat([LARGE, LARGE], dim=1)
        counts["after"] = os_threads()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return len(counts["after"] - counts["before"])


def test_a_helper_thread_copies_without_a_team_of_its_own(two_omp_threads):
    assert threads_started_by_a_copy(lambda: None) >= 1  # without it, the copy starts an OpenMP worker
    assert threads_started_by_a_copy(single_omp_thread) == 0
    assert torch.get_num_threads() == 2  # the calling thread's own setting is untouched


def test_the_storage_tiers_reader_and_writer_threads_form_no_team(two_omp_threads, tmp_path):
    layers, page, heads, dim = 4, 16, 8, 64  # a page of 65,536 values: its copies are parallel ops
    device = KVPool(4 * page, layers, heads, dim, torch.float32, torch.device("cpu"))
    before = os_threads()
    store = KVPageStore(FileBackend(str(tmp_path)), page, "test-model", (2, layers, page, heads, dim), torch.float32)
    tokens = list(range(3 * page))
    store.save(device, tokens, list(range(3 * page)), 0)  # the writer slices and encodes each page
    store.flush()
    end, kv = store.prefetch(tokens, 0).result()[1]  # the reader joins the pages into one tensor
    assert end == 3 * page and kv.shape == (2, layers, 3 * page, heads, dim)
    assert len(os_threads() - before) == 2  # the writer and the reader, and no OpenMP worker of theirs
    store.close()
