"""What every worker actor reports about its own process (fault tests, the run summary)."""

from __future__ import annotations

import os
import resource
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from alphadrive_ray.config import Config


def policy_fields(c: Config) -> dict[str, Any]:
    """The spec fields of every worker that loads the policy and encodes prompts (learners and
    rollout engines alike): the model, its prompt and its image handling, from the config."""
    return dict(
        model_path=c.model.path,
        dtype=c.model.dtype,
        attn_implementation=c.model.attn_implementation,
        prompt_template=c.data.prompt_template,
        image_cache_mb=c.data.image_cache_mb if c.data.image_cache else 0,
        min_pixels=c.data.min_pixels,
        max_pixels=c.data.max_pixels,
    )


class ProcessInfo:
    """Mixed into the worker actor classes: `pid`, `peak_rss_mb` and `peak_gpu_mb` of the actor's process."""

    def pid(self) -> int:
        return os.getpid()

    def peak_rss_mb(self) -> float:
        """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def peak_gpu_mb(self) -> float:
        """Peak GPU memory this process allocated through torch, on the busiest of its GPUs (0
        without CUDA, or when the process never used it). A vLLM engine allocates in its own
        engine process, so a vLLM rollout worker reports about 0 here."""
        import torch

        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return 0.0
        return max(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count())) / 2**20
