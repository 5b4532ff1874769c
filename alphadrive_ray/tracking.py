"""Metrics of a run: one JSONL line per step, TensorBoard scalars, and progress lines.

Keys are namespaced (`rollout/`, `reward/`, `loss/`, `perf/`, `eval/`); the stage and
step are recorded with every line so `metrics.jsonl` alone tells the story of a run.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping


class Tracker:
    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True, stream=sys.stdout):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        self.stream = stream
        self.started = time.monotonic()
        self._sinks: list = []

    def add_sink(self, sink) -> None:
        """Another receiver of every logged dict (e.g. Ray dashboard metrics)."""
        self._sinks.append(sink)

    def log(self, stage: str, step: int, metrics: Mapping[str, Any]) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}
        line = {"stage": stage, "step": step, "time_s": round(time.monotonic() - self.started, 3), **clean}
        self._jsonl.write(json.dumps(line) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in clean.items():
                self._tb.add_scalar(f"{stage}/{key}", value, step)
        for sink in self._sinks:
            sink(stage, step, clean)

    def say(self, text: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[{elapsed:7.1f}s] {text}", file=self.stream, flush=True)

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def progress_line(
    stage: str, step: int, total: int, metrics: Mapping[str, float], keys: tuple[str, ...], started: float, done_here: int | None = None
) -> str:
    """`grpo  12/100 [####......] total 1.93 ... | eta 3m05s`; `done_here`: steps run since `started` (after a resume)."""
    width = 20
    done = int(width * step / max(total, 1))
    elapsed = time.monotonic() - started
    eta = elapsed / max(done_here if done_here is not None else step, 1) * (total - step)
    shown = " ".join(f"{k.split('/', 1)[-1]} {metrics[k]:.3g}" for k in keys if k in metrics)
    return f"{stage:4s} {step:>4d}/{total} [{'#' * done}{'.' * (width - done)}] {shown} | eta {int(eta // 60)}m{int(eta % 60):02d}s"
