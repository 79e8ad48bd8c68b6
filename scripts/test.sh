#!/usr/bin/env bash
# Run the checks CI runs: lint + format check (ruff) and the test suite (pytest), in .venv.
# Sets the environment up first (scripts/setup.sh) when .venv is missing. Extra arguments go to pytest:
#   scripts/test.sh -k teacher_cache -x
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[[ -x .venv/bin/python ]] || bash scripts/setup.sh
export RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q "$@"
