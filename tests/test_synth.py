"""The synthetic scene generator: determinism, class coverage and mix, the planner's rules, reasoning, CLI."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from alphadrive_ray.actions import PATH_ACTIONS, SPEED_ACTIONS
from alphadrive_ray.data.records import load_records
from alphadrive_ray.data.synth import (
    DEFAULT_PATH_MIX,
    DEFAULT_SPEED_MIX,
    Labelling,
    generate_dataset,
    parse_mix,
    plan_scene,
    reasoning_for,
    render_scene,
    sample_scene,
    scene_from_json,
)
from tests.conftest import open_road


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alphadrive_ray", *args], capture_output=True, text=True, timeout=120)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """400 scenes at 64 px with the default mix and the rule-based planner's labels (about a second)."""
    path, stats = generate_dataset(tmp_path_factory.mktemp("synth400"), 400, seed=0, size=64, labelling=Labelling(labels="rule"))
    assert stats.n == 400
    return path


# --- determinism ---------------------------------------------------------------------------


def test_same_seed_same_bytes(tmp_path):
    generate_dataset(tmp_path / "a", 25, seed=7, size=64)
    generate_dataset(tmp_path / "b", 25, seed=7, size=64)
    a, b = folder_bytes(tmp_path / "a"), folder_bytes(tmp_path / "b")
    assert len([k for k in a if k.startswith("images/")]) == 25
    assert a.keys() == b.keys()
    for name in a:  # data.jsonl, synth.json and every PNG, byte for byte
        assert a[name] == b[name], name


def test_different_seed_different_data(tmp_path):
    generate_dataset(tmp_path / "a", 25, seed=7, size=64)
    generate_dataset(tmp_path / "b", 25, seed=8, size=64)
    a, b = folder_bytes(tmp_path / "a"), folder_bytes(tmp_path / "b")
    assert a["data.jsonl"] != b["data.jsonl"]
    images_a = sorted(v for k, v in a.items() if k.startswith("images/"))
    images_b = sorted(v for k, v in b.items() if k.startswith("images/"))
    assert images_a != images_b


# --- class coverage and mix ----------------------------------------------------------------


def test_every_class_occurs(dataset):
    rows = [json.loads(line) for line in dataset.read_text().splitlines()]
    speed = Counter(r["speed_action"] for r in rows)
    path = Counter(r["path_action"] for r in rows)
    assert set(speed) == set(SPEED_ACTIONS), speed
    assert set(path) == set(PATH_ACTIONS), path
    # the default SPEED mix is uniform: no class is starved
    assert min(speed.values()) >= 50, speed


def draw(n: int, seed: int, speed_mix=DEFAULT_SPEED_MIX, path_mix=DEFAULT_PATH_MIX) -> tuple[Counter, Counter]:
    rng = random.Random(seed)
    plans = [sample_scene(rng, speed_mix, path_mix)[1] for _ in range(n)]
    return Counter(p.speed_action for p in plans), Counter(p.path_action for p in plans)


def test_speed_mix_shifts_the_distribution():
    default_speed, _ = draw(300, seed=1)
    stop_speed, _ = draw(300, seed=1, speed_mix={"KEEP": 1, "ACCELERATE": 1, "DECELERATE": 1, "STOP": 12})
    assert stop_speed["STOP"] > 150, stop_speed  # the majority
    assert stop_speed["STOP"] > 2 * default_speed["STOP"]


def test_path_mix_shifts_the_distribution():
    _, default_path = draw(300, seed=2)
    _, left_path = draw(300, seed=2, path_mix={"LEFT_CHANGE": 1.0})
    assert left_path.most_common(1)[0][0] == "LEFT_CHANGE", left_path
    assert left_path["LEFT_CHANGE"] > 2 * default_path["LEFT_CHANGE"]


def test_zero_weight_class_never_targeted():
    # ACCELERATE is never a target; it can still appear only as the fallback of an impossible pair,
    # which never happens for SPEED targets alone: so it never appears
    speed, _ = draw(200, seed=3, speed_mix={"KEEP": 1, "DECELERATE": 1, "STOP": 1})
    assert "ACCELERATE" not in speed


# (mix text, expected weights or the words of the error)
PARSE_MIX_CASES = [
    ("KEEP=1,STOP=2", {"KEEP": 1.0, "STOP": 2.0}),  # two classes, others get 0
    (" keep = 0.5 , stop=1 ", {"KEEP": 0.5, "STOP": 1.0}),  # case and spaces do not matter
    ("KEEP=1,", {"KEEP": 1.0}),  # a trailing comma is fine
    ("FAST=1", "unknown class"),  # not a SPEED class
    ("KEEP", "expected CLASS=WEIGHT"),  # no weight
    ("KEEP=abc", "must be a number"),  # weight not a number
    ("KEEP=-1", "must be >= 0"),  # negative weight
    ("KEEP=nan", "must be >= 0"),  # NaN weight
    ("KEEP=0,STOP=0", "no class a positive weight"),  # nothing to draw
]


@pytest.mark.parametrize("text,expected", PARSE_MIX_CASES)
def test_parse_mix(text, expected):
    if isinstance(expected, dict):
        assert parse_mix(text, SPEED_ACTIONS) == expected
    else:
        with pytest.raises(ValueError, match=expected):
            parse_mix(text, SPEED_ACTIONS)


# --- the planner's rules -------------------------------------------------------------------

# A free two-lane road, ego in the left lane, 10 m/s, going straight: KEEP, STRAIGHT.

# (changes to an open road, SPEED, PATH, speed rule that fired)
RULE_CASES = [
    # SPEED rule 1, hazard: a pedestrian; slow enough to stop (just below 4 m/s)
    (dict(pedestrian_distance=12.0, speed=3.9), "STOP", "STRAIGHT", "pedestrian"),
    # hazard at exactly 4 m/s: too fast to stop, decelerate
    (dict(pedestrian_distance=12.0, speed=4.0), "DECELERATE", "STRAIGHT", "pedestrian"),
    # hazard: a red light at a near intersection, stopped
    (dict(intersection="near", light="red", speed=0.0), "STOP", "STRAIGHT", "red"),
    # a red light at a far intersection is not a hazard yet
    (dict(intersection="far", light="red"), "KEEP", "STRAIGHT", "free"),
    # hazard: lead vehicle just below 10 m
    (dict(lead_distance=9.9, speed=2.0), "STOP", "STRAIGHT", "lead_hazard"),
    # lead vehicle at exactly 10 m is caution, not hazard
    (dict(lead_distance=10.0, speed=2.0), "DECELERATE", "STRAIGHT", "lead_close"),
    # the pedestrian outranks a followed lead vehicle
    (dict(pedestrian_distance=8.0, lead_distance=30.0, speed=10.0), "DECELERATE", "STRAIGHT", "pedestrian"),
    # SPEED rule 2, caution: yellow light at a near intersection
    (dict(intersection="near", light="yellow"), "DECELERATE", "STRAIGHT", "yellow"),
    # a yellow light at a far intersection is ignored
    (dict(intersection="far", light="yellow"), "KEEP", "STRAIGHT", "free"),
    # caution: lead vehicle just below 25 m
    (dict(lead_distance=24.9), "DECELERATE", "STRAIGHT", "lead_close"),
    # caution: cones close the ego lane; a lane on the right to move into
    (dict(cones_distance=15.0), "DECELERATE", "RIGHT_CHANGE", "cones"),
    # caution: turning at a near intersection just above 8 m/s
    (dict(intersection="near", light="green", navigation="turn left", speed=8.1), "DECELERATE", "LEFT_TURN", "turn_fast"),
    # turning at exactly 8 m/s is not too fast
    (dict(intersection="near", light="green", navigation="turn left", speed=8.0), "KEEP", "LEFT_TURN", "free"),
    # SPEED rule 3, following at exactly 25 m just below 5 m/s: catch up
    (dict(lead_distance=25.0, speed=4.9), "ACCELERATE", "STRAIGHT", "follow"),
    # following at exactly 5 m/s: keep
    (dict(lead_distance=25.0, speed=5.0), "KEEP", "STRAIGHT", "follow"),
    # following just below 45 m at cruising speed
    (dict(lead_distance=44.9, speed=12.0), "KEEP", "STRAIGHT", "follow"),
    # a lead vehicle at exactly 45 m is not followed: free road, slow
    (dict(lead_distance=45.0, speed=4.9), "ACCELERATE", "STRAIGHT", "free_slow"),
    # SPEED rule 4, free road just below 8 m/s
    (dict(speed=7.9), "ACCELERATE", "STRAIGHT", "free_slow"),
    # free road at exactly 8 m/s
    (dict(speed=8.0), "KEEP", "STRAIGHT", "free"),
    # free road at exactly 15 m/s
    (dict(speed=15.0), "KEEP", "STRAIGHT", "free"),
    # free road just above 15 m/s
    (dict(speed=15.1), "DECELERATE", "STRAIGHT", "free_fast"),
    # PATH rule 1: STOP holds the lane even with a turn at a near intersection
    (dict(intersection="near", light="green", navigation="turn right", pedestrian_distance=9.0, speed=1.0), "STOP", "STRAIGHT", "pedestrian"),
    # PATH rule 1: a red near light holds the lane even when not stopping
    (dict(intersection="near", light="red", navigation="turn left", speed=10.0), "DECELERATE", "STRAIGHT", "red"),
    # PATH rule 2: near intersection, turn right, no light
    (dict(intersection="near", navigation="turn right", speed=6.0), "ACCELERATE", "RIGHT_TURN", "free_slow"),
    # PATH rule 2 outranks cones (the turn leaves the closed lane anyway)
    (dict(intersection="near", navigation="turn left", cones_distance=15.0, speed=6.0), "DECELERATE", "LEFT_TURN", "cones"),
    # PATH rule 2: decelerating for a pedestrian still turns
    (dict(intersection="near", navigation="turn left", pedestrian_distance=15.0, speed=10.0), "DECELERATE", "LEFT_TURN", "pedestrian"),
    # PATH rule 3: cones with a lane on the left
    (dict(cones_distance=15.0, ego_lane=1), "DECELERATE", "LEFT_CHANGE", "cones"),
    # PATH rule 4: turn left ahead (far intersection), lane on the left
    (dict(intersection="far", navigation="turn left", ego_lane=1), "KEEP", "LEFT_CHANGE", "free"),
    # PATH rule 4 does not apply without a lane on the left
    (dict(navigation="turn left", ego_lane=0), "KEEP", "STRAIGHT", "free"),
    # PATH rule 4: turn right ahead, lane on the right
    (dict(navigation="turn right", ego_lane=0), "KEEP", "RIGHT_CHANGE", "free"),
    # PATH rule 4 does not apply from the rightmost lane
    (dict(navigation="turn right", ego_lane=1), "KEEP", "STRAIGHT", "free"),
    # PATH rule 5: the base scene
    (dict(), "KEEP", "STRAIGHT", "free"),
]


@pytest.mark.parametrize("changes,speed_action,path_action,rule", RULE_CASES)
def test_planner_rules(changes, speed_action, path_action, rule):
    plan = plan_scene(open_road(**changes))
    assert (plan.speed_action, plan.path_action, plan.speed_reason) == (speed_action, path_action, rule)


def test_generated_labels_follow_the_planner(dataset):
    records = load_records(dataset)  # also: the generated dataset is valid
    assert len(records) == 400
    for record in records:
        scene = scene_from_json(record.extra["scene"])
        plan = plan_scene(scene)
        assert (record.speed_action, record.path_action) == (plan.speed_action, plan.path_action), record.id
        assert (record.speed, record.navigation) == (scene.speed, scene.navigation)


# The words by which the reasoning states each decision (written here, not imported).
SPEED_WORDS = {"STOP": "so I stop", "DECELERATE": "so I slow down", "ACCELERATE": "so I speed up", "KEEP": "so I keep my speed"}
PATH_WORDS = {
    "STRAIGHT": ("I keep straight", "I stay in my lane"),
    "LEFT_TURN": ("so I turn left",),
    "RIGHT_TURN": ("so I turn right",),
    "LEFT_CHANGE": ("left lane",),
    "RIGHT_CHANGE": ("right lane",),
}


def test_reasoning_states_the_decision(dataset):
    for record in load_records(dataset, check_images=False):
        text = record.reasoning
        assert text.startswith("I see ") and f". At {record.speed:.1f} m/s, " in text, text
        assert SPEED_WORDS[record.speed_action] in text, text
        assert any(w in text for w in PATH_WORDS[record.path_action]), text


def test_reasoning_of_a_constructed_scene():
    scene = open_road(intersection="near", light="red", speed=2.0)
    assert reasoning_for(scene, plan_scene(scene)) == (
        "I see a red light at an intersection close ahead and a lane on my right. "
        "At 2.0 m/s, the traffic light at the intersection ahead is red, so I stop. I stay in my lane."
    )


# (changes to an open road, the scene description): every planning-relevant element is named
DESCRIPTION_CASES = [
    # nothing in view but the lane to the right
    ({}, "I see a lane on my right."),
    # one lane only
    (dict(num_lanes=1), "I see no other lane."),
    # the lead car's distance in the planner's bands: < 10 m very close, < 25 m close, < 45 m safe
    (dict(lead_distance=9.9), "I see a car very close ahead and a lane on my right."),
    (dict(lead_distance=10.0), "I see a car close ahead and a lane on my right."),
    (dict(lead_distance=30.0), "I see a car at a safe distance ahead and a lane on my right."),
    (dict(lead_distance=45.0), "I see a car far ahead and a lane on my right."),
    # an intersection without a light, far away
    (dict(intersection="far"), "I see an intersection far ahead and a lane on my right."),
    # everything at once, in the fixed order; the middle lane of three has lanes on both sides
    (
        dict(num_lanes=3, ego_lane=1, intersection="near", light="yellow", lead_distance=20.0, pedestrian_distance=8.0, cones_distance=12.0),
        "I see a yellow light at an intersection close ahead, a car close ahead, a pedestrian on the road, "
        "cones in my lane and a lane on my left and right.",
    ),
]


@pytest.mark.parametrize("changes, expected", DESCRIPTION_CASES)
def test_scene_description(changes, expected):
    from alphadrive_ray.data.synth import describe_scene

    assert describe_scene(open_road(**changes)) == expected


# --- rendering -----------------------------------------------------------------------------

LIGHT_RED, LIGHT_GREEN, SKIN, CONE = (255, 30, 30), (40, 230, 60), (230, 190, 150), (255, 120, 0)

# (changes to an open road, a colour the renderer uses only for one element, whether it must appear)
VISIBLE_CASES = [
    (dict(intersection="near", light="red"), LIGHT_RED, True),  # a red light is drawn lit red
    (dict(intersection="near", light="red"), LIGHT_GREEN, False),  # ... and not green
    (dict(intersection="near", light="green"), LIGHT_GREEN, True),  # a green light is drawn lit green
    (dict(pedestrian_distance=12.0), SKIN, True),  # a pedestrian has a face
    (dict(), SKIN, False),  # no pedestrian, no face
    (dict(cones_distance=15.0), CONE, True),  # cones are orange
    (dict(), CONE, False),  # no cones, no orange
]


@pytest.mark.parametrize("changes,colour,present", VISIBLE_CASES)
def test_what_decides_the_label_is_drawn(changes, colour, present):
    image = render_scene(open_road(**changes), size=224, seed=0)
    assert image.size == (224, 224) and image.mode == "RGB"
    colours = {c for _, c in image.getcolors(224 * 224)}
    assert (colour in colours) == present


def test_render_size_and_seed():
    scene = open_road(lead_distance=20.0)
    assert render_scene(scene, size=96, seed=1).size == (96, 96)
    assert render_scene(scene, size=96, seed=1).tobytes() == render_scene(scene, size=96, seed=1).tobytes()


# --- throughput and the CLI ----------------------------------------------------------------


def test_generate_200_at_full_size(tmp_path):
    path, stats = generate_dataset(tmp_path, 200, seed=5)  # 224 px, the default
    assert stats.n == 200 and sum(stats.speed_counts.values()) == 200 and sum(stats.path_counts.values()) == 200
    assert len(list((tmp_path / "images").glob("*.png"))) == 200
    meta = json.loads((tmp_path / "synth.json").read_text())
    assert meta["n"] == 200 and meta["size"] == 224 and meta["speed_counts"] == stats.speed_counts
    print(f"200 scenes at 224 px in {stats.seconds:.2f}s ({200 / stats.seconds * 60:.0f}/min)")


def test_cli_synth(tmp_path):
    out = tmp_path / "scenes"
    result = run_cli("data", "synth", str(out), "--n", "20", "--seed", "3", "--size", "64", "--speed-mix", "STOP=1")
    assert result.returncode == 0, result.stderr
    assert f"wrote 20 scenes to {out / 'data.jsonl'}" in result.stdout and "SPEED: " in result.stdout
    records = load_records(out / "data.jsonl")
    assert len(records) == 20 and {r.speed_action for r in records} == {"STOP"}
    assert run_cli("data", "validate", str(out / "data.jsonl")).returncode == 0


# (arguments after `data synth OUT`, words of the error)
CLI_ERROR_CASES = [
    (["--n", "0"], "--n must be at least 1"),  # nothing to generate
    (["--size", "10"], "--size must be between"),  # too small for the processor
    (["--speed-mix", "FAST=1"], "bad class mix"),  # unknown class
    (["--path-mix", "STRAIGHT=0"], "bad class mix"),  # no positive weight
]


@pytest.mark.parametrize("args,words", CLI_ERROR_CASES)
def test_cli_synth_errors(tmp_path, args, words):
    result = run_cli("data", "synth", str(tmp_path / "out"), *args)
    assert result.returncode == 2 and "error: " in result.stderr and words in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
