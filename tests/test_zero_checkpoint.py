"""Learner checkpoints of any ZeRO stage and learner count: whole again (export), and
re-sharded for another learner count (resume). Real DeepSpeed learners in Ray actors.

Learner counts 3 and 5 give padded layouts: ZeRO-2 pads the flat vector of 4,061,952
elements to a multiple of 2 x 5 (8 elements on the last rank), ZeRO-3 pads parameters to a
multiple of 3.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alphadrive_ray.train import zero_checkpoint as zc

LAYOUTS = [(2, 2), (3, 3), (2, 5)]  # (ZeRO stage, learners) of the checkpoints written here
N_EXAMPLES = 30  # splits evenly over 1, 2, 3 and 5 learners
MICRO = 15
LR = 1e-3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from alphadrive_ray.models.tiny import TinySpec, build_tiny_qwen2vl

    return str(build_tiny_qwen2vl(tmp_path_factory.mktemp("zc-model"), TinySpec(seed=0, vision_pretrain_steps=0, language_pretrain_steps=0)))


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    from alphadrive_ray.actions import format_completion
    from alphadrive_ray.data.records import load_records
    from alphadrive_ray.data.synth import generate_dataset
    from alphadrive_ray.workers.learner import SFTExample

    path, _ = generate_dataset(tmp_path_factory.mktemp("zc-data"), N_EXAMPLES, seed=6, size=56)
    return [SFTExample(r, format_completion(r.reasoning, r.speed_action, r.path_action)) for r in load_records(path)]


def start(model_dir: str, stage: int, learners: int):
    from alphadrive_ray.workers.group import LearnerGroup, Resources
    from alphadrive_ray.workers.learner import LearnerSpec

    group = LearnerGroup.start(LearnerSpec(model_path=model_dir, zero_stage=stage, cpus=1), learners, Resources(1, 0))
    group.begin_stage("sft")
    return group


@pytest.fixture(scope="module")
def checkpoints(ray_cluster, model_dir, examples, tmp_path_factory):
    """For each layout: the learner folder after an SFT step, the weights then, and the loss
    and weights of the step the group took next (what any resume must reproduce)."""
    root = tmp_path_factory.mktemp("zc-ckpt")
    out = {}
    for stage, learners in LAYOUTS:
        group = start(model_dir, stage, learners)
        group.sft_step(examples, MICRO, LR)
        folder = root / f"z{stage}-w{learners}" / "learner"
        group.save_state(str(folder), {"stage": "sft", "step": 1})
        saved = group.state_dict_cpu()
        loss = group.sft_step(examples, MICRO, LR)["loss/sft"]
        out[(stage, learners)] = {"folder": folder, "saved": saved, "next_loss": loss, "next": group.state_dict_cpu()}
        group.shutdown()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_whole_weights_equal_deepspeeds_zero_to_fp32_and_the_learners(checkpoints, layout):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = checkpoints[layout]
    ours = zc.full_state(ckpt["folder"])
    oracle = get_fp32_state_dict_from_zero_checkpoint(str(ckpt["folder"]), tag="state")
    assert set(ours) == set(oracle) == set(ckpt["saved"])
    for name, tensor in ours.items():
        assert torch.equal(tensor, oracle[name].contiguous().float()), name
        assert torch.equal(tensor, ckpt["saved"][name]), name
    assert zc.checkpoint_layout(ckpt["folder"]) == layout and zc.optimizer_steps(ckpt["folder"]) == 1.0


@pytest.mark.slow
def test_moments_do_not_depend_on_the_learner_count(checkpoints):
    # the same step on 2 and 5 learners (ZeRO-2) and on 3 (ZeRO-3): the same Adam moments, up
    # to the order of the all-reduce's sums
    for a, b in (((2, 2), (2, 5)), ((2, 2), (3, 3))):
        for key in zc.MOMENTS:
            x, y = zc.full_state(checkpoints[a]["folder"], key), zc.full_state(checkpoints[b]["folder"], key)
            for name in x:
                torch.testing.assert_close(x[name], y[name], rtol=1e-5, atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("old", LAYOUTS)
@pytest.mark.parametrize("new", LAYOUTS)
def test_resharding_keeps_every_tensor(checkpoints, tmp_path, old, new):
    # the files of layout `new` (its template: what those learners saved) filled with `old`'s state
    out = tmp_path / "resharded"
    for rank in range(new[1]):
        zc.reshard(checkpoints[old]["folder"] / "state", checkpoints[new]["folder"] / "state", out, rank)
    assert zc.checkpoint_layout(out) == new and zc.optimizer_steps(out) == 1.0
    for key in ("param", *zc.MOMENTS):
        want, got = zc.full_state(checkpoints[old]["folder"], key), zc.full_state(out, key)
        assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want), key
    client = zc.find_shards(out).model_state(0)
    assert client["step"] == 1 and client["stage"] == "sft" and "torch_rng" in client  # what save_state added


# (checkpoint layout, layout of the learners that resume it)
RESUMES = [
    ((2, 2), (2, 1)),  # fewer learners
    ((3, 3), (3, 2)),  # from a padded ZeRO-3 layout
    ((2, 5), (3, 2)),  # from a padded ZeRO-2 layout, to another ZeRO stage
]


@pytest.mark.slow
@pytest.mark.parametrize("saved, resumed", RESUMES)
def test_a_resume_on_other_learners_takes_the_same_next_step(checkpoints, model_dir, examples, saved, resumed, tmp_path):
    ckpt = checkpoints[saved]
    learner = tmp_path / "ckpt" / "learner"
    shutil.copytree(ckpt["folder"], learner)
    group = start(model_dir, *resumed)
    try:
        client = group.load_state(str(learner))
        assert client["step"] == 1
        loaded = group.state_dict_cpu()
        for name, tensor in ckpt["saved"].items():
            assert torch.equal(loaded[name], tensor), name
        loss = group.sft_step(examples, MICRO, LR)["loss/sft"]
        after = group.state_dict_cpu()
    finally:
        group.shutdown()
    assert (learner.parent / f"learner-w{resumed[1]}-z{resumed[0]}" / "state").is_dir()  # kept for the next resume
    assert loss == pytest.approx(ckpt["next_loss"], rel=1e-6)
    for name, tensor in ckpt["next"].items():
        torch.testing.assert_close(after[name], tensor, rtol=1e-4, atol=1e-6)


def _export(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alphadrive_ray", "export", *map(str, args)], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [(3, 3)])
def test_export_loads_in_from_pretrained_serve_and_the_rollout_engine(checkpoints, model_dir, tmp_path, layout):
    from fastapi.testclient import TestClient
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    from alphadrive_ray.engines.base import SamplingParams
    from alphadrive_ray.engines.hf import HFEngine
    from alphadrive_ray.prompts import planning_prompt
    from alphadrive_ray.serve.app import ServerOptions, create_app, load_backend

    ckpt = checkpoints[layout]
    out = tmp_path / "hf"
    done = _export(ckpt["folder"], out, "--model", model_dir)
    assert done.returncode == 0, done.stderr
    model = Qwen2VLForConditionalGeneration.from_pretrained(out)
    for name, tensor in model.state_dict().items():
        if name in ckpt["saved"]:
            assert torch.equal(tensor, ckpt["saved"][name]), name
    assert AutoProcessor.from_pretrained(out).tokenizer.chat_template
    provenance = json.loads((out / "alphadrive_export.json").read_text())
    assert (provenance["zero_stage"], provenance["learners"]) == layout
    # the processor keeps the image-size bounds a run trained with (the CLI reads them from its config.yaml)
    from alphadrive_ray.train.export import export_checkpoint, resolve_checkpoint

    bounded = export_checkpoint(resolve_checkpoint(ckpt["folder"])[0], tmp_path / "bounded", model_dir, min_pixels=3136, max_pixels=401408)
    size = AutoProcessor.from_pretrained(bounded).image_processor.size
    assert (size["shortest_edge"], size["longest_edge"]) == (3136, 401408)

    # the rollout engine (what training's evaluation runs) and `serve` give the same greedy plan
    from alphadrive_ray.data.records import load_records
    from alphadrive_ray.data.synth import generate_dataset

    path, _ = generate_dataset(tmp_path / "scene", 1, seed=9, size=56)
    (record,) = load_records(path)
    (group,) = HFEngine(str(out)).generate([record], SamplingParams(greedy=True, max_new_tokens=8))
    app = create_app(load_backend("hf", str(out)), ServerOptions(served_model_name="exported", model_dir=str(out)))
    image = "data:image/png;base64," + base64.b64encode(Path(record.image).read_bytes()).decode()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image}},
                {"type": "text", "text": planning_prompt(record.speed, record.navigation)},
            ],
        }
    ]
    with TestClient(app) as client:
        reply = client.post("/v1/chat/completions", json={"model": "exported", "messages": messages, "max_tokens": 8, "temperature": 0})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == group.completions[0].text


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: tmp / "nope", "checkpoint not found"),
        (lambda tmp: (tmp / "run" / "checkpoints").mkdir(parents=True) or tmp / "run", "no complete checkpoint yet"),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "no DeepSpeed checkpoint"),
    ],
)
def test_export_user_errors(tmp_path, make, message):
    done = _export(make(tmp_path), tmp_path / "out", "--model", tmp_path)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_export_needs_to_know_the_base_model(tmp_path):
    (tmp_path / "ds").mkdir()
    done = _export(tmp_path / "ds", tmp_path / "out")
    assert done.returncode == 2 and "pass --model BASE" in done.stderr
