"""Image-size control (data.min_pixels / data.max_pixels): a camera frame larger than the model's
images is resized to the same capped area in the rollout engine, the learner and the export,
so their image tokens and log-probs agree.

Real parts: the tiny Qwen2-VL's processor, the HF engine in-process, a DeepSpeed learner in a
Ray actor, the `serve` command line.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from alphadrive_ray.data.records import Record
from tests.conftest import TEST_PROMPT, open_road

RELEASE_MAX_PIXELS = 401408  # the AlphaDrive release's --max_pixels: at most 512 image tokens
TOKEN_PIXELS = 28 * 28  # one image token: a merged 2x2 group of 14-pixel patches


@pytest.fixture(scope="module")
def frame(tmp_path_factory) -> Record:
    """A scene rendered at a nuScenes camera's 1600x900 (1.44 MP)."""
    from alphadrive_ray.data.synth import render_scene

    path = tmp_path_factory.mktemp("frame") / "frame.png"
    render_scene(open_road(lead_distance=20.0), size=448, seed=0).resize((1600, 900)).save(path)
    return Record("wide", str(path), 8.0, "go straight", "KEEP", "STRAIGHT")


def image_tokens(encoder, record: Record) -> int:
    return sum(1 for t in encoder.encode(record).input_ids if t == encoder.image_token_id)


def test_the_bounds_set_the_number_of_image_tokens(tiny_vl_dir, frame):
    from alphadrive_ray.inputs import PromptEncoder
    from alphadrive_ray.models.loading import load_processor

    own = image_tokens(PromptEncoder(load_processor(tiny_vl_dir), TEST_PROMPT, cache_mb=0), frame)
    assert own == 50  # the tiny model's own bounds (224^2 px): 10 x 20 patches, 2x2 merged
    release = image_tokens(PromptEncoder(load_processor(tiny_vl_dir, 3136, RELEASE_MAX_PIXELS), TEST_PROMPT, cache_mb=0), frame)
    assert 400 < release <= RELEASE_MAX_PIXELS // TOKEN_PIXELS  # 480 of at most 512
    small = image_tokens(PromptEncoder(load_processor(tiny_vl_dir, 3136, 100 * TOKEN_PIXELS), TEST_PROMPT, cache_mb=0), frame)
    assert 80 < small <= 100


def test_bounds_that_cross_the_models_own_are_a_clear_error(tiny_vl_dir):
    from alphadrive_ray.errors import UserError
    from alphadrive_ray.models.loading import load_processor

    # the tiny model's own minimum is 50176 px: a maximum below it, alone, cannot hold
    with pytest.raises(UserError, match="min_pixels 50176 exceeds max_pixels 3136; set both data.min_pixels and data.max_pixels"):
        load_processor(tiny_vl_dir, max_pixels=3136)


def test_engine_and_learner_see_the_same_capped_frame(ray_cluster, tiny_vl_dir, frame, tmp_path):
    import ray
    from transformers import AutoProcessor

    from alphadrive_ray.engines.base import SamplingParams
    from alphadrive_ray.engines.hf import HFEngine
    from alphadrive_ray.workers.group import LearnerGroup, Resources
    from alphadrive_ray.workers.learner import GRPOSample, LearnerSpec

    bounds = dict(min_pixels=3136, max_pixels=RELEASE_MAX_PIXELS)
    engine = HFEngine(tiny_vl_dir, prompt_template=TEST_PROMPT, batch_size=4, zero_copy_weights=False, **bounds)
    assert image_tokens(engine.encoder, frame) == 480
    learners = LearnerGroup.start(
        LearnerSpec(model_path=tiny_vl_dir, prompt_template=TEST_PROMPT, backend="gloo", cpus=1, seed=0, **bounds), 1, Resources(cpus=1)
    )
    try:
        (group,) = engine.generate([frame], SamplingParams(n=2, max_new_tokens=6, seed=0))
        samples = [GRPOSample(frame, c.token_ids, c.logprobs, 0.0) for c in group.completions]
        learner_logprobs = ray.get(learners.actors[0].compute_logprobs.remote(samples))
        for sample, theirs in zip(samples, learner_logprobs):
            assert torch.allclose(torch.tensor(theirs), torch.tensor(sample.logprobs), atol=1e-4)
        # the export keeps the bounds it was trained with
        out = learners.save_hf(str(tmp_path / "export"))
        size = AutoProcessor.from_pretrained(out).image_processor.size
        assert (size["shortest_edge"], size["longest_edge"]) == (3136, RELEASE_MAX_PIXELS)
    finally:
        learners.shutdown()


def test_serve_refuses_bounds_below_one_image_token(tiny_vl_dir):
    done = subprocess.run(
        [sys.executable, "-m", "alphadrive_ray", "serve", tiny_vl_dir, "--max-pixels", "100"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0 and "--max-pixels must be 0 (the model's own) or at least 784" in done.stderr
    assert "Traceback" not in done.stderr
