"""Synthetic front-camera driving scenes, labelled by a documented rule-based planner.

The embedded default dataset: a perspective road with lanes and markings, an optional
intersection (near or far) with a traffic light and stop line, a lead vehicle at some
distance, a crossing pedestrian, a lane closure with cones, distractor vehicles in other
lanes, and varied sky and road colours. Each scene has an ego speed and a navigation
command, and its SPEED / PATH meta-actions follow from what is visible plus speed and
navigation, by the rules below (the whole planner is `plan_scene`).

SPEED, first rule that applies:
  1. hazard: a pedestrian on the road, a red light at a near intersection, or a lead
     vehicle closer than 10 m -> STOP if speed < 4 m/s, else DECELERATE;
  2. caution: a yellow light at a near intersection, a lead vehicle 10-25 m ahead, cones
     closing the ego lane, or a turn at a near intersection at more than 8 m/s -> DECELERATE;
  3. following a lead vehicle 25-45 m ahead -> ACCELERATE below 5 m/s, else KEEP;
  4. otherwise (free road) -> ACCELERATE below 8 m/s, DECELERATE above 15 m/s, else KEEP.
PATH, first rule that applies:
  1. STOP, or a red light at a near intersection -> STRAIGHT;
  2. a near intersection and navigation "turn left/right" -> LEFT_TURN / RIGHT_TURN;
  3. cones closing the ego lane -> LEFT_CHANGE if there is a lane on the left, else RIGHT_CHANGE;
  4. navigation "turn left/right" with no near intersection, and a lane on that side
     -> LEFT_CHANGE / RIGHT_CHANGE (move over for the coming turn);
  5. otherwise STRAIGHT.

    alphadrive-ray data synth artifacts/scenes --n 2000 --seed 0
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, cast

from alphadrive_ray.actions import PATH_ACTIONS, SPEED_ACTIONS
from alphadrive_ray.data.records import Record, write_records

# Thresholds of the rule-based planner (metres, m/s); see the module docstring.
STOP_BELOW_SPEED = 4.0
TURN_SLOW_ABOVE_SPEED = 8.0
CRUISE_MIN_SPEED = 8.0
CRUISE_MAX_SPEED = 15.0
FOLLOW_ACCELERATE_BELOW = 5.0
LEAD_HAZARD_M = 10.0
LEAD_CAUTION_M = 25.0
LEAD_FOLLOW_M = 45.0

DEFAULT_SPEED_MIX: dict[str, float] = {"KEEP": 1.0, "ACCELERATE": 1.0, "DECELERATE": 1.0, "STOP": 1.0}
DEFAULT_PATH_MIX: dict[str, float] = {
    "STRAIGHT": 0.4,
    "LEFT_TURN": 0.15,
    "RIGHT_TURN": 0.15,
    "LEFT_CHANGE": 0.15,
    "RIGHT_CHANGE": 0.15,
}


@dataclass(frozen=True)
class Scene:
    """Everything the renderer draws and the planner reads."""

    speed: float  # ego speed, m/s (one decimal)
    navigation: str  # "go straight" | "turn left" | "turn right"
    num_lanes: int  # lanes in the ego direction, 1-3
    ego_lane: int  # 0 = leftmost
    intersection: str | None  # None | "near" | "far"
    light: str | None  # None | "red" | "yellow" | "green" (only with an intersection)
    lead_distance: float | None  # metres to the vehicle ahead in the ego lane
    pedestrian_distance: float | None  # metres to a pedestrian crossing in the ego lane
    cones_distance: float | None  # metres to cones closing the ego lane
    others: tuple[tuple[int, float], ...] = ()  # (lane, distance) of vehicles in other lanes
    style: int = 0  # sky / road palette
    intersection_distance: float | None = None  # metres to the near edge of the crossing road

    @property
    def lane_on_left(self) -> bool:
        return self.ego_lane > 0

    @property
    def lane_on_right(self) -> bool:
        return self.ego_lane < self.num_lanes - 1


@dataclass(frozen=True)
class Plan:
    speed_action: str
    path_action: str
    speed_reason: str  # which speed rule fired, e.g. "pedestrian"
    path_reason: str


def plan_scene(scene: Scene) -> Plan:
    """The rule-based planner of the module docstring."""
    near = scene.intersection == "near"
    red = near and scene.light == "red"
    lead = scene.lead_distance
    turning = near and scene.navigation in ("turn left", "turn right")

    if scene.pedestrian_distance is not None or red or (lead is not None and lead < LEAD_HAZARD_M):
        reason = "pedestrian" if scene.pedestrian_distance is not None else "red" if red else "lead_hazard"
        speed_action = "STOP" if scene.speed < STOP_BELOW_SPEED else "DECELERATE"
    elif near and scene.light == "yellow":
        speed_action, reason = "DECELERATE", "yellow"
    elif lead is not None and lead < LEAD_CAUTION_M:
        speed_action, reason = "DECELERATE", "lead_close"
    elif scene.cones_distance is not None:
        speed_action, reason = "DECELERATE", "cones"
    elif turning and scene.speed > TURN_SLOW_ABOVE_SPEED:
        speed_action, reason = "DECELERATE", "turn_fast"
    elif lead is not None and lead < LEAD_FOLLOW_M:
        speed_action = "ACCELERATE" if scene.speed < FOLLOW_ACCELERATE_BELOW else "KEEP"
        reason = "follow"
    elif scene.speed < CRUISE_MIN_SPEED:
        speed_action, reason = "ACCELERATE", "free_slow"
    elif scene.speed > CRUISE_MAX_SPEED:
        speed_action, reason = "DECELERATE", "free_fast"
    else:
        speed_action, reason = "KEEP", "free"

    side = scene.navigation.split()[-1]  # "left" | "right" | "straight"
    if speed_action == "STOP" or red:
        path_action, path_reason = "STRAIGHT", "hold"
    elif turning:
        path_action, path_reason = f"{side.upper()}_TURN", "turn"
    elif scene.cones_distance is not None:
        path_action = "LEFT_CHANGE" if scene.lane_on_left else "RIGHT_CHANGE"
        path_reason = "cones"
    elif side == "left" and scene.lane_on_left:
        path_action, path_reason = "LEFT_CHANGE", "prepare"
    elif side == "right" and scene.lane_on_right:
        path_action, path_reason = "RIGHT_CHANGE", "prepare"
    else:
        path_action, path_reason = "STRAIGHT", "straight"
    return Plan(speed_action, path_action, reason, path_reason)


# --- reasoning -------------------------------------------------------------------------

_SPEED_REASONS = {
    "pedestrian": "a pedestrian is crossing the road ahead",
    "red": "the traffic light at the intersection ahead is red",
    "lead_hazard": "the vehicle ahead in my lane is very close",
    "yellow": "the traffic light at the intersection ahead is yellow",
    "lead_close": "a vehicle is close ahead in my lane",
    "cones": "cones close my lane ahead",
    "turn_fast": "I am too fast for the turn at the intersection ahead",
    "follow": "I am following a vehicle at a safe distance",
    "free_slow": "the road ahead is clear and I am below cruising speed",
    "free_fast": "the road ahead is clear but I am above cruising speed",
    "free": "the road ahead is clear and my speed is right",
}
_SPEED_VERBS = {
    "STOP": "stop",
    "DECELERATE": "slow down",
    "ACCELERATE": "speed up",
    "KEEP": "keep my speed",
}


# The lead car's distance bands of the planner, nearest first (`lead_band`).
LEAD_BANDS = ("very close", "close", "at a safe distance", "far")


def lead_band(distance: float) -> int:
    """Index in LEAD_BANDS of a lead car at `distance` metres (the planner's thresholds)."""
    return 0 if distance < LEAD_HAZARD_M else 1 if distance < LEAD_CAUTION_M else 2 if distance < LEAD_FOLLOW_M else 3


def describe_scene(scene: Scene) -> str:
    """What a driver would note first: the planning-relevant things in view, in a fixed order.

    Writing them out (not just the one that decides) gives every sample a dense, checkable
    account of the scene; a teacher model's reasoning does the same.
    """
    seen = []
    if scene.intersection:
        light = f"a {scene.light} light at " if scene.light else ""
        seen.append(f"{light}an intersection {'close' if scene.intersection == 'near' else 'far'} ahead")
    if scene.lead_distance is not None:
        seen.append(f"a car {LEAD_BANDS[lead_band(scene.lead_distance)]} ahead")
    if scene.pedestrian_distance is not None:
        seen.append("a pedestrian on the road")
    if scene.cones_distance is not None:
        seen.append("cones in my lane")
    lanes = [side for side, ok in (("left", scene.lane_on_left), ("right", scene.lane_on_right)) if ok]
    seen.append(f"a lane on my {' and '.join(lanes)}" if lanes else "no other lane")
    return "I see " + ", ".join(seen[:-1]) + (" and " if len(seen) > 1 else "") + seen[-1] + "."


def reasoning_for(scene: Scene, plan: Plan) -> str:
    """A short account of the scene and the decision, as a teacher would write it."""
    speed = f"{scene.speed:.1f}"
    first = f"{describe_scene(scene)} At {speed} m/s, {_SPEED_REASONS[plan.speed_reason]}, so I {_SPEED_VERBS[plan.speed_action]}."
    side = scene.navigation.split()[-1]
    second = {
        "hold": "I stay in my lane.",
        "turn": f"The navigation says turn {side} at this intersection, so I turn {side}.",
        "cones": f"I change to the {'left' if plan.path_action == 'LEFT_CHANGE' else 'right'} lane to pass them.",
        "prepare": f"The navigation says turn {side} ahead, so I move to the {side} lane.",
        "straight": "I keep straight.",
    }[plan.path_reason]
    return f"{first} {second}"


# --- the teacher: reasoning that explains a logged action -------------------------------

# What a teacher writes for each SPEED action, first cue the scene supports. The paper's teacher
# (GPT-4o) was given the logged action and asked to explain it; so is this one, and an unusual
# action gets an explanation of that action, not of the typical one.
_SPEED_CUES: dict[str, tuple[tuple[str, Callable[[Scene], bool]], ...]] = {
    "STOP": (
        ("pedestrian", lambda s: s.pedestrian_distance is not None),
        ("red", lambda s: s.intersection == "near" and s.light == "red"),
        ("lead_hazard", lambda s: s.lead_distance is not None and s.lead_distance < LEAD_HAZARD_M),
        ("yellow", lambda s: s.intersection == "near" and s.light == "yellow"),
        ("standstill", lambda s: True),
    ),
    "DECELERATE": (
        ("pedestrian", lambda s: s.pedestrian_distance is not None),
        ("red", lambda s: s.intersection == "near" and s.light == "red"),
        ("lead_hazard", lambda s: s.lead_distance is not None and s.lead_distance < LEAD_HAZARD_M),
        ("yellow", lambda s: s.intersection == "near" and s.light == "yellow"),
        ("lead_close", lambda s: s.lead_distance is not None and s.lead_distance < LEAD_CAUTION_M),
        ("cones", lambda s: s.cones_distance is not None),
        ("turn_fast", lambda s: s.intersection == "near" and s.navigation != "go straight"),
        ("free_fast", lambda s: s.speed > CRUISE_MAX_SPEED - 2),
        ("lead_gap", lambda s: s.lead_distance is not None),
        ("margin", lambda s: True),
    ),
    "KEEP": (
        ("yellow_go", lambda s: s.intersection == "near" and s.light == "yellow"),
        ("slow_already", lambda s: s.pedestrian_distance is not None or (s.intersection == "near" and s.light == "red")),
        ("follow", lambda s: s.lead_distance is not None and s.lead_distance < LEAD_FOLLOW_M),
        ("free", lambda s: True),
    ),
    "ACCELERATE": (
        ("green", lambda s: s.intersection == "near" and s.light == "green"),
        ("lead_away", lambda s: s.lead_distance is not None and s.lead_distance < LEAD_FOLLOW_M),
        ("free_slow", lambda s: s.speed < CRUISE_MIN_SPEED + 2),
        ("room", lambda s: True),
    ),
}
_TEACHER_REASONS = {
    **_SPEED_REASONS,
    "standstill": "I am almost at a standstill and wait",
    "lead_gap": "I want a larger gap to the vehicle ahead",
    "margin": "I want more margin for what is ahead",
    "yellow_go": "the light ahead is yellow but I can clear the intersection",
    "slow_already": "I am already slow enough for what is ahead",
    "green": "the light at the intersection ahead is green",
    "lead_away": "the vehicle ahead is pulling away",
    "room": "there is room ahead to speed up",
}


def explain(scene: Scene, speed_action: str, path_action: str) -> str:
    """The teacher's reasoning for a logged (SPEED, PATH): the scene, then why this action.

    Written like `reasoning_for`, but for any action a driver took, not only the rule's.
    """
    cue = next(name for name, applies in _SPEED_CUES[speed_action] if applies(scene))
    first = f"{describe_scene(scene)} At {scene.speed:.1f} m/s, {_TEACHER_REASONS[cue]}, so I {_SPEED_VERBS[speed_action]}."
    nav = scene.navigation.split()[-1]
    if path_action == "STRAIGHT":
        held = speed_action == "STOP" or scene.pedestrian_distance is not None or (scene.intersection == "near" and scene.light == "red")
        second = "I stay in my lane." if held else "I keep straight."
    elif path_action.endswith("_TURN"):
        side = path_action.split("_")[0].lower()
        second = (
            f"The navigation says turn {side} at this intersection, so I turn {side}."
            if scene.intersection == "near" and nav == side
            else f"I turn {side}."
        )
    else:
        side = path_action.split("_")[0].lower()
        if scene.cones_distance is not None:
            second = f"I change to the {side} lane to pass them."
        elif nav == side:
            second = f"The navigation says turn {side} ahead, so I move to the {side} lane."
        elif scene.lead_distance is not None:
            second = f"I change to the {side} lane to pass the vehicle ahead."
        else:
            second = f"I change to the {side} lane."
    return f"{first} {second}"


def reasoning_corpus() -> list[str]:
    """Every reasoning phrase the generator can write (for training the tiny tokenizer)."""
    out = []
    for reason in _TEACHER_REASONS.values():
        for verb in _SPEED_VERBS.values():
            out.append(f"At 12.5 m/s, {reason}, so I {verb}.")
    for side in ("left", "right"):
        out += [
            f"The navigation says turn {side} at this intersection, so I turn {side}.",
            f"I change to the {side} lane to pass them.",
            f"The navigation says turn {side} ahead, so I move to the {side} lane.",
            f"I change to the {side} lane to pass the vehicle ahead.",
            f"I change to the {side} lane.",
            f"I turn {side}.",
        ]
    out += ["I stay in my lane.", "I keep straight."]
    for light in ("red", "yellow", "green"):
        for where in ("close", "far"):
            out.append(f"I see a {light} light at an intersection {where} ahead, a car very close ahead and a lane on my left and right.")
    for where in ("close", "at a safe distance", "far"):
        out.append(f"I see an intersection close ahead, a car {where} ahead, a pedestrian on the road, cones in my lane and no other lane.")
    return out


# --- sampling --------------------------------------------------------------------------


# The element each proposal is built around; every planner rule gets a fair share of
# scenes, so rare situations (a yellow light, cones) are not starved of examples.
SCENARIOS: tuple[str, ...] = (
    "free",
    "pedestrian",
    "red",
    "yellow",
    "green",
    "lead_hazard",
    "lead_close",
    "lead_follow",
    "cones",
    "turn",
)


def random_scene(rng: random.Random) -> Scene:
    """A scene built around one random scenario, plus random secondary elements and clutter."""
    scenario = rng.choice(SCENARIOS)
    num_lanes = rng.choice((1, 2, 2, 3, 3)) if scenario != "cones" else rng.choice((2, 3))
    ego_lane = rng.randrange(num_lanes)

    def maybe(p: float) -> bool:
        return rng.random() < p

    intersection = "near" if scenario in ("red", "yellow", "green", "turn") else rng.choice((None, None, "far", "near")) if maybe(0.4) else None
    light = None
    if intersection:
        light = {"red": "red", "yellow": "yellow", "green": "green"}.get(scenario) or rng.choice((None, "red", "yellow", "green", "green"))
    lead = {
        # distances keep a margin from the planner's thresholds: a label should not hinge on
        # a difference of a few centimetres that no camera resolves
        "lead_hazard": rng.uniform(4, 0.85 * LEAD_HAZARD_M),
        "lead_close": rng.uniform(1.15 * LEAD_HAZARD_M, 0.88 * LEAD_CAUTION_M),
        "lead_follow": rng.uniform(1.12 * LEAD_CAUTION_M, 0.9 * LEAD_FOLLOW_M),
    }.get(scenario)
    if lead is None and maybe(0.3):
        lead = rng.uniform(1.1 * LEAD_FOLLOW_M, 80)
    pedestrian = rng.uniform(6, 20) if scenario == "pedestrian" or maybe(0.05) else None
    cones = rng.uniform(8, 25) if scenario == "cones" or (num_lanes > 1 and maybe(0.05)) else None
    if cones is not None and lead is not None and lead > cones:
        lead = None  # the closure hides anything behind it
    if pedestrian is not None and lead is not None and lead < pedestrian:
        pedestrian = None
    if scenario == "turn":
        navigation = rng.choice(("turn left", "turn right"))
    else:
        navigation = rng.choice(("go straight", "go straight", "turn left", "turn right"))
    speed_kind = rng.random()
    if speed_kind < 0.25:
        speed = rng.uniform(0.0, STOP_BELOW_SPEED)
    elif speed_kind < 0.35:
        speed = rng.uniform(STOP_BELOW_SPEED, CRUISE_MIN_SPEED)
    else:
        speed = rng.uniform(0.0, 20.0)
    others = tuple((lane, round(rng.uniform(6, 60), 1)) for lane in range(num_lanes) if lane != ego_lane and maybe(0.5))
    crossing = None
    if intersection:
        crossing = round(rng.uniform(*(NEAR_INTERSECTION_M if intersection == "near" else FAR_INTERSECTION_M)), 1)
    return Scene(
        speed=round(speed, 1),
        navigation=navigation,
        num_lanes=num_lanes,
        ego_lane=ego_lane,
        intersection=intersection,
        light=light,
        lead_distance=None if lead is None else round(lead, 1),
        pedestrian_distance=None if pedestrian is None else round(pedestrian, 1),
        cones_distance=None if cones is None else round(cones, 1),
        others=others,
        style=rng.randrange(4),
        intersection_distance=crossing,
    )


def _normalise(mix: Mapping[str, float], vocab: tuple[str, ...], what: str) -> list[float]:
    unknown = set(mix) - set(vocab)
    if unknown:
        raise ValueError(f"{what} mix names unknown classes {sorted(unknown)}; expected some of {list(vocab)}")
    weights = [float(mix.get(c, 0.0)) for c in vocab]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"{what} mix weights must be >= 0 and not all zero, got {dict(mix)}")
    return weights


def _targets(rng: random.Random, speed_mix: Mapping[str, float], path_mix: Mapping[str, float]) -> tuple[str, str]:
    speed_target = rng.choices(SPEED_ACTIONS, weights=_normalise(speed_mix, SPEED_ACTIONS, "speed"))[0]
    path_target = rng.choices(PATH_ACTIONS, weights=_normalise(path_mix, PATH_ACTIONS, "path"))[0]
    return speed_target, path_target


def sample_scene(
    rng: random.Random,
    speed_mix: Mapping[str, float] = DEFAULT_SPEED_MIX,
    path_mix: Mapping[str, float] = DEFAULT_PATH_MIX,
    max_tries: int = 400,
) -> tuple[Scene, Plan]:
    """Draw target classes from the mixes, then propose random scenes until the rule-based
    planner's plan matches.

    Some (SPEED, PATH) pairs cannot occur (STOP with a turn); when no proposal matches
    both targets, the first proposal matching the SPEED target is taken, then any.
    """
    speed_target, path_target = _targets(rng, speed_mix, path_mix)
    fallback = None
    for _ in range(max_tries):
        scene = random_scene(rng)
        plan = plan_scene(scene)
        if plan.speed_action == speed_target:
            if plan.path_action == path_target:
                return scene, plan
            fallback = fallback or (scene, plan)
    if fallback is not None:
        return fallback
    scene = random_scene(rng)
    return scene, plan_scene(scene)


def sample_driven_scenes(
    rng: random.Random,
    n: int,
    speed_mix: Mapping[str, float] = DEFAULT_SPEED_MIX,
    path_mix: Mapping[str, float] = DEFAULT_PATH_MIX,
    pool: int = 2048,
    tries_per_scene: int = 20,
    patience: int = 2,
) -> list[Scene]:
    """`sample_scene` for driver labels, n scenes at once: target classes are drawn from the
    mixes, and random proposals, labelled by the typical driver (`driver.typical_labels`,
    which the most likely pair mostly is) `pool` at a time, fill the targets in order. A target
    no proposal matched within n x `tries_per_scene` proposals takes one matching its SPEED
    target, then any (some pairs never occur, e.g. STOP with a turn): the search also ends
    after `patience` pools in a row that filled no target."""
    from alphadrive_ray.data.driver import typical_labels

    targets = [_targets(rng, speed_mix, path_mix) for _ in range(n)]
    chosen: list[Scene | None] = [None] * n
    waiting: dict[tuple[str, str], list[int]] = {}
    for i, target in enumerate(targets):
        waiting.setdefault(target, []).append(i)
    by_speed: dict[str, list[Scene]] = {}
    spare: list[Scene] = []
    proposed = idle = 0
    while any(waiting.values()) and proposed < n * tries_per_scene and idle < patience:
        scenes = [random_scene(rng) for _ in range(pool)]
        proposed += pool
        idle += 1
        for scene, label in zip(scenes, typical_labels(scenes)):
            if waiting.get(label):
                chosen[waiting[label].pop(0)] = scene
                idle = 0
            elif len(by_speed.setdefault(label[0], [])) < n:
                by_speed[label[0]].append(scene)
            elif len(spare) < n:
                spare.append(scene)
    for target, left in waiting.items():
        for i in left:
            fallback = by_speed.get(target[0]) or spare
            chosen[i] = fallback.pop() if fallback else random_scene(rng)
    return chosen  # type: ignore[return-value]


# --- rendering -------------------------------------------------------------------------

_SKIES = ((135, 190, 235), (170, 200, 225), (240, 170, 120), (110, 130, 170))
_ROADS = ((95, 95, 100), (80, 80, 85), (110, 105, 100), (70, 72, 80))
_GRASS = ((70, 130, 60), (95, 140, 70), (120, 120, 80), (60, 100, 60))
_CAR_COLOURS = ((200, 30, 30), (30, 60, 200), (230, 230, 230), (40, 40, 40), (200, 180, 40), (20, 140, 140))
_PEDESTRIAN_COLOURS = ((255, 0, 200), (0, 230, 255), (255, 255, 0))
_LIGHT_COLOURS = {"red": (255, 30, 30), "yellow": (255, 210, 0), "green": (40, 230, 60)}
_LANE_M = 3.5  # lane width, metres
_NEAR_M = 6.0  # distance seen at the bottom row of the image (a mild telephoto view)
NEAR_INTERSECTION_M = (6.0, 12.0)
FAR_INTERSECTION_M = (40.0, 60.0)


class _Camera:
    """A pinhole view of a flat road: distance d (m) and lateral x (m) to pixels."""

    def __init__(self, size: int, ego_offset_m: float):
        self.w = self.h = size
        self.horizon = 0.42 * size
        self.px_per_m = 0.45 * size / _LANE_M  # at the bottom row
        self.offset = ego_offset_m  # lateral position of the ego car

    def scale(self, d: float) -> float:
        return _NEAR_M / max(d, 0.5)

    def y(self, d: float) -> float:
        return self.horizon + (self.h - self.horizon) * self.scale(d)

    def x(self, lateral_m: float, d: float) -> float:
        return self.w / 2 + (lateral_m - self.offset) * self.px_per_m * self.scale(d)


def _box(draw, cam: _Camera, lateral: float, d: float, width_m: float, height_m: float, fill, outline=None):
    s = cam.scale(d) * cam.px_per_m
    x, y = cam.x(lateral, d), cam.y(d)
    draw.rectangle([x - width_m * s / 2, y - height_m * s, x + width_m * s / 2, y], fill=fill, outline=outline)
    return x, y, s


def _vehicle(draw, cam: _Camera, lateral: float, d: float, colour):
    x, y, s = _box(draw, cam, lateral, d, 1.8, 1.4, colour, outline=(20, 20, 20))
    # rear window and tail lights make it read as the back of a car
    draw.rectangle([x - 0.7 * s, y - 1.25 * s, x + 0.7 * s, y - 0.85 * s], fill=(60, 70, 90))
    draw.rectangle([x - 0.9 * s, y - 0.6 * s, x - 0.6 * s, y - 0.4 * s], fill=(255, 60, 40))
    draw.rectangle([x + 0.6 * s, y - 0.6 * s, x + 0.9 * s, y - 0.4 * s], fill=(255, 60, 40))


def render_scene(scene: Scene, size: int = 224, seed: int = 0):
    """Draw `scene` as an RGB PIL image of `size` x `size` pixels."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), _SKIES[scene.style])
    draw = ImageDraw.Draw(img)
    lane_left_m = -_LANE_M * (scene.ego_lane + 0.5)  # left edge of the road, ego at 0
    road_right_m = lane_left_m + _LANE_M * scene.num_lanes
    cam = _Camera(size, ego_offset_m=0.0)
    far = 400.0
    draw.rectangle([0, cam.horizon, size, size], fill=_GRASS[scene.style])
    # buildings / trees on the horizon as clutter
    for _ in range(rng.randrange(2, 6)):
        x0 = rng.uniform(0, size)
        h = rng.uniform(4, 22) * size / 224
        draw.rectangle([x0, cam.horizon - h, x0 + rng.uniform(8, 30) * size / 224, cam.horizon], fill=tuple(rng.randrange(60, 200) for _ in range(3)))
    road = [
        (cam.x(lane_left_m - 0.5, _NEAR_M), size),
        (cam.x(road_right_m + 0.5, _NEAR_M), size),
        (cam.x(road_right_m + 0.5, far), cam.y(far)),
        (cam.x(lane_left_m - 0.5, far), cam.y(far)),
    ]
    draw.polygon(road, fill=_ROADS[scene.style])
    # an oncoming lane on the left, beyond a solid yellow line
    draw.polygon(
        [(cam.x(lane_left_m - 3.5, _NEAR_M), size), road[0], road[3], (cam.x(lane_left_m - 3.5, far), cam.y(far))],
        fill=_ROADS[scene.style],
    )
    cross = None
    if scene.intersection:
        d0 = scene.intersection_distance
        if d0 is None:  # a scene written before the distance was part of it
            d0 = rng.uniform(*(NEAR_INTERSECTION_M if scene.intersection == "near" else FAR_INTERSECTION_M))
        cross = (d0, d0 + 12.0)
        draw.rectangle([0, cam.y(cross[1]), size, cam.y(cross[0])], fill=_ROADS[scene.style])

    def line(lateral: float, colour, width: float, dashed: bool):
        d = _NEAR_M
        while d < 150:
            step = 3.0 if dashed else 150
            d1 = min(d + step, 150.0)
            if not (cross and cross[0] < d1 and d < cross[1]):
                draw.line([(cam.x(lateral, d), cam.y(d)), (cam.x(lateral, d1), cam.y(d1))], fill=colour, width=max(1, int(width)))
            d = d1 + (3.0 if dashed else 0)

    edge_w = 3 * size / 224
    line(lane_left_m, (240, 200, 0), edge_w, dashed=False)
    line(road_right_m, (240, 240, 240), edge_w, dashed=False)
    for k in range(1, scene.num_lanes):
        line(lane_left_m + k * _LANE_M, (240, 240, 240), 2 * size / 224, dashed=True)

    if cross and scene.intersection == "near":
        y0 = cam.y(cross[0] - 1.0)
        draw.rectangle([cam.x(lane_left_m, cross[0] - 1.0), y0 - 2 * size / 224, cam.x(road_right_m, cross[0] - 1.0), y0], fill=(250, 250, 250))
    if cross and scene.light:
        # an overhead signal on a gantry across the far side of the intersection, drawn about
        # 3x life size so that a 112 px input still shows its colour
        d = cross[1]
        y, s = cam.y(d), max(cam.scale(d) * cam.px_per_m, 1.5)
        left, right = cam.x(lane_left_m - 0.5, d), cam.x(road_right_m + 0.5, d)
        top = y - 7.0 * s
        draw.rectangle([right - 0.2 * s, top, right + 0.2 * s, y], fill=(40, 40, 40))
        draw.rectangle([min(left, cam.x(0.0, d) - 2.0 * s), top - 0.3 * s, right, top + 0.3 * s], fill=(40, 40, 40))
        hx = cam.x(0.0, d)  # above the ego lane
        hy = top + 0.3 * s
        draw.rectangle([hx - 1.6 * s, hy, hx + 1.6 * s, hy + 4.6 * s], fill=(25, 25, 25))
        slot = {"red": 0, "yellow": 1, "green": 2}[scene.light]
        for k in range(3):
            cy = hy + (k + 0.5) * 1.5 * s
            colour = _LIGHT_COLOURS[scene.light] if k == slot else (60, 60, 60)
            draw.ellipse([hx - 1.2 * s, cy - 0.65 * s, hx + 1.2 * s, cy + 0.65 * s], fill=colour)

    # far to near, so nearer objects hide farther ones
    objects = [(d, "other", lane) for lane, d in scene.others]
    if scene.lead_distance is not None:
        objects.append((scene.lead_distance, "lead", scene.ego_lane))
    if scene.pedestrian_distance is not None:
        objects.append((scene.pedestrian_distance, "pedestrian", scene.ego_lane))
    if scene.cones_distance is not None:
        objects.append((scene.cones_distance, "cones", scene.ego_lane))
    for d, kind, lane in sorted(objects, reverse=True):
        lateral = lane_left_m + (lane + 0.5) * _LANE_M
        if kind in ("other", "lead"):
            _vehicle(draw, cam, lateral + rng.uniform(-0.3, 0.3), d, rng.choice(_CAR_COLOURS))
        elif kind == "pedestrian":
            # drawn 1.5x life size in a high-visibility colour, so that a 112 px input shows it
            x, y, s = _box(draw, cam, lateral + rng.uniform(-0.8, 0.8), d, 0.9, 1.9, rng.choice(_PEDESTRIAN_COLOURS))
            draw.ellipse([x - 0.45 * s, y - 2.7 * s, x + 0.45 * s, y - 1.85 * s], fill=(230, 190, 150))
            draw.rectangle([x - 0.4 * s, y - 0.1 * s, x + 0.4 * s, y], fill=(30, 30, 30))
        else:  # cones across the lane, then a barrier
            for k in range(4):
                cd = d + 2.5 * k
                cx, cy, s = cam.x(lateral - 1.4 + 0.9 * k, cd), cam.y(cd), cam.scale(cd) * cam.px_per_m
                # 1.5x life size, like the pedestrians
                draw.polygon([(cx - 0.7 * s, cy), (cx + 0.7 * s, cy), (cx, cy - 1.9 * s)], fill=(255, 120, 0))
                draw.rectangle([cx - 0.35 * s, cy - 1.1 * s, cx + 0.35 * s, cy - 0.8 * s], fill=(250, 250, 250))
    return img


# --- the dataset -----------------------------------------------------------------------


@dataclass
class SynthStats:
    n: int = 0
    seconds: float = 0.0
    speed_counts: dict[str, int] = field(default_factory=lambda: {c: 0 for c in SPEED_ACTIONS})
    path_counts: dict[str, int] = field(default_factory=lambda: {c: 0 for c in PATH_ACTIONS})
    with_reasoning: int = 0
    ceiling: float = 0.0  # share of scenes whose logged label is their most likely pair
    expected_ceiling: float = 0.0  # mean probability of the most likely pair


LABELS = ("driver", "rule")


@dataclass(frozen=True)
class Labelling:
    """How a generated split is labelled (the config keys data.synth_*.<name>)."""

    labels: str = "driver"
    """`driver`: one draw of the stochastic driver model (alphadrive_ray/data/driver.py), read off
    its trajectory; `rule`: the deterministic rule-based planner of this module."""
    driver_noise: float = 1.0
    """Spread of the drivers around the typical one (0: the typical driver, deterministic labels)."""
    label_draws: int = 64
    """Drivers drawn per scene to estimate its label distribution and most likely pair."""
    reasoning_share: float = 1.0
    """Share of the scenes that carry reasoning (MetaAD: about a quarter); the rest have labels only."""

    def check(self) -> None:
        if self.labels not in LABELS:
            raise ValueError(f"labels must be one of {', '.join(LABELS)}, got {self.labels!r}")
        if not (self.driver_noise >= 0 and math.isfinite(self.driver_noise)):
            raise ValueError(f"driver_noise must be a finite number >= 0, got {self.driver_noise}")
        if self.label_draws < 1:
            raise ValueError(f"label_draws must be at least 1, got {self.label_draws}")
        if not 0 <= self.reasoning_share <= 1:
            raise ValueError(f"reasoning_share must be in [0, 1], got {self.reasoning_share}")


def pair_key(speed: str, path: str) -> str:
    """How a (SPEED, PATH) pair is written in a record's label_distribution."""
    return f"{speed}, {path}"


LABEL_CHUNK = 256  # scenes simulated together by the driver model


def generate_dataset(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    *,
    size: int = 224,
    speed_mix: Mapping[str, float] = DEFAULT_SPEED_MIX,
    path_mix: Mapping[str, float] = DEFAULT_PATH_MIX,
    labelling: Labelling = Labelling(),
    id_prefix: str = "scene",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Path, SynthStats]:
    """Render `n` scenes into `out_dir/images/` and write `out_dir/data.jsonl`.

    Each record carries its logged label (`speed_action`, `path_action`), the scene, and its
    label distribution (`label_distribution`: "SPEED, PATH" -> share of drivers) with the most
    likely pair (`most_likely`); with driver labels also the logged trajectory. A share
    `labelling.reasoning_share` of the records carries the teacher's reasoning of the logged
    label (`explain`; `reasoning_for` with rule labels).

    Deterministic in (`n`, `seed`, `size`, the mixes, `labelling`): the same call writes the same files.
    """
    import numpy as np

    labelling.check()
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    stats = SynthStats()
    start = time.perf_counter()
    driven = labelling.labels == "driver"
    scenes, plans, label_seeds, reasoning = [], [], [], []
    proposals = sample_driven_scenes(rng, n, speed_mix, path_mix) if driven else []
    for i in range(n):
        if driven:
            scene, plan = proposals[i], None
        else:
            scene, plan = sample_scene(rng, speed_mix, path_mix)
        render_scene(scene, size=size, seed=rng.randrange(2**31)).save(out / "images" / f"{id_prefix}-{seed}-{i:06d}.png", compress_level=1)
        scenes.append(scene)
        plans.append(plan)
        label_seeds.append(rng.randrange(2**63))
        reasoning.append(rng.random() < labelling.reasoning_share)
        if progress is not None:
            progress(i + 1, n)

    records = []
    for lo in range(0, n, LABEL_CHUNK):
        chunk = range(lo, min(n, lo + LABEL_CHUNK))
        if driven:
            from alphadrive_ray.data.driver import distribution_of, label_scenes, most_likely

            # draw 0 is the logged drive; the others estimate the scene's label distribution
            drawn, paths = label_scenes(
                [scenes[i] for i in chunk],
                1 + labelling.label_draws,
                [np.random.default_rng(label_seeds[i]) for i in chunk],
                labelling.driver_noise,
            )
        for j, i in enumerate(chunk):
            scene = scenes[i]
            if driven:
                logged, dist = drawn[j][0], distribution_of(drawn[j][1:])
                mode = most_likely(dist)
                extra = {"trajectory": np.round(paths[j][0], 2).tolist()}
            else:
                # rule labels: every scene has its plan (None only with driver labels)
                plan = cast(Plan, plans[i])
                logged = mode = (plan.speed_action, plan.path_action)
                dist, extra = {mode: 1.0}, {}
            text = None
            if reasoning[i]:
                text = explain(scene, *logged) if driven else reasoning_for(scene, cast(Plan, plans[i]))
            sample_id = f"{id_prefix}-{seed}-{i:06d}"
            records.append(
                Record(
                    id=sample_id,
                    image=str((out / "images" / f"{sample_id}.png").resolve()),
                    speed=scene.speed,
                    navigation=scene.navigation,
                    speed_action=logged[0],
                    path_action=logged[1],
                    reasoning=text,
                    extra={
                        "scene": asdict(scene),
                        **extra,
                        "label_distribution": {pair_key(*pair): round(p, 4) for pair, p in dist.items()},
                        "most_likely": list(mode),
                    },
                )
            )
            stats.speed_counts[logged[0]] += 1
            stats.path_counts[logged[1]] += 1
            stats.with_reasoning += text is not None
            stats.ceiling += (logged == mode) / n
            stats.expected_ceiling += dist[mode] / n
    path = out / "data.jsonl"
    write_records(path, records)
    stats.n = n
    stats.seconds = time.perf_counter() - start
    (out / "synth.json").write_text(
        json.dumps(
            {
                **generation_key(n, seed, size, speed_mix, path_mix, labelling),
                "speed_counts": stats.speed_counts,
                "path_counts": stats.path_counts,
                "with_reasoning": stats.with_reasoning,
                "ceiling": round(stats.ceiling, 4),
                "expected_ceiling": round(stats.expected_ceiling, 4),
            },
            indent=2,
        )
        + "\n"
    )
    return path, stats


# Bumped whenever rendering or labelling changes, so that stale generated splits are redone.
GENERATOR_VERSION = 5


def generation_key(
    n: int, seed: int, size: int, speed_mix: Mapping[str, float], path_mix: Mapping[str, float], labelling: Labelling = Labelling()
) -> dict:
    """What determines a generated split (written to synth.json next to data.jsonl)."""
    return {
        "generator_version": GENERATOR_VERSION,
        "n": n,
        "seed": seed,
        "size": size,
        "speed_mix": {k: float(v) for k, v in speed_mix.items()},
        "path_mix": {k: float(v) for k, v in path_mix.items()},
        **asdict(labelling),
    }


def is_current(out_dir: str | Path, key: dict) -> bool:
    """True when out_dir holds a complete split generated with exactly `key`."""
    out = Path(out_dir)
    try:
        recorded = json.loads((out / "synth.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (out / "data.jsonl").is_file() and all(recorded.get(k) == v for k, v in key.items())


def scene_from_json(obj: Mapping) -> Scene:
    """Rebuild a Scene from the `scene` field a generated record carries."""
    data = dict(obj)
    data["others"] = tuple(tuple(o) for o in data.get("others", ()))
    return Scene(**data)


def parse_mix(text: str, vocab: Iterable[str]) -> dict[str, float]:
    """'KEEP=1,STOP=2' -> {'KEEP': 1.0, 'STOP': 2.0}; classes not named get weight 0."""
    vocab = tuple(vocab)
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"expected CLASS=WEIGHT, got {part!r}")
        name = name.strip().upper()
        if name not in vocab:
            raise ValueError(f"unknown class {name!r}; expected one of {', '.join(vocab)}")
        try:
            out[name] = float(value)
        except ValueError:
            raise ValueError(f"weight of {name} must be a number, got {value!r}") from None
        if not math.isfinite(out[name]) or out[name] < 0:
            raise ValueError(f"weight of {name} must be >= 0, got {value!r}")
    if not out or sum(out.values()) <= 0:
        raise ValueError(f"mix {text!r} gives no class a positive weight")
    return out
