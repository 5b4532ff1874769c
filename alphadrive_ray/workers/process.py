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
    """Mixed into the worker actor classes: `pid` and `peak_rss_mb` of the actor's process."""

    def pid(self) -> int:
        return os.getpid()

    def peak_rss_mb(self) -> float:
        """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
