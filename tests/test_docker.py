"""docker/: the images install the way the README does, so they cannot drift from it.

Images cannot be built here (no Docker engine); these tests read the Dockerfiles' instructions.
The CPU image runs the README's own set-up script; the GPU image installs the [gpu] extra as
pyproject.toml declares it, through docker/install-gpu.sh (whose pip commands are checked).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in (REPO / "docker" / name).read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        pending += " " + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            word, _, args = pending.strip().partition(" ")
            out.append((word.upper(), " ".join(args.split())))
            pending = ""
    return out


def readme_commands() -> list[str]:
    """The commands of the README's first code block (the two that set up and run)."""
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_starts_with_the_setup_script():
    first, second = readme_commands()[:2]
    assert first.startswith("./scripts/setup.sh && ") and "train jobs/quickstart_cpu.yaml" in first
    assert second.startswith("./scripts/setup.sh && ") and "pytest" in second


def test_cpu_image_installs_with_the_readme_setup_script():
    steps = instructions("cpu.Dockerfile")
    runs = [args for word, args in steps if word == "RUN"]
    assert "./scripts/setup.sh" in runs  # the README's set-up, verbatim
    # nothing else installs Python packages: the script is the one way in
    assert not [r for r in runs if re.search(r"\bpip\b|\bapt-get install\b", r)]
    # the whole repository is in the image before the script runs, and its venv is on PATH after
    order = [word for word, _ in steps]
    assert order.index("COPY") < runs_index(steps, "./scripts/setup.sh")
    env = " ".join(args for word, args in steps if word == "ENV")
    assert "/opt/alphadrive/.venv/bin" in env and ("WORKDIR", "/opt/alphadrive") in steps


def runs_index(steps, command: str) -> int:
    return next(i for i, (word, args) in enumerate(steps) if word == "RUN" and args == command)


def test_gpu_image_installs_the_gpu_extra_of_pyproject():
    steps = instructions("gpu.Dockerfile")
    assert steps[0][0] == "FROM" and "nvidia/cuda" in steps[0][1] and "devel" in steps[0][1]  # flash-attn compiles
    runs = [args for word, args in steps if word == "RUN"]
    assert "./docker/install-gpu.sh" in runs
    # versions live in pyproject.toml only
    text = (REPO / "docker" / "gpu.Dockerfile").read_text() + (REPO / "docker" / "install-gpu.sh").read_text()
    assert not re.search(r"vllm\s*[=<>~]=", text) and not re.search(r"flash.attn\s*[=<>~]=", text)


def test_install_gpu_script_installs_exactly_the_extra():
    proc = subprocess.run(
        ["bash", str(REPO / "docker" / "install-gpu.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    commands = proc.stdout.splitlines()
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    installs = [c for c in commands if " pip install " in f" {c} " and "--upgrade pip" not in c]
    for requirement in extra:
        assert any(requirement in c.split() for c in installs), requirement
    # the package itself, editable, in the same pip call as vLLM (vLLM's torch wins over our unpinned one)
    vllm = next(c for c in installs if any(r.startswith("vllm") and r in c.split() for r in extra))
    assert "-e" in vllm.split() and ".[dev]" in vllm.split()
    flash = next(c for c in installs if "flash-attn" in c)
    assert "--no-build-isolation" in flash.split()


def test_images_pin_the_same_ray():
    versions = {re.search(r"^ARG RAY_VERSION=(\S+)$", (REPO / "docker" / n).read_text(), re.M).group(1) for n in ("cpu.Dockerfile", "gpu.Dockerfile")}
    assert len(versions) == 1
    for name in ("cpu.Dockerfile", "gpu.Dockerfile"):
        text = (REPO / "docker" / name).read_text()
        assert 'echo "ray==${RAY_VERSION}"' in text and "PIP_CONSTRAINT=" in text


def test_build_context_leaves_out_environments_and_outputs():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")}
    assert {".venv", ".venv-*", ".git", "runs", "artifacts"} <= ignored
