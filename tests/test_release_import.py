"""Importing the AlphaDrive release format: the parsers, every class, the CLI round trip and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from alphadrive_ray.actions import PATH_ACTIONS, SPEED_ACTIONS, format_answer
from alphadrive_ray.data.convert import convert_items
from alphadrive_ray.data.records import load_records
from alphadrive_ray.data.release import (
    convert_release_item,
    parse_navigation,
    parse_solution,
    parse_speed,
    parse_thinking,
)
from alphadrive_ray.prompts import planning_prompt

# The release's prompt, with its slots filled (the wording of the authors' code).
RELEASE_PROMPT = (
    "You are an expert driving assistant. Your current speed is {}m/s, the navigation command is '{}', "
    "based on the understanding of the driving scene and the navigation information, what is your driving "
    "plan for the next three seconds? Output the planning reasoning process in <think> </think> and final "
    "planning answer in <answer> </answer> tags, respectively. Planning answer consists of SPEED plan and "
    "PATH plan, SPEED includes KEEP, ACCELERATE, DECELERATE, and STOP. PATH includes STRAIGHT, RIGHT_CHANGE, "
    "LEFT_CHANGE, RIGHT_TURN, and LEFT_TURN. For example, a correct answer format is like "
    "'<think> planning reasoning process here </think> <answer> KEEP, LEFT_TURN </answer>'."
)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alphadrive_ray", *args], capture_output=True, text=True, timeout=120)


# --- the parsers ---------------------------------------------------------------------------

# (prompt, speed in m/s or the words of the error)
SPEED_CASES = [
    (RELEASE_PROMPT.format("8.4", "turn left"), 8.4),  # the release prompt
    (planning_prompt(12.5, "go straight"), 12.5),  # our own prompt parses back
    (RELEASE_PROMPT.format("0", "go straight"), 0.0),  # an integer speed
    ("Your current speed is 3.25 m/s, ...", 3.25),  # a space before the unit
    ("YOUR CURRENT SPEED IS 7m/s", 7.0),  # upper case
    ("Your current speed is -2.0m/s", -2.0),  # negative parses here; the record check rejects it
    ("Your current speed is 8.4km/h, ...", 'no "Your current speed is'),  # another unit
    ("Your current speed is fastm/s", "not a number"),  # not a number
    ("Your current speed is m/s", "not a number"),  # no number at all
    ("You are an expert driving assistant.", 'no "Your current speed is'),  # no speed phrase
]


@pytest.mark.parametrize("prompt,expected", SPEED_CASES)
def test_parse_speed(prompt, expected):
    if isinstance(expected, float):
        assert parse_speed(prompt) == expected
    else:
        with pytest.raises(ValueError, match=expected):
            parse_speed(prompt)


# (prompt, navigation or the words of the error)
NAVIGATION_CASES = [
    (RELEASE_PROMPT.format("8.4", "turn left"), "turn left"),  # the release prompt
    (planning_prompt(3.0, "turn right"), "turn right"),  # our own prompt parses back
    ('the navigation command is "go straight 100m, then turn left", ...', "go straight 100m, then turn left"),  # double quotes
    ("the navigation command is ' keep lane '", "keep lane"),  # surrounding spaces are dropped
    ("The Navigation Command Is 'go straight'", "go straight"),  # case of the phrase
    ("the navigation command is ''", ""),  # empty: the record check rejects it later
    ("the navigation command is turn left", "quoted"),  # no quotes
    # the release's commands by distance: a dict inside the quotes, kept whole and normalised
    (RELEASE_PROMPT.format("3.2", "{'100m': 'Straight', '200m': 'Straight'}"), "{'100m': 'Straight', '200m': 'Straight'}"),
    ("the navigation command is \"{ '100m' : 'Turn Left' }\", ...", "{'100m': 'Turn Left'}"),  # spacing normalised
    ('the navigation command is \'{"100m": "Straight"}\', ...', "{'100m': 'Straight'}"),  # JSON-style quotes
    ("the navigation command is '{'100m': 'Straight', '200m': 'Straight''", "never closed"),  # truncated
    ("the navigation command is '{'100m': 5}', ...", "not a dict of distances to commands"),  # not a command
    ("the navigation command is '{'100m': 'Straight'} then left', ...", "not followed by its closing"),
    ("the navigation command is 'turn left", "no closing"),  # an unclosed quote
    ("Your current speed is 8.4m/s.", 'no "the navigation command is'),  # no navigation phrase
]


@pytest.mark.parametrize("prompt,expected", NAVIGATION_CASES)
def test_parse_navigation(prompt, expected):
    errors = ("quoted", 'no "the navigation command is', "never closed", "not a dict", "not followed", "no closing")
    if expected.startswith(errors):
        with pytest.raises(ValueError, match=expected):
            parse_navigation(prompt)
    else:
        assert parse_navigation(prompt) == expected


# every (SPEED, PATH) pair, written as the release writes solutions
SOLUTION_CLASS_CASES = [(s, p) for s in SPEED_ACTIONS for p in PATH_ACTIONS]


@pytest.mark.parametrize("speed,path", SOLUTION_CLASS_CASES)
def test_parse_solution_every_class(speed, path):
    assert parse_solution(format_answer(speed, path)) == (speed, path)


# (solution, the pair or the words of the error)
SOLUTION_CASES = [
    ("<answer>KEEP,LEFT_TURN</answer>", ("KEEP", "LEFT_TURN")),  # no spaces
    ("<answer>\n  STOP ,  STRAIGHT \n</answer>", ("STOP", "STRAIGHT")),  # white space and new lines
    ("<think> red light </think>\n<answer> STOP, STRAIGHT </answer>", ("STOP", "STRAIGHT")),  # a whole completion
    ("ACCELERATE, STRAIGHT", "no <answer>"),  # no tags
    ("<answer> ACCELERATE, STRAIGHT", "no <answer>"),  # unclosed
    ("<answer> STRAIGHT, ACCELERATE </answer>", "unknown SPEED action 'STRAIGHT'"),  # PATH first
    ("<answer> accelerate, straight </answer>", "unknown SPEED action 'accelerate'"),  # lower case
    ("<answer> KEEP, FORWARD </answer>", "unknown PATH action 'FORWARD'"),  # not a PATH word
    ("<answer> KEEP </answer>", "expected 'SPEED, PATH'"),  # one word
    ("<answer> KEEP, STRAIGHT, STOP </answer>", "expected 'SPEED, PATH'"),  # three words
    ("<answer> KEEP STRAIGHT </answer>", "expected 'SPEED, PATH'"),  # no comma
    ("<answer></answer>", "expected 'SPEED, PATH'"),  # an empty answer
]


@pytest.mark.parametrize("solution,expected", SOLUTION_CASES)
def test_parse_solution(solution, expected):
    if isinstance(expected, tuple):
        assert parse_solution(solution) == expected
    else:
        with pytest.raises(ValueError, match=expected.replace("(", r"\(")):
            parse_solution(solution)


# (thinking, reasoning or None, or the words of the error)
THINKING_CASES = [
    ("<think> The light is red, so I stop. </think>", "The light is red, so I stop."),  # the release form
    ("<think>\nTwo lines,\nkept.\n</think>", "Two lines,\nkept."),  # inner new lines are kept
    ("<think> </think>", None),  # empty tags: no reasoning
    ("<think></think>", None),  # empty tags without space
    ("The light is red.", "expected '<think>"),  # no tags
    ("<think> unclosed", "expected '<think>"),  # unclosed
]


@pytest.mark.parametrize("thinking,expected", THINKING_CASES)
def test_parse_thinking(thinking, expected):
    if expected is None or not expected.startswith("expected"):
        assert parse_thinking(thinking) == expected
    else:
        with pytest.raises(ValueError, match=expected):
            parse_thinking(thinking)


# --- the converter -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory) -> Path:
    """A release-like folder: images under samples/, the json next to them."""
    folder = tmp_path_factory.mktemp("release")
    (folder / "samples").mkdir()
    for k in range(4):
        Image.new("RGB", (40, 30), (20 * k, 90, 90)).save(folder / "samples" / f"{k}.jpg")
    return folder


def release_record(
    k: int = 0, speed="8.4", nav="turn left", answer=("DECELERATE", "LEFT_TURN"), thinking="<think> red light </think>", **changes
) -> dict:
    out = {
        "image": f"samples/{k}.jpg",
        "problem": RELEASE_PROMPT.format(speed, nav),
        "solution": format_answer(*answer),
    }
    if thinking is not None:
        out["thinking"] = thinking
    out.update(changes)
    return out


GOOD_RECORDS = [
    release_record(0),
    release_record(1, speed="0.0", nav="go straight", answer=("STOP", "STRAIGHT"), thinking=None),
    release_record(2, speed="15.2", nav="turn right", answer=("KEEP", "RIGHT_CHANGE"), thinking="<think> </think>", id="clip-42"),
    release_record(3, speed="3", nav="go straight", answer=("ACCELERATE", "STRAIGHT"), scene_token="abc123"),
]


def write_release(path: Path, items, jsonl: bool) -> Path:
    path.write_text("\n".join(json.dumps(i) for i in items) + "\n" if jsonl else json.dumps(items, indent=2))
    return path


@pytest.mark.parametrize("jsonl", [False, True], ids=["json_array", "jsonl"])
def test_cli_round_trip(release_dir, tmp_path, jsonl):
    src = write_release(release_dir / f"train-{tmp_path.name}.json{'l' if jsonl else ''}", GOOD_RECORDS, jsonl)
    out = tmp_path / "canonical" / "train.jsonl"
    result = run_cli("data", "import-release", str(src), str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"wrote 4 record(s) to {out}"
    records = load_records(out)
    # ids: derived from the line number (JSONL, from 1) or the array index (from 0), unless given
    first = 1 if jsonl else 0
    assert [r.id for r in records] == [f"{src.stem}-{first:06d}", f"{src.stem}-{first + 1:06d}", "clip-42", f"{src.stem}-{first + 3:06d}"]
    assert [(r.speed, r.navigation) for r in records] == [(8.4, "turn left"), (0.0, "go straight"), (15.2, "turn right"), (3.0, "go straight")]
    assert [(r.speed_action, r.path_action) for r in records] == [
        ("DECELERATE", "LEFT_TURN"),
        ("STOP", "STRAIGHT"),
        ("KEEP", "RIGHT_CHANGE"),
        ("ACCELERATE", "STRAIGHT"),
    ]
    assert [r.reasoning for r in records] == ["red light", None, None, "red light"]
    assert [Path(r.image) for r in records] == [release_dir / "samples" / f"{k}.jpg" for k in range(4)]
    assert records[3].extra == {"scene_token": "abc123"}  # other fields are kept
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(not Path(r["image"]).is_absolute() for r in rows)  # relative to the output file
    assert "problem" not in rows[0] and "solution" not in rows[0]
    assert run_cli("data", "validate", str(out)).returncode == 0
    # importing again gives the same bytes (ids are deterministic)
    again = tmp_path / "again.jsonl"
    assert run_cli("data", "import-release", str(src), str(again)).returncode == 0
    assert [json.loads(x)["id"] for x in again.read_text().splitlines()] == [r.id for r in records]


def test_cli_image_root(release_dir, tmp_path):
    src = write_release(tmp_path / "elsewhere.json", GOOD_RECORDS[:1], jsonl=False)
    result = run_cli("data", "import-release", str(src), str(tmp_path / "o.jsonl"))
    assert result.returncode == 1 and f"{src}[0]: image: image file not found" in result.stdout
    result = run_cli("data", "import-release", str(src), str(tmp_path / "o.jsonl"), "--image-root", str(release_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert Path(load_records(tmp_path / "o.jsonl")[0].image) == release_dir / "samples" / "0.jpg"
    result = run_cli("data", "import-release", str(src), str(tmp_path / "o.jsonl"), "--image-root", str(tmp_path / "nope"))
    assert result.returncode == 2 and "--image-root" in result.stderr and "Traceback" not in result.stderr


def without(record: dict, key: str) -> dict:
    return {k: v for k, v in record.items() if k != key}


# (id, bad release record, [(field, words), ...] of its problems)
BAD_RECORD_CASES = [
    # no image
    ("missing_image_field", without(release_record(), "image"), [("image", "missing required field")]),
    # the image file does not exist
    ("image_not_found", release_record(image="samples/9.jpg"), [("image", "image file not found")]),
    # no prompt
    ("missing_problem", without(release_record(), "problem"), [("problem", "missing required field")]),
    # no answer
    ("missing_solution", without(release_record(), "solution"), [("solution", "missing required field")]),
    # the prompt is not text
    ("problem_not_text", release_record(problem=["Your current speed is 3m/s"]), [("problem", "must be a string")]),
    # the prompt has no speed
    ("no_speed", release_record(problem="the navigation command is 'turn left'"), [("problem", "current speed is")]),
    # the prompt has no navigation
    ("no_navigation", release_record(problem="Your current speed is 3m/s."), [("problem", "navigation command is")]),
    # the speed is not a number
    ("speed_not_a_number", release_record(speed="fast"), [("problem", "not a number")]),
    # negative speed: parsed, then rejected by the record check
    ("negative_speed", release_record(speed="-3.0"), [("problem", "parsed speed: must be a finite, non-negative")]),
    # km/h by mistake
    ("implausible_speed", release_record(speed="120"), [("problem", "parsed speed: 120.0 m/s is implausible")]),
    # empty navigation command
    ("empty_navigation", release_record(nav=""), [("problem", "parsed navigation: must be a non-empty string")]),
    # an answer without tags
    ("solution_without_tags", release_record(solution="KEEP, STRAIGHT"), [("solution", "no <answer>")]),
    # an unknown SPEED word
    ("unknown_speed_action", release_record(answer=("FAST", "STRAIGHT")), [("solution", "unknown SPEED action 'FAST'")]),
    # an unknown PATH word
    ("unknown_path_action", release_record(answer=("KEEP", "U_TURN")), [("solution", "unknown PATH action 'U_TURN'")]),
    # reasoning without tags
    ("thinking_without_tags", release_record(thinking="I stop."), [("thinking", "expected '<think>")]),
    # reasoning that is not text
    ("thinking_not_text", release_record(thinking=5), [("thinking", "must be a string")]),
    # an empty given id
    ("empty_id", release_record(id=""), [("id", "non-empty")]),
    # the id of the good first record
    ("duplicate_id", release_record(id="good"), [("id", "duplicate id 'good'")]),
    # every problem of a record is listed, not only the first
    (
        "several_problems",
        release_record(image="samples/9.jpg", speed="-1", solution="KEEP"),
        [("problem", "parsed speed"), ("solution", "no <answer>"), ("image", "not found")],
    ),
    # not an object
    ("not_an_object", ["samples/0.jpg", "prompt", "answer"], [("", "expected a JSON object")]),
]


@pytest.mark.parametrize("name,bad,expected", BAD_RECORD_CASES, ids=[c[0] for c in BAD_RECORD_CASES])
def test_bad_record_in_process(release_dir, name, bad, expected, tmp_path):
    src = write_release(tmp_path / "in.jsonl", [release_record(id="good"), bad], jsonl=True)

    def convert_one(obj, line, index):
        return convert_release_item(obj, file=str(src), line=line, index=index, image_root=release_dir)

    conversion = convert_items(src, convert_one)
    assert [r.id for r in conversion.records] == ["good"]
    assert (conversion.n_items, conversion.n_bad) == (2, 1)
    found = sorted((p.line, p.field, p.message) for p in conversion.problems)
    assert len(found) == len(expected), found
    for field, words in expected:
        assert any(line == 2 and f == field and words in m for line, f, m in found), (field, words, found)


def test_bad_records_cli(release_dir, tmp_path):
    items = [release_record(id="good")] + [bad for _, bad, _ in BAD_RECORD_CASES]
    n_bad, n_problems = len(BAD_RECORD_CASES), sum(len(e) for _, _, e in BAD_RECORD_CASES)
    for as_jsonl in (True, False):
        src = write_release(tmp_path / ("in.jsonl" if as_jsonl else "in.json"), items, jsonl=as_jsonl)
        out = tmp_path / "out.jsonl"
        result = run_cli("data", "import-release", str(src), str(out), "--image-root", str(release_dir))
        assert result.returncode == 1 and "Traceback" not in result.stderr and not out.exists()
        lines = result.stdout.splitlines()
        assert len(lines) == n_problems
        for k, (_, _, expected) in enumerate(BAD_RECORD_CASES, start=1):
            where = f"{src}:{k + 1}: " if as_jsonl else f"{src}[{k}]: "
            mine = [line for line in lines if line.startswith(where)]
            assert len(mine) == len(expected), (where, mine)
            for field, words in expected:
                assert any(line.startswith(where + (f"{field}: " if field else "")) and words in line for line in mine), (field, words, mine)
        assert f"{src}: {n_bad} bad record(s) of {n_bad + 1}; {n_problems} problem(s)" in result.stderr

        result = run_cli("data", "import-release", str(src), str(out), "--image-root", str(release_dir), "--skip-bad")
        assert result.returncode == 0, result.stderr
        assert f"wrote 1 record(s) to {out}; skipped {n_bad} bad record(s) of {n_bad + 1} (--skip-bad)" in result.stdout
        assert [r.id for r in load_records(out)] == ["good"]
        out.unlink()


def test_no_images_flag(release_dir, tmp_path):
    src = write_release(tmp_path / "in.json", [release_record(image="samples/missing.jpg")], jsonl=False)
    out = tmp_path / "o.jsonl"
    assert run_cli("data", "import-release", str(src), str(out), "--image-root", str(release_dir)).returncode == 1
    result = run_cli("data", "import-release", str(src), str(out), "--image-root", str(release_dir), "--no-images")
    assert result.returncode == 0 and out.exists()
    assert run_cli("data", "validate", str(out)).returncode == 1  # validate still catches it


# (id, file content or None for no file, words of the error, exit status)
FILE_CASES = [
    ("missing_input", None, "input file not found", 2),  # a typo in the input path
    ("empty_file", "", "empty file", 1),  # nothing to convert
    ("blank_lines", "\n\n  \n", "no records", 1),  # only white space
    ("empty_array", "  []  ", "empty JSON array", 1),  # an array without records
    ("bad_json_array", '[\n  {"image": "a.jpg"}\n  {"image": "b.jpg"}\n]', "in.json:3: bad JSON", 1),  # a missing comma
    ("bad_json_line", '{"image": "a.jpg"\n', "in.json:1: bad JSON", 1),  # JSONL with a broken line
]


@pytest.mark.parametrize("name,content,words,status", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_cli_file_errors(tmp_path, name, content, words, status):
    src = tmp_path / "in.json"
    if content is not None:
        src.write_text(content)
    result = run_cli("data", "import-release", str(src), str(tmp_path / "out.jsonl"))
    assert result.returncode == status and words in result.stdout + result.stderr, result
    assert "Traceback" not in result.stderr and not (tmp_path / "out.jsonl").exists()


def test_non_utf8_array_file(tmp_path):
    src = tmp_path / "in.json"
    src.write_bytes(b'[\n {"image": "caf\xe9.jpg"}\n]')
    result = run_cli("data", "import-release", str(src), str(tmp_path / "out.jsonl"))
    assert result.returncode == 1 and f"{src}:2: not valid UTF-8" in result.stdout and "Traceback" not in result.stderr


def test_refuses_to_overwrite_the_input(release_dir, tmp_path):
    src = write_release(tmp_path / "in.jsonl", GOOD_RECORDS[:1], jsonl=True)
    before = src.read_bytes()
    result = run_cli("data", "import-release", str(src), str(src), "--image-root", str(release_dir))
    assert result.returncode == 2 and "is the input file" in result.stderr and src.read_bytes() == before


# --- the shapes the release's files come in -------------------------------------------------

# data_tools/example.json of the public release: one pretty-printed object whose prompt gives
# the navigation as a dict of distances to commands
NAV_BY_DISTANCE = "{'100m': 'Straight', '200m': 'Straight'}"
EXAMPLE = release_record(0, speed="3.2", nav=NAV_BY_DISTANCE, answer=("KEEP", "STRAIGHT"), thinking="<think> clear road </think>")


def test_the_release_example_imports_whole_and_renders_its_own_prompt(release_dir, tmp_path):
    src = release_dir / f"example-{tmp_path.name}.json"
    src.write_text(json.dumps(EXAMPLE, indent=4))
    out = tmp_path / "example.jsonl"
    result = run_cli("data", "import-release", str(src), str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    (record,) = load_records(out)
    assert record.id == f"{src.stem}-000001" and record.navigation == NAV_BY_DISTANCE
    # the prompt template renders the navigation exactly as the release's prompt shows it
    assert f"the navigation command is '{NAV_BY_DISTANCE}'," in planning_prompt(record.speed, record.navigation)
    template = RELEASE_PROMPT.replace("{}", "{speed}", 1).replace("{}", "{navigation}", 1)
    assert planning_prompt(record.speed, record.navigation, template) == EXAMPLE["problem"]
    assert run_cli("data", "validate", str(out)).returncode == 0


@pytest.mark.parametrize("shape", ["one object", "JSONL", "JSON array", "objects one after another"])
def test_every_shape_of_release_file_gives_the_same_records(release_dir, tmp_path, shape):
    items = [EXAMPLE, release_record(1, nav="{'50m': 'Left'}")]
    text = {
        "one object": json.dumps(items[0], indent=2),
        "JSONL": "\n".join(json.dumps(i) for i in items) + "\n",
        "JSON array": json.dumps(items, indent=2),
        "objects one after another": "\n".join(json.dumps(i, indent=2) for i in items) + "\n",
    }[shape]
    src = tmp_path / "in.json"
    src.write_text(text)

    def convert_one(obj, line, index):
        return convert_release_item(obj, file=str(src), line=line, index=index, image_root=release_dir)

    conversion = convert_items(src, convert_one)
    assert conversion.problems == []
    expected = [NAV_BY_DISTANCE, "{'50m': 'Left'}"][: 1 if shape == "one object" else 2]
    assert [r.navigation for r in conversion.records] == expected
    if shape == "objects one after another":  # located by the line each object starts on
        second = len(json.dumps(items[0], indent=2).splitlines()) + 1
        assert [r.id for r in conversion.records] == ["in-000001", f"in-{second:06d}"]


def test_a_navigation_that_does_not_parse_names_the_record_and_field(release_dir, tmp_path):
    broken = release_record(1, nav="{'100m': 'Straight', '200m': 'Straight'")
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(EXAMPLE) + "\n" + json.dumps(broken) + "\n")
    out = tmp_path / "out.jsonl"
    result = run_cli("data", "import-release", str(src), str(out), "--image-root", str(release_dir))
    assert result.returncode == 1 and not out.exists() and "Traceback" not in result.stderr
    assert f"{src}:2: problem: the navigation command" in result.stdout and "never closed" in result.stdout


def test_validate_refuses_a_truncated_navigation_dict(release_dir, tmp_path):
    # what an earlier import wrote for the release's example given as one JSONL line
    row = {
        "id": "a",
        "image": str(release_dir / "samples" / "0.jpg"),
        "speed": 3.2,
        "navigation": "{",
        "speed_action": "KEEP",
        "path_action": "STRAIGHT",
    }
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "id": "b", "navigation": NAV_BY_DISTANCE}) + "\n")
    result = run_cli("data", "validate", str(path))
    assert result.returncode == 1 and f"{path}:1: navigation: starts like a dict" in result.stdout
    assert f"{path}:2" not in result.stdout
