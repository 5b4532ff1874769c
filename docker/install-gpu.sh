#!/usr/bin/env bash
# Install alphadrive-ray with its [gpu] extra (vLLM, flash-attn) into the Python on PATH; the
# GPU image runs it (docker/gpu.Dockerfile). The requirements are read from pyproject.toml's
# [gpu] extra, so the image installs exactly what `pip install -e ".[gpu]"` means.
#
#   docker/install-gpu.sh             # install
#   docker/install-gpu.sh --dry-run   # print the pip commands instead
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DRY=0; [ "${1:-}" = "--dry-run" ] && DRY=1

mapfile -t GPU_EXTRA < <("$PYTHON" -c '
import tomllib
for req in tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["gpu"]:
    print(req)
')
engines=(); compiled=()
for req in "${GPU_EXTRA[@]}"; do
  case "$req" in flash-attn*|flash_attn*) compiled+=("$req") ;; *) engines+=("$req") ;; esac
done

run() { if [ "$DRY" = 1 ]; then echo "$*"; else "$@"; fi; }
run "$PYTHON" -m pip install --upgrade pip
# 1. The package with vLLM: vLLM's wheel pins the torch build it was compiled against, and
#    our torch requirement is unpinned, so pip takes vLLM's torch.
run "$PYTHON" -m pip install -e ".[dev]" "${engines[@]}"
# 2. flash-attn compiles against that torch, so it must see it: no build isolation.
if [ "${#compiled[@]}" -gt 0 ]; then
  run "$PYTHON" -m pip install ninja packaging wheel
  run env MAX_JOBS="${MAX_JOBS:-8}" "$PYTHON" -m pip install --no-build-isolation "${compiled[@]}"
fi
run "$PYTHON" -c "import vllm, ray, alphadrive_ray; print('vllm', vllm.__version__, 'ray', ray.__version__)"
