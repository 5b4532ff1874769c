"""Resumable checkpoints of a run: written atomically, kept with retention.

Layout under `run_dir/checkpoints/`:

    sft-000375/            one checkpoint (stage, step)
        learner/           DeepSpeed model + optimizer states of every rank
        trainer.json       stage, step, weight version, data positions, results so far
    grpo-000020/
    latest                 the name of the newest complete checkpoint
    reference.safetensors  the GRPO reference policy (when grpo.beta > 0)

A checkpoint is written into a temporary folder and renamed into place only when every
part is on disk; `latest` is replaced atomically after that. A crash mid-write leaves a
`tmp-*` folder that is ignored (and removed by the next save), never a broken `latest`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from alphadrive_ray.errors import UserError

LATEST = "latest"
STAGES = ("sft", "grpo")  # in run order: a GRPO checkpoint is newer than every SFT one


@dataclass
class TrainerState:
    stage: str  # "sft" | "grpo"
    step: int  # steps finished in that stage
    version: int  # weight version the engines hold
    samplers: dict[str, dict[str, int]]  # name -> {"epoch", "position"}
    accuracy: dict[str, float]  # evaluations so far (untrained, sft)
    # NOTE: no driver RNG state: the driver draws from no global RNG (data order comes from
    # seeded EpochSamplers, sampling from per-step seeds); each learner rank saves and
    # restores its own torch RNG with its DeepSpeed state (LearnerWorker.save_state).

    def to_json(self) -> dict:
        return self.__dict__.copy()


def checkpoint_name(stage: str, step: int) -> str:
    return f"{stage}-{step:06d}"


def checkpoint_order(name: str) -> tuple[int, int] | None:
    """Where a checkpoint folder stands in the run: (stage index, step); None for other names.

    Age is decided by this, never by file times (a copied or restored run folder keeps its order).
    """
    stage, sep, step = name.partition("-")
    if not sep or stage not in STAGES or not step.isdigit():
        return None
    return STAGES.index(stage), int(step)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep: int = 2):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    def begin(self, stage: str, step: int) -> Path:
        """A fresh temporary folder for a checkpoint (earlier unfinished ones are removed)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob("tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.root / f"tmp-{checkpoint_name(stage, step)}"
        tmp.mkdir()
        return tmp

    def commit(self, tmp: Path, state: TrainerState) -> Path:
        """Finish a checkpoint: trainer state, rename into place, point `latest` at it, prune."""
        _write_atomic(tmp / "trainer.json", json.dumps(state.to_json(), indent=2) + "\n")
        final = self.root / checkpoint_name(state.stage, state.step)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(self.root / LATEST, final.name + "\n")
        self._prune(final.name)
        return final

    def _prune(self, newest: str) -> None:
        done = sorted(
            (p for p in self.root.iterdir() if p.is_dir() and checkpoint_order(p.name) and (p / "trainer.json").exists()),
            key=lambda p: cast(tuple[int, int], checkpoint_order(p.name)),  # not None: filtered above
        )
        for old in done[: max(0, len(done) - self.keep)]:
            if old.name != newest:
                shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        if not (path / "trainer.json").is_file():
            raise UserError(f"{pointer} names {path.name}, which is missing or incomplete; delete {pointer} to start over")
        return path

    def load_state(self, path: Path) -> TrainerState:
        data = json.loads((path / "trainer.json").read_text())
        data.pop("rng", None)  # written by earlier versions, never needed to resume
        return TrainerState(**data)

    @property
    def reference_path(self) -> Path:
        return self.root / "reference.safetensors"

    def check_resumable(self, beta: float) -> None:
        """Refuse to resume a GRPO checkpoint with a KL term whose reference file is gone.

        The reference is the policy as GRPO started; it is saved once, when GRPO starts. A
        learner that rebuilt it on resume would snapshot the weights at `model.path` (they are
        loaded before the checkpoint), a different model, and train against it silently.
        """
        path = self.latest()
        if path is None or beta <= 0:
            return
        state = self.load_state(path)
        if state.stage == "grpo" and not self.reference_path.is_file():
            raise UserError(
                f"--resume: {self.reference_path} is missing, so the KL reference of {path.name} (the policy as GRPO "
                f"started) cannot be restored. Put the file back, rerun without --resume, or set grpo.beta: 0 to "
                f"continue without the KL term"
            )
