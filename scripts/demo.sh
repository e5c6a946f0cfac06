#!/usr/bin/env bash
# The main job: set up, then generate from the embedded SmolLM2 model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
radixflow generate --chat "Name three primary colors." --max-new-tokens 64
radixflow generate "The capital of France is" "Once upon a time," --max-new-tokens 24
