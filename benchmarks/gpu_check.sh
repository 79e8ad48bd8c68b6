#!/usr/bin/env bash
# The prepared GPU check for a machine with one CUDA GPU (written for one H200, 16 cores; < 8 minutes in all):
# installs what is missing (scripts/setup.sh --vllm-gpu: the package, vllm 0.32.0, the offline SmolLM2-135M),
# then runs benchmarks/gpu_check.py, which prints ONE table (also written to $OUT/gpu_check.md when $OUT is set):
#   (a) hf vs vLLM engine on the same GPU, model and documents: max |Δℓ|, max |Δσ| in bf16 and fp32, tokens/s ratio
#   (b) cached ALM train step ÷ plain next-token step, bf16
#   (c) peak GPU memory of each
#
#   bash benchmarks/gpu_check.sh                        # on the GPU machine, from the repository root
#   python benchmarks/gpu_check.py --device cpu --tiny  # the CPU dry run of the same steps (tests run it)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
T0=$SECONDS

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check.sh: no CUDA GPU here (nvidia-smi); on a CPU run: python benchmarks/gpu_check.py --device cpu --tiny" >&2
    exit 2
fi
# install only what is missing (setup.sh is idempotent; the vLLM wheel and its CUDA libraries are most of the time)
if [[ ! -x "$PY" ]] || ! "$PY" -c 'import vllm, alm_pipeline' >/dev/null 2>&1; then
    bash scripts/setup.sh --vllm-gpu >&2
fi
"$PY" -c 'import torch; assert torch.cuda.is_available(), f"torch {torch.__version__} sees no CUDA device"'
echo "[gpu_check] set-up done after $((SECONDS - T0)) s" >&2

export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false VLLM_LOGGING_LEVEL=WARNING
# each benchmark process gets at most 150 s, so the four of them and the set-up fit in 8 minutes
"$PY" benchmarks/gpu_check.py --device cuda --timeout 150 "$@"
echo "[gpu_check] done after $((SECONDS - T0)) s" >&2
