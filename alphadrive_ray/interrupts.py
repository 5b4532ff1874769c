"""Ctrl-C that cannot be lost.

Python raises KeyboardInterrupt wherever the main thread happens to be when SIGINT arrives.
Raised inside a `__del__` method or a garbage-collector callback, it is printed as
"Exception ignored in ..." and dropped, and the program runs on. In one CI run, a training
run and a distillation run each ignored a Ctrl-C (both passed when rerun); a dropped
KeyboardInterrupt is the likely cause, not a proven one. While a command runs
(`alphadrive_ray.cli.main`), `caught()` keeps the usual behaviour and also records the
signal. Long loops call `check()` between steps, and it raises KeyboardInterrupt again if
the first one was lost.

asyncio's runner installs its own SIGINT handler only when it finds Python's default
handler. Under `caught()` it does not, so an `asyncio.run` sees the KeyboardInterrupt
itself: it cancels the remaining tasks, waits for them, and raises it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

_received = threading.Event()


def _on_sigint(signum, frame) -> None:
    _received.set()
    raise KeyboardInterrupt


@contextlib.contextmanager
def caught() -> Iterator[None]:
    """Record Ctrl-C for `check()` while the block runs (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()
    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _received.clear()


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C arrived under `caught()` (again, if the first was lost)."""
    if _received.is_set():
        raise KeyboardInterrupt
