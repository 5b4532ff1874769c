"""A Ray head on this machine for tests, started the way users start one: `ray start --head`.

It is isolated from every other Ray cluster on the machine (other tests and sessions run their
own): its own temp dir (sessions, sockets and the `ray_current_cluster` address file that a
bare `ray.init()` would follow), a free port for every service (another cluster may hold the
defaults 6379, 8265, 52365, 10001), and the dashboard on 127.0.0.1. It runs as
`ray start --head --block` in its own session and is stopped by signalling that process,
which takes its own Ray processes down.
NOTE: never `ray stop` here: it stops every Ray process on the machine, other clusters too.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

VENV_BIN = str(Path(sys.executable).parent)
# NOTE: one token for every head and client of the test session, passed in the environment.
# `ray start --head` (Ray 2.60) turns token authentication on only when a token already exists
# (~/.ray/auth_token, which the first local `ray.init()` of a machine writes): on a fresh
# machine, a head started before any `ray.init()` ran without authentication while its
# clients asked for it, and failed.
AUTH_TOKEN = secrets.token_hex(32)


def free_ports(n: int) -> list[int]:
    """n distinct TCP ports that were free a moment ago."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def client_env(**extra: str) -> dict[str, str]:
    """Environment of Ray clients (`ray job submit`, drivers): the venv first on PATH, token auth."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    # token authentication, with the session's token (see AUTH_TOKEN)
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = AUTH_TOKEN
    env.update(extra)
    return env


class LocalHead:
    """`ray start --head` on loopback ports; `stop()` (or the context manager) takes it down."""

    def __init__(self, num_cpus: int = 6, env: dict[str, str] | None = None):
        self.num_cpus = num_cpus
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self._new_place()

    def _new_place(self) -> None:
        """Fresh ports and a fresh temp dir (a failed start leaves neither usable)."""
        # short: Ray's unix socket paths live under it (108 bytes at most)
        self.temp_dir = tempfile.mkdtemp(prefix="adr-head-", dir="/tmp")
        (self.gcs_port, self.dashboard_port, self.agent_port, self.agent_grpc_port, self.client_port, self.metrics_port, self.runtime_env_port) = (
            free_ports(7)
        )
        self.log_path = Path(self.temp_dir) / "head.log"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self, timeout_s: float = 180.0) -> "LocalHead":
        try:
            return self._start(timeout_s)
        except RuntimeError as exc:
            # Ray's own 30 s startup deadline can pass on a loaded 2-core machine; try once more
            # on fresh ports and a fresh temp dir, and fail on anything else
            if "timed out during startup" not in str(exc):
                raise
            self._new_place()
            return self._start(timeout_s)

    def _start(self, timeout_s: float) -> "LocalHead":
        cmd = [
            os.path.join(VENV_BIN, "ray"),
            "start",
            "--head",
            "--block",
            "--disable-usage-stats",
            f"--num-cpus={self.num_cpus}",
            f"--port={self.gcs_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--dashboard-agent-listen-port={self.agent_port}",
            f"--dashboard-agent-grpc-port={self.agent_grpc_port}",
            f"--ray-client-server-port={self.client_port}",
            f"--metrics-export-port={self.metrics_port}",
            f"--runtime-env-agent-port={self.runtime_env_port}",
            f"--temp-dir={self.temp_dir}",
        ]
        # the venv first on PATH: job entrypoints resolve `python` through the head's PATH
        env = client_env(**self.extra_env)  # token authentication on, with the session's token
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            if "block forever" in text:
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        log_text = self.log_path.read_text(errors="replace")
        self.stop()
        raise RuntimeError(f"`ray start --head` did not come up:\n{log_text[-4000:]}")

    def ray(self, *args: str, timeout: float = 120.0, env: dict[str, str] | None = None, cwd: str | None = None):
        """Run the `ray` CLI against this head (jobs API on the dashboard port)."""
        return subprocess.run(
            [os.path.join(VENV_BIN, "ray"), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            env=client_env(RAY_API_SERVER_ADDRESS=self.dashboard_url, **(env or {})),
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # SIGTERM: `ray start --block` stops its GCS, raylet, dashboard and agents; workers follow
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: only what it started
                self.proc.wait(timeout=30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "LocalHead":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def read_metrics(url: str) -> str:
    """The Prometheus text a node's metrics agent exports."""
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def sample_value(text: str, name: str, **labels: str) -> float | None:
    """The value of the Prometheus sample `name{...labels...}` in `text`, or None."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None
