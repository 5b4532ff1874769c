"""SPEED / PATH meta-actions from the ego's future trajectory (the nuScenes-style recipe).

    alphadrive-ray data from-trajectories samples.json data.jsonl

Frame and input. `points` are the ego's future waypoints [[x, y], ...] in metres, in the
ego frame at the current time: the ego is at (0, 0), x is lateral (right positive) and y
points forward. Waypoint i is at time i * dt (nuScenes: 6 waypoints, dt = 0.5 s, i.e. the
next 3 s). At least 2 waypoints are needed.

SPEED (`speed_action_from_trajectory`):
  v_i = |p_i - p_{i-1}| / dt for i = 1..n, with p_0 = (0, 0) the current position, so
  v_first = v_1 is the speed over the first interval, from the current position to the
  first waypoint, and v_last = v_n the speed over the last interval. (We include p_0
  because the waypoints are positions relative to "now": the first interval is the ego's
  motion in the first dt, and leaving it out would ignore the first 0.5 s of the horizon.)
    STOP        if max_i v_i <  stop_speed (2.0 m/s)
    ACCELERATE  else if v_last - v_first >=  accel_delta (3.0 m/s)
    DECELERATE  else if v_last - v_first <= -accel_delta
    KEEP        otherwise.

PATH (`path_action_from_trajectory`), from the end point (x_end, y_end) = p_n:
  angle = atan2(y_end, x_end) - 90 deg, wrapped to (-180, 180]: the bearing of the end
  point from straight ahead, positive to the left (0 for a point straight ahead). Note
  that this is the direction of the end point seen from the ego, as the recipe writes it,
  not the ego's heading at the end of the trajectory.
    |x_end| <  lateral_threshold (4.0 m)             -> STRAIGHT
    |x_end| >= lateral_threshold, |angle| >= angle_threshold (5 deg)
                                                      -> RIGHT_TURN if x_end > 0 else LEFT_TURN
    |x_end| >= lateral_threshold, |angle| <  angle_threshold
                                                      -> RIGHT_CHANGE if x_end > 0 else LEFT_CHANGE
Comparisons are exact (no tolerance); the defaults are those of the reference notes, and
"large" reads as ">= threshold" on both. A consequence of using the end point's bearing:
with the defaults, a 4 m sideways move counts as a CHANGE only when it ends more than
4 / tan(5 deg) = 45.7 m ahead (above ~15 m/s over 3 s); slower lane changes label as turns.

The converter (`data from-trajectories`) reads a JSON array or JSONL of samples
    {"id": "n008-0001", "image": "samples/CAM_FRONT/0001.jpg", "speed": 6.2,
     "navigation": "turn left", "trajectory": [[x1, y1], ..., [x6, y6]], "reasoning": "..."}
(`reasoning` optional), labels each from its trajectory with the thresholds given as flags,
and writes canonical records; each bad sample gets a problem line naming file, line (or
array index) and field (a trajectory of the wrong shape, non-finite numbers, too few or
too many waypoints, and everything `data validate` checks).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from alphadrive_ray.data.records import Problem, Record, parse_record

DT = 0.5  # seconds between waypoints (nuScenes)
STOP_SPEED = 2.0  # m/s: below this maximum speed the ego is stopping / stopped
ACCEL_DELTA = 3.0  # m/s: change of speed over the horizon that counts as accelerating / decelerating
LATERAL_THRESHOLD = 4.0  # m: end-point lateral offset beyond which the path leaves the lane
ANGLE_THRESHOLD_DEG = 5.0  # degrees: end-point bearing beyond which a lateral move is a turn
NUM_POINTS = 6  # waypoints of the converter's input (3 s at 0.5 s)
MIN_POINTS = 2


def as_points(points: Any) -> list[tuple[float, float]]:
    """`points` as a list of (x, y) floats; ValueError naming the bad point otherwise."""
    if isinstance(points, (str, bytes, dict)) or not hasattr(points, "__iter__"):
        raise ValueError(f"must be a list of [x, y] points, got {type(points).__name__}")
    out: list[tuple[float, float]] = []
    for i, point in enumerate(points):
        if isinstance(point, (str, bytes, dict)) or not hasattr(point, "__len__") or len(point) != 2:
            raise ValueError(f"point {i} must be [x, y], got {point!r}")
        coords = []
        for value in point:
            if isinstance(value, bool) or not (isinstance(value, (int, float)) or hasattr(value, "__float__")):
                raise ValueError(f"point {i} must hold two numbers, got {list(point)!r}")
            try:
                number = float(value)
            except (OverflowError, TypeError, ValueError):
                number = math.nan
            if not math.isfinite(number):
                raise ValueError(f"point {i} has a non-finite coordinate: {list(point)!r}")
            coords.append(number)
        out.append((coords[0], coords[1]))
    if len(out) < MIN_POINTS:
        raise ValueError(f"needs at least {MIN_POINTS} points, got {len(out)}")
    return out


def interval_speeds(points: Any, dt: float = DT) -> list[float]:
    """v_i = |p_i - p_{i-1}| / dt for i = 1..n, with p_0 = (0, 0) the current position."""
    if not dt > 0:
        raise ValueError(f"dt must be > 0, got {dt}")
    pts = [(0.0, 0.0)] + as_points(points)
    return [math.hypot(x1 - x0, y1 - y0) / dt for (x0, y0), (x1, y1) in zip(pts, pts[1:])]


def speed_action_from_trajectory(points: Any, dt: float = DT, stop_speed: float = STOP_SPEED, accel_delta: float = ACCEL_DELTA) -> str:
    """KEEP / ACCELERATE / DECELERATE / STOP by the rules of the module docstring."""
    speeds = interval_speeds(points, dt)
    if max(speeds) < stop_speed:
        return "STOP"
    change = speeds[-1] - speeds[0]
    if change >= accel_delta:
        return "ACCELERATE"
    if change <= -accel_delta:
        return "DECELERATE"
    return "KEEP"


def end_point_angle_deg(points: Any) -> float:
    """atan2(y_end, x_end) - 90 deg in (-180, 180]: 0 straight ahead, positive to the left."""
    x_end, y_end = as_points(points)[-1]
    angle = math.degrees(math.atan2(y_end, x_end)) - 90.0
    return angle + 360.0 if angle <= -180.0 else angle


def path_action_from_trajectory(points: Any, lateral_threshold: float = LATERAL_THRESHOLD, angle_threshold_deg: float = ANGLE_THRESHOLD_DEG) -> str:
    """STRAIGHT / LEFT_TURN / RIGHT_TURN / LEFT_CHANGE / RIGHT_CHANGE by the rules of the module docstring."""
    x_end, _ = as_points(points)[-1]
    if abs(x_end) < lateral_threshold:
        return "STRAIGHT"
    side = "RIGHT" if x_end > 0 else "LEFT"
    if abs(end_point_angle_deg(points)) >= angle_threshold_deg:
        return f"{side}_TURN"
    return f"{side}_CHANGE"


def label_trajectory(
    points: Any,
    dt: float = DT,
    stop_speed: float = STOP_SPEED,
    accel_delta: float = ACCEL_DELTA,
    lateral_threshold: float = LATERAL_THRESHOLD,
    angle_threshold_deg: float = ANGLE_THRESHOLD_DEG,
) -> tuple[str, str]:
    """(SPEED, PATH) meta-actions of a future trajectory."""
    return (
        speed_action_from_trajectory(points, dt, stop_speed, accel_delta),
        path_action_from_trajectory(points, lateral_threshold, angle_threshold_deg),
    )


def label_trajectories(
    points,
    dt: float = DT,
    stop_speed: float = STOP_SPEED,
    accel_delta: float = ACCEL_DELTA,
    lateral_threshold: float = LATERAL_THRESHOLD,
    angle_threshold_deg: float = ANGLE_THRESHOLD_DEG,
) -> list[tuple[str, str]]:
    """`label_trajectory` of many trajectories at once: `points` is an array [K, n, 2] of finite
    waypoints. The same rules, in numpy (the synthetic driver model labels thousands a second)."""
    import numpy as np

    pts = np.asarray(points, dtype=float)
    if pts.ndim != 3 or pts.shape[2] != 2 or pts.shape[1] < MIN_POINTS:
        raise ValueError(f"expected trajectories of shape [K, n >= {MIN_POINTS}, 2], got {list(pts.shape)}")
    if not np.isfinite(pts).all():
        raise ValueError("trajectories must hold finite numbers")
    if not dt > 0:
        raise ValueError(f"dt must be > 0, got {dt}")
    full = np.concatenate([np.zeros((len(pts), 1, 2)), pts], axis=1)
    speeds = np.hypot(*np.moveaxis(np.diff(full, axis=1), 2, 0)) / dt  # [K, n]
    change = speeds[:, -1] - speeds[:, 0]
    speed = np.where(
        speeds.max(axis=1) < stop_speed,
        "STOP",
        np.where(change >= accel_delta, "ACCELERATE", np.where(change <= -accel_delta, "DECELERATE", "KEEP")),
    )
    x_end, y_end = pts[:, -1, 0], pts[:, -1, 1]
    angle = np.degrees(np.arctan2(y_end, x_end)) - 90.0
    angle = np.where(angle <= -180.0, angle + 360.0, angle)
    side = np.where(x_end > 0, "RIGHT", "LEFT")
    kind = np.where(np.abs(angle) >= angle_threshold_deg, "_TURN", "_CHANGE")
    path = np.where(np.abs(x_end) < lateral_threshold, "STRAIGHT", np.char.add(side, kind))
    return list(zip(speed.tolist(), path.tolist()))


# --- the converter -------------------------------------------------------------------------

SAMPLE_FIELDS: tuple[str, ...] = ("id", "image", "speed", "navigation", "trajectory", "reasoning")


def convert_trajectory_item(
    obj: Any,
    *,
    file: str,
    line: int,
    index: int | None,
    image_root: Path,
    num_points: int = NUM_POINTS,
    check_images: bool = True,
    **thresholds: float,
) -> tuple[Record | None, list[Problem]]:
    """One sample {id, image, speed, navigation, trajectory, reasoning?} -> a labelled Record, or its problems.

    The labels always come from the trajectory (labels in the sample are replaced); the
    trajectory and any other fields of the sample are kept as extra fields of the record.
    """
    if not isinstance(obj, dict):
        return None, [Problem(file, line, "", f"expected a JSON object, got {type(obj).__name__}", index)]
    problems: list[Problem] = []
    labels = ("KEEP", "STRAIGHT")  # stands in while the other fields are checked; never written
    trajectory = obj.get("trajectory")
    if trajectory is None:
        problems.append(Problem(file, line, "trajectory", "missing required field", index))
    else:
        try:
            points = as_points(trajectory)
        except ValueError as exc:
            problems.append(Problem(file, line, "trajectory", str(exc), index))
        else:
            if len(points) != num_points:
                problems.append(
                    Problem(
                        file,
                        line,
                        "trajectory",
                        f"expected {num_points} waypoints (the planning horizon; see --num-points), got {len(points)}",
                        index,
                    )
                )
            else:
                labels = label_trajectory(points, **thresholds)
                trajectory = [list(p) for p in points]
    canonical = dict(obj, speed_action=labels[0], path_action=labels[1], trajectory=trajectory)
    record, found = parse_record(canonical, image_root, file, line, check_images)
    problems += [Problem(p.file, p.line, p.field, p.message, index) for p in found]
    return (None, problems) if problems else (record, [])
