"""The whole pipeline end to end, as users run it: `python -m alphadrive_ray.train CONFIG`.

Tiny settings (a few SFT and GRPO steps), but every part is real: a local Ray cluster,
2 rollout workers, 2 reward workers, 2 DeepSpeed learners, weight sync, evaluation with
pycocoevalcap, the HTML report and the Hugging Face export.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_cli(args, cwd, timeout=900):
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_vl_dir):
    work = tmp_path_factory.mktemp("e2e")
    overrides = [
        "run.name=e2e",
        f"run.output_dir={work / 'runs'}",
        f"model.path={tiny_vl_dir}",
        "model.init_tiny=false",
        f"data.train={work / 'train' / 'data.jsonl'}",
        f"data.eval={work / 'eval' / 'data.jsonl'}",
        "data.synth_train.n=64",
        "data.synth_train.reasoning_share=0.5",
        "data.synth_train.size=96",
        "data.synth_eval.n=12",
        "data.synth_eval.size=96",
        "sft.samples=16",
        "sft.epochs=1",
        "sft.batch_size=8",  # two SFT steps
        "sft.micro_batch_size=4",
        "grpo.steps=2",
        "grpo.prompts_per_step=4",
        "grpo.group_size=4",
        "grpo.micro_batch_size=4",
        "grpo.beta=0.04",
        "rollout.num_workers=2",
        "rollout.max_new_tokens=24",
        "reward.num_workers=2",
        "learner.num_workers=2",
        "learner.cpus_per_worker=1",
        "eval.samples=12",
    ]
    args = ["-m", "alphadrive_ray.train", str(REPO / "jobs" / "quickstart_cpu.yaml")]
    for item in overrides:
        args += ["--set", item]
    proc = run_cli(args, cwd=work)
    assert proc.returncode == 0, f"training failed:\nSTDOUT\n{proc.stdout[-6000:]}\nSTDERR\n{proc.stderr[-6000:]}"
    return work / "runs" / "e2e", proc


def test_prints_the_three_accuracies(run):
    _, proc = run
    out = proc.stdout
    for label in ("starting model", "after SFT warm-up", "after SFT + GRPO", "ceiling", "McNemar p"):
        assert label in out
    assert "report:" in out and "Traceback" not in proc.stderr


def test_run_directory_holds_config_metrics_report_and_export(run):
    run_dir, _ = run
    import yaml

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["grpo"]["steps"] == 2 and config["learner"]["num_workers"] == 2
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    stages = [line["stage"] for line in lines]
    assert stages.count("sft") == 2 and stages.count("grpo") == 2 and stages.count("eval") == 3
    grpo = [line for line in lines if line["stage"] == "grpo"]
    for key in ("reward/total", "reward/format", "loss/policy", "loss/kl", "rollout/accuracy", "perf/sync_s", "perf/step_s", "rollout/logp_diff"):
        assert key in grpo[-1], key
    # the learner recomputes the engine's log-probs of the same weights (on-policy)
    assert grpo[0]["rollout/logp_diff"] < 1e-3
    # the quickstart's dynamic sampling: refill rounds are counted, and their generation is
    # rollout time (the step's parts are disjoint intervals of it)
    assert config["grpo"]["dynamic_sampling"] is True
    for line in grpo:
        assert line["rollout/resample_rounds"] in range(config["grpo"]["max_resample_rounds"] + 1)
        # a refill round generates: it takes time, and that time is part of the rollout's
        assert line["perf/resample_s"] <= line["perf/rollout_s"]
        if line["rollout/resample_rounds"]:
            assert line["perf/resample_s"] > 0.01  # at least one generate + score through the actors
        parts = sum(line[f"perf/{k}_s"] for k in ("rollout", "reward", "learner", "sync"))
        assert parts <= line["perf/step_s"] + 1e-6
    assert any(line["rollout/resample_rounds"] > 0 for line in grpo) or all(line["rollout/dropped_groups"] == 0 for line in grpo)
    assert any((run_dir / "tensorboard").iterdir())
    metrics = json.loads((run_dir / "eval" / "final" / "metrics.json").read_text())
    assert 0.0 <= metrics["planning"]["accuracy"] <= 1.0 and metrics["n"] == 12
    assert metrics["reasoning"]["computed"]
    # driver labels: the split's ceiling (always the most likely plan) is reported beside accuracy
    assert 0.0 < metrics["planning"]["ceiling"] <= 1.0
    html = (run_dir / "eval" / "final" / "report.html").read_text()
    assert "Planning accuracy by stage" in html and "ceiling" in html
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["accuracy"]) == {"untrained", "sft", "final"}
    assert summary["accuracy"]["final"] == metrics["planning"]["accuracy"]
    assert summary["ceiling"] == metrics["planning"]["ceiling"]
    # every stage's greedy plans are kept, and consecutive stages are compared scene by scene
    for stage in ("untrained", "sft", "final"):
        assert len((run_dir / "eval" / stage / "predictions.jsonl").read_text().splitlines()) == 12
    assert set(summary["comparisons"]) == {"sft_vs_untrained", "final_vs_sft"}
    for c in summary["comparisons"].values():
        assert c["n"] == 12 and 0.0 <= c["p_value"] <= 1.0
    # SFT trained on the reasoning share only: half the scenes carry reasoning
    train = [json.loads(line) for line in (run_dir.parent.parent / "train" / "data.jsonl").read_text().splitlines()]
    assert 0 < sum(1 for r in train if r.get("reasoning")) < len(train)


def test_export_loads_with_from_pretrained(run):
    run_dir, _ = run
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(run_dir / "export")
    processor = AutoProcessor.from_pretrained(run_dir / "export")
    assert processor.tokenizer.chat_template and sum(p.numel() for p in model.parameters()) > 1e6


def test_bad_config_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("grpo:\n  group_sise: 4\n")
    proc = run_cli(["-m", "alphadrive_ray.train", str(bad)], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "grpo.group_sise" in proc.stderr and "did you mean" in proc.stderr
    assert "Traceback" not in proc.stderr
