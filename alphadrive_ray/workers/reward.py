"""A reward worker: scores whole GRPO groups with the planning rewards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from alphadrive_ray.actions import format_answer
from alphadrive_ray.config import Config
from alphadrive_ray.engines.base import Group
from alphadrive_ray.rewards import ABLATION_COMPONENTS
from alphadrive_ray.workers.process import ProcessInfo


@dataclass(frozen=True)
class RewardSpec:
    variant: str = "paper"
    components: tuple[str, ...] = ABLATION_COMPONENTS
    speed_weight: float = 1.0
    path_weight: float = 1.0
    format_weight: float = 1.0
    diversity_cap: float = 0.2

    @classmethod
    def from_config(cls, c: Config) -> RewardSpec:
        """The spec of every reward worker of a run (the one place config keys reach it)."""
        r = c.reward
        return cls(r.variant, r.components, r.speed_weight, r.path_weight, r.format_weight, r.diversity_cap)


def score_groups(groups: Sequence[Group], spec: RewardSpec) -> list[list[dict[str, float]]]:
    """Reward components of every completion, group by group (the diversity reward needs the whole group)."""
    from alphadrive_ray.rewards import score_group

    return [
        score_group(
            [c.text for c in group.completions],
            format_answer(group.record.speed_action, group.record.path_action),
            spec.variant,
            speed_weight=spec.speed_weight,
            path_weight=spec.path_weight,
            format_weight=spec.format_weight,
            diversity_cap=spec.diversity_cap,
            components=spec.components,
        )
        for group in groups
    ]


class RewardWorker(ProcessInfo):
    def __init__(self, spec: RewardSpec, index: int = 0):
        self.spec = spec
        self.index = index

    def score(self, groups: Sequence[Group]) -> list[list[dict[str, float]]]:
        return score_groups(groups, self.spec)

    def ping(self) -> int:
        return self.index
