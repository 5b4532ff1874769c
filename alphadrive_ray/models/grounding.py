"""A pretrained base for the tiny model: image-grounded text that contains no driving decisions.

Qwen2-VL-2B starts able to describe an image, read numbers from a prompt and answer in a
requested format, but it plans poorly (13.69% zero-shot, the AlphaDrive paper). A tiny
model with a random language half starts unable to write anything, so RL from it cannot even
produce the answer format. After its vision pretraining (`tiny.pretrain_vision`), the tiny
model's language half is trained on four kinds of text about synthetic scenes, in the chat
template, none of which pairs a scene with what to do in it:

  caption   "Describe the scene."                -> "I see a red light at an intersection ..."
  question  "Is there a pedestrian on the road?" -> "<think> I see ... </think>\n<answer> YES </answer>"
            (the light's colour, the lead car's distance, pedestrians, cones, lanes, the
            intersection; the reasoning is the caption)
  speed     "Speed 12.3m/s. How fast are you going?" -> "<think> At 12.3 m/s. </think>\n<answer> 12.3 </answer>"
  wording   "Speed 12.3m/s, ... Plan the next three seconds: slow down and move to the left lane. ..."
            -> "<think> I see ... At 12.3 m/s, I slow down. I move to the left lane. </think>
                <answer> DECELERATE, LEFT_CHANGE </answer>"
            The plan is drawn at random and spelled out by the user: the base learns the
            meta-action vocabulary and the answer format the way a language model knows
            them, not which plan a scene calls for.

So the base, given the planning prompt, writes a well-formed description and a plan that is
no better than chance (`alphadrive-ray model init-tiny` logs its zero-shot figures).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterator

from alphadrive_ray.actions import NAVIGATION_COMMANDS, PATH_ACTIONS, SPEED_ACTIONS, format_answer

TASKS = ("caption", "question", "speed", "wording")
TASK_WEIGHTS = (0.3, 0.35, 0.05, 0.3)

_SPEED_WORDS = {"KEEP": "keep my speed", "ACCELERATE": "speed up", "DECELERATE": "slow down", "STOP": "stop"}
_PATH_WORDS = {
    "STRAIGHT": "keep straight",
    "LEFT_TURN": "turn left",
    "RIGHT_TURN": "turn right",
    "LEFT_CHANGE": "move to the left lane",
    "RIGHT_CHANGE": "move to the right lane",
}
_ANSWER_FORMAT = "Think in <think> </think>, then answer in <answer> </answer>."
# The wording task's prompt: the embedded planning prompt (jobs/quickstart_cpu.yaml) with the
# plan spelled out by the user.
WORDING_PROMPT = (
    "Speed {speed}m/s, navigation '{navigation}'. Plan the next three seconds: {plan}. "
    "Reasoning in <think> </think>, then <answer> SPEED, PATH </answer>."
)


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str  # the user turn's text (after the image)
    target: str  # the assistant turn


def _questions(scene) -> list[tuple[str, str]]:
    """(question, one-word answer) pairs about what is in view."""
    from alphadrive_ray.data.synth import LEAD_BANDS, lead_band

    lead = "NONE" if scene.lead_distance is None else LEAD_BANDS[lead_band(scene.lead_distance)].upper().replace(" ", "_")
    lanes = {(True, True): "BOTH", (True, False): "LEFT", (False, True): "RIGHT", (False, False): "NONE"}
    return [
        ("What colour is the traffic light?", (scene.light or "none").upper()),
        ("How far ahead is the car in my lane?", lead),
        ("Is there a pedestrian on the road?", "YES" if scene.pedestrian_distance is not None else "NO"),
        ("Are there cones in my lane?", "YES" if scene.cones_distance is not None else "NO"),
        ("On which side is there another lane?", lanes[(scene.lane_on_left, scene.lane_on_right)]),
        ("Is there an intersection ahead?", {"near": "CLOSE", "far": "FAR", None: "NO"}[scene.intersection]),
    ]


def make_example(scene, rng: random.Random, task: str | None = None) -> Example:
    """One pretraining example about `scene` (a task drawn by TASK_WEIGHTS unless given)."""
    from alphadrive_ray.data.synth import describe_scene

    task = task or rng.choices(TASKS, weights=TASK_WEIGHTS)[0]
    caption = describe_scene(scene)
    speed = f"{scene.speed:.1f}"
    if task == "caption":
        return Example(task, "Describe the scene.", caption)
    if task == "question":
        question, answer = rng.choice(_questions(scene))
        if rng.random() < 0.5:  # a short answer: the most direct signal of what the image shows
            return Example(task, f"{question} Answer in one word.", answer)
        return Example(task, f"{question} {_ANSWER_FORMAT}", f"<think> {caption} </think>\n<answer> {answer} </answer>")
    if task == "speed":
        return Example(
            task, f"Speed {speed}m/s. How fast are you going? {_ANSWER_FORMAT}", f"<think> At {speed} m/s. </think>\n<answer> {speed} </answer>"
        )
    speed_action, path_action = rng.choice(SPEED_ACTIONS), rng.choice(PATH_ACTIONS)
    plan = f"{_SPEED_WORDS[speed_action]} and {_PATH_WORDS[path_action]}"
    prompt = WORDING_PROMPT.format(speed=speed, navigation=scene.navigation, plan=plan)
    reasoning = f"{caption} At {speed} m/s, I {_SPEED_WORDS[speed_action]}. I {_PATH_WORDS[path_action]}."
    return Example(task, prompt, f"<think> {reasoning} </think>\n{format_answer(speed_action, path_action)}")


def corpus() -> Iterator[str]:
    """The tasks' fixed text, for the tokenizer."""
    yield "Describe the scene."
    yield "Answer in one word."
    for question in (
        "What colour is the traffic light?",
        "How far ahead is the car in my lane?",
        "Is there a pedestrian on the road?",
        "Are there cones in my lane?",
        "On which side is there another lane?",
        "Is there an intersection ahead?",
    ):
        yield f"{question} {_ANSWER_FORMAT}"
    for answer in ("RED", "YELLOW", "GREEN", "NONE", "VERY_CLOSE", "CLOSE", "AT_A_SAFE_DISTANCE", "FAR", "YES", "NO", "BOTH", "LEFT", "RIGHT"):
        yield f"<answer> {answer} </answer>"
    for nav in NAVIGATION_COMMANDS:
        yield WORDING_PROMPT.format(speed="12.3", navigation=nav, plan="slow down and keep straight")
    for words in list(_SPEED_WORDS.values()) + list(_PATH_WORDS.values()):
        yield f"At 12.3 m/s, I {words}. I {words}."
    yield f"Speed 12.3m/s. How fast are you going? {_ANSWER_FORMAT}"


PRETRAIN_THREADS = 2  # torch threads of the pretraining, whatever the machine (see tiny.pretrain_vision)


def pretrain_language(
    model, processor, steps: int, seed: int = 0, batch_size: int = 16, lr: float = 2e-3, log: Callable[[str], None] | None = None
) -> float:
    """Train the language half (the vision tower is frozen as pretrained) on `make_example` text for
    `steps` steps; returns the final training loss per token (running mean)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(PRETRAIN_THREADS)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(20_000 + seed)
            return _pretrain_language(model, processor, steps, seed, batch_size, lr, log)
    finally:
        torch.set_num_threads(threads)


def _pretrain_language(model, processor, steps: int, seed: int, batch_size: int, lr: float, log) -> float:
    import torch

    from alphadrive_ray import algo
    from alphadrive_ray.data.synth import random_scene, render_scene
    from alphadrive_ray.inputs import EncodedPrompt, PromptEncoder, completion_logits
    from alphadrive_ray.prompts import chat_messages
    from alphadrive_ray.train.schedule import cosine_lr

    rng = random.Random(20_000 + seed)  # scenes unlike any dataset split's
    encoder = PromptEncoder(processor, cache_mb=0)
    # The vision tower stays frozen: trained together with a language half that starts random,
    # its features were worn away before the text learnt to read them (captions 2.5% exact
    # after 300 steps, the same loss with the images shuffled); frozen, 41% (docs/benchmark.md).
    visual = list(model.model.visual.parameters())
    frozen = {id(p) for p in visual}
    params = [p for p in model.parameters() if id(p) not in frozen]
    was = [p.requires_grad for p in visual]
    for p in visual:
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    running = 0.0
    try:
        for step in range(steps):
            prompts, targets = [], []
            for _ in range(batch_size):
                scene = random_scene(rng)
                example = make_example(scene, rng)
                text = processor.apply_chat_template(chat_messages(example.prompt, image={}), add_generation_prompt=True, tokenize=False)
                out = processor(text=[text], images=[render_scene(scene, size=224, seed=rng.randrange(2**31))], return_tensors="pt")
                prompts.append(EncodedPrompt(tuple(out["input_ids"][0].tolist()), out["pixel_values"], out["image_grid_thw"]))
                targets.append(encoder.encode_completion(example.target))
            batch = encoder.collate(prompts, targets)
            logits = completion_logits(model, batch)  # [B, C, V]
            loss = algo.compute_sft_loss(logits, batch["completion_ids"], batch["response_mask"])
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, steps, lr, 0.05)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            running = 0.9 * running + 0.1 * loss.item() if step else loss.item()
            if log is not None and (step + 1) % 50 == 0:
                log(f"language pretraining {step + 1}/{steps}: loss {running:.3f} per token")
    finally:
        model.eval()
        for p, requires_grad in zip(visual, was):
            p.requires_grad_(requires_grad)
    return running
