"""Linters, the formatter and the type checker, as part of the test command: ruff's checks
(pyflakes' errors, syntax and the line length) and `ruff format --check` over the whole repository, and mypy over
the package alphadrive_ray (settings, and the files mypy checks, in pyproject.toml)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def ruff(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if exe is None:
        pytest.fail("ruff is not installed: pip install -e '.[dev]' (scripts/setup.sh does)")
    return subprocess.run([exe, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_ruff_check_passes():
    done = ruff("check", "--output-format", "concise", ".")
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]


def test_ruff_format_leaves_every_file_unchanged():
    done = ruff("format", "--check", ".")
    assert done.returncode == 0, "run `ruff format .`:\n" + done.stdout[-5000:] + done.stderr[-2000:]


def test_mypy_passes():
    if importlib.util.find_spec("mypy") is None:
        pytest.fail("mypy is not installed: pip install -e '.[dev]' (scripts/setup.sh does)")
    cache = Path(tempfile.gettempdir()) / "alphadrive-ray-mypy-cache"
    done = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(cache)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, "mypy (settings in pyproject.toml):\n" + done.stdout[-5000:] + done.stderr[-2000:]
