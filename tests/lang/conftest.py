"""The two real backends the SmolLM2 program suites run on, each started once per session."""

from __future__ import annotations

import pytest

import radixflow as sgl


@pytest.fixture(scope="session")
def smol_runtime():
    # One torch thread: on a 2-core machine the server's default (all cores) competes with its own HTTP process
    # and runs the model about 3x slower.
    runtime = sgl.Runtime(max_total_tokens=16384, num_threads=1)
    yield runtime
    runtime.shutdown()


@pytest.fixture(scope="session", params=["engine", "runtime"])
def real_backend(request):
    """What a user passes as `backend=`: an `Engine` or a `Runtime`; each loads the model once per session."""
    return request.getfixturevalue("smol_engine" if request.param == "engine" else "smol_runtime")
