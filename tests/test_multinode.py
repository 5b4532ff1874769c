"""Several nodes, simulated on this machine with `ray.cluster_utils.Cluster` (3 nodes of 3 CPUs).

- rollout workers placed with SPREAD land on different nodes;
- a weight sync crosses nodes: after it, every engine holds the learner's weights bit for bit;
- the tiny end-to-end run passes on the cluster (the CLI joins it through RAY_ADDRESS).

The cluster runs in its own process with its own RAY_TMPDIR, so that neither this test
process (which may hold another Ray cluster) nor any other `ray.init()` on the machine
finds it; drivers join it through RAY_ADDRESS.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import TEST_PROMPT
from tests.test_job_submit import tiny_overrides

REPO = Path(__file__).resolve().parent.parent
NODES = 3

pytestmark = pytest.mark.slow  # three raylets, learner and engines, then a whole tiny run: minutes on 2 cores

HOST = """
import json, sys
from ray.cluster_utils import Cluster

# each node is told apart by a custom resource, as node pools are
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "resources": {"pool_0": 1}, "include_dashboard": False})
for i in range(1, int(sys.argv[1])):
    cluster.add_node(num_cpus=3, resources={f"pool_{i}": 1})
cluster.wait_for_nodes()
print(json.dumps({"address": cluster.address}), flush=True)
sys.stdin.read()  # until the test closes stdin
cluster.shutdown()
"""


@pytest.fixture(scope="module")
def cluster():
    temp_dir = tempfile.mkdtemp(prefix="adr-mn-", dir="/tmp")  # short: unix socket paths live under it
    env = {**os.environ, "RAY_TMPDIR": temp_dir}
    env.pop("RAY_ADDRESS", None)
    host = subprocess.Popen(
        [sys.executable, "-c", HOST, str(NODES)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        line = host.stdout.readline()
        assert line, "the simulated cluster did not start"
        yield json.loads(line)["address"]
    finally:
        host.stdin.close()
        try:
            host.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(host.pid, signal.SIGKILL)  # its own session: only the processes it started
            host.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def run_driver(code: str, address: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": address, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, *(["-c", code] if code else []), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )


# A driver: 1 learner, 2 rollout workers placed with SPREAD, one SFT step with a large learning
# rate, then a sync through the object store; prints what it saw as JSON.
SPREAD_AND_SYNC = """
import json, sys
import ray, torch
from ray.util.placement_group import placement_group_table
from alphadrive_ray.actions import format_completion
from alphadrive_ray.data.records import load_records
from alphadrive_ray.data.synth import generate_dataset
from alphadrive_ray.workers.group import LearnerGroup, Resources, RolloutGroup
from alphadrive_ray.workers.learner import LearnerSpec, SFTExample
from alphadrive_ray.workers.rollout import RolloutSpec

model, scratch, prompt = sys.argv[1:4]
ray.init()  # RAY_ADDRESS
records = load_records(generate_dataset(scratch, 8, seed=3, size=96)[0])
spec = LearnerSpec(model_path=model, prompt_template=prompt, zero_stage=2, backend="gloo", cpus=1, seed=0)
learners = LearnerGroup.start(spec, 1, Resources(cpus=1))
rollout = RolloutGroup.start(RolloutSpec(model_path=model, prompt_template=prompt, batch_size=8), 2, Resources(cpus=1), placement="SPREAD")
learners.begin_stage("sft")
learners.sft_step([SFTExample(r, format_completion(r.reasoning, r.speed_action, r.path_action)) for r in records[:4]], 4, 1e-2)
learner_state = learners.state_dict_cpu()

def same_as_learner(actor):
    engine = ray.get(actor.get_weights.remote())
    return all(torch.equal(engine[name], tensor) for name, tensor in learner_state.items())

before = [same_as_learner(a) for a in rollout.actors]
bucket_refs = learners.export_weights(bucket_mb=1)  # small buckets: several objects to move
versions = ray.get([a.load_weights.remote(bucket_refs, 1) for a in rollout.actors])
print(json.dumps({
    "nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
    "learner_node": placement_group_table(learners.pg)["bundles_to_node_id"][0],
    "rollout_nodes": ray.get([a.node_id.remote() for a in rollout.actors]),
    "buckets": len(bucket_refs),
    "same_before": before,
    "same_after": [same_as_learner(a) for a in rollout.actors],
    "engine_versions": ray.get([a.weight_version.remote() for a in rollout.actors]),
}))
"""


@pytest.fixture(scope="module")
def spread_and_sync(cluster, tiny_vl_dir, tmp_path_factory):
    proc = run_driver(SPREAD_AND_SYNC, cluster, tiny_vl_dir, str(tmp_path_factory.mktemp("scenes")), TEST_PROMPT)
    assert proc.returncode == 0, f"STDOUT\n{proc.stdout[-4000:]}\nSTDERR\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_cluster_has_several_nodes(spread_and_sync):
    assert len(spread_and_sync["nodes"]) == NODES


def test_rollout_workers_spread_across_nodes(spread_and_sync):
    nodes = spread_and_sync["rollout_nodes"]
    assert len(set(nodes)) == 2 and set(nodes) <= set(spread_and_sync["nodes"])


def test_weight_sync_crosses_nodes(spread_and_sync):
    s = spread_and_sync
    # at least one engine is on another node than the learner that published the buckets
    assert set(s["rollout_nodes"]) - {s["learner_node"]}
    assert s["buckets"] > 1
    assert s["same_before"] == [False, False]  # the SFT step moved the learner away from the engines
    assert s["same_after"] == [True, True]  # every engine now holds the learner's weights, bit for bit
    assert s["engine_versions"] == [1, 1]


def test_tiny_run_passes_on_the_cluster(cluster, tiny_vl_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("multinode-run")
    overrides = [o for o in tiny_overrides(work, tiny_vl_dir) if not o.startswith("run.name=")]
    overrides += ["run.name=multinode", "rollout.placement=SPREAD", "reward.placement=SPREAD"]
    args = ["-m", "alphadrive_ray.train", str(REPO / "jobs" / "quickstart_cpu.yaml")]
    for item in overrides:
        args += ["--set", item]
    proc = run_driver("", cluster, *args)
    assert proc.returncode == 0, f"STDOUT\n{proc.stdout[-6000:]}\nSTDERR\n{proc.stderr[-6000:]}"
    assert f"joining Ray cluster at {cluster}" in proc.stdout  # it joined, it did not start its own
    summary = json.loads((work / "runs" / "multinode" / "summary.json").read_text())
    assert summary["grpo_steps"] == 2 and summary["sft_steps"] == 1 and "final" in summary["accuracy"]
    assert (work / "runs" / "multinode" / "export" / "config.json").is_file()
