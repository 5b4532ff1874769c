"""The meta-action vocabulary of AlphaDrive and the release's action weights.

A plan is one SPEED action and one PATH action for the next three seconds
(AlphaDrive, arXiv 2503.07608, Sec. 3). The weights are the release's importance
weights used by the action-weight reward: rarer, safety-critical actions weigh more.
"""

from __future__ import annotations

SPEED_ACTIONS: tuple[str, ...] = ("KEEP", "ACCELERATE", "DECELERATE", "STOP")
PATH_ACTIONS: tuple[str, ...] = ("STRAIGHT", "LEFT_TURN", "RIGHT_TURN", "LEFT_CHANGE", "RIGHT_CHANGE")

SPEED_WEIGHTS: dict[str, float] = {"ACCELERATE": 0.9, "DECELERATE": 1.0, "STOP": 1.0, "KEEP": 0.8}
PATH_WEIGHTS: dict[str, float] = {
    "LEFT_TURN": 1.0,
    "RIGHT_TURN": 1.0,
    "LEFT_CHANGE": 1.0,
    "RIGHT_CHANGE": 1.0,
    "STRAIGHT": 0.8,
}

# Navigation commands of the synthetic benchmark; the paper turns sparse map
# navigation (the high-level command ahead) into text of this kind.
NAVIGATION_COMMANDS: tuple[str, ...] = ("go straight", "turn left", "turn right")


def format_answer(speed_action: str, path_action: str) -> str:
    """The ground-truth answer text, as in the release's `solution` field."""
    return f"<answer> {speed_action}, {path_action} </answer>"


def format_completion(reasoning: str, speed_action: str, path_action: str) -> str:
    """A well-formed model completion: reasoning (may be empty), then the plan."""
    text = reasoning.strip()
    return f"<think> {text + ' ' if text else ''}</think>\n{format_answer(speed_action, path_action)}"
