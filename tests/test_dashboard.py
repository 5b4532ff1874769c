"""alphadrive_ray.dashboard: run metrics as Ray gauges, read back from a head's Prometheus endpoint."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alphadrive_ray.dashboard import metric_name
from tests.local_head import LocalHead, client_env, read_metrics, sample_value

REPO = Path(__file__).resolve().parent.parent
PROMETHEUS_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")

# (tracker key, metric name)
NAME_CASES = [
    ("reward/accuracy", "alphadrive_reward_accuracy"),  # namespace/name -> namespace_name
    ("perf/samples_per_s", "alphadrive_perf_samples_per_s"),  # underscores stay
    ("rollout/weight_version_lag", "alphadrive_rollout_weight_version_lag"),
    ("eval/bleu-4", "alphadrive_eval_bleu_4"),  # characters Prometheus refuses become `_`
    ("loss/KL", "alphadrive_loss_kl"),  # lower case
    ("4xx/errors", "alphadrive_4xx_errors"),  # a leading digit is fine after the prefix
    ("/reward//total/", "alphadrive_reward_total"),  # no leading, trailing or repeated separators
]


@pytest.mark.parametrize("key,name", NAME_CASES)
def test_metric_names(key, name):
    assert metric_name(key) == name and PROMETHEUS_NAME.match(name)


def test_a_key_without_letters_is_refused():
    with pytest.raises(ValueError, match="no letter or digit"):
        metric_name("//")


# A driver that logs through a Tracker with the sink, then stays connected (gauges live as long
# as the process that set them) until the test closes its stdin.
DRIVER = """
import sys
import ray
from alphadrive_ray.dashboard import RayMetricsSink
from alphadrive_ray.tracking import Tracker

ray.init(address=sys.argv[1])
tracker = Tracker(sys.argv[2], tensorboard=False)
tracker.add_sink(RayMetricsSink("unit-run"))
tracker.log("sft", 7, {"loss/sft": 2.5})
for step in (1, 2, 3):
    tracker.log("grpo", step, {
        "reward/total": 0.5 * step, "reward/format": 1.0, "loss/kl": 0.01 * step, "loss/clip_frac": 0.0,
        "perf/samples_per_s": 100.0 + step, "perf/sync_s": 0.25, "rollout/weight_version_lag": 0,
        "loss/policy": float("nan"),  # not finite: the tracker drops it, so no sample either
    })
print("logged", flush=True)
sys.stdin.read()
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The Prometheus text of a head while a driver holds the logged metrics."""
    with LocalHead(num_cpus=1) as head:
        driver = subprocess.Popen(
            [sys.executable, "-c", DRIVER, f"127.0.0.1:{head.gcs_port}", str(tmp_path_factory.mktemp("tracker"))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=client_env(),
        )
        try:
            assert driver.stdout.readline().strip() == "logged", driver.stderr.read()
            # the metrics agent exports what the driver recorded every few seconds
            deadline = time.monotonic() + 90
            while True:
                text = read_metrics(head.metrics_url)
                if sample_value(text, "ray_alphadrive_perf_sync_s", run="unit-run", stage="grpo") is not None:
                    break
                assert time.monotonic() < deadline, "no alphadrive metric on the endpoint after 90s"
                time.sleep(2)
            yield text
        finally:
            driver.stdin.close()
            driver.wait(timeout=60)


def test_latest_values_per_stage(exported):
    grpo = {"run": "unit-run", "stage": "grpo"}
    assert sample_value(exported, "ray_alphadrive_reward_total", **grpo) == 1.5  # step 3's value
    assert sample_value(exported, "ray_alphadrive_loss_kl", **grpo) == pytest.approx(0.03)
    assert sample_value(exported, "ray_alphadrive_perf_samples_per_s", **grpo) == 103.0
    assert sample_value(exported, "ray_alphadrive_rollout_weight_version_lag", **grpo) == 0.0
    assert sample_value(exported, "ray_alphadrive_step", **grpo) == 3.0
    assert sample_value(exported, "ray_alphadrive_logged_steps_total", **grpo) == 3.0
    sft = {"run": "unit-run", "stage": "sft"}
    assert sample_value(exported, "ray_alphadrive_step", **sft) == 7.0
    assert sample_value(exported, "ray_alphadrive_loss_sft", **sft) == 2.5
    assert sample_value(exported, "ray_alphadrive_loss_sft", **grpo) is None  # logged only in sft


def test_non_finite_values_are_not_exported(exported):
    assert "ray_alphadrive_loss_policy" not in exported


def test_only_the_run_and_stage_tag_the_series(exported):
    ray_labels = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId", "JobId"}
    for line in exported.splitlines():
        if line.startswith("ray_alphadrive_"):
            labels = set(re.findall(r'(\w+)="', line.split("{", 1)[1].rsplit("}", 1)[0]))
            ours = {label for label in labels if label not in ray_labels and not label.startswith("otel_")}
            assert ours == {"run", "stage"}, line
