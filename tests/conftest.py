"""Shared fixtures: the tiny models, a small synthetic dataset and a local Ray cluster.

Expensive things are built once per test session; everything is real (transformers models,
DeepSpeed, Ray actors), only small.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

# Prompt of the tests: short, so that the tiny model's batches stay small.
TEST_PROMPT = "Speed {speed}m/s, navigation '{navigation}'. Plan: <think> </think> then <answer> SPEED, PATH </answer>."


@pytest.fixture(scope="session")
def tiny_vl_dir(tmp_path_factory):
    """The default tiny Qwen2-VL (built once per session; its vision pretraining takes minutes).

    ALPHADRIVE_TEST_TINY_VL names a folder built with the same spec to reuse instead.
    """
    import json
    from dataclasses import asdict

    from alphadrive_ray.models.tiny import TinySpec, build_tiny_qwen2vl

    prebuilt = os.environ.get("ALPHADRIVE_TEST_TINY_VL")
    if prebuilt:
        spec_file = Path(prebuilt) / "tiny_spec.json"
        if not spec_file.is_file() or json.loads(spec_file.read_text()) != asdict(TinySpec(seed=0)):
            pytest.fail(f"ALPHADRIVE_TEST_TINY_VL={prebuilt} is not a tiny model built with TinySpec(seed=0)")
        return prebuilt
    return str(build_tiny_qwen2vl(tmp_path_factory.mktemp("tiny-vl"), TinySpec(seed=0)))


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory):
    """The text-only tiny Qwen2 (same tokenizer and sizes, no vision tower)."""
    from alphadrive_ray.models.tiny import TinySpec, build_tiny_qwen2

    return str(build_tiny_qwen2(tmp_path_factory.mktemp("tiny-text"), TinySpec(seed=0)))


@pytest.fixture(scope="session")
def scenes(tmp_path_factory):
    """64 synthetic scenes (small images) and their records."""
    from alphadrive_ray.data.records import load_records
    from alphadrive_ray.data.synth import generate_dataset

    path, _ = generate_dataset(tmp_path_factory.mktemp("scenes"), 64, seed=3, size=96)
    return load_records(path)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster shared by the tests that need actors."""
    import ray

    if not ray.is_initialized():
        # workers import test helpers (classes defined in test modules) from the repo
        env = {"TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()
