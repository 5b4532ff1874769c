"""What every worker actor reports about its own process (fault tests, the run summary)."""

from __future__ import annotations

import os
import resource


class ProcessInfo:
    """Mixed into the worker actor classes: `pid` and `peak_rss_mb` of the actor's process."""

    def pid(self) -> int:
        return os.getpid()

    def peak_rss_mb(self) -> float:
        """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
