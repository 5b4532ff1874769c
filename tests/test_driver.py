"""The stochastic driver model: its labels, their distributions, the ceiling, the teacher's reasoning."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from alphadrive_ray.actions import PATH_ACTIONS, SPEED_ACTIONS
from alphadrive_ray.data.driver import (
    LABEL_THRESHOLDS,
    draw_drivers,
    label_distribution,
    label_scenes,
    most_likely,
    typical_labels,
)
from alphadrive_ray.data.records import load_records
from alphadrive_ray.data.synth import Labelling, Scene, explain, generate_dataset, random_scene
from alphadrive_ray.data.trajectory import label_trajectories, label_trajectory
from tests.conftest import open_road


# An empty two-lane road, ego in the left lane; each test changes what it needs.
def scene(**changes):
    return open_road(**{"speed": 11.0, **changes})


# --- the labeller, vectorised ------------------------------------------------------------


def test_vectorised_labeller_equals_the_scalar_one():
    rng = np.random.default_rng(0)
    # random walks forward, standing cars, and points exactly on the thresholds
    paths = np.cumsum(rng.normal(0, 2, (3000, 6, 2)) + [0, 3], axis=1)
    paths[::5] = rng.normal(0, 0.2, (len(paths[::5]), 6, 2))
    paths[1::7, -1, 0] = 4.0  # lateral threshold, inclusive
    thresholds = [{}, {"stop_speed": 2.5, "lateral_threshold": 2.0, "angle_threshold_deg": 12.0}]
    for kw in thresholds:
        assert label_trajectories(paths, **kw) == [label_trajectory(p.tolist(), **kw) for p in paths]


@pytest.mark.parametrize(
    "bad",
    [np.zeros((3, 1, 2)), np.zeros((3, 6, 3)), np.zeros((6, 2)), np.full((2, 6, 2), np.nan)],
)
def test_vectorised_labeller_rejects_bad_shapes(bad):
    with pytest.raises(ValueError):
        label_trajectories(bad)


# --- what drivers do ---------------------------------------------------------------------


def test_no_noise_is_one_label_per_scene():
    rng = random.Random(0)
    for _ in range(40):
        s = random_scene(rng)
        dist = label_distribution(s, draws=16, seed=1, noise=0.0)
        assert len(dist) == 1 and list(dist.values()) == [1.0]
        assert list(dist) == typical_labels([s])  # the typical driver is the noise-free one


def test_same_scene_different_labels_at_default_noise():
    # a yellow light 8 m ahead at 9 m/s: some drivers go through, the others stop
    dist = label_distribution(scene(speed=9.0, intersection="near", light="yellow", intersection_distance=9.0), draws=256)
    speeds = {speed for speed, _ in dist}
    assert "KEEP" in speeds and "DECELERATE" in speeds
    assert abs(sum(dist.values()) - 1.0) < 1e-9
    assert list(dist.values()) == sorted(dist.values(), reverse=True)


@pytest.mark.parametrize(
    "changes, expected",
    [
        # waiting at a red light: stops
        ({"speed": 0.5, "intersection": "near", "light": "red", "intersection_distance": 8.0}, ("STOP", "STRAIGHT")),
        # a pedestrian in front of a fast car: brakes
        ({"speed": 12.0, "pedestrian_distance": 15.0}, ("DECELERATE", "STRAIGHT")),
        # a slow car on an empty road: speeds up to its cruising speed
        ({"speed": 3.0}, ("ACCELERATE", "STRAIGHT")),
        # at cruising speed on an empty road: keeps it
        ({"speed": 11.5}, ("KEEP", "STRAIGHT")),
        # a turn at the intersection just ahead, at turning speed
        (
            {"speed": 6.0, "navigation": "turn right", "num_lanes": 1, "intersection": "near", "light": "green", "intersection_distance": 7.0},
            ("KEEP", "RIGHT_TURN"),
        ),
        # cones in the ego lane, a lane on the right: slows and changes lanes
        ({"speed": 12.0, "cones_distance": 20.0}, ("DECELERATE", "RIGHT_CHANGE")),
        # moving over early for a right turn the navigation announces
        ({"speed": 11.5, "navigation": "turn right"}, ("KEEP", "RIGHT_CHANGE")),
    ],
)
def test_most_likely_plan_of_clear_scenes(changes, expected):
    dist = label_distribution(scene(**changes), draws=128, seed=3)
    assert most_likely(dist) == expected
    assert dist[expected] >= 0.6


def test_a_slow_lane_change_is_still_in_its_lane_after_three_seconds():
    # the same move at walking pace covers a few metres of a 22-40 m lane change
    dist = label_distribution(scene(speed=3.0, navigation="turn right"), draws=64)
    assert most_likely(dist)[1] == "STRAIGHT"


def test_labels_of_a_scene_do_not_depend_on_its_batch():
    rng = random.Random(5)
    scenes = [random_scene(rng) for _ in range(12)]
    together, paths = label_scenes(scenes, 20, [np.random.default_rng(i) for i in range(12)])
    alone = [label_scenes([s], 20, [np.random.default_rng(i)])[0][0] for i, s in enumerate(scenes)]
    assert together == alone
    assert paths.shape == (12, 20, 6, 2)
    for labels in together:
        assert all(sp in SPEED_ACTIONS and pa in PATH_ACTIONS for sp, pa in labels)


def test_driver_noise_must_not_be_negative():
    with pytest.raises(ValueError, match="noise"):
        draw_drivers(np.random.default_rng(0), 4, noise=-0.1)


def test_most_likely_breaks_ties_in_sorted_order():
    assert most_likely({("KEEP", "STRAIGHT"): 0.5, ("ACCELERATE", "STRAIGHT"): 0.5}) == ("ACCELERATE", "STRAIGHT")


# --- the teacher ---------------------------------------------------------------------------


def test_teacher_explains_the_logged_action_even_an_unusual_one():
    yellow = scene(speed=9.0, intersection="near", light="yellow", intersection_distance=9.0)
    went = explain(yellow, "KEEP", "STRAIGHT")
    stopped = explain(yellow, "DECELERATE", "STRAIGHT")
    assert went.startswith("I see a yellow light at an intersection close ahead")
    assert "the light ahead is yellow but I can clear the intersection, so I keep my speed." in went
    assert "the traffic light at the intersection ahead is yellow, so I slow down." in stopped
    # every action gets a sentence with its own verb, in any scene
    verbs = {"KEEP": "keep my speed", "ACCELERATE": "speed up", "DECELERATE": "slow down", "STOP": "stop"}
    rng = random.Random(1)
    for _ in range(50):
        s = random_scene(rng)
        for speed in SPEED_ACTIONS:
            for path in PATH_ACTIONS:
                text = explain(s, speed, path)
                assert f"so I {verbs[speed]}." in text
                if path != "STRAIGHT":
                    assert path.split("_")[0].lower() in text.split(".")[-2]


# --- generated splits: distributions, the ceiling, the reasoning share ----------------------


@pytest.fixture(scope="module")
def driven_split(tmp_path_factory):
    """600 scenes with the default driver labels and a quarter with reasoning (64 px images)."""
    path, stats = generate_dataset(tmp_path_factory.mktemp("driven"), 600, seed=11, size=64, labelling=Labelling(reasoning_share=0.25))
    return path, stats


def test_records_carry_their_label_distribution(driven_split):
    path, stats = driven_split
    records = load_records(path)
    for r in records:
        dist = r.extra["label_distribution"]
        assert abs(sum(dist.values()) - 1.0) < 1e-3
        assert list(dist.values()) == sorted(dist.values(), reverse=True)
        assert ", ".join(r.extra["most_likely"]) == next(iter(dist))
        assert len(r.extra["trajectory"]) == 6
    # the logged label is what the logged trajectory says (the stored waypoints are rounded to
    # the centimetre, which may move a label sitting exactly on a threshold)
    relabelled = label_trajectories([r.extra["trajectory"] for r in records], dt=0.5, **LABEL_THRESHOLDS)
    same = sum(label == (r.speed_action, r.path_action) for label, r in zip(relabelled, records))
    assert same >= 0.99 * len(records)
    # the same scene type carries different logged labels: not a function of the scene
    unusual = [r for r in records if (r.speed_action, r.path_action) != tuple(r.extra["most_likely"])]
    assert 0.05 * len(records) < len(unusual) < 0.25 * len(records)


def test_default_ceiling_is_between_080_and_092(driven_split):
    path, stats = driven_split
    info = json.loads((path.parent / "synth.json").read_text())
    assert 0.80 <= stats.expected_ceiling <= 0.92
    assert 0.78 <= stats.ceiling <= 0.94  # one draw per scene: +-0.016 of sampling error on 600 scenes
    assert info["ceiling"] == round(stats.ceiling, 4) and info["labels"] == "driver"


def test_reasoning_share(driven_split):
    path, stats = driven_split
    records = load_records(path)
    with_reasoning = [r for r in records if r.reasoning]
    assert stats.with_reasoning == len(with_reasoning)
    assert 0.20 * len(records) < len(with_reasoning) < 0.30 * len(records)
    for r in with_reasoning:  # the reasoning explains the logged action, not the most likely one
        assert r.reasoning == explain(
            Scene(**{**r.extra["scene"], "others": tuple(map(tuple, r.extra["scene"]["others"]))}), r.speed_action, r.path_action
        )


def test_rule_labels_remain_a_setting(tmp_path):
    path, stats = generate_dataset(tmp_path, 40, seed=2, size=64, labelling=Labelling(labels="rule"))
    records = load_records(path)
    assert stats.ceiling == pytest.approx(1.0) and stats.with_reasoning == 40
    for r in records:
        assert r.extra["label_distribution"] == {f"{r.speed_action}, {r.path_action}": 1.0}


@pytest.mark.parametrize(
    "labelling, match",
    [
        (Labelling(labels="oracle"), "labels"),
        (Labelling(driver_noise=-1), "driver_noise"),
        (Labelling(label_draws=0), "label_draws"),
        (Labelling(reasoning_share=1.5), "reasoning_share"),
    ],
)
def test_bad_labelling_is_refused(tmp_path, labelling, match):
    with pytest.raises(ValueError, match=match):
        generate_dataset(tmp_path, 2, labelling=labelling)


def test_cli_synth_driver_labels(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "cli"
    ok = subprocess.run(
        [sys.executable, "-m", "alphadrive_ray", "data", "synth", str(out), "--n", "30", "--size", "64", "--reasoning-share", "0.5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert "with reasoning; ceiling (always the most likely plan)" in ok.stdout
    assert json.loads((out / "synth.json").read_text())["reasoning_share"] == 0.5
    bad = subprocess.run(
        [sys.executable, "-m", "alphadrive_ray", "data", "synth", str(tmp_path / "bad"), "--n", "3", "--reasoning-share", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "reasoning_share must be in [0, 1]" in bad.stderr
    assert "Traceback" not in bad.stderr
