"""Labels as drivers make them: a stochastic driver model rolls out the ego's next 3 s.

The synthetic benchmark's default labels. MetaAD's labels are what a human driver did next,
read off the future trajectory, so the same scene can carry different labels and no planner
is right every time. Here each label is one draw of that process:

1. a driver is drawn (`DriverParams`, the priors in `DRIVER_PRIORS`), together with what the
   image cannot show (the lead car's speed);
2. the driver decides a manoeuvre and follows it for 3 s (`rollout`): speed by the Intelligent
   Driver Model (Treiber et al. 2000, https://arxiv.org/abs/cond-mat/0002177) behind the lead
   car and the obstacles the driver stops for; path by a lane change or a turn where the
   driver takes one;
3. the trajectory's 6 waypoints (every 0.5 s) are labelled by the nuScenes-style recipe of
   `alphadrive_ray.data.trajectory`, with the thresholds of `LABEL_THRESHOLDS`.

    from alphadrive_ray.data.driver import label_distribution
    dist = label_distribution(scene, draws=64, seed=0)   # {(SPEED, PATH): share}

The driver, per draw (each parameter uniform in its prior's range, scaled around the typical
driver's value by `noise`; `noise=0` is the typical driver every time, i.e. deterministic labels):

  cruise_speed   preferred speed on a free road, m/s
  accel          IDM maximum acceleration, m/s^2
  brake          IDM comfortable braking, m/s^2
  headway_s      IDM desired time gap to the vehicle ahead, s
  reaction_s     delay before the driver's first change of acceleration, s
  amber_go_s     at a yellow light, goes on when the stop line is this close in time, s
  turn_speed     speed through a turn, m/s
  zone_speed     speed past a lane closure (cones), m/s
  prepare_prob   chance to move over early for a turn the navigation announces
  overtake_prob  chance to change lanes to pass a lead car slower than the ego
  lane_change_m  length of a lane change, m
  turn_radius    radius of a turn at an intersection, m

Hidden from the image: the lead car's speed, `lead_speed_delta` m/s around the ego's speed.
A chance manoeuvre is taken when the driver's uniform draw (`prepare_draw`, `overtake_draw`)
is below its probability; `noise` pulls those draws toward 1/2 too.

The manoeuvre, first rule that applies:
  PATH  red light at a near intersection, or a stop for a pedestrian: keep the lane;
        near intersection and navigation "turn left/right": turn there (once the ego is in
        the intersection; a slow ego may not get there within 3 s);
        cones closing the ego lane: change lanes, to the left where there is a lane;
        navigation "turn left/right" and a lane on that side: move over (prepare_prob);
        a lead car slower than the ego and a free lane on the left: overtake (overtake_prob);
        otherwise keep the lane.
        A lane change covers `lane_change_m` of road: a slow ego is still in its lane after 3 s.
  SPEED IDM toward the desired speed (cruise_speed; turn_speed into a turn; zone_speed past
        cones) behind the nearest of: the lead car (unless overtaking it), a pedestrian on the
        road, the stop line of a near red light, or of a near yellow one the driver does not
        go through (the stop line is more than amber_go_s away).

The label thresholds differ from nuScenes' where the synthetic world needs it (a lane here is
3.5 m wide, so a finished lane change ends 3.5 m to the side, under nuScenes' 4 m): see
`LABEL_THRESHOLDS`.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Mapping

import numpy as np

from alphadrive_ray.data.trajectory import label_trajectories

if TYPE_CHECKING:
    from alphadrive_ray.data.synth import Scene

HORIZON_S = 3.0
SIM_DT = 0.1  # integration step, s
WAYPOINT_DT = 0.5  # the labeller's waypoint spacing (nuScenes)
LANE_M = 3.5  # lane width of the synthetic world (the renderer's)
MIN_GAP_M = 2.0  # IDM standstill gap s0
MAX_BRAKE = 8.0  # m/s^2: the hardest a car brakes
IDM_DELTA = 4.0  # IDM acceleration exponent
# A driver slower than this, with a pedestrian or a stop line closer than HOLD_WITHIN_M, waits
# where it is instead of creeping up to it (the IDM alone would move a stopped car on).
HOLD_BELOW_SPEED = 2.5
HOLD_WITHIN_M = 25.0

# The labeller's thresholds for this world (`trajectory.label_trajectory`). nuScenes':
# stop 2.0 m/s, accel 3.0 m/s, lateral 4.0 m, angle 5 deg. A 3.5 m lane makes 4.0 m unreachable
# by a lane change, and a 5 deg bearing calls most lane changes below 14 m/s turns; STOP at
# 2.5 m/s counts a car that brakes from a crawl to a halt as stopping.
LABEL_THRESHOLDS: dict[str, float] = {
    "stop_speed": 2.5,
    "accel_delta": 3.0,
    "lateral_threshold": 2.0,
    "angle_threshold_deg": 12.0,
}


@dataclass(frozen=True)
class Prior:
    """A uniform prior [lo, hi] around the typical driver's value."""

    typical: float
    lo: float
    hi: float

    def draw(self, rng: np.random.Generator, n: int, noise: float) -> np.ndarray:
        # noise scales the range around the typical value (1: the documented range)
        lo = self.typical + noise * (self.lo - self.typical)
        hi = self.typical + noise * (self.hi - self.typical)
        return rng.uniform(lo, hi, n) if hi > lo else np.full(n, self.typical)


DRIVER_PRIORS: dict[str, Prior] = {
    "cruise_speed": Prior(11.5, 9.5, 13.5),
    "accel": Prior(1.8, 1.3, 2.4),
    "brake": Prior(2.8, 2.0, 3.6),
    "headway_s": Prior(1.5, 1.0, 2.2),
    "reaction_s": Prior(0.5, 0.2, 0.9),
    "amber_go_s": Prior(1.5, 0.6, 2.6),
    "turn_speed": Prior(5.5, 4.0, 7.0),
    "zone_speed": Prior(6.0, 4.0, 8.0),
    "prepare_prob": Prior(0.85, 0.55, 1.0),
    "overtake_prob": Prior(0.0, 0.0, 0.4),
    "lane_change_m": Prior(30.0, 22.0, 40.0),
    "turn_radius": Prior(8.0, 6.0, 11.0),
    "lead_speed_delta": Prior(-0.5, -3.5, 2.0),
    # the draws that decide the chance manoeuvres (taken when below their probability); at
    # noise 0 they are 1/2: the typical driver takes a manoeuvre of probability above 1/2
    "prepare_draw": Prior(0.5, 0.0, 1.0),
    "overtake_draw": Prior(0.5, 0.0, 1.0),
}


@dataclass(frozen=True)
class DriverParams:
    """K drawn drivers, one array of K values per parameter (see DRIVER_PRIORS)."""

    cruise_speed: np.ndarray
    accel: np.ndarray
    brake: np.ndarray
    headway_s: np.ndarray
    reaction_s: np.ndarray
    amber_go_s: np.ndarray
    turn_speed: np.ndarray
    zone_speed: np.ndarray
    prepare_prob: np.ndarray
    overtake_prob: np.ndarray
    lane_change_m: np.ndarray
    turn_radius: np.ndarray
    lead_speed_delta: np.ndarray
    prepare_draw: np.ndarray
    overtake_draw: np.ndarray


def draw_drivers(rng: np.random.Generator, n: int, noise: float = 1.0) -> DriverParams:
    """n independent drivers (and hidden lead speeds) from the priors, their spread scaled by noise."""
    if noise < 0:
        raise ValueError(f"driver noise must be >= 0, got {noise}")
    return DriverParams(**{f.name: DRIVER_PRIORS[f.name].draw(rng, n, noise) for f in fields(DriverParams)})


@dataclass(frozen=True)
class Manoeuvres:
    """What each of K drivers does (one row per driver): the manoeuvre and what it stops for."""

    speed: np.ndarray  # [K] ego speed now, m/s
    lateral: np.ndarray  # [K] 0 keep lane, 1 lane change, 2 turn
    side: np.ndarray  # [K] -1 left, +1 right (the labeller's x: right positive)
    desired_speed: np.ndarray  # [K] IDM desired speed, m/s
    stop_at: np.ndarray  # [K] distance to a standing obstacle, m (inf: none)
    lead_gap: np.ndarray  # [K] gap to the lead car, m (inf: none or passed)
    turn_at: np.ndarray  # [K] distance at which a turn starts, m
    hold: np.ndarray  # [K] a (nearly) stopped driver waits behind its standing obstacle


def decide(scene: Scene, d: DriverParams) -> Manoeuvres:
    """Each driver's manoeuvre for the scene, by the rules of the module docstring."""
    k = len(d.cruise_speed)
    v = scene.speed
    near = scene.intersection == "near"
    side_word = scene.navigation.split()[-1]
    nav_side = {"left": -1, "right": 1}.get(side_word, 0)
    inf = np.full(k, math.inf)

    # standing obstacles: a pedestrian, the stop line of a red (or a yellow not taken) light
    stop_at = inf.copy()
    if scene.pedestrian_distance is not None:
        stop_at = np.minimum(stop_at, scene.pedestrian_distance)
    stop_line = (scene.intersection_distance or 0.0) - 1.0
    if near and scene.light == "red":
        stop_at = np.minimum(stop_at, stop_line)
    elif near and scene.light == "yellow":
        time_to_line = stop_line / max(v, 0.1)
        stops = time_to_line > d.amber_go_s
        stop_at = np.where(stops, np.minimum(stop_at, stop_line), stop_at)
    stopping = np.isfinite(stop_at)

    lateral = np.zeros(k, dtype=int)
    side = np.zeros(k, dtype=int)
    desired = d.cruise_speed.copy()
    lead_gap = np.full(k, scene.lead_distance if scene.lead_distance is not None else math.inf)

    turning = near and nav_side != 0 and not (scene.light == "red")
    if turning:
        turn = ~stopping
        lateral[turn], side[turn] = 2, nav_side
        desired = np.where(turn, np.minimum(desired, d.turn_speed), desired)
    elif scene.cones_distance is not None:
        lateral[:], side[:] = 1, (-1 if scene.lane_on_left else 1)
        desired = np.minimum(desired, d.zone_speed)
    else:
        lane_there = (nav_side < 0 and scene.lane_on_left) or (nav_side > 0 and scene.lane_on_right)
        if nav_side and lane_there:
            move = (d.prepare_draw < d.prepare_prob) & ~stopping
            lateral[move], side[move] = 1, nav_side
        slow_lead = scene.lead_distance is not None and scene.lead_distance < 45.0
        left_free = scene.lane_on_left and not any(lane == scene.ego_lane - 1 and dist < 30 for lane, dist in scene.others)
        if slow_lead and left_free:
            lead_slower = d.lead_speed_delta < -1.0
            overtake = (lateral == 0) & lead_slower & (d.overtake_draw < d.overtake_prob) & ~stopping
            lateral[overtake], side[overtake] = 1, -1
            lead_gap = np.where(overtake, math.inf, lead_gap)
    turn_at = np.full(k, scene.intersection_distance or 0.0)
    hold = stopping & (v < HOLD_BELOW_SPEED) & (stop_at < HOLD_WITHIN_M)
    return Manoeuvres(np.full(k, float(v)), lateral, side, desired, stop_at, lead_gap, turn_at, hold)


def rollout(m: Manoeuvres, d: DriverParams) -> np.ndarray:
    """Trajectories of the rows of `m` (drivers `d`): [K, 6, 2] waypoints (x right, y forward,
    metres), every 0.5 s. Rows may come from different scenes (see `label_scenes`)."""
    k = len(m.speed)
    steps = round(HORIZON_S / SIM_DT)
    every = round(WAYPOINT_DT / SIM_DT)
    v = m.speed.copy()
    s = np.zeros(k)  # distance travelled along the path
    lead_v = np.maximum(0.0, m.speed + d.lead_speed_delta)
    lead_s = m.lead_gap.copy()
    sqrt_ab = np.sqrt(d.accel * d.brake)
    desired = np.maximum(m.desired_speed, 0.1)
    path_s = []
    for step in range(1, steps + 1):
        t = step * SIM_DT
        free = 1.0 - (v / desired) ** IDM_DELTA
        interaction = np.zeros(k)
        for gap, obstacle_v in ((lead_s - s, lead_v), (m.stop_at - s, 0.0)):
            finite = np.isfinite(gap)
            g = np.where(finite, np.maximum(gap, 0.1), 1.0)
            wanted = MIN_GAP_M + v * d.headway_s + v * (v - obstacle_v) / (2 * sqrt_ab)
            interaction = np.maximum(interaction, np.where(finite, (np.maximum(wanted, 0.0) / g) ** 2, 0.0))
        a = np.clip(d.accel * (free - interaction), -MAX_BRAKE, d.accel)
        a = np.where(m.hold, -np.minimum(d.brake, v / SIM_DT), a)
        a = np.where(t <= d.reaction_s, 0.0, a)  # the driver has not reacted yet
        v_next = np.maximum(0.0, v + a * SIM_DT)
        s = s + 0.5 * (v + v_next) * SIM_DT
        v = v_next
        lead_s = lead_s + lead_v * SIM_DT
        if step % every == 0:
            path_s.append(s)
    along = np.stack(path_s, axis=1)  # [K, 6]
    return _place(along, m, d)


def _place(along: np.ndarray, m: Manoeuvres, d: DriverParams) -> np.ndarray:
    """Waypoints [K, 6, 2] of paths travelled `along` metres by each driver's manoeuvre."""
    side = m.side[:, None].astype(float)
    # lane change: a cosine-shaped lateral move of one lane over lane_change_m of road
    progress = np.clip(along / d.lane_change_m[:, None], 0.0, 1.0)
    change_x = side * LANE_M * (1 - np.cos(math.pi * progress)) / 2
    # turn: straight to turn_at, a quarter circle of turn_radius, then straight along the new road
    r = d.turn_radius[:, None]
    turn_at = m.turn_at[:, None]
    into = np.maximum(along - turn_at, 0.0)
    theta = np.minimum(into / r, math.pi / 2)
    beyond = np.maximum(into - r * math.pi / 2, 0.0)
    turn_x = side * (r * (1 - np.cos(theta)) + beyond)
    turn_y = np.minimum(along, turn_at) + r * np.sin(theta)
    kind = m.lateral[:, None]
    x = np.where(kind == 1, change_x, np.where(kind == 2, turn_x, 0.0))
    y = np.where(kind == 2, turn_y, along)
    return np.stack([x, y], axis=-1)


def _concat(items: list, cls: type):
    return cls(**{f.name: np.concatenate([getattr(it, f.name) for it in items]) for f in fields(cls)})


def label_scenes(
    scenes: list[Scene], draws: int, rngs: list[np.random.Generator], noise: float = 1.0
) -> tuple[list[list[tuple[str, str]]], np.ndarray]:
    """`draws` drivers' (SPEED, PATH) labels for each scene, and the trajectories [S, draws, 6, 2].

    Scene i's drivers come from rngs[i] only, so a scene's labels do not depend on the others
    in the batch; all rows are simulated together (one numpy pass for thousands of drivers).
    """
    drivers, plans = [], []
    for scene, rng in zip(scenes, rngs):
        d = draw_drivers(rng, draws, noise)
        drivers.append(d)
        plans.append(decide(scene, d))
    d_all, m_all = _concat(drivers, DriverParams), _concat(plans, Manoeuvres)
    paths = rollout(m_all, d_all)
    labels = label_trajectories(paths, dt=WAYPOINT_DT, **LABEL_THRESHOLDS)
    return [labels[i * draws : (i + 1) * draws] for i in range(len(scenes))], paths.reshape(len(scenes), draws, -1, 2)


def typical_labels(scenes: list[Scene]) -> list[tuple[str, str]]:
    """The typical driver's label of each scene (every parameter at its typical value, no
    chance): deterministic and cheap; the scene sampler targets class mixes with it."""
    if not scenes:
        return []
    d = draw_drivers(np.random.default_rng(0), 1, noise=0.0)
    plans = [decide(scene, d) for scene in scenes]
    d_all = _concat([d] * len(scenes), DriverParams)
    return label_trajectories(rollout(_concat(plans, Manoeuvres), d_all), dt=WAYPOINT_DT, **LABEL_THRESHOLDS)


def distribution_of(labels: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
    """Share of each (SPEED, PATH) label, most common first."""
    counts = Counter(labels)
    return {pair: n / len(labels) for pair, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))}


def label_distribution(scene: Scene, draws: int = 64, seed: int = 0, noise: float = 1.0) -> dict[tuple[str, str], float]:
    """Share of `draws` drivers giving each (SPEED, PATH) label, most common first."""
    (labels,), _ = label_scenes([scene], draws, [np.random.default_rng(seed)], noise)
    return distribution_of(labels)


def most_likely(distribution: Mapping[tuple[str, str], float]) -> tuple[str, str]:
    """The most likely (SPEED, PATH) pair; ties go to the first in sorted order."""
    return min(distribution, key=lambda pair: (-distribution[pair], pair))
