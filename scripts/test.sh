#!/usr/bin/env bash
# Set up, then run the whole test suite (unit, scheduler, end-to-end on a tiny model and on SmolLM2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
python -m pytest tests -q -p no:cacheprovider "$@"
