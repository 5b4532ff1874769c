"""Learning-rate schedules and the deterministic data order, as small pure pieces."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Generic, Sequence, TypeVar

T = TypeVar("T")


def cosine_lr(step: int, total_steps: int, peak: float, warmup_ratio: float = 0.0, floor: float = 0.0) -> float:
    """Linear warm-up to `peak`, then cosine decay to `floor` (the release's SFT schedule). `step` is 0-based."""
    warmup = int(total_steps * warmup_ratio)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def constant_lr(step: int, peak: float, warmup_steps: int = 0) -> float:
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return peak


@dataclass
class SamplerState:
    epoch: int = 0
    position: int = 0


class EpochSampler(Generic[T]):
    """Visits items in a seeded random order, epoch after epoch; its state resumes it exactly."""

    def __init__(self, items: Sequence[T], seed: int, state: SamplerState | None = None):
        if not items:
            raise ValueError("EpochSampler needs at least one item")
        self.items = list(items)
        self.seed = seed
        self.state = state or SamplerState()
        self._order = self._order_of(self.state.epoch)

    def _order_of(self, epoch: int) -> list[int]:
        order = list(range(len(self.items)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[T]:
        return [item for _, item in self.take_tagged(n)]

    def take_tagged(self, n: int) -> list[tuple[int, T]]:
        """The next `n` items, each with the epoch it belongs to."""
        out: list[tuple[int, T]] = []
        while len(out) < n:
            if self.state.position >= len(self.items):
                self.state = SamplerState(self.state.epoch + 1, 0)
                self._order = self._order_of(self.state.epoch)
            out.append((self.state.epoch, self.items[self._order[self.state.position]]))
            self.state.position += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.state.epoch, "position": self.state.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.state = SamplerState(int(state["epoch"]), int(state["position"]))
        self._order = self._order_of(self.state.epoch)
