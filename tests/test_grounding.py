"""The tiny base's language pretraining: image-grounded text that never pairs a scene with a plan."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from alphadrive_ray.actions import PATH_ACTIONS, SPEED_ACTIONS
from alphadrive_ray.data.synth import Scene, describe_scene, random_scene
from alphadrive_ray.models.grounding import TASKS, corpus, make_example
from alphadrive_ray.rewards import format_reward, parse_plan

SCENE = Scene(
    speed=12.3,
    navigation="turn left",
    num_lanes=2,
    ego_lane=1,
    intersection="near",
    light="red",
    lead_distance=30.0,
    pedestrian_distance=None,
    cones_distance=None,
    intersection_distance=9.0,
)


def examples(scene: Scene, task: str, n: int, seed: int = 0):
    rng = random.Random(seed)
    return [make_example(scene, rng, task) for _ in range(n)]


def test_caption_is_the_scene_description():
    (ex,) = examples(SCENE, "caption", 1)
    assert ex.prompt == "Describe the scene."
    assert ex.target == describe_scene(SCENE)
    assert ex.target == "I see a red light at an intersection close ahead, a car at a safe distance ahead and a lane on my left."


def test_questions_are_answered_from_the_scene():
    answers = {}
    for ex in examples(SCENE, "question", 300):
        question = ex.prompt.split("?")[0] + "?"
        answer = parse_answer(ex.target)
        answers.setdefault(question, set()).add(answer)
        if "<think>" in ex.target:  # the long form: the description, then the answer, well formed
            assert ex.target.startswith(f"<think> {describe_scene(SCENE)} </think>")
            assert format_reward(ex.target) == 1.0
    assert answers == {
        "What colour is the traffic light?": {"RED"},
        "How far ahead is the car in my lane?": {"AT_A_SAFE_DISTANCE"},
        "Is there a pedestrian on the road?": {"NO"},
        "Are there cones in my lane?": {"NO"},
        "On which side is there another lane?": {"LEFT"},
        "Is there an intersection ahead?": {"CLOSE"},
    }


def parse_answer(target: str) -> str:
    return target.split("<answer>")[1].split("</answer>")[0].strip() if "<answer>" in target else target


def test_speed_is_read_from_the_prompt():
    (ex,) = examples(SCENE, "speed", 1)
    assert "12.3m/s" in ex.prompt and ex.target == "<think> At 12.3 m/s. </think>\n<answer> 12.3 </answer>"


def test_wording_spells_a_random_plan_never_the_scenes():
    """The plan of a wording example is drawn at random and written in the prompt: the same scene
    gets every plan, so no example teaches what to do in a scene."""
    plans = Counter()
    for ex in examples(SCENE, "wording", 2000):
        plan = parse_plan(ex.target)
        plans[plan] += 1
        assert format_reward(ex.target) == 1.0
        assert ex.prompt.startswith("Speed 12.3m/s, navigation 'turn left'. Plan the next three seconds: ")
        speed_words, path_words = ex.prompt.split("Plan the next three seconds: ")[1].split(".")[0].split(" and ")
        assert f"I {speed_words}. I {path_words}." in ex.target  # the target restates the plan the user spelled out
    assert set(plans) == {(s, p) for s in SPEED_ACTIONS for p in PATH_ACTIONS}
    assert max(plans.values()) < 3 * min(plans.values())  # roughly uniform


def test_tasks_follow_their_weights():
    rng = random.Random(1)
    seen = Counter(make_example(random_scene(rng), rng).task for _ in range(2000))
    assert set(seen) == set(TASKS)
    assert seen["speed"] < seen["caption"] < seen["question"]


def test_corpus_holds_the_fixed_text():
    text = "\n".join(corpus())
    for phrase in ("Describe the scene.", "Answer in one word.", "What colour is the traffic light?", "<answer> AT_A_SAFE_DISTANCE </answer>"):
        assert phrase in text


@pytest.mark.slow
def test_language_pretraining_lowers_the_loss(tmp_path):
    """A few steps on a very small model: the loss per token falls well below a uniform guess."""
    import math

    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from alphadrive_ray.models.grounding import pretrain_language
    from alphadrive_ray.models.tiny import TinySpec, build_config, build_processor, default_corpus, train_tokenizer

    spec = TinySpec(
        vocab_size=1024,
        text_hidden=128,
        text_layers=1,
        text_heads=2,
        text_kv_heads=1,
        text_intermediate=256,
        vision_dim=32,
        vision_depth=1,
        vision_heads=1,
        image_pixels=112 * 112,
    )
    tokenizer = train_tokenizer(default_corpus(), spec.vocab_size)
    processor = build_processor(tokenizer, spec)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(build_config(tokenizer, spec))
    before = [p.detach().clone() for p in model.model.visual.parameters()]
    embed_before = model.model.language_model.embed_tokens.weight.detach().clone()
    loss = pretrain_language(model, processor, steps=25, batch_size=4, lr=3e-3)
    assert loss < 0.5 * math.log(len(tokenizer)), loss
    assert not model.training
    # the vision tower is frozen (and trainable again afterwards); the language half trains
    assert all(torch.equal(a, b) for a, b in zip(before, model.model.visual.parameters()))
    assert all(p.requires_grad for p in model.parameters())
    assert not torch.equal(embed_before, model.model.language_model.embed_tokens.weight)
