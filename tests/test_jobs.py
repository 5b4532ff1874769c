"""jobs/: the GPU configs carry the release's hyperparameters and fit their GPUs, and the runtime
environment of `ray job submit` uploads the code without virtual environments, data or secrets."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import pytest
import yaml

from alphadrive_ray.config import load_config

REPO = Path(__file__).resolve().parent.parent
GPU_JOBS = {"qwen2vl_2b.yaml": (1, 8), "qwen2vl_2b_2nodes.yaml": (2, 8)}  # file: (nodes, GPUs per node)


@pytest.mark.parametrize("name", sorted(GPU_JOBS))
def test_gpu_jobs_use_the_release_hyperparameters(name):
    c = load_config(REPO / "jobs" / name)
    # the AlphaDrive release: GRPO and SFT settings
    assert (c.grpo.lr, c.grpo.beta, c.grpo.kl_estimator, c.grpo.group_size, c.grpo.prompts_per_step) == (1e-6, 0.04, "k3", 2, 32)
    assert (c.grpo.advantage, c.grpo.advantage_eps, c.grpo.updates_per_batch) == ("std", 1e-4, 1)
    assert (c.rollout.temperature, c.rollout.top_p, c.rollout.max_new_tokens) == (1.0, 1.0, 256)
    assert (c.sft.lr, c.sft.warmup_ratio, c.sft.epochs) == (2e-5, 0.1, 1)
    assert c.data.prompt_template == "" and c.data.synth_train.n == 0  # the release prompt, real data
    # a real Qwen2-VL-2B on GPUs: vLLM engines, ZeRO-2 learners, bf16, NCCL sync
    assert c.model.dtype == "bfloat16" and "Qwen2-VL-2B" in c.model.path and not c.model.init_tiny
    assert (c.rollout.engine, c.rollout.gpus_per_worker, c.learner.zero_stage, c.learner.gpus_per_worker) == ("vllm", 1, 2, 1)
    assert c.sync.backend == "nccl" and c.learner.backend in ("nccl", "auto")


@pytest.mark.parametrize("name", sorted(GPU_JOBS))
def test_gpu_jobs_fill_their_nodes(name):
    nodes, gpus_per_node = GPU_JOBS[name]
    c = load_config(REPO / "jobs" / name)
    gpus = c.rollout.num_workers * c.rollout.gpus_per_worker + c.learner.num_workers * c.learner.gpus_per_worker
    assert gpus == nodes * gpus_per_node
    # the learner ranks fit on one node, so their all-reduce stays on its NVLink
    assert c.learner.num_workers * c.learner.gpus_per_worker <= gpus_per_node


def test_layouts_compute_the_same_updates():
    """1 node and 2 nodes differ only in layout: the same global batches, so the same updates."""
    from dataclasses import replace

    one, two = (load_config(REPO / "jobs" / name) for name in ("qwen2vl_2b.yaml", "qwen2vl_2b_2nodes.yaml"))
    for section in ("sft", "grpo", "model", "data", "sync", "eval", "checkpoint"):
        a, b = getattr(one, section), getattr(two, section)
        if section in ("sft", "grpo"):  # micro-batches are a memory layout, not part of the update
            a, b = replace(a, micro_batch_size=1), replace(b, micro_batch_size=1)
        assert a == b, section
    layout = ("num_workers", "cpus_per_worker", "placement")
    assert replace(one.reward, **{k: getattr(two.reward, k) for k in layout}) == two.reward


def runtime_env() -> dict:
    return yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())


def test_runtime_env_is_valid_for_ray():
    from ray.runtime_env import RuntimeEnv

    env = runtime_env()
    RuntimeEnv(**env)  # raises on unknown fields or wrong types
    assert "working_dir" not in env  # given on the command line: `--working-dir .`
    assert env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    assert all(isinstance(v, str) for v in env["env_vars"].values())


def test_runtime_env_holds_no_secret():
    env = runtime_env()
    # whole words of a variable name: HF_TOKEN, OPENAI_API_KEY, AWS_SECRET_ACCESS_KEY (not TOKENIZERS_...)
    secretish = re.compile(r"(^|_)(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)(_|$)", re.I)
    assert secretish.search("HF_TOKEN") and secretish.search("OPENAI_API_KEY") and not secretish.search("TOKENIZERS_PARALLELISM")
    assert not [name for name in env.get("env_vars", {}) if secretish.search(name)]


def package_names(directory: Path, tmp_path: Path) -> tuple[list[str], int]:
    """The files `ray job submit --working-dir DIR` uploads, packed by Ray's own code.

    .gitignore is not consulted, so the excludes alone must keep the package lean.
    """
    from ray._private.runtime_env.packaging import create_package

    package = tmp_path / "package.zip"
    create_package(str(directory), package, include_gitignore=False, excludes=runtime_env()["excludes"])
    return zipfile.ZipFile(package).namelist(), package.stat().st_size


def test_working_dir_excludes_environments_outputs_and_large_files(tmp_path):
    checkout = tmp_path / "checkout"
    # what a checkout holds besides code: environments, runs, generated data, weights, caches
    for rel in (
        ".venv/bin/python",
        ".venv-vllm-cpu/bin/python",
        ".git/HEAD",
        "runs/quickstart/metrics.jsonl",
        "artifacts/tiny-qwen2vl/model.safetensors",
        "alphadrive_ray/__pycache__/x.cpython-311.pyc",
        "alphadrive_ray.egg-info/PKG-INFO",
        "weights/policy.bin",
        "data/train.parquet",
        "ckpt/optim.pt",
        "alphadrive_ray/train/trainer.py",
        "jobs/qwen2vl_2b.yaml",
        "pyproject.toml",
        "README.md",
    ):
        (checkout / rel).parent.mkdir(parents=True, exist_ok=True)
        (checkout / rel).write_text("x")
    names, _ = package_names(checkout, tmp_path)
    assert sorted(n for n in names if not n.endswith("/")) == [
        "README.md",
        "alphadrive_ray/train/trainer.py",
        "jobs/qwen2vl_2b.yaml",
        "pyproject.toml",
    ]


def test_this_checkout_packs_small(tmp_path):
    names, size = package_names(REPO, tmp_path)
    for needed in (
        "alphadrive_ray/train/trainer.py",
        "alphadrive_ray/train/cli.py",
        "jobs/qwen2vl_2b.yaml",
        "jobs/quickstart_cpu.yaml",
        "pyproject.toml",
    ):
        assert needed in names, needed
    assert not [n for n in names if n.startswith((".venv", ".git/", "runs/", "artifacts/"))]
    assert size < 20 * 2**20  # code and docs only (Ray's limit for a working dir is 500 MiB)
