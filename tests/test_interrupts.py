"""A Ctrl-C swallowed where Python drops exceptions (a `__del__`) still stops the command."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from alphadrive_ray import interrupts


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped one, on purpose
def test_a_lost_ctrl_c_is_raised_again_at_the_next_check():
    before = signal.getsignal(signal.SIGINT)
    with interrupts.caught():
        interrupts.check()  # nothing yet

        class Finalised:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGINT)  # the KeyboardInterrupt is raised here ...

        Finalised()  # ... and dropped: "Exception ignored in ... __del__"
        gc.collect()
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
    assert signal.getsignal(signal.SIGINT) is before
    interrupts.check()  # outside the block: cleared


def test_ctrl_c_still_raises_where_it_lands():
    with interrupts.caught():
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(10**6):  # the handler runs between bytecodes
                pass


def test_asyncio_run_under_the_handler_cancels_its_tasks_and_raises():
    """`distill run` shape: workers awaiting slow I/O, Ctrl-C, KeyboardInterrupt out of asyncio.run, no traceback."""
    script = textwrap.dedent(
        """
        import asyncio, os, signal, sys
        from alphadrive_ray import interrupts

        cleaned = []

        async def worker():
            while True:
                interrupts.check()
                try:
                    await asyncio.sleep(30)
                finally:
                    cleaned.append(1)

        async def main():
            loop = asyncio.get_running_loop()
            loop.call_later(0.2, os.kill, os.getpid(), signal.SIGINT)
            await asyncio.gather(worker(), worker())

        with interrupts.caught():
            try:
                asyncio.run(main())
            except KeyboardInterrupt:
                print("interrupted", len(cleaned))
                sys.exit(130)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130, proc.stderr
    assert proc.stdout.strip() == "interrupted 2"  # both workers ran their clean-up
    assert "Traceback" not in proc.stderr
