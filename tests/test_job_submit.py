"""Submitting a training job the documented way, to a real `ray start --head` on this machine.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml --entrypoint-num-cpus 1 \\
        -- python -m alphadrive_ray.train jobs/quickstart_cpu.yaml --set ...

The job is the CPU quickstart made tiny with `--set` overrides (data, model and run directory
in a temp folder). Checked: the job SUCCEEDS, its run directory is complete, `ray job logs`
holds the progress lines, the run's metrics are on the head's Prometheus endpoint, and a
secret in the cluster's environment reaches none of the run directory, the logs or the metrics.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from pathlib import Path

import pytest

from tests.local_head import LocalHead, read_metrics, sample_value

REPO = Path(__file__).resolve().parent.parent
RUN_NAME = "submitted"
# a secret the cluster's nodes hold in their environment (as a distillation key would be)
SECRET = "sk-alphadrive-sentinel-" + uuid.uuid4().hex

pytestmark = pytest.mark.slow  # a Ray head, a job with 4 actors, SFT + GRPO + evaluation: 2-3 minutes on 2 cores


def tiny_overrides(work: Path, model: str) -> list[str]:
    """The quickstart at its smallest: 1 SFT step, 2 GRPO steps, 4 held-out scenes, the tests'
    tiny model (the demo's base takes minutes to build; model.init_tiny is tested in test_models)."""
    return [
        f"run.name={RUN_NAME}",
        f"run.output_dir={work / 'runs'}",
        f"model.path={model}",
        "model.init_tiny=false",
        f"data.train={work / 'train' / 'data.jsonl'}",
        f"data.eval={work / 'eval' / 'data.jsonl'}",
        "data.synth_train.n=16",
        "data.synth_train.reasoning_share=1.0",
        "data.synth_train.size=96",
        "data.synth_eval.n=4",
        "data.synth_eval.size=96",
        "sft.samples=8",
        "sft.epochs=1",
        "sft.batch_size=8",
        "sft.micro_batch_size=4",
        "grpo.steps=2",
        "grpo.prompts_per_step=2",
        "grpo.group_size=2",
        "grpo.micro_batch_size=4",
        "rollout.num_workers=2",
        "rollout.max_new_tokens=8",
        "reward.num_workers=1",
        "learner.num_workers=1",
        "learner.cpus_per_worker=1",
        "eval.samples=4",
        "eval.every_steps=0",
        "eval.baseline=false",
        "eval.reasoning_metrics=false",
    ]


@pytest.fixture(scope="module")
def head():
    # the secret is in the environment of every Ray process, so the job's driver and actors see it
    with LocalHead(num_cpus=6, env={"OPENAI_API_KEY": SECRET, "HF_TOKEN": SECRET}) as head:
        yield head


@pytest.fixture(scope="module")
def job(head, tmp_path_factory, tiny_vl_dir):
    work = tmp_path_factory.mktemp("job")
    submission_id = f"alphadrive-test-{uuid.uuid4().hex[:8]}"
    args = [
        "job",
        "submit",
        "--working-dir",
        ".",
        "--runtime-env",
        "jobs/runtime_env.yaml",
        "--entrypoint-num-cpus",
        "1",
        "--submission-id",
        submission_id,
        "--",
        "python",
        "-m",
        "alphadrive_ray.train",
        "jobs/quickstart_cpu.yaml",
    ]
    for item in tiny_overrides(work, tiny_vl_dir):
        args += ["--set", item]
    started = time.monotonic()
    # blocks and follows the job's logs until it ends, as users see it
    proc = head.ray(*args, timeout=1500, cwd=str(REPO))
    seconds = time.monotonic() - started
    assert proc.returncode == 0, f"ray job submit failed after {seconds:.0f}s:\nSTDOUT\n{proc.stdout[-8000:]}\nSTDERR\n{proc.stderr[-4000:]}"
    logs = head.ray("job", "logs", submission_id)
    assert logs.returncode == 0, logs.stderr
    return {"id": submission_id, "run_dir": work / "runs" / RUN_NAME, "submit": proc, "logs": logs.stdout}


def plain(text: str) -> str:
    """CLI output without its colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def test_job_succeeds(head, job):
    assert f"Job '{job['id']}' succeeded" in plain(job["submit"].stdout + job["submit"].stderr)
    status = head.ray("job", "status", job["id"])
    assert status.returncode == 0 and f"Job '{job['id']}' succeeded" in plain(status.stdout + status.stderr)


def test_run_directory_is_complete(job):
    import yaml

    run_dir = job["run_dir"]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["run"]["name"] == RUN_NAME and config["grpo"]["steps"] == 2 and config["learner"]["num_workers"] == 1
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if line["stage"] == "grpo"] == [1, 2]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["grpo_steps"] == 2 and summary["sft_steps"] == 1 and "final" in summary["accuracy"]
    assert (run_dir / "eval" / "final" / "report.html").is_file()
    assert (run_dir / "export" / "config.json").is_file() and list((run_dir / "export").glob("*.safetensors"))
    assert any((run_dir / "tensorboard").iterdir())


def test_job_logs_hold_the_progress_lines(job):
    text = job["logs"]  # `ray job logs SUBMISSION_ID`
    assert "joining Ray cluster" in text  # the driver joined the head instead of starting a cluster
    assert re.search(r"sft\s+1/1 \[#+\]", text), text[-3000:]
    assert re.search(r"grpo\s+2/2 \[#+\] total", text), text[-3000:]  # progress_line shows reward/total as `total`
    assert "held-out planning accuracy" in text and "after SFT + GRPO" in text


def test_run_metrics_reach_the_prometheus_endpoint(head, job):
    """The driver's dashboard sink is wired in: its step counters per stage are on the head.

    Gauges (reward, KL, ...) live as long as the driver process, so after the job only the
    counters remain; tests/test_dashboard.py reads the gauges from a live driver.
    """
    expected = {"sft": 1, "grpo": 2, "eval": 1}  # logged steps per stage (eval: the final one)
    deadline = time.monotonic() + 90
    while True:
        text = read_metrics(head.metrics_url)
        counts = {stage: sample_value(text, "ray_alphadrive_logged_steps_total", run=RUN_NAME, stage=stage) for stage in expected}
        if counts == expected or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert counts == expected, "\n".join(line for line in text.splitlines() if "alphadrive" in line)


def test_secrets_in_the_environment_reach_no_output(head, job):
    """A key in the nodes' environment is in no file of the run, no job log line and no metric."""
    # the jobs of this cluster do see the key (so the checks below can fail): its hash, not the key
    probe = head.ray(
        "job", "submit", "--", "python", "-c", "import hashlib, os; print('key', hashlib.sha256(os.environ['OPENAI_API_KEY'].encode()).hexdigest())"
    )
    assert probe.returncode == 0 and f"key {hashlib.sha256(SECRET.encode()).hexdigest()}" in probe.stdout, probe.stdout[-2000:]
    secret = SECRET.encode()
    leaked = [str(p) for p in job["run_dir"].rglob("*") if p.is_file() and secret in p.read_bytes()]
    assert not leaked, f"the secret is written to {leaked}"
    assert SECRET not in job["logs"] and SECRET not in job["submit"].stdout + job["submit"].stderr
    assert SECRET not in read_metrics(head.metrics_url)
