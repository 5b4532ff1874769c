#!/usr/bin/env bash
# Set up a fresh machine for alphadrive-ray: Java (for METEOR), Chromium and its driver (the
# run report's browser test), a .venv in the repo root,
# torch 2.14.1 + torchvision 0.29.1 (from the local wheel cache where there is one) and the
# package with its test extras. Safe to rerun: finished steps are skipped.
#
#   ./scripts/setup.sh            # then: .venv/bin/alphadrive-ray --help
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"

say() { printf '[setup] %s\n' "$*"; }

# 1. Java: pycocoevalcap's METEOR and PTB tokenizer are Java programs.
if ! command -v java >/dev/null 2>&1; then
  say "installing Java (default-jre-headless) for METEOR"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq default-jre-headless >/dev/null
fi

# 2. Chromium and chromedriver: tests open the run report in a real headless browser.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  say "installing Chromium (chromium, chromium-driver) for the browser tests"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi

# 3. The virtual environment.
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
PIP="$VENV/bin/python -m pip"

# 4. torch first, pinned, so that no later requirement pulls another build.
if ! "$VENV/bin/python" -c "import torch, torchvision, sys; sys.exit(not (torch.__version__.startswith('2.14.1') and torchvision.__version__.startswith('0.29.1')))" 2>/dev/null; then
  say "installing $TORCH_PINS"
  $PIP install -q $TORCH_PINS
fi

# 5. The package and the test tools; skipped when pyproject.toml has not changed.
stamp="$VENV/.alphadrive-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  say "installing alphadrive-ray and its dependencies"
  $PIP install -q -e ".[dev]" $TORCH_PINS
  echo "$want" > "$stamp"
fi
say "ready: $("$VENV/bin/python" -c 'import torch, transformers, ray, deepspeed; print(f"torch {torch.__version__}, transformers {transformers.__version__}, ray {ray.__version__}, deepspeed {deepspeed.__version__}")' 2>/dev/null | tail -1)"
