"""Shared fixtures: the tiny models, a small synthetic dataset and a local Ray cluster.

Expensive things are built once per test session; everything is real (transformers models,
DeepSpeed, Ray actors), only small.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

# Prompt of the tests: short, so that the tiny model's batches stay small.
TEST_PROMPT = "Speed {speed}m/s, navigation '{navigation}'. Plan: <think> </think> then <answer> SPEED, PATH </answer>."


def tiny_test_spec():
    """The tiny Qwen2-VL of the tests: the demo's sizes, short pretraining (the plumbing, not the
    skills, is under test; the base's full build is measured by the demo, docs/results.md)."""
    from alphadrive_ray.models.tiny import TinySpec

    return TinySpec(seed=0, vision_pretrain_steps=100, language_pretrain_steps=10)


def open_road(**changes):
    """A scene with nothing in it (a two-lane road, 10 m/s, go straight) with `changes` applied:
    the starting point of the scene-by-scene tests."""
    from alphadrive_ray.data.synth import Scene

    road = Scene(
        speed=10.0,
        navigation="go straight",
        num_lanes=2,
        ego_lane=0,
        intersection=None,
        light=None,
        lead_distance=None,
        pedestrian_distance=None,
        cones_distance=None,
    )
    return dataclasses.replace(road, **changes)


@pytest.fixture(scope="session")
def tiny_vl_dir(tmp_path_factory):
    """The tests' tiny Qwen2-VL (built once per session)."""
    from alphadrive_ray.models.tiny import build_tiny_qwen2vl

    return str(build_tiny_qwen2vl(tmp_path_factory.mktemp("tiny-vl"), tiny_test_spec()))


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
        from alphadrive_ray.train.trainer import torch_extensions_dir

        env = {
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
            "TORCH_EXTENSIONS_DIR": torch_extensions_dir(),
        }
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()
