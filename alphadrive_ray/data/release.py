"""Import the AlphaDrive release format into canonical records.

    alphadrive-ray data import-release release/train.json data/train.jsonl --image-root release/

A release record (one JSON object per sample; the input is a JSON array, JSONL, or JSON
objects over several lines each, such as the release's one pretty-printed
data_tools/example.json):

    {"image": "samples/0001.jpg",
     "problem": "You are an expert driving assistant. Your current speed is 8.4m/s, the
                 navigation command is '{'100m': 'Straight', '200m': 'Straight'}', ...",
     "solution": "<answer> DECELERATE, LEFT_TURN </answer>",
     "thinking": "<think> The light ahead is red ... </think>"}          # optional

becomes a canonical record (see `records.py`):
- `speed` and `navigation` are parsed from the prompt: the first "current speed is {x}m/s"
  (a space before "m/s" is allowed) and the first "navigation command is '{nav}'" (single
  or double quotes); both phrases are matched case-insensitively. A command by distance,
  `'{'100m': 'Straight', ...}'` (a dict literal inside the quotes, as the release writes
  it), is kept whole, normalised by `records.navigation_text`: `{'100m': 'Straight', '200m':
  'Straight'}`, which the prompt template renders exactly as the release's prompt; one that
  does not parse is a problem of the record's `problem` field, never a truncated value;
- `solution` must hold `<answer> SPEED, PATH </answer>`: exactly two comma-separated
  words, a SPEED action then a PATH action, spelled as in the vocabulary;
- `reasoning` is the text inside `<think> ... </think>`; a record without `thinking`
  (absent, null, or empty tags) has no reasoning;
- `id` is the record's own `id` when it has one, else `{input file stem}-{n:06d}` with n
  the line number (JSONL, 1-based) or the array index (0-based): importing the same file
  again gives the same ids;
- `image` is resolved against --image-root (default: the input file's folder) and written
  relative to the output file;
- other fields are kept as they are (fields named like canonical ones are derived, never copied).
Every record is then checked like any dataset record (`records.parse_record`, images
opened unless --no-images), so the output passes `alphadrive-ray data validate`.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from alphadrive_ray.actions import PATH_ACTIONS, SPEED_ACTIONS
from alphadrive_ray.data.convert import derived_id
from alphadrive_ray.data.records import (
    OPTIONAL_FIELDS,
    REQUIRED_FIELDS,
    Problem,
    Record,
    navigation_text,
    parse_navigation_dict,
    parse_record,
)

RELEASE_FIELDS: tuple[str, ...] = ("id", "image", "problem", "solution", "thinking")

_SPEED_RE = re.compile(r"current speed is\s*(?P<value>[^\s,']*?)\s*m/s", re.IGNORECASE)
_NAV_RE = re.compile(r"navigation command is\s*(?P<quote>['\"])", re.IGNORECASE)
_ANSWER_RE = re.compile(r"<answer>(?P<value>.*?)</answer>", re.DOTALL)
_THINK_RE = re.compile(r"<think>(?P<value>.*?)</think>", re.DOTALL)

# Which release field a canonical field comes from, to name it in problems.
_SOURCE_FIELD = {
    "speed": "problem",
    "navigation": "problem",
    "speed_action": "solution",
    "path_action": "solution",
    "reasoning": "thinking",
}


def _show(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def parse_speed(prompt: str) -> float:
    """The ego speed (m/s) in the prompt's "Your current speed is {x}m/s"; ValueError if absent or not a number."""
    match = _SPEED_RE.search(prompt)
    if match is None:
        raise ValueError('no "Your current speed is {x}m/s" in the prompt')
    try:
        return float(match["value"])
    except ValueError:
        raise ValueError(f'the speed in "current speed is {match["value"]}m/s" is not a number') from None


def parse_navigation(prompt: str) -> str:
    """The command in the prompt's "the navigation command is '{nav}'"; ValueError if absent.

    A dict of distances to commands inside the quotes comes back whole, as `navigation_text`
    writes it (its own quotes would otherwise end the command early).
    """
    match = _NAV_RE.search(prompt)
    if match is None:
        raise ValueError("no \"the navigation command is '{nav}'\" (quoted) in the prompt")
    quote, start = match["quote"], match.end()
    if prompt[start:].lstrip().startswith("{"):
        return _navigation_dict(prompt, prompt.index("{", start), quote)
    end = prompt.find(quote, start)
    if end < 0:
        raise ValueError(f'the navigation command after "navigation command is {quote}" has no closing {quote}')
    return prompt[start:end].strip()


def _navigation_dict(prompt: str, brace: int, quote: str) -> str:
    """The dict literal that starts at `brace` and the closing `quote` right after it."""
    depth, in_string, i = 0, "", brace
    while i < len(prompt):
        ch = prompt[i]
        if in_string:
            if ch == "\\":
                i += 1
            elif ch == in_string:
                in_string = ""
        elif ch in "'\"":
            in_string = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                break
        i += 1
    else:
        raise ValueError(f"the navigation command {_show(prompt[brace:])} opens a dict that is never closed")
    literal = prompt[brace : i + 1]
    try:
        value = parse_navigation_dict(literal)
    except ValueError as exc:
        raise ValueError(f"the navigation command {_show(literal)} is not a dict of distances to commands: {exc}") from None
    if not prompt[i + 1 :].lstrip().startswith(quote):
        raise ValueError(f"the navigation command {_show(literal)} is not followed by its closing {quote}")
    return navigation_text(value)


def parse_solution(solution: str) -> tuple[str, str]:
    """'<answer> ACCELERATE, STRAIGHT </answer>' -> ('ACCELERATE', 'STRAIGHT'); ValueError otherwise."""
    match = _ANSWER_RE.search(solution)
    if match is None:
        raise ValueError(f"no <answer> ... </answer> in {_show(solution)}; expected e.g. '<answer> KEEP, STRAIGHT </answer>'")
    words = [w.strip() for w in match["value"].split(",")]
    if len(words) != 2:
        raise ValueError(f"expected 'SPEED, PATH' inside <answer>, got {_show(match['value'].strip())}")
    speed, path = words
    if speed not in SPEED_ACTIONS:
        raise ValueError(f"unknown SPEED action {speed!r}; expected one of {', '.join(SPEED_ACTIONS)} (first word)")
    if path not in PATH_ACTIONS:
        raise ValueError(f"unknown PATH action {path!r}; expected one of {', '.join(PATH_ACTIONS)} (second word)")
    return speed, path


def parse_thinking(thinking: str) -> str | None:
    """The text inside '<think> ... </think>', or None when it is empty; ValueError without the tags."""
    match = _THINK_RE.search(thinking)
    if match is None:
        raise ValueError(f"expected '<think> ... </think>', got {_show(thinking)}")
    return match["value"].strip() or None


def release_to_canonical(obj: Any, default_id: str) -> tuple[dict | None, list[tuple[str, str]]]:
    """A release record as a canonical record dict (not yet validated) and the (field, message) problems.

    The dict holds what could be parsed even when something else could not (None only when
    `obj` is not an object), so that the caller can still check the rest of the record.
    """
    if not isinstance(obj, dict):
        return None, [("", f"expected a JSON object, got {type(obj).__name__}")]
    problems: list[tuple[str, str]] = []
    for name in ("image", "problem", "solution"):
        if obj.get(name) is None:
            problems.append((name, "missing required field"))
        elif not isinstance(obj[name], str):
            problems.append((name, f"must be a string, got {type(obj[name]).__name__}"))
    if obj.get("thinking") is not None and not isinstance(obj["thinking"], str):
        problems.append(("thinking", f"must be a string when present, got {type(obj['thinking']).__name__}"))
    failed = {name for name, _ in problems}

    out: dict[str, Any] = {k: v for k, v in obj.items() if k not in RELEASE_FIELDS + REQUIRED_FIELDS + OPTIONAL_FIELDS}
    out["id"] = obj["id"] if obj.get("id") is not None else default_id
    if "image" not in failed:
        out["image"] = obj["image"]
    if "problem" not in failed:
        for name, parse in (("speed", parse_speed), ("navigation", parse_navigation)):
            try:
                out[name] = parse(obj["problem"])
            except ValueError as exc:
                problems.append(("problem", str(exc)))
    if "solution" not in failed:
        try:
            out["speed_action"], out["path_action"] = parse_solution(obj["solution"])
        except ValueError as exc:
            problems.append(("solution", str(exc)))
    if obj.get("thinking") is not None and "thinking" not in failed:
        try:
            reasoning = parse_thinking(obj["thinking"])
        except ValueError as exc:
            problems.append(("thinking", str(exc)))
        else:
            if reasoning is not None:
                out["reasoning"] = reasoning
    return out, problems


# Stand-ins for canonical fields that could not be parsed, so that `parse_record` still
# checks the others (its problems about these fields are dropped: the parse problem says it).
_PLACEHOLDERS = {
    "image": "",
    "speed": 0.0,
    "navigation": "-",
    "speed_action": SPEED_ACTIONS[0],
    "path_action": PATH_ACTIONS[0],
}


def convert_release_item(
    obj: Any, *, file: str, line: int, index: int | None, image_root: Path, check_images: bool = True
) -> tuple[Record | None, list[Problem]]:
    """One release item -> a validated canonical Record, or all its problems (named by release field)."""
    canonical, found = release_to_canonical(obj, derived_id(file, line, index))
    problems = [Problem(file, line, name, message, index) for name, message in found]
    if canonical is None:
        return None, problems
    stand_ins = {name for name in _PLACEHOLDERS if name not in canonical}
    record, more = parse_record({**_PLACEHOLDERS, **canonical}, image_root, file, line, check_images)
    for p in more:
        if p.field in stand_ins:
            continue
        source = _SOURCE_FIELD.get(p.field, p.field)
        message = f"parsed {p.field}: {p.message}" if p.field in _SOURCE_FIELD else p.message
        problems.append(dataclasses.replace(p, field=source, message=message, index=index))
    return (None, problems) if problems else (record, [])
