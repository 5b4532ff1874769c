"""Run metrics in the Ray dashboard and Prometheus, through `ray.util.metrics`.

The driver logs every step through `Tracker.log(stage, step, metrics)`; `RayMetricsSink`
is a tracker sink that turns every key into a gauge of the same name, tagged with the run
name and the stage (`sft`, `grpo`, `eval`), so that the dashboard's Metrics view, Grafana
or any Prometheus that scrapes the cluster follows a run live:

    reward/accuracy      -> alphadrive_reward_accuracy      (Prometheus: ray_alphadrive_reward_accuracy)
    perf/samples_per_s   -> alphadrive_perf_samples_per_s
    loss/kl              -> alphadrive_loss_kl

`alphadrive_step` holds the step last logged and the counter `alphadrive_logged_steps`
counts logged steps (Prometheus: `ray_alphadrive_logged_steps_total`). Ray exports
application metrics from each node's metrics agent (`ray start --metrics-export-port`),
with a `ray_` prefix. Values are numbers and the only tags are the run name and the stage:
nothing else from the config or the environment reaches a metric.

    tracker.add_sink(RayMetricsSink(config.run.name))   # in alphadrive_ray.train.trainer.train
"""

from __future__ import annotations

import re
from typing import Any, Mapping

PREFIX = "alphadrive_"
TAG_KEYS = ("run", "stage")
# Prometheus metric names: [a-zA-Z_:][a-zA-Z0-9_:]*; Ray also warns on `:`, so `_` only
_NOT_ALLOWED = re.compile(r"[^a-zA-Z0-9_]+")


def metric_name(key: str) -> str:
    """`perf/samples_per_s` -> `alphadrive_perf_samples_per_s`, a valid Prometheus name."""
    body = _NOT_ALLOWED.sub("_", key).strip("_").lower()
    if not body:
        raise ValueError(f"metric key {key!r} has no letter or digit to name a metric after")
    return PREFIX + body


class RayMetricsSink:
    """A `Tracker` sink: the latest value of every logged key as a Ray gauge.

    Create it after `ray.init` (the trainer does, right after `connect_ray`); gauges are
    created on first use, so new metric keys need no change here.
    """

    def __init__(self, run_name: str):
        from ray.util.metrics import Counter, Gauge

        self.run_name = run_name
        self._gauge_cls = Gauge
        self._gauges: dict[str, Any] = {}
        self._step = Gauge(PREFIX + "step", description="Step last logged, per stage", tag_keys=TAG_KEYS)
        self._logged = Counter(PREFIX + "logged_steps", description="Steps logged, per stage", tag_keys=TAG_KEYS)

    def __call__(self, stage: str, step: int, metrics: Mapping[str, float]) -> None:
        tags = {"run": self.run_name, "stage": stage}
        self._step.set(float(step), tags=tags)
        self._logged.inc(1.0, tags=tags)
        for key, value in metrics.items():
            self._gauge(key).set(float(value), tags=tags)

    def _gauge(self, key: str):
        name = metric_name(key)
        gauge = self._gauges.get(name)
        if gauge is None:
            gauge = self._gauges[name] = self._gauge_cls(name, description=f"`{key}` as logged by the driver", tag_keys=TAG_KEYS)
        return gauge
