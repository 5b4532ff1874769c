"""Pure parts of distillation: the reasoning filters, the teacher prompt, backoff, response parsing."""

from __future__ import annotations

import random

import pytest

from alphadrive_ray.actions import PATH_ACTIONS, SPEED_ACTIONS
from alphadrive_ray.data.records import Record
from alphadrive_ray.distill.filters import (
    CONTRADICTIONS,
    FILTERS,
    MENTIONS,
    FilterLimits,
    check_reasoning,
    normalise_reasoning,
)
from alphadrive_ray.distill.prompt import (
    TEACHER_PROMPT,
    check_template,
    render_prompt,
    request_hash,
    truncate_data_urls,
)
from alphadrive_ray.distill.teacher import MalformedResponse, backoff_delay, parse_completion, parse_retry_after
from alphadrive_ray.errors import UserError

GOOD = "The traffic light ahead is red and a car is waiting, so I slow down and stay in my lane."

# (case, text, speed, path, navigation, expected filter names)
CASES = [
    # clean English reasoning that matches the plan
    ("clean", GOOD, "DECELERATE", "STRAIGHT", "go straight", []),
    # --- empty -------------------------------------------------------------------------
    ("blank", "   \n ", "KEEP", "STRAIGHT", "go straight", ["empty"]),
    ("fragment of two words", "Red light.", "STOP", "STRAIGHT", "go straight", ["empty"]),
    ("punctuation only", "... !!", "STOP", "STRAIGHT", "go straight", ["empty"]),
    # --- refusal -----------------------------------------------------------------------
    ("apology", "I'm sorry, but I can't help with identifying details in this image.", "KEEP", "STRAIGHT", "go straight", ["refusal"]),
    ("typographic apostrophe", "I\u2019m sorry, I cannot see the image you sent me today.", "KEEP", "STRAIGHT", "go straight", ["refusal"]),
    ("cannot view image", "As the scene is unclear, I cannot view the image well enough to explain.", "KEEP", "STRAIGHT", "go straight", ["refusal"]),
    ("as an AI", "As an AI I do not drive, but the road ahead looks clear to me.", "KEEP", "STRAIGHT", "go straight", ["refusal"]),
    # "I cannot <driving verb>" is reasoning, not a refusal
    (
        "cannot accelerate is reasoning",
        "I cannot accelerate because the car ahead is close, so I slow down.",
        "DECELERATE",
        "STRAIGHT",
        "go straight",
        [],
    ),
    # --- answer leak -------------------------------------------------------------------
    (
        "answer tag",
        "The road is clear so I speed up. <answer> ACCELERATE, STRAIGHT </answer>",
        "ACCELERATE",
        "STRAIGHT",
        "go straight",
        ["answer_leak"],
    ),
    ("think tag", "<think> The road ahead is clear, so I keep my speed. </think>", "KEEP", "STRAIGHT", "go straight", ["answer_leak"]),
    ("vocabulary token", "The navigation says turn left at the junction, so LEFT_TURN is right.", "KEEP", "LEFT_TURN", "turn left", ["answer_leak"]),
    (
        "capitalised action word",
        "A pedestrian is on the crossing ahead, so I must STOP here now.",
        "STOP",
        "STRAIGHT",
        "go straight",
        ["answer_leak"],
    ),
    (
        "lower-case token with underscore",
        "The plan is a right_change because cones close my lane ahead.",
        "DECELERATE",
        "RIGHT_CHANGE",
        "go straight",
        ["answer_leak"],
    ),
    ("SPEED label", "SPEED: slow, because the light ahead of me is yellow now.", "DECELERATE", "STRAIGHT", "go straight", ["answer_leak"]),
    # ordinary words that look like vocabulary are fine in lower case
    ("lower-case words are fine", "I keep straight and stop behind the car ahead at the light.", "STOP", "STRAIGHT", "go straight", []),
    # --- wrong language ----------------------------------------------------------------
    ("chinese", "前方红灯，有行人通过，所以我减速停车。", "STOP", "STRAIGHT", "go straight", ["wrong_language"]),
    ("short chinese is not empty", "红灯，停车。", "STOP", "STRAIGHT", "go straight", ["wrong_language"]),
    ("german", "Die Ampel vor mir ist rot, deshalb halte ich an der Haltelinie.", "STOP", "STRAIGHT", "go straight", ["wrong_language"]),
    ("french", "Le feu est rouge devant moi, donc je ralentis et je m'arrête.", "STOP", "STRAIGHT", "go straight", ["wrong_language"]),
    ("spanish", "El semáforo está en rojo, así que reduzco la velocidad ahora mismo.", "STOP", "STRAIGHT", "go straight", ["wrong_language"]),
    ("short english is not checked by word share", "Slowing for pedestrians.", "DECELERATE", "STRAIGHT", "go straight", []),
    # --- too long ----------------------------------------------------------------------
    ("too many words", " ".join(["The road ahead is clear and calm."] * 12), "KEEP", "STRAIGHT", "go straight", ["too_long"]),
    ("too many sentences", "The road is clear. No cars are near. The light is green. I keep going.", "KEEP", "STRAIGHT", "go straight", ["too_long"]),
    ("decimal points are not sentence ends", "At 8.4 m/s the light ahead is red, so I slow down.", "DECELERATE", "STRAIGHT", "go straight", []),
    # --- contradictions: SPEED -----------------------------------------------------------
    ("accelerate vs STOP", "The road ahead is clear, so I accelerate to cruising speed.", "STOP", "STRAIGHT", "go straight", ["contradiction"]),
    (
        "speed up vs DECELERATE",
        "The light turned green, so I speed up through the intersection.",
        "DECELERATE",
        "STRAIGHT",
        "go straight",
        ["contradiction"],
    ),
    ("slow down vs ACCELERATE", "A car is merging ahead of me, so I slow down a little.", "ACCELERATE", "STRAIGHT", "go straight", ["contradiction"]),
    ("stop vs KEEP", "The pedestrian is crossing, so I stop before the crossing.", "KEEP", "STRAIGHT", "go straight", ["contradiction"]),
    ("keep speed vs STOP", "Traffic is flowing well, so I maintain my current speed.", "STOP", "STRAIGHT", "go straight", ["contradiction"]),
    # negated mentions are not statements of the plan
    ("negated stop", "The road is clear and there is no need to stop, so I speed up.", "ACCELERATE", "STRAIGHT", "go straight", []),
    ("instead of accelerating", "Instead of accelerating I slow down, as the car ahead brakes.", "DECELERATE", "STRAIGHT", "go straight", []),
    ("don't speed up", "The light may change soon, so I don't speed up and I slow down.", "DECELERATE", "STRAIGHT", "go straight", []),
    # scene words are not actions
    (
        "stop sign is a scene word",
        "There is a stop sign far ahead, but the road is clear, so I speed up.",
        "ACCELERATE",
        "STRAIGHT",
        "go straight",
        [],
    ),
    (
        "stopping vs DECELERATE is no contradiction",
        "The light is yellow, so I decelerate and prepare for stopping.",
        "DECELERATE",
        "STRAIGHT",
        "go straight",
        [],
    ),
    # --- contradictions: PATH ------------------------------------------------------------
    ("turn left vs RIGHT_TURN", "The intersection is clear, so I turn left at the corner.", "KEEP", "RIGHT_TURN", "turn right", ["contradiction"]),
    (
        "turning right vs STRAIGHT",
        "The road ahead is clear, so I keep my speed while turning right.",
        "KEEP",
        "STRAIGHT",
        "go straight",
        ["contradiction"],
    ),
    (
        "left lane change vs RIGHT_CHANGE",
        "Cones close my lane, so I move into the left lane to pass.",
        "DECELERATE",
        "RIGHT_CHANGE",
        "go straight",
        ["contradiction"],
    ),
    (
        "go straight vs LEFT_TURN",
        "The light is green, so I go straight through the intersection.",
        "KEEP",
        "LEFT_TURN",
        "turn left",
        ["contradiction"],
    ),
    # quoting the navigation command is not the plan
    (
        "quoting navigation",
        "The navigation says turn left ahead, but cones close my lane, so I change to the right lane.",
        "DECELERATE",
        "RIGHT_CHANGE",
        "turn left",
        [],
    ),
    # a lane change to the left does not contradict a left turn label, by design
    ("left change vs LEFT_TURN is allowed", "I move to the left lane and turn left at the intersection ahead.", "KEEP", "LEFT_TURN", "turn left", []),
    # --- several filters at once ---------------------------------------------------------
    (
        "leak and contradiction",
        "<answer> ACCELERATE, STRAIGHT </answer> because I accelerate now.",
        "STOP",
        "STRAIGHT",
        "go straight",
        ["answer_leak", "contradiction"],
    ),
]


@pytest.mark.parametrize("case,text,speed,path,navigation,expected", CASES, ids=[c[0] for c in CASES])
def test_filters(case, text, speed, path, navigation, expected):
    flags = check_reasoning(text, speed, path, navigation)
    assert [f.filter for f in flags] == expected, [str(f) for f in flags]
    for flag in flags:
        assert flag.detail  # every flag says why


def test_cut_off_answers_are_too_long():
    # the teacher ran out of tokens: the text ends mid-sentence even if it is short
    flags = check_reasoning("The road ahead is clear, so I keep my", "KEEP", "STRAIGHT", finish_reason="length")
    assert [f.filter for f in flags] == ["too_long"]


def test_limits_are_configurable():
    text = "The light ahead is red, so I slow down and stay in my lane."
    assert check_reasoning(text, "DECELERATE", "STRAIGHT", limits=FilterLimits(max_words=5))[0].filter == "too_long"
    assert check_reasoning(text, "DECELERATE", "STRAIGHT", limits=FilterLimits(max_words=14)) == []


def test_filter_names_are_the_documented_ones():
    assert set(FILTERS) == {c[5][0] for c in CASES if c[5]} | {"too_long"}
    # every contradiction rule names mentions that exist, for every label of the vocabulary
    assert set(CONTRADICTIONS) == set(SPEED_ACTIONS) | set(PATH_ACTIONS)
    assert {m for ms in CONTRADICTIONS.values() for m in ms} <= set(MENTIONS)


def test_each_contradiction_rule_fires():
    # one phrase per mention; each rule of the table must fire on its phrase, and a label
    # must never be contradicted by its own phrase
    phrase = {
        "accelerate": "so I accelerate now",
        "slow_down": "so I slow down now",
        "stop": "so I stop now",
        "keep_speed": "so I keep my speed now",
        "left_turn": "so I turn left now",
        "right_turn": "so I turn right now",
        "left_change": "so I change to the left lane now",
        "right_change": "so I change to the right lane now",
        "straight": "so I go straight now",
    }
    own = {
        "KEEP": "keep_speed",
        "ACCELERATE": "accelerate",
        "DECELERATE": "slow_down",
        "STOP": "stop",
        "STRAIGHT": "straight",
        "LEFT_TURN": "left_turn",
        "RIGHT_TURN": "right_turn",
        "LEFT_CHANGE": "left_change",
        "RIGHT_CHANGE": "right_change",
    }
    for label, ruled_out in CONTRADICTIONS.items():
        other = "KEEP" if label in PATH_ACTIONS else "STRAIGHT"
        speed, path = (other, label) if label in PATH_ACTIONS else (label, other)
        for mention in ruled_out:
            text = f"The scene ahead is as it is, {phrase[mention]}."
            flags = check_reasoning(text, speed, path, "")
            assert "contradiction" in [f.filter for f in flags], (label, mention)
        text = f"The scene ahead is as it is, {phrase[own[label]]}."
        assert check_reasoning(text, speed, path, "") == [], label


def test_synthetic_reasoning_passes_every_filter():
    # the rule-based reasoning of the synthetic scenes is the offline default: every sentence
    # it writes, for every plan it makes, must pass (a filter that fires here is wrong)
    from alphadrive_ray.data.synth import plan_scene, random_scene, reasoning_for

    rng = random.Random(0)
    seen = set()
    for _ in range(3000):
        scene = random_scene(rng)
        plan = plan_scene(scene)
        seen.add((plan.speed_action, plan.path_action))
        text = reasoning_for(scene, plan)
        assert check_reasoning(text, plan.speed_action, plan.path_action, scene.navigation) == [], text
    assert len(seen) >= 12  # most plan combinations were covered


def test_normalise_reasoning():
    assert normalise_reasoning('  "The light\n is red."  ') == "The light is red."
    assert normalise_reasoning("\u201cQuoted.\u201d") == "Quoted."
    assert normalise_reasoning(None) == ""
    assert normalise_reasoning('"a" and "b"') == '"a" and "b"'  # inner quotes: not a wrapper


ADVERSARIAL_REASONING = "stop " * 200_000 + "<answer" * 10_000  # 1 MB; its speed: bench/adversarial_inputs.py


@pytest.mark.timeout(120)  # a hang guard, not a speed target
def test_adversarial_text_is_checked():
    flags = check_reasoning(ADVERSARIAL_REASONING, "ACCELERATE", "STRAIGHT")
    assert {f.filter for f in flags} == {"too_long", "contradiction"}


# --- the teacher prompt ------------------------------------------------------------------


def _record(**kw) -> Record:
    base = dict(id="s1", image="/x.png", speed=8.44, navigation="turn left", speed_action="DECELERATE", path_action="LEFT_TURN")
    return Record(**{**base, **kw})


def test_default_prompt_has_the_release_slots():
    text = render_prompt(_record())
    assert "Your current speed is 8.4m/s" in text
    assert "the navigation command is 'turn left'" in text
    assert "'decelerate, turn left'" in text
    assert "LEFT_TURN" not in text  # plain words, so the teacher does not echo tokens
    check_template(TEACHER_PROMPT)


@pytest.mark.parametrize(
    "template,error",
    [
        ("Speed {speed}, plan {decision}.", None),  # minimal valid template
        ("Plan {speed_action} and {path_action}.", None),  # the raw tokens are allowed
        ("Speed {speed} only.", "must be told the true plan"),  # the plan is the point
        ("Plan {decision} at {weather}.", "unknown slot"),  # a typo'd slot
        ("Plan {decision} {", "not a valid format string"),  # a stray brace
    ],
)
def test_template_checks(template, error):
    if error is None:
        assert check_template(template) == template
        render_prompt(_record(), template)
    else:
        with pytest.raises(UserError, match=error):
            check_template(template)


def test_request_hash_and_display():
    body = {"messages": [{"content": [{"image_url": {"url": "data:image/png;base64," + "A" * 1000}}]}], "temperature": 0.2}
    other = {**body, "temperature": 0.3}
    assert request_hash(body) == request_hash(dict(reversed(list(body.items()))))  # key order does not matter
    assert request_hash(body) != request_hash(other)
    shown = truncate_data_urls(body)
    url = shown["messages"][0]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,AAA") and url.endswith(f"({22 + 1000} chars)") and len(url) < 80
    assert len(body["messages"][0]["content"][0]["image_url"]["url"]) == 1022  # the original is untouched


# --- retries -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers,expected",
    [
        ({"Retry-After": "3"}, 3.0),  # seconds
        ({"retry-after": "0.25"}, 0.25),  # fractional seconds, any header case
        ({"retry-after-ms": "1500", "Retry-After": "9"}, 1.5),  # OpenAI's ms header wins
        ({"Retry-After": "Wed, 21 Oct 2015 07:28:10 GMT"}, 10.0),  # an HTTP date, 10 s after "now"
        ({"Retry-After": "Wed, 21 Oct 2015 07:27:00 GMT"}, 0.0),  # a date in the past: no wait
        ({"Retry-After": "-5"}, 0.0),  # negative: no wait
        ({"Retry-After": "99999"}, 600.0),  # capped
        ({"Retry-After": "soon"}, None),  # unparsable: ignored
        ({}, None),
        (None, None),
    ],
)
def test_parse_retry_after(headers, expected):
    from email.utils import parsedate_to_datetime

    now = parsedate_to_datetime("Wed, 21 Oct 2015 07:28:00 GMT").timestamp()
    assert parse_retry_after(headers, now=now) == expected


def test_backoff_grows_exponentially_with_jitter():
    rng = random.Random(0)
    for retry in range(6):
        d = min(30.0, 1.0 * 2**retry)
        delays = [backoff_delay(retry, 1.0, 30.0, None, rng) for _ in range(200)]
        assert all(d / 2 <= x <= d for x in delays)  # equal jitter: [d/2, d]
        assert max(delays) - min(delays) > d / 4  # and it is really random
    # the cap holds
    assert all(backoff_delay(20, 1.0, 30.0, None, rng) <= 30.0 for _ in range(50))


def test_backoff_honours_retry_after():
    rng = random.Random(0)
    # Retry-After is a floor, even when it is longer than the exponential delay
    assert all(7.0 <= backoff_delay(0, 1.0, 30.0, 7.0, rng) <= 8.0 for _ in range(100))
    # and when the exponential delay is longer, that one is used
    assert all(backoff_delay(5, 1.0, 60.0, 0.5, rng) >= 16.0 for _ in range(100))


@pytest.mark.parametrize(
    "body,expected",
    [
        (
            '{"choices":[{"message":{"content":"Clear road."},"finish_reason":"stop"}],"usage":{"prompt_tokens":10,"completion_tokens":3}}',
            ("Clear road.", "stop", 10, 3),
        ),
        # no usage block: zero tokens, not an error
        ('{"choices":[{"message":{"content":"x"}}]}', ("x", None, 0, 0)),
        # a structured refusal is the teacher's answer (the refusal filter then drops it)
        ('{"choices":[{"message":{"content":null,"refusal":"I cannot help"}}]}', ("I cannot help", None, 0, 0)),
        # null content: an empty answer (the empty filter drops it)
        ('{"choices":[{"message":{"content":null}}]}', ("", None, 0, 0)),
    ],
)
def test_parse_completion(body, expected):
    r = parse_completion(body)
    assert (r.content, r.finish_reason, r.prompt_tokens, r.completion_tokens) == expected


@pytest.mark.parametrize(
    "body",
    [
        "{not json",  # truncated / malformed
        "[1, 2]",  # JSON but not an object
        '{"choices": []}',  # no choice
        '{"choices": [{"text": "completion API shape"}]}',  # no message
        '{"error": {"message": "overloaded"}}',  # an error body with status 200
        '{"choices":[{"message":{"content":["parts"]}}]}',  # content that is not text
    ],
)
def test_parse_completion_rejects_malformed(body):
    with pytest.raises(MalformedResponse):
        parse_completion(body)
