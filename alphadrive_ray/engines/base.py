"""The rollout-engine interface every engine (HF on CPU/GPU, vLLM on GPU) implements.

An engine turns planning prompts into groups of sampled completions with token ids and
per-token log-probs under the sampling distribution, and loads new weights tagged with a
version number. Everything above it (workers, driver, tests) sees only this interface.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Protocol, Sequence

from alphadrive_ray.data.records import Record


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    """Completions per prompt (the GRPO group size)."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    greedy: bool = False
    """Arg-max decoding (evaluation); temperature and top_p are ignored."""
    seed: int = 0


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    logprobs: list[float]  # one per token, under the sampling distribution
    finish_reason: str  # "stop" (end-of-turn token) or "length"
    weight_version: int


@dataclass
class Group:
    """The completions of one prompt; never split across workers."""

    record: Record
    completions: list[Completion] = field(default_factory=list)


@dataclass(frozen=True)
class TensorMeta:
    """One tensor of a weight-sync bucket: where it sits in the bucket's bytes."""

    name: str
    dtype: str  # torch dtype name, e.g. "float32"
    shape: tuple[int, ...]
    offset: int
    nbytes: int


class RolloutEngine(Protocol):
    weight_version: int

    def generate(self, records: Sequence[Record], params: SamplingParams) -> list[Group]:
        """`params.n` completions for each record, in the order of `records`."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, "object"]], version: int) -> int:
        """Copy the given tensors into the model; returns how many were loaded."""
        ...

    def parameter_names(self) -> list[str]: ...
