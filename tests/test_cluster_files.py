"""cluster/: the Ray cluster launcher files pass Ray's own schema and checks, the KubeRay
manifests carry what KubeRay requires, and the GPU jobs fit the node types they declare."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

from alphadrive_ray.config import Config, load_config

REPO = Path(__file__).resolve().parent.parent
LAUNCHER = ["aws.yaml", "gcp.yaml"]
GPU_JOBS = ["qwen2vl_2b.yaml", "qwen2vl_2b_2nodes.yaml"]
IMAGE = re.compile(r"(^|/)alphadrive-ray:gpu$")


def load(name: str) -> dict:
    return yaml.safe_load((REPO / "cluster" / name).read_text())


def dockerfile_ray_version(name: str) -> str:
    match = re.search(r"^ARG RAY_VERSION=(\S+)$", (REPO / "docker" / name).read_text(), re.M)
    assert match, f"docker/{name} has no `ARG RAY_VERSION=`"
    return match.group(1)


# --- fitting the jobs on nodes ---------------------------------------------------------------


def bundles(c: Config) -> list[tuple[str, str, list[dict[str, float]]]]:
    """(role, strategy, bundles) of every placement group a job reserves, in start order."""

    def shape(cpus, gpus):
        return {"CPU": cpus, "GPU": gpus}

    return [
        ("driver", "PACK", [shape(1, 0)]),  # `--entrypoint-num-cpus 1`
        ("learner", c.learner.placement, [shape(c.learner.cpus_per_worker, c.learner.gpus_per_worker)] * c.learner.num_workers),
        ("rollout", c.rollout.placement, [shape(c.rollout.cpus_per_worker, c.rollout.gpus_per_worker)] * c.rollout.num_workers),
        ("reward", c.reward.placement, [shape(c.reward.cpus_per_worker, 0)] * c.reward.num_workers),
    ]


def fits(c: Config, head: dict[str, float], worker: dict[str, float], max_workers: int) -> bool:
    """Can `max_workers` nodes of one worker type (plus the head) hold every bundle of the job?

    First fit in start order; a STRICT_PACK group must land whole on one node.
    """
    nodes = [dict(head)] + [dict(worker) for _ in range(max_workers)]

    def place(node, bundle):
        if all(node.get(k, 0) >= v for k, v in bundle.items()):
            for k, v in bundle.items():
                node[k] = node.get(k, 0) - v
            return True
        return False

    for _, strategy, group in bundles(c):
        if strategy == "STRICT_PACK":
            for node in nodes:
                trial = dict(node)
                if all(place(trial, b) for b in group):
                    node.update(trial)
                    break
            else:
                return False
        else:
            for bundle in group:
                if not any(place(node, bundle) for node in nodes):
                    return False
    return True


def test_fit_can_fail():
    """The fitting check itself: a job that asks for too many GPUs does not fit."""
    c = load_config(REPO / "jobs" / "qwen2vl_2b_2nodes.yaml")
    node = {"CPU": 96, "GPU": 8}
    assert fits(c, {"CPU": 8}, node, 2) and not fits(c, {"CPU": 8}, node, 1)
    assert not fits(c, {"CPU": 8}, {"CPU": 96, "GPU": 4}, 4)  # 8 learners STRICT_PACK on 4-GPU nodes


# --- cluster launcher ------------------------------------------------------------------------


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_file_matches_rays_schema(name):
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(load(name), schema)


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_file_passes_ray_up_checks(name):
    """What `ray up` does before it talks to the cloud: merge the provider defaults, validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(load(name)))
    validate_config(config)
    # our commands, not the provider defaults (which pip-install a nightly Ray on every node)
    assert config["setup_commands"] == [] and config["worker_setup_commands"] == []


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_has_a_cpu_head_and_autoscaling_gpu_workers(name):
    config = load(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] >= 2
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert workers and all(w["resources"]["GPU"] >= 1 for w in workers.values())
    for w in workers.values():
        assert w["min_workers"] == 0 < w["max_workers"] <= config["max_workers"]  # scale from zero
    # one image on every node, the GPU image of docker/
    docker = config["docker"]
    assert IMAGE.search(docker["image"]) and "head_image" not in docker and "worker_image" not in docker


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_dashboard_stays_on_loopback(name):
    config = load(name)
    (head_start,) = [cmd for cmd in config["head_start_ray_commands"] if "ray start" in cmd]
    assert "--dashboard-host=127.0.0.1" in head_start
    assert not any("0.0.0.0" in cmd for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"])


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_turns_token_authentication_on_on_every_node(name):
    # Ray 2.60's `ray start` turns it on by itself only where a token file already exists
    config = load(name)
    starts = [cmd for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in cmd]
    assert len(starts) == 2 and all(cmd.startswith("export RAY_AUTH_MODE=token;") for cmd in starts)
    # every node gets the token the user generated (`ray get-auth-token --generate`), clients too
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    assert "ray get-auth-token --generate" in (REPO / "cluster" / name).read_text()


@pytest.mark.parametrize("name", LAUNCHER)
@pytest.mark.parametrize("job", GPU_JOBS)
def test_gpu_jobs_fit_the_8_gpu_worker_type(name, job):
    config = load(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]["resources"]
    eight = [t for t in types.values() if t["resources"].get("GPU") == 8]
    assert eight, "no 8-GPU worker type"
    c = load_config(REPO / "jobs" / job)
    assert any(fits(c, head, t["resources"], t["max_workers"]) for t in eight)


# --- KubeRay ---------------------------------------------------------------------------------


def cluster_spec(name: str) -> dict:
    doc = load(name)
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


@pytest.mark.parametrize("name,kind", [("kuberay-raycluster.yaml", "RayCluster"), ("kuberay-rayjob.yaml", "RayJob")])
def test_kuberay_manifest_has_the_required_fields(name, kind):
    doc = load(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind and doc["metadata"]["name"]
    spec = cluster_spec(name)
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    groups = [head] + spec["workerGroupSpecs"]
    for group in groups:
        # KubeRay's rayStartParams is a map of strings
        assert isinstance(group["rayStartParams"], dict)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in group["rayStartParams"].items())
        for container in containers(group):
            assert IMAGE.search(container["image"]) and container["name"]
            assert container["resources"]["limits"]["cpu"] and container["resources"]["limits"]["memory"]
    names = [g["groupName"] for g in spec["workerGroupSpecs"]]
    assert len(names) == len(set(names)) and all(names)
    for group in spec["workerGroupSpecs"]:
        assert 0 == group["minReplicas"] <= group["replicas"] <= group["maxReplicas"] and group["maxReplicas"] >= 1
        assert int(containers(group)[0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    # a CPU head
    assert "nvidia.com/gpu" not in containers(head)[0]["resources"]["limits"]


@pytest.mark.parametrize("name", ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"])
def test_kuberay_ray_version_is_the_images(name):
    version = dockerfile_ray_version("gpu.Dockerfile")
    assert dockerfile_ray_version("cpu.Dockerfile") == version
    assert cluster_spec(name)["rayVersion"] == version


@pytest.mark.parametrize("name", ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"])
@pytest.mark.parametrize("job", GPU_JOBS)
def test_gpu_jobs_fit_the_kuberay_gpu_group(name, job):
    spec = cluster_spec(name)
    head_cpus = float(spec["headGroupSpec"]["rayStartParams"]["num-cpus"])
    fitted = []
    for group in spec["workerGroupSpecs"]:
        limits = containers(group)[0]["resources"]["limits"]
        node = {"CPU": float(limits["cpu"]), "GPU": float(limits["nvidia.com/gpu"])}
        fitted.append(fits(load_config(REPO / "jobs" / job), {"CPU": head_cpus}, node, group["maxReplicas"]))
    assert any(fitted)


def test_rayjob_entrypoint_is_a_valid_training_command():
    spec = load("kuberay-rayjob.yaml")["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "alphadrive_ray.train"]
    image_root = "/opt/alphadrive/"  # WORKDIR of docker/gpu.Dockerfile
    assert f"WORKDIR {image_root.rstrip('/')}" in (REPO / "docker" / "gpu.Dockerfile").read_text()
    config_path = REPO / os.path.relpath(argv[3], image_root)
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    load_config(config_path, overrides)  # the job's config, with its overrides, is valid
    assert spec["entrypointNumCpus"] == 1 and spec["shutdownAfterJobFinishes"] is True


def test_rayjob_runtime_env_is_the_submit_one():
    """The same env vars as jobs/runtime_env.yaml, whose combination with the driver's a real job proves."""
    job_env = yaml.safe_load(load("kuberay-rayjob.yaml")["spec"]["runtimeEnvYAML"])
    submit_env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    assert job_env["env_vars"] == submit_env["env_vars"]
