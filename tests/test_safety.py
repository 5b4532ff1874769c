"""Safety: a local cluster's dashboard stays on 127.0.0.1, configs never hold secrets, and
nothing is loaded in a way that runs code from a file (torch.load without weights_only, pickle,
remote code of model folders).

The end-to-end half (a key in the cluster's environment reaches no run file, job log line or
metric) is in tests/test_job_submit.py.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from alphadrive_ray.config import ConfigError, RayConfig, load_config

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "alphadrive_ray"

# Starts a local cluster the way `alphadrive-ray train` does, then reports where its dashboard listens.
LOCAL_CLUSTER = """
import json, psutil, ray
from alphadrive_ray.config import load_config
from alphadrive_ray.train.trainer import connect_ray

connect_ray(load_config(None, ["ray.num_cpus=1"]), say=lambda text: None)
url = ray._private.worker.get_dashboard_url()
port = int(url.rsplit(":", 1)[1])
hosts = sorted({c.laddr.ip for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.laddr.port == port})
print(json.dumps({"url": url, "hosts": hosts}))
ray.shutdown()
"""


def test_local_cluster_dashboard_listens_on_loopback_only():
    assert RayConfig().dashboard_host == "127.0.0.1"
    # own temp dir: a bare ray.init() would otherwise join the latest `ray start` cluster of the machine
    with tempfile.TemporaryDirectory(prefix="adr-safe-", dir="/tmp") as temp_dir:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_TMPDIR"] = temp_dir
        proc = subprocess.run([sys.executable, "-c", LOCAL_CLUSTER], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["url"].startswith("127.0.0.1:")
    assert seen["hosts"] == ["127.0.0.1"], seen  # not 0.0.0.0, not the machine's address


# (override, the field the error names)
SECRET_CASES = [
    ("ray.address=ray://alice:hunter2-SECRET@head:10001", "ray.address"),  # user:password in a URL
    ("data.train=https://ghp_SECRETtoken@example.com/train.jsonl", "data.train"),  # a token as the user
    ("model.path=s3://AKIA:SECRET@bucket/qwen", "model.path"),
]


@pytest.mark.parametrize("override,key", SECRET_CASES)
def test_credentials_in_a_config_are_refused_without_echoing_them(override, key):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    message = str(error.value)
    assert key in message and "environment" in message
    assert "SECRET" not in message and "hunter2" not in message


@pytest.mark.parametrize(
    "override", ["ray.address=ray://head:10001", "ray.address=10.0.0.1:6379", "ray.address=auto", "data.train=/data/a@b/train.jsonl"]
)
def test_addresses_without_credentials_are_fine(override):
    load_config(None, [override])


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            yield owner, name, {k.arg: k.value for k in node.keywords}, node


def package_sources():
    return sorted(PACKAGE.rglob("*.py"))


def test_every_torch_load_is_weights_only():
    """torch.load unpickles; only `weights_only=True` keeps a checkpoint file from running code."""
    offenders = []
    for path in package_sources():
        for owner, name, keywords, node in calls(ast.parse(path.read_text())):
            if (owner, name) == ("torch", "load"):
                value = keywords.get("weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, f"torch.load without weights_only=True: {offenders}"


def test_nothing_unpickles_files_or_runs_model_code():
    offenders = []
    for path in package_sources():
        for owner, name, keywords, node in calls(ast.parse(path.read_text())):
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            if owner in ("pickle", "cloudpickle", "dill", "joblib") and name in ("load", "loads"):
                offenders.append(f"{where} {owner}.{name}")
            for key, unsafe in (("trust_remote_code", True), ("weights_only", False), ("use_safetensors", False)):
                value = keywords.get(key)
                if isinstance(value, ast.Constant) and value.value is unsafe:
                    offenders.append(f"{where} {key}={unsafe}")
    assert not offenders, offenders


def test_models_are_written_as_safetensors(tiny_vl_dir):
    """What we write (the tiny model; exports use the same save_pretrained) loads without unpickling."""
    files = {p.name for p in Path(tiny_vl_dir).iterdir()}
    assert "model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
