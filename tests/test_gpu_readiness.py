"""bench/gpu_readiness.py's code on CPU: the GPU recipe (jobs/qwen2vl_2b.yaml) at tiny scale
through the real `alphadrive-ray train`, Ray actors, DeepSpeed and the HF engine, with its
checks and figures (its GPU figures come from a GPU machine, docs/performance.md)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SCRIPT = str(REPO / "bench" / "gpu_readiness.py")


def run(args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_recipe_runs_end_to_end_on_cpu_and_every_check_and_figure_is_reported(tmp_path):
    out = tmp_path / "readiness.json"
    args = ["--size", "tiny", "--device", "cpu", "--sft-steps", "2", "--sft-batch", "4", "--grpo-steps", "2", "--prompts", "2"]
    proc = run([*args, "--max-new-tokens", "12", "--eval-samples", "2", "--workdir", str(tmp_path), "--json", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] is True and report["vllm"] is None
    assert "vLLM not installed" in proc.stdout and proc.stdout.rstrip().endswith("READY")
    [hf] = report["runs"]
    assert hf["engine"] == "hf" and hf["returncode"] == 0 and hf["sync_backend"] == "object_store"
    assert hf["checks"] == {
        "exit 0": True,
        "SFT steps ran, losses finite": True,
        "GRPO steps ran, losses and KL finite": True,
        "synced weights bit-equal (sync.verify, every sync)": True,
    }
    # every parameter of the model syncs (the recipe trains the vision tower too)
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration

    import torch

    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration._from_config(AutoConfig.from_pretrained(tmp_path / "qwen2vl-tiny"))
    assert hf["verified_tensors"] == len(list(model.parameters()))
    assert len(hf["sft_loss"]) == 2 and len(hf["grpo_loss"]) == 2
    assert all(math.isfinite(x) for x in hf["sft_loss"] + hf["grpo_loss"])
    for key in ("rollout_tokens_per_s", "grpo_step_s", "sft_step_s", "sync_gb", "sync_gb_per_s"):
        assert hf[key] > 0, key
    assert hf["logp_diff"] < 1e-4  # float32 on CPU: the engine's log-probs are the learner's
    assert hf["peak_gpu_mb_per_role"] == {} and hf["peak_gpu_mb_per_device"] == {}
    assert set(hf["peak_rss_mb_per_role"]) == {"learner", "rollout", "reward"}
    # the recipe's settings, cut down in scale only; no checkpoint written (checkpoint.keep: 0)
    run_dir = tmp_path / "runs" / "readiness-hf"
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["grpo"]["group_size"] == 2 and config["grpo"]["lr"] == 1e-6 and config["data"]["max_pixels"] == 401408
    assert config["checkpoint"]["keep"] == 0 and config["sync"]["verify"] is True
    assert not list(run_dir.glob("checkpoints/*"))
    assert "sync.verify: " in proc.stdout and "tensors bit-equal after every sync" in proc.stdout


def test_bad_requests_are_refused_before_anything_runs(tmp_path):
    proc = run(["--size", "tiny", "--device", "cpu", "--engines", "vllm", "--workdir", str(tmp_path)], timeout=120)
    assert proc.returncode == 2 and "--engines vllm needs --device cuda" in proc.stderr
    proc = run(["--size", "tiny", "--device", "cpu", "--grpo-steps", "0"], timeout=120)
    assert proc.returncode == 2 and "--grpo-steps must be at least 1" in proc.stderr
    assert not list(tmp_path.iterdir())
