#!/usr/bin/env bash
# Set up, lint, then run the whole test suite (unit, scheduler, end-to-end on a tiny model and on SmolLM2).
# Arguments go to pytest: `bash scripts/test.sh -m "not slow"` is the quick loop (no SmolLM2 tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
python -m ruff check .
python -m pytest tests -q -p no:cacheprovider --durations=25 "$@"
