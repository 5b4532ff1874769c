"""The trajectory labeller: every class and threshold edge on constructed trajectories; the converter CLI.

Frame: the ego is at (0, 0), x lateral (right positive), y forward, metres; waypoints every
0.5 s. Step lengths below are chosen so that the interval speeds are exact in binary
floating point where a case sits exactly on a threshold.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from alphadrive_ray.data.convert import convert_items
from alphadrive_ray.data.records import load_records
from alphadrive_ray.data.trajectory import (
    as_points,
    convert_trajectory_item,
    end_point_angle_deg,
    interval_speeds,
    label_trajectory,
    path_action_from_trajectory,
    speed_action_from_trajectory,
)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alphadrive_ray", *args], capture_output=True, text=True, timeout=120)


def forward(*steps: float) -> list[list[float]]:
    """Waypoints straight ahead, each `step` metres beyond the previous one (the first from the ego)."""
    points, y = [], 0.0
    for step in steps:
        y += step
        points.append([0.0, y])
    return points


# (id, waypoints, keyword thresholds, expected SPEED)
SPEED_CASES = [
    # standing still: every interval speed is 0
    ("standing", forward(0, 0, 0, 0, 0, 0), {}, "STOP"),
    # creeping at 1.9 m/s (0.95 m per 0.5 s): max speed just below 2.0
    ("max_just_below_stop", forward(0.95, 0.95, 0.95, 0.95, 0.95, 0.95), {}, "STOP"),
    # exactly 2.0 m/s everywhere: STOP needs max < 2.0, so this is KEEP
    ("max_at_stop", forward(1, 1, 1, 1, 1, 1), {}, "KEEP"),
    # 2.1 m/s: moving
    ("max_just_above_stop", forward(1.05, 1.05, 1.05, 1.05, 1.05, 1.05), {}, "KEEP"),
    # speeding up from 0 to 1.8 m/s stays STOP: the STOP rule comes first
    ("slow_speeding_up", forward(0, 0.2, 0.4, 0.6, 0.8, 0.9), {}, "STOP"),
    # v_first 2 -> v_last 5: exactly +3.0 is ACCELERATE
    ("accel_at_edge", forward(1, 1, 1, 1, 1, 2.5), {}, "ACCELERATE"),
    # 2 -> 4.9: +2.9 is KEEP
    ("accel_just_below", forward(1, 1, 1, 1, 1, 2.45), {}, "KEEP"),
    # 2 -> 5.1: +3.1 is ACCELERATE
    ("accel_just_above", forward(1, 1, 1, 1, 1, 2.55), {}, "ACCELERATE"),
    # v_first 5 -> v_last 2: exactly -3.0 is DECELERATE
    ("decel_at_edge", forward(2.5, 2, 2, 2, 2, 1), {}, "DECELERATE"),
    # 5 -> 2.1: -2.9 is KEEP
    ("decel_just_below", forward(2.5, 2, 2, 2, 2, 1.05), {}, "KEEP"),
    # 5 -> 1.9: -3.1 is DECELERATE
    ("decel_just_above", forward(2.5, 2, 2, 2, 2, 0.95), {}, "DECELERATE"),
    # braking to a full stop from 10 m/s
    ("brake_to_stop", forward(5, 4, 3, 2, 1, 0), {}, "DECELERATE"),
    # cruising at 10 m/s
    ("cruise", forward(5, 5, 5, 5, 5, 5), {}, "KEEP"),
    # v_first is measured from the ego at (0, 0): 2 m/s then 6 m/s is ACCELERATE
    # (measured between waypoints only, it would be 6 -> 6, KEEP)
    ("v_first_from_the_ego", forward(1, 3, 3, 3, 3, 3), {}, "ACCELERATE"),
    # only the first and last intervals count: a dip in the middle is still KEEP
    ("dip_in_the_middle", forward(5, 1, 1, 1, 1, 5), {}, "KEEP"),
    # sideways motion counts in |dp|: 3 m/s to the right
    ("sideways", [[1.5 * i, 0.0] for i in range(1, 7)], {}, "KEEP"),
    # dt is a parameter: 1.5 m steps are 3 m/s at dt 0.5 but 1.5 m/s at dt 1.0
    ("dt_changes_speed", forward(1.5, 1.5, 1.5, 1.5, 1.5, 1.5), {"dt": 1.0}, "STOP"),
    # stop_speed is a parameter: 2 m/s is a STOP below 3 m/s
    ("stop_speed_parameter", forward(1, 1, 1, 1, 1, 1), {"stop_speed": 3.0}, "STOP"),
    # accel_delta is a parameter: +2.0 m/s counts with a 2.0 threshold
    ("accel_delta_parameter", forward(1, 1, 1, 1, 1, 2), {"accel_delta": 2.0}, "ACCELERATE"),
    # two waypoints are enough
    ("two_points", forward(1, 2.5), {}, "ACCELERATE"),
]


@pytest.mark.parametrize("name,points,kwargs,expected", SPEED_CASES, ids=[c[0] for c in SPEED_CASES])
def test_speed_action(name, points, kwargs, expected):
    assert speed_action_from_trajectory(points, **kwargs) == expected


def test_interval_speeds_start_at_the_ego():
    assert interval_speeds([[3.0, 4.0], [3.0, 9.0]]) == [10.0, 10.0]  # |(3, 4)| = 5 m in 0.5 s, then 5 m
    assert interval_speeds([[0.0, 1.0], [0.0, 3.0]], dt=0.25) == [4.0, 8.0]


def to(x: float, y: float, n: int = 6) -> list[list[float]]:
    """n waypoints on the straight line from the ego to (x, y)."""
    return [[x * i / n, y * i / n] for i in range(1, n + 1)]


def at_bearing(lateral: float, degrees: float) -> list[list[float]]:
    """A trajectory ending `lateral` metres to the side at `degrees` from straight ahead."""
    return to(lateral, abs(lateral) / math.tan(math.radians(degrees)))


# (id, waypoints, keyword thresholds, expected PATH)
PATH_CASES = [
    # straight ahead
    ("straight", to(0, 30), {}, "STRAIGHT"),
    # 3.99 m to the right: just below the lateral threshold
    ("lateral_just_below", to(3.99, 60), {}, "STRAIGHT"),
    # exactly 4.0 m to the right far ahead (angle -2.3 deg): a lane change
    ("lateral_at_edge_right", to(4.0, 100), {}, "RIGHT_CHANGE"),
    # exactly 4.0 m to the left far ahead: a lane change to the left
    ("lateral_at_edge_left", to(-4.0, 100), {}, "LEFT_CHANGE"),
    # 4.01 m: just above
    ("lateral_just_above", to(4.01, 100), {}, "RIGHT_CHANGE"),
    # -3.99 m: still straight on the left
    ("lateral_just_below_left", to(-3.99, 60), {}, "STRAIGHT"),
    # 10 m right, 20 m ahead (-26.6 deg): a right turn
    ("right_turn", to(10, 20), {}, "RIGHT_TURN"),
    # 10 m left, 20 m ahead (+26.6 deg): a left turn
    ("left_turn", to(-10, 20), {}, "LEFT_TURN"),
    # 5 m right at 4.9 deg: just below the angle threshold, a change
    ("angle_just_below", at_bearing(5, 4.9), {}, "RIGHT_CHANGE"),
    # 5 m right at 5.1 deg: just above, a turn
    ("angle_just_above", at_bearing(5, 5.1), {}, "RIGHT_TURN"),
    # 5 m left at 5.1 deg: a left turn
    ("angle_just_above_left", at_bearing(-5, 5.1), {}, "LEFT_TURN"),
    # exactly on the angle threshold: (5, 5) is exactly 45 deg, a turn with a 45 deg threshold
    ("angle_at_edge", to(5, 5), {"angle_threshold_deg": 45.0}, "RIGHT_TURN"),
    # the angle is the end point's bearing: 4 m over 30 m ahead (-7.6 deg) is a turn, not a change
    ("slow_lane_change_is_a_turn", to(4, 30), {}, "RIGHT_TURN"),
    # a large angle with a small offset is STRAIGHT (3 m right, 10 m ahead: -16.7 deg)
    ("angle_without_offset", to(3, 10), {}, "STRAIGHT"),
    # only the end point counts: a swerve that comes back is STRAIGHT
    ("swerve_and_back", [[0, 5], [3, 10], [6, 15], [3, 20], [0, 25], [0, 30]], {}, "STRAIGHT"),
    # ending behind and to the left (a U-turn): angle +149 deg, a left turn
    ("behind_left", [[0, 2], [-2, 3], [-4, 2], [-5, 0], [-6, -5], [-6, -10]], {}, "LEFT_TURN"),
    # lateral_threshold is a parameter: 3 m counts with a 2.5 m threshold
    ("lateral_parameter", to(3, 100), {"lateral_threshold": 2.5}, "RIGHT_CHANGE"),
    # angle_threshold_deg is a parameter: 26.6 deg is a change below a 30 deg threshold
    ("angle_parameter", to(10, 20), {"angle_threshold_deg": 30.0}, "RIGHT_CHANGE"),
    # standing still is straight
    ("standing", to(0, 0), {}, "STRAIGHT"),
]


@pytest.mark.parametrize("name,points,kwargs,expected", PATH_CASES, ids=[c[0] for c in PATH_CASES])
def test_path_action(name, points, kwargs, expected):
    assert path_action_from_trajectory(points, **kwargs) == expected


# (end point, bearing in degrees)
ANGLE_CASES = [
    ((0.0, 10.0), 0.0),  # straight ahead
    ((5.0, 5.0), -45.0),  # ahead to the right: negative
    ((-5.0, 5.0), 45.0),  # ahead to the left: positive
    ((10.0, 0.0), -90.0),  # square to the right
    ((-10.0, 0.0), 90.0),  # square to the left
    ((0.0, -10.0), 180.0),  # straight behind wraps to +180, not -180
]


@pytest.mark.parametrize("end,expected", ANGLE_CASES)
def test_end_point_angle(end, expected):
    assert end_point_angle_deg([[0.0, 1.0], list(end)]) == pytest.approx(expected, abs=1e-12)


def test_label_trajectory_combines_both():
    # braking into a left turn
    points = [[-0.2, 4.0], [-0.8, 7.5], [-1.8, 10.5], [-3.2, 13.0], [-5.0, 15.0], [-7.0, 16.5]]
    assert label_trajectory(points) == ("DECELERATE", "LEFT_TURN")
    assert label_trajectory(points, dt=0.25) == ("DECELERATE", "LEFT_TURN")  # thresholds pass through
    assert label_trajectory(points, lateral_threshold=8.0) == ("DECELERATE", "STRAIGHT")


def test_numpy_points_are_accepted():
    import numpy as np

    points = np.array(forward(1, 1, 1, 1, 1, 2.5))
    assert label_trajectory(points) == ("ACCELERATE", "STRAIGHT")
    assert as_points(points.astype(np.float32))[0] == (0.0, 1.0)


# (id, bad waypoints, words of the ValueError)
BAD_POINTS_CASES = [
    ("string", "0,1,0,2", "must be a list of [x, y] points"),  # a string is not a list of points
    ("mapping", {"x": [0, 1]}, "must be a list of [x, y] points"),  # nor is an object
    ("number", 3.0, "must be a list of [x, y] points"),  # nor a number
    ("empty", [], "at least 2 points"),  # no waypoint
    ("one_point", [[0, 1]], "at least 2 points"),  # one waypoint: no first and last interval
    ("three_coords", [[0, 1, 0], [0, 2, 0]], "point 0 must be [x, y]"),  # [x, y, z]
    ("flat_list", [0, 1, 0, 2], "point 0 must be [x, y]"),  # not nested
    ("string_coord", [[0, 1], [0, "2"]], "point 1 must hold two numbers"),  # a coordinate as text
    ("bool_coord", [[0, 1], [True, 2]], "point 1 must hold two numbers"),  # a boolean is not a coordinate
    ("null_coord", [[0, 1], [None, 2]], "point 1 must hold two numbers"),  # a missing coordinate
    ("nan", [[0, 1], [math.nan, 2]], "non-finite"),  # NaN
    ("inf", [[0, 1], [0, math.inf]], "non-finite"),  # infinity
    ("huge_int", [[0, 1], [0, 10**400]], "non-finite"),  # beyond float range
]


@pytest.mark.parametrize("name,points,words", BAD_POINTS_CASES, ids=[c[0] for c in BAD_POINTS_CASES])
def test_bad_points(name, points, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        label_trajectory(points)


def test_bad_dt():
    with pytest.raises(ValueError, match="dt must be > 0"):
        speed_action_from_trajectory(forward(1, 1), dt=0.0)


# --- the converter -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cam")
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (32, 24), (90, 90, 90)).save(folder / name)
    return folder


def sample(id: str, trajectory, image: str = "a.png", **changes) -> dict:
    out = {"id": id, "image": image, "speed": 4.0, "navigation": "go straight", "trajectory": trajectory}
    out.update(changes)
    return out


GOOD_SAMPLES = [
    # braking into a left turn, with reasoning
    (
        sample(
            "s-left",
            [[-0.2, 4.0], [-0.8, 7.5], [-1.8, 10.5], [-3.2, 13.0], [-5.0, 15.0], [-7.0, 16.5]],
            navigation="turn left",
            reasoning="The road turns left; I slow down and turn.",
        ),
        ("DECELERATE", "LEFT_TURN"),
    ),
    # waiting at a light
    (sample("s-stop", forward(0, 0, 0, 0, 0, 0.1), image="b.png", speed=0.0), ("STOP", "STRAIGHT")),
    # moving into the right lane at 20 m/s: 4.5 m right, 60 m ahead (4.3 deg)
    (sample("s-right", [[0.75 * i, 10.0 * i] for i in range(1, 7)], image="c.png", speed=20.0), ("KEEP", "RIGHT_CHANGE")),
]


def write_json(path: Path, items, jsonl: bool = False) -> Path:
    path.write_text("\n".join(json.dumps(i) for i in items) + "\n" if jsonl else json.dumps(items, indent=1))
    return path


@pytest.mark.parametrize("jsonl", [False, True], ids=["json_array", "jsonl"])
def test_cli_round_trip(image_dir, tmp_path, jsonl):
    src = write_json(image_dir / f"samples-{tmp_path.name}.json{'l' if jsonl else ''}", [s for s, _ in GOOD_SAMPLES], jsonl)
    out = tmp_path / "out" / "data.jsonl"
    result = run_cli("data", "from-trajectories", str(src), str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"wrote 3 record(s) to {out}"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["speed_action"], r["path_action"]) for r in rows] == [labels for _, labels in GOOD_SAMPLES]
    assert all(not Path(r["image"]).is_absolute() for r in rows)  # relative to the output file
    assert rows[0]["reasoning"].startswith("The road turns left") and "reasoning" not in rows[1]
    assert rows[0]["trajectory"] == GOOD_SAMPLES[0][0]["trajectory"]  # kept for provenance
    records = load_records(out)
    assert [r.id for r in records] == ["s-left", "s-stop", "s-right"]
    assert Path(records[1].image) == image_dir / "b.png"
    assert run_cli("data", "validate", str(out)).returncode == 0


# (flags, labels of the two samples: 2 -> 3 m/s straight ahead; 3 m right, 100 m ahead)
THRESHOLD_FLAG_CASES = [
    ([], [("KEEP", "STRAIGHT"), ("KEEP", "STRAIGHT")]),  # the defaults: +1 m/s, 3 m < 4 m
    (["--accel-delta", "1"], [("ACCELERATE", "STRAIGHT"), ("KEEP", "STRAIGHT")]),  # +1 m/s now counts
    (["--dt", "1.0"], [("STOP", "STRAIGHT"), ("KEEP", "STRAIGHT")]),  # 1-1.5 m/s at 1 s per waypoint
    (["--stop-speed", "3.5"], [("STOP", "STRAIGHT"), ("KEEP", "STRAIGHT")]),  # 3 m/s is below 3.5
    (["--lateral-threshold", "2.5"], [("KEEP", "STRAIGHT"), ("KEEP", "RIGHT_CHANGE")]),  # 3 m now leaves the lane
    (["--lateral-threshold", "2.5", "--angle-threshold", "1"], [("KEEP", "STRAIGHT"), ("KEEP", "RIGHT_TURN")]),  # 1.7 deg > 1
]


@pytest.mark.parametrize("flags,labels", THRESHOLD_FLAG_CASES)
def test_cli_thresholds_are_flags(image_dir, tmp_path, flags, labels):
    image = str(image_dir / "a.png")
    src = write_json(tmp_path / "in.json", [sample("s1", forward(1, 1, 1, 1, 1, 1.5), image=image), sample("s2", to(3, 100), image=image)])
    result = run_cli("data", "from-trajectories", str(src), str(tmp_path / "o.jsonl"), *flags)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [(r.speed_action, r.path_action) for r in load_records(tmp_path / "o.jsonl")] == labels


def test_cli_image_root(image_dir, tmp_path):
    src = write_json(tmp_path / "in.json", [sample("s", forward(1, 1, 1, 1, 1, 1), image="b.png")])
    result = run_cli("data", "from-trajectories", str(src), str(tmp_path / "o.jsonl"))
    assert result.returncode == 1 and f"{src}[0]: image: image file not found" in result.stdout
    result = run_cli("data", "from-trajectories", str(src), str(tmp_path / "o.jsonl"), "--image-root", str(image_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert Path(load_records(tmp_path / "o.jsonl")[0].image) == image_dir / "b.png"


# (id, bad sample, field named, words of the problem)
BAD_SAMPLE_CASES = [
    # no trajectory
    ("missing_trajectory", {k: v for k, v in sample("x", []).items() if k != "trajectory"}, "trajectory", "missing required field"),
    # five waypoints where six are expected
    ("too_few_points", sample("x", forward(1, 1, 1, 1, 1)), "trajectory", "expected 6 waypoints"),
    # seven waypoints
    ("too_many_points", sample("x", forward(1, 1, 1, 1, 1, 1, 1)), "trajectory", "expected 6 waypoints"),
    # a single waypoint
    ("one_point", sample("x", [[0, 1]]), "trajectory", "at least 2 points"),
    # flat list of numbers
    ("bad_shape", sample("x", [0, 1, 0, 2, 0, 3]), "trajectory", "must be [x, y]"),
    # NaN coordinate (json.dumps writes NaN)
    ("non_finite", sample("x", forward(1, 1, 1, 1, 1, math.nan)), "trajectory", "non-finite"),
    # a coordinate as text
    ("text_coordinate", sample("x", [[0, 1]] * 5 + [[0, "6"]]), "trajectory", "must hold two numbers"),
    # the trajectory is an object
    ("trajectory_object", sample("x", {"x": [0], "y": [1]}), "trajectory", "must be a list"),
    # negative speed: checked like any record
    ("negative_speed", sample("x", forward(1, 1, 1, 1, 1, 1), speed=-1.0), "speed", "non-negative"),
    # the image does not exist
    ("missing_image", sample("x", forward(1, 1, 1, 1, 1, 1), image="nope.png"), "image", "not found"),
    # no id (ids are not derived for trajectory samples)
    ("missing_id", {k: v for k, v in sample("x", forward(1, 1, 1, 1, 1, 1)).items() if k != "id"}, "id", "missing required field"),
    # the id of the good first sample
    ("duplicate_id", sample("good", forward(1, 1, 1, 1, 1, 1)), "id", "duplicate id 'good'"),
    # not an object
    ("not_an_object", [[0, 1]] * 6, "", "expected a JSON object"),
]


@pytest.mark.parametrize("name,bad,field,words", BAD_SAMPLE_CASES, ids=[c[0] for c in BAD_SAMPLE_CASES])
def test_bad_sample_in_process(image_dir, tmp_path, name, bad, field, words):
    good = sample("good", forward(1, 1, 1, 1, 1, 1))
    src = write_json(tmp_path / "in.json", [good, bad])

    def convert_one(obj, line, index):
        return convert_trajectory_item(obj, file=str(src), line=line, index=index, image_root=image_dir)

    conversion = convert_items(src, convert_one)
    assert [r.id for r in conversion.records] == ["good"]
    assert (conversion.n_items, conversion.n_bad) == (2, 1)
    assert [(p.index, p.field) for p in conversion.problems] == [(1, field)], conversion.problems
    assert words in conversion.problems[0].message


def test_bad_samples_cli(image_dir, tmp_path):
    good = sample("good", forward(1, 1, 1, 1, 1, 1))
    items = [good] + [bad for _, bad, _, _ in BAD_SAMPLE_CASES]
    for as_jsonl in (False, True):
        src = write_json(tmp_path / ("in.jsonl" if as_jsonl else "in.json"), items, jsonl=as_jsonl)
        out = tmp_path / "out.jsonl"
        result = run_cli("data", "from-trajectories", str(src), str(out), "--image-root", str(image_dir))
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert not out.exists()  # nothing written while anything is wrong
        lines = result.stdout.splitlines()
        assert len(lines) == len(BAD_SAMPLE_CASES)
        for k, (line, (_, _, field, words)) in enumerate(zip(lines, BAD_SAMPLE_CASES), start=1):
            where = f"{src}:{k + 1}: " if as_jsonl else f"{src}[{k}]: "
            assert line.startswith(where + (f"{field}: " if field else "")) and words in line, line
        n = len(BAD_SAMPLE_CASES)
        assert f"{src}: {n} bad record(s) of {n + 1}; {n} problem(s)" in result.stderr
        assert "--skip-bad" in result.stderr

        result = run_cli("data", "from-trajectories", str(src), str(out), "--image-root", str(image_dir), "--skip-bad")
        assert result.returncode == 0, result.stderr
        assert f"wrote 1 record(s) to {out}; skipped {n} bad record(s) of {n + 1} (--skip-bad)" in result.stdout
        assert [r.id for r in load_records(out)] == ["good"]
        out.unlink()


# (id, file content or None for no file, extra CLI arguments, words of the error, exit status)
CLI_FILE_CASES = [
    ("missing_input", None, [], "input file not found", 2),  # a typo in the input path
    ("empty_input", "", [], "empty file", 1),  # nothing to convert
    ("empty_array", "[]", [], "empty JSON array", 1),  # an array without samples
    # a trailing comma: the decoder fails at the closing bracket, line 4
    ("bad_json_array", '[\n {"id": 1},\n {"id": 2,\n]', [], "in.json:4: bad JSON", 1),
    ("zero_dt", "[]", ["--dt", "0"], "--dt must be a positive number", 2),  # a threshold that makes no sense
    # NaN would make every comparison false, silently
    ("nan_threshold", "[]", ["--angle-threshold", "nan"], "--angle-threshold must be a positive number", 2),
    # one waypoint has no first and last interval
    ("one_point_horizon", "[]", ["--num-points", "1"], "--num-points must be at least 2", 2),
]


@pytest.mark.parametrize("name,content,args,words,status", CLI_FILE_CASES, ids=[c[0] for c in CLI_FILE_CASES])
def test_cli_file_errors(tmp_path, name, content, args, words, status):
    src = tmp_path / "in.json"
    if content is not None:
        src.write_text(content)
    result = run_cli("data", "from-trajectories", str(src), str(tmp_path / "out.jsonl"), *args)
    assert result.returncode == status and words in result.stdout + result.stderr, result
    assert "Traceback" not in result.stderr and not (tmp_path / "out.jsonl").exists()


def test_cli_refuses_to_overwrite_the_input(tmp_path):
    src = write_json(tmp_path / "in.jsonl", [sample("x", forward(1, 1, 1, 1, 1, 1))], jsonl=True)
    result = run_cli("data", "from-trajectories", str(src), str(src))
    assert result.returncode == 2 and "is the input file" in result.stderr
    assert json.loads(src.read_text())["id"] == "x"
