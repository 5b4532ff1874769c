"""The planning prompt and the chat messages built from it.

The template keeps the slots and structure of the AlphaDrive release prompt; users
may override it in the config (``data.prompt_template``) as long as it keeps the
``{speed}`` and ``{navigation}`` slots.
"""

from __future__ import annotations

from typing import Any

PLANNING_PROMPT = (
    "You are an expert driving assistant. Your current speed is {speed}m/s, the navigation "
    "command is '{navigation}', based on the understanding of the driving scene and the "
    "navigation information, what is your driving plan for the next three seconds? Output the "
    "planning reasoning process in <think> </think> and final planning answer in <answer> "
    "</answer> tags, respectively. Planning answer consists of SPEED plan and PATH plan, SPEED "
    "includes KEEP, ACCELERATE, DECELERATE, and STOP, PATH includes STRAIGHT, RIGHT_CHANGE, "
    "LEFT_CHANGE, RIGHT_TURN, and LEFT_TURN. For example, a correct answer format is like "
    "'<answer> KEEP, LEFT_CHANGE </answer>'."
)


def format_speed(speed: float) -> str:
    """Speeds are shown with one decimal, as the release does."""
    return f"{float(speed):.1f}"


def planning_prompt(speed: float, navigation: str, template: str = PLANNING_PROMPT) -> str:
    return template.format(speed=format_speed(speed), navigation=navigation)


def chat_messages(prompt: str, image: Any = None) -> list[dict]:
    """One user turn: the front image (when there is one) followed by the prompt text.

    `image` is whatever the consumer accepts (a PIL image for processors, a data URL
    for OpenAI clients); text-only policies pass None.
    """
    content: list[dict] = []
    if image is not None:
        content.append({"type": "image", "image": image})
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]
