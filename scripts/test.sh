#!/usr/bin/env bash
# Run the checks CI runs: lint + format check (ruff) and the test suite (pytest), in .venv.
# Sets the environment up first (scripts/setup.sh) when .venv is missing.
# Without arguments: the suite, then the multi-node tests (tests/multinode, a simulated Ray cluster) in a pytest
# process of their own, so that the cluster they start and tear down shares nothing with the rest.
# Extra arguments go to one pytest run instead:
#   scripts/test.sh -k teacher_cache -x
#   scripts/test.sh -m multinode tests/multinode
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[[ -x .venv/bin/python ]] || bash scripts/setup.sh
export RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check .
.venv/bin/ruff format --check .
if [[ $# -gt 0 ]]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
.venv/bin/python -m pytest -q
.venv/bin/python -m pytest -q -m multinode tests/multinode
