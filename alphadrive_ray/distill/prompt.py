"""The teacher request of reasoning distillation: prompt template, image data URL, messages.

AlphaDrive (arXiv 2503.07608, Sec. 3.3) asks a large cloud model for one or two sentences
explaining a known decision, given the front image, the ego speed and the navigation. The
default template keeps the structure and slots of the release's prompt; the decision is
written in plain words ("decelerate, turn left") rather than the planner's vocabulary
tokens, so that the teacher does not echo `LEFT_TURN` into the reasoning (the
`answer_leak` filter would drop it). A custom template (`--prompt-template FILE`) may use
these slots:

    {speed}         ego speed in m/s, one decimal, as in the planning prompt
    {navigation}    the navigation command, e.g. "turn left"
    {decision}      the true plan in words, e.g. "decelerate, turn left"
    {speed_action}  the true SPEED token, e.g. DECELERATE
    {path_action}   the true PATH token, e.g. LEFT_TURN

and must name the true plan ({decision}, or both {speed_action} and {path_action}).
"""

from __future__ import annotations

import base64
import hashlib
import json
import string
from pathlib import Path
from typing import Any

from alphadrive_ray.data.records import Record
from alphadrive_ray.errors import UserError
from alphadrive_ray.prompts import format_speed

TEACHER_PROMPT = (
    "You are an expert driving assistant. Your current speed is {speed}m/s, the navigation command "
    "is '{navigation}', and your driving decision for the next three seconds is '{decision}'. Based on "
    "your understanding of the driving scene, briefly explain why you made the above driving decisions "
    "in one or two sentences."
)

TEMPLATE_SLOTS: tuple[str, ...] = ("speed", "navigation", "decision", "speed_action", "path_action")

SPEED_WORDS: dict[str, str] = {
    "KEEP": "keep the current speed",
    "ACCELERATE": "accelerate",
    "DECELERATE": "decelerate",
    "STOP": "stop",
}
PATH_WORDS: dict[str, str] = {
    "STRAIGHT": "go straight",
    "LEFT_TURN": "turn left",
    "RIGHT_TURN": "turn right",
    "LEFT_CHANGE": "change to the left lane",
    "RIGHT_CHANGE": "change to the right lane",
}

# Shown instead of the base64 payload when a request is printed (`--dry-run`).
DISPLAY_DATA_URL_CHARS = 48


def decision_text(speed_action: str, path_action: str) -> str:
    return f"{SPEED_WORDS[speed_action]}, {PATH_WORDS[path_action]}"


def check_template(template: str, source: str = "prompt template") -> str:
    """The template itself when its slots are valid; a UserError saying what to fix otherwise."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise UserError(f"{source}: not a valid format string ({exc}); write literal braces as {{{{ and }}}}") from None
    unknown = sorted(f for f in fields if f not in TEMPLATE_SLOTS)
    if unknown:
        raise UserError(
            f"{source}: unknown slot(s) {', '.join('{' + f + '}' for f in unknown)}; available: {', '.join('{' + s + '}' for s in TEMPLATE_SLOTS)}"
        )
    if "decision" not in fields and not {"speed_action", "path_action"} <= fields:
        raise UserError(f"{source}: the teacher must be told the true plan; use {{decision}} (or both {{speed_action}} and {{path_action}})")
    return template


def load_template(path: str | None) -> str:
    if not path:
        return TEACHER_PROMPT
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read --prompt-template {file}: {exc}") from None
    if not text:
        raise UserError(f"--prompt-template {file} is empty")
    return check_template(text, str(file))


def render_prompt(record: Record, template: str = TEACHER_PROMPT) -> str:
    return template.format(
        speed=format_speed(record.speed),
        navigation=record.navigation,
        decision=decision_text(record.speed_action, record.path_action),
        speed_action=record.speed_action,
        path_action=record.path_action,
    )


_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp", ".gif": "image/gif"}


def image_data_url(path: str) -> str:
    """The image file's own bytes as a data URL (never re-encoded, so the hash is stable)."""
    file = Path(path)
    mime = _MIME.get(file.suffix.lower())
    if mime is None:
        from PIL import Image

        with Image.open(file) as img:
            mime = Image.MIME.get(img.format or "", "application/octet-stream")
    return f"data:{mime};base64," + base64.b64encode(file.read_bytes()).decode("ascii")


def build_messages(record: Record, template: str = TEACHER_PROMPT, image_detail: str | None = None) -> list[dict]:
    """One user turn: the front image, then the prompt text (OpenAI chat format)."""
    image_url: dict[str, Any] = {"url": image_data_url(record.image)}
    if image_detail:
        image_url["detail"] = image_detail
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": image_url},
                {"type": "text", "text": render_prompt(record, template)},
            ],
        }
    ]


def request_hash(body: dict) -> str:
    """sha256 of everything that determines the teacher's answer except the model name.

    `body` is the request without `model` (the cache key names the model separately): the
    messages with the full image bytes, and the sampling parameters.
    """
    canonical = json.dumps(body, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def truncate_data_urls(value: Any, keep: int = DISPLAY_DATA_URL_CHARS) -> Any:
    """A copy of a request with each data URL cut to its first `keep` characters, for display."""
    if isinstance(value, dict):
        return {k: truncate_data_urls(v, keep) for k, v in value.items()}
    if isinstance(value, list):
        return [truncate_data_urls(v, keep) for v in value]
    if isinstance(value, str) and value.startswith("data:") and len(value) > keep:
        return f"{value[:keep]}...({len(value)} chars)"
    return value
