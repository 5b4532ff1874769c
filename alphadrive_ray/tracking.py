"""Metrics of a run: one JSONL line per step, TensorBoard scalars, and progress lines.

Keys are namespaced (`rollout/`, `reward/`, `loss/`, `perf/`, `eval/`); the stage and
step are recorded with every line so `metrics.jsonl` alone tells the story of a run.
Sinks receive every logged dict too: the Ray dashboard's gauges (dashboard.py) and, with
`tracking.wandb.mode` offline or online, Weights & Biases (`WandbSink`).
"""

from __future__ import annotations

import json
import math
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping, cast

if TYPE_CHECKING:
    from alphadrive_ray.config import WandbConfig


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
        for sink in self._sinks:
            if hasattr(sink, "close"):
                sink.close()


class WandbSink:
    """A `Tracker` sink that logs every step to Weights & Biases.

    Keys are `<stage>/<key>` as in TensorBoard (`grpo/reward/total`), each stage plotted
    against its own step (`grpo/step`), since SFT, GRPO and evaluation count steps apart.
    The run lives in `run_dir/wandb` (offline: only there, until `wandb sync`); its config is
    the resolved config, which validation keeps free of secrets. The API key is wandb's own
    business (`wandb login` or WANDB_API_KEY): nothing here reads, prints or stores it.
    Console capture and system metrics are off: the driver's output stays as it is.

        tracker.add_sink(WandbSink(run_dir, config.tracking.wandb, config.run.name, config.to_dict()))
    """

    def __init__(self, run_dir: str | Path, wandb_config: WandbConfig, run_name: str, config_dict: Mapping[str, Any], resume: bool = False):
        try:
            import wandb
        except ImportError:
            from alphadrive_ray.errors import UserError

            raise UserError(
                f"tracking.wandb.mode is {wandb_config.mode!r} but wandb is not installed: "
                "pip install 'alphadrive-ray[wandb]' (or set tracking.wandb.mode: disabled)"
            ) from None
        run_dir = Path(run_dir)
        id_file = run_dir / "wandb" / "run-id"
        id_file.parent.mkdir(parents=True, exist_ok=True)
        # a resumed training run continues the same W&B run
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            project=wandb_config.project,
            name=wandb_config.name or run_name,
            mode=cast(Literal["disabled", "offline", "online"], wandb_config.mode),  # the values the config's check allows
            dir=str(run_dir),
            id=run_id,
            resume="allow" if resume else None,
            config=dict(config_dict),
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )
        self._stages: set[str] = set()

    def __call__(self, stage: str, step: int, metrics: Mapping[str, float]) -> None:
        if stage not in self._stages:
            self.run.define_metric(f"{stage}/step")
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
            self._stages.add(stage)
        self.run.log({f"{stage}/step": step, **{f"{stage}/{key}": value for key, value in metrics.items()}})

    @property
    def folder(self) -> str:
        """Where the run's files are (offline: what `wandb sync` takes)."""
        return str(Path(self.run.dir).parent)

    def close(self) -> None:
        self.run.finish()


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
