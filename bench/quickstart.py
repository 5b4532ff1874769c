"""The demo's job file (jobs/quickstart_cpu.yaml), where the benchmarks take their settings from."""

from __future__ import annotations

from pathlib import Path

PATH = Path(__file__).resolve().parent.parent / "jobs" / "quickstart_cpu.yaml"


def settings() -> dict:
    """The job file as written (the config's defaults not filled in)."""
    import yaml

    return yaml.safe_load(PATH.read_text())


def prompt_template() -> str:
    return settings()["data"]["prompt_template"]
