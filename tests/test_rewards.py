"""The four AlphaDrive rewards, both variants: hand-computed tables, regex equivalence, fuzzing."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alphadrive_ray.actions import PATH_WEIGHTS, SPEED_WEIGHTS
from alphadrive_ray.rewards import (
    ABLATION_COMPONENTS,
    SCORE_KEYS,
    action_weight_reward,
    diversity_rewards,
    exact_accuracy_reward,
    exact_match_reward,
    f1_reward,
    find_answer,
    find_reasoning,
    format_reward,
    paper_answer_words,
    parse_answer,
    parse_plan,
    release_answer_words,
    release_diversity,
    score_group,
)

SOLUTION = "<answer> DECELERATE, LEFT_TURN </answer>"

# --------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------

FIND_ANSWER_CASES = [
    # (text, dotall, expected)
    ("<answer> A </answer>", True, " A "),  # plain answer, white space kept
    ("no tags at all", True, None),  # nothing to find
    ("<answer> A", True, None),  # unclosed (truncated generation)
    ("</answer> A <answer>", True, None),  # closing before opening does not count
    ("<answer> A </answer", True, None),  # truncated closing tag
    ("<answer> A <answer> B </answer>", True, " A <answer> B "),  # nested: the first opening wins (re.search)
    ("<answer> A </answer><answer> B </answer>", True, " A "),  # two answers: the first
    ("<answer></answer>", True, ""),  # empty answer is still an answer
    ("<answer>\nA\n</answer>", True, "\nA\n"),  # DOTALL spans newlines
    ("<answer>\nA\n</answer>", False, None),  # without DOTALL it does not
    ("<answer>\nA</answer> <answer> B </answer>", False, " B "),  # ...and the next one-line answer is used
    ("<answer><answer> A </answer>", False, "<answer> A "),  # nested on one line, non-DOTALL
    ("<answer>\n<answer> B </answer>", False, " B "),  # an opening after the newline starts a valid answer
    ("<answer> A\n<answer> B\n</answer>", False, None),  # every candidate spans a newline
    ("<answer> A\r</answer>", False, " A\r"),  # only \n stops `.` (not \r)
]


@pytest.mark.parametrize("text, dotall, expected", FIND_ANSWER_CASES)
def test_find_answer(text, dotall, expected):
    assert find_answer(text, dotall=dotall) == expected


PAPER_WORDS_CASES = [
    # (text, expected words)
    ("<answer> KEEP, STRAIGHT </answer>", ["KEEP", "STRAIGHT"]),  # canonical
    ("<answer>KEEP,STRAIGHT</answer>", ["KEEP", "STRAIGHT"]),  # commas without spaces
    ("<answer> KEEP\n\tSTRAIGHT ,, STOP </answer>", ["KEEP", "STRAIGHT", "STOP"]),  # any mix of white space / commas
    ("KEEP <answer> STOP", ["KEEP", "STOP"]),  # no complete answer: whole text, tags removed
    ("<think> x </think> KEEP", ["<think>", "x", "</think>", "KEEP"]),  # fallback keeps other tags as words
    ("<answer> </answer> KEEP", []),  # an empty answer wins over words outside it
    ("", []),  # empty text
    ("<answer> KEEP\u00a0STOP </answer>", ["KEEP", "STOP"]),  # unicode white space separates (like re's \s)
]


@pytest.mark.parametrize("text, expected", PAPER_WORDS_CASES)
def test_paper_answer_words(text, expected):
    assert paper_answer_words(text) == expected


RELEASE_WORDS_CASES = [
    # (text, expected words)
    ("<answer> KEEP, STRAIGHT </answer>", ["KEEP", "STRAIGHT"]),  # canonical: matched answer is stripped
    ("<answer>KEEP,STRAIGHT</answer>", ["KEEP,STRAIGHT"]),  # only ", " splits
    ("<answer> KEEP STRAIGHT </answer>", ["KEEP STRAIGHT"]),  # white space alone does not split
    ("<answer> KEEP,\nSTRAIGHT </answer>", [" KEEP,\nSTRAIGHT "]),  # newline: no match; fallback is NOT stripped
    ("KEEP, STRAIGHT\n", ["KEEP", "STRAIGHT\n"]),  # fallback keeps the trailing newline on the last word
    ("<answer> STOP, STOP </answer>", ["STOP", "STOP"]),  # duplicates kept here, sets later
]


@pytest.mark.parametrize("text, expected", RELEASE_WORDS_CASES)
def test_release_answer_words(text, expected):
    assert release_answer_words(text) == expected


PARSE_ANSWER_CASES = [
    # (text, variant, expected set)
    ("<answer> KEEP, STRAIGHT </answer>", "paper", {"KEEP", "STRAIGHT"}),  # canonical
    ("<answer> keep, Straight </answer>", "paper", set()),  # case-sensitive
    ("<answer> KEEPING, STRAIGHTER </answer>", "paper", set()),  # exact words only, no substrings
    ("<answer> KEEP, KEEP, STOP </answer>", "paper", {"KEEP", "STOP"}),  # a set
    ("<answer> KEEP STRAIGHT </answer>", "release", set()),  # release needs ", "
    ("<answer> KEEP, STRAIGHT </answer>", "release", {"KEEP", "STRAIGHT"}),  # canonical, release
    ("<answer> KEEP.</answer>", "paper", set()),  # punctuation glued to a word: not the word
]


@pytest.mark.parametrize("text, variant, expected", PARSE_ANSWER_CASES)
def test_parse_answer(text, variant, expected):
    assert parse_answer(text, variant) == frozenset(expected)


PARSE_PLAN_CASES = [
    # (text, expected (speed, path))
    ("<think> x </think><answer> DECELERATE, LEFT_TURN </answer>", ("DECELERATE", "LEFT_TURN")),  # canonical
    ("<answer> LEFT_TURN, DECELERATE </answer>", ("DECELERATE", "LEFT_TURN")),  # order of families does not matter
    ("<answer> KEEP, STOP, STRAIGHT, LEFT_TURN </answer>", ("KEEP", "STRAIGHT")),  # first word of each family
    ("<answer> STOP </answer>", ("STOP", None)),  # PATH missing: a miss
    ("I would keep going straight", (None, None)),  # lower case is not the vocabulary
    ("<think> KEEP? </think> STOP, RIGHT_CHANGE", ("STOP", "RIGHT_CHANGE")),  # fallback: whole text ("KEEP?" is no word)
    ("<think> KEEP </think><answer> STOP, STRAIGHT </answer>", ("STOP", "STRAIGHT")),  # only the answer counts
]


@pytest.mark.parametrize("text, expected", PARSE_PLAN_CASES)
def test_parse_plan(text, expected):
    assert parse_plan(text) == expected


FIND_REASONING_CASES = [
    # (text, expected)
    ("<think> red light </think><answer> STOP </answer>", "red light"),  # stripped
    ("<think>a\nb</think>", "a\nb"),  # DOTALL
    ("<think> unclosed, truncated", None),  # no closing tag: no reasoning
    ("<answer> STOP </answer>", None),  # no think block
    ("<think></think>", ""),  # empty but present
]


@pytest.mark.parametrize("text, expected", FIND_REASONING_CASES)
def test_find_reasoning(text, expected):
    assert find_reasoning(text) == expected


# --------------------------------------------------------------------------------------
# Single rewards
# --------------------------------------------------------------------------------------

F1_CASES = [
    # (pred, true, expected)
    ({"STOP"}, {"STOP"}, 1.0),  # exact
    ({"KEEP"}, {"STOP"}, 0.0),  # wrong
    ({"STOP", "KEEP"}, {"STOP"}, 2 / 3),  # one extra word: 2*1/(2*1+1+0)
    ({"STOP", "KEEP", "ACCELERATE", "DECELERATE"}, {"STOP"}, 2 / 5),  # listing everything is punished
    (set(), {"STOP"}, 0.0),  # empty prediction
    ({"STOP"}, set(), 0.0),  # empty truth
    (set(), set(), 0.0),  # both empty: 0, not 1
    ({"STOP", "KEEP"}, {"STOP", "DECELERATE"}, 0.5),  # 2*1/(2+1+1)
]


@pytest.mark.parametrize("pred, true, expected", F1_CASES)
def test_f1_reward(pred, true, expected):
    assert f1_reward(frozenset(pred), frozenset(true)) == pytest.approx(expected, abs=1e-15)


EXACT_CASES = [
    # (pred, true, expected)
    ({"STOP"}, {"STOP"}, 1.0),  # exact
    ({"STOP", "KEEP"}, {"STOP"}, 0.0),  # superset is not exact
    (set(), set(), 0.0),  # nothing is never right
]


@pytest.mark.parametrize("pred, true, expected", EXACT_CASES)
def test_exact_match_reward(pred, true, expected):
    assert exact_match_reward(frozenset(pred), frozenset(true)) == expected


WEIGHT_CASES = [
    # (pred, weights, expected)
    ({"KEEP"}, SPEED_WEIGHTS, 0.8),  # release weight of KEEP
    ({"ACCELERATE"}, SPEED_WEIGHTS, 0.9),  # release weight of ACCELERATE
    ({"KEEP", "STOP"}, SPEED_WEIGHTS, 0.9),  # mean of 0.8 and 1.0
    ({"STRAIGHT"}, PATH_WEIGHTS, 0.8),  # STRAIGHT is the cheap path
    ({"LEFT_CHANGE", "STRAIGHT"}, PATH_WEIGHTS, 0.9),  # mean of 1.0 and 0.8
    (set(), SPEED_WEIGHTS, 0.0),  # no words
    ({"KEEP", "NOT_A_WORD"}, SPEED_WEIGHTS, 0.4),  # unknown words weigh 0 (and count)
]


@pytest.mark.parametrize("pred, weights, expected", WEIGHT_CASES)
def test_action_weight_reward(pred, weights, expected):
    assert action_weight_reward(frozenset(pred), weights) == pytest.approx(expected, abs=1e-15)


K, S, A, D = frozenset({"KEEP"}), frozenset({"STOP"}), frozenset({"ACCELERATE"}), frozenset({"DECELERATE"})
E = frozenset()

PAPER_DIVERSITY_CASES = [
    # (group of predicted sets, cap, expected)
    ([K, S], 0.2, [0.8, 0.8]),  # G=2: 1/2 > cap, so even unique answers get the full 20%
    ([K, K, K, K, K, K, K, K], 0.2, [0.8] * 8),  # all the same: capped at 20%
    ([K, S, A, D, E, K | S, K | A, K | D], 0.2, [0.875] * 8),  # all distinct in G=8: 1 - 1/8
    ([K, K, S, A, D, E, K | S, K | A], 0.2, [0.8, 0.8] + [0.875] * 6),  # one pair shares: 1 - min(.2, 2/8)
    ([K, K, S], 1.0, [1 / 3, 1 / 3, 2 / 3]),  # cap 1 exposes c/G itself
    ([], 0.2, []),  # empty group
]


@pytest.mark.parametrize("sets, cap, expected", PAPER_DIVERSITY_CASES)
def test_diversity_rewards(sets, cap, expected):
    assert diversity_rewards(sets, cap) == pytest.approx(expected, abs=1e-15)


RELEASE_DIVERSITY_CASES = [
    # (group of predicted sets, expected)
    ([K, K, S, K], [0.4, -0.4, 0.4, -0.4]),  # first use +, every later duplicate -
    ([K | S, S, A, K | A, E], [0.4, -0.4, 0.4, -0.4, 0.4]),  # one counter over words: any seen word makes it -
    ([E, E, K], [0.4, 0.4, 0.4]),  # empty predictions always get + (all([]) is True)
    ([S, K, S], [0.4, 0.4, -0.4]),  # order matters: it is the later one that loses
]


@pytest.mark.parametrize("sets, expected", RELEASE_DIVERSITY_CASES)
def test_release_diversity(sets, expected):
    assert release_diversity(sets) == expected


def test_release_diversity_bonus_is_a_parameter():
    assert release_diversity([K, K], bonus=0.1) == [0.1, -0.1]


FORMAT_CASES = [
    # (text, variant, expected)
    ("<think> a </think><answer> KEEP, STRAIGHT </answer>", "paper", 1.0),  # canonical
    ("<think> a </think>\n\n <answer> KEEP </answer>", "paper", 1.0),  # white space between blocks
    ("<think>\nmulti\nline\n</think><answer>\nx\n</answer>", "paper", 1.0),  # DOTALL inside blocks
    ("  <think> a </think><answer> x </answer>\n", "paper", 1.0),  # paper strips the surrounding white space
    ("  <think> a </think><answer> x </answer>\n", "release", 0.0),  # the release does not
    ("<answer> x </answer>", "paper", 0.0),  # no think block
    ("<think> a </think> text <answer> x </answer>", "paper", 0.0),  # text between blocks
    ("<think> a </think><answer> x </answer> trailing", "paper", 0.0),  # text after the answer
    ("<think> a </think><answer> x", "paper", 0.0),  # unclosed answer
    ("<think> a <answer> x </answer>", "paper", 0.0),  # unclosed think
    ("<think></think><answer></answer>", "paper", 1.0),  # empty blocks are fine
    ("<think> a </think>x</think> <answer> y </answer>", "paper", 1.0),  # a later </think> can close it (.*? backtracks)
    ("<think> a </think><answer> x </answer><answer> y </answer>", "paper", 1.0),  # answer body may hold tags
    ("<think></think><answer></answer", "paper", 0.0),  # truncated closing tag
]


@pytest.mark.parametrize("text, variant, expected", FORMAT_CASES)
def test_format_reward(text, variant, expected):
    assert format_reward(text, variant) == expected


EXACT_ACCURACY_CASES = [
    # (completion, expected)
    ("<think> x </think><answer> DECELERATE, LEFT_TURN </answer>", 1.0),  # both right
    ("<answer> LEFT_TURN DECELERATE </answer>", 1.0),  # order and separators do not matter (paper parsing)
    ("<answer> DECELERATE, RIGHT_TURN </answer>", 0.0),  # PATH wrong
    ("<answer> DECELERATE, STOP, LEFT_TURN </answer>", 0.0),  # an extra SPEED word is not exact
    ("<answer> DECELERATE </answer>", 0.0),  # PATH missing
]


@pytest.mark.parametrize("completion, expected", EXACT_ACCURACY_CASES)
def test_exact_accuracy_reward(completion, expected):
    assert exact_accuracy_reward(completion, SOLUTION) == expected


# --------------------------------------------------------------------------------------
# One group, hand-computed
# --------------------------------------------------------------------------------------

# A group of 8 completions for SOLUTION (DECELERATE, LEFT_TURN).
A_ = "<think> red light ahead </think>\n<answer> DECELERATE, LEFT_TURN </answer>"  # right, three copies
B_ = "<think> clear road </think><answer> KEEP, LEFT_TURN </answer>"  # SPEED wrong
C_ = "<answer> DECELERATE STOP, STRAIGHT </answer>"  # extra SPEED word, PATH wrong, no think
D_ = "  <think> t </think> <answer>ACCELERATE,RIGHT_CHANGE</answer>\n"  # no space after comma, padded
E_ = "I would decelerate and turn left"  # no vocabulary word
F_ = "<think> x </think>\n<answer> DECELERATE, LEFT_CHANGE"  # truncated: unclosed answer
GROUP = [A_, A_, A_, B_, C_, D_, E_, F_]

PAPER_GROUP_EXPECTED = [
    # SPEED sets: {DEC} x4 (A x3, F), others unique -> diversity 0.8 for those, 1 - 1/8 = 0.875 otherwise.
    # PATH sets: {LEFT_TURN} x4 (A x3, B), others unique.
    # (speed_f1, path_f1, speed_weight, path_weight, speed_div, path_div, speed, path, format, total)
    (1.0, 1.0, 1.0, 1.0, 0.8, 0.8, 0.8, 0.8, 1.0, 2.6),  # A: right; both answers shared by 4 of 8
    (1.0, 1.0, 1.0, 1.0, 0.8, 0.8, 0.8, 0.8, 1.0, 2.6),  # A again
    (1.0, 1.0, 1.0, 1.0, 0.8, 0.8, 0.8, 0.8, 1.0, 2.6),  # A again
    (0.0, 1.0, 0.8, 1.0, 0.875, 0.8, 0.0, 0.8, 1.0, 1.8),  # B: KEEP weighs 0.8 but F1 0
    (2 / 3, 0.0, 1.0, 0.8, 0.875, 0.875, 2 / 3 * 0.875, 0.0, 0.0, 2 / 3 * 0.875),  # C: {DEC, STOP} F1 2/3
    (0.0, 0.0, 0.9, 1.0, 0.875, 0.875, 0.0, 0.0, 1.0, 1.0),  # D: format ok after strip; ACCELERATE 0.9
    (0.0, 0.0, 0.0, 0.0, 0.875, 0.875, 0.0, 0.0, 0.0, 0.0),  # E: empty sets (unique) -> weight 0
    (1.0, 0.0, 1.0, 1.0, 0.8, 0.875, 0.8, 0.0, 0.0, 0.8),  # F: fallback parse finds DEC (shared with A)
]

RELEASE_GROUP_EXPECTED = [
    # Release parsing: C -> ["DECELERATE STOP", "STRAIGHT"]: SPEED {} ; D -> one token: {} {} ;
    # F -> fallback split on ", ": ["<think> x </think>\n DECELERATE", "LEFT_CHANGE"]: SPEED {}, PATH {LC}.
    # SPEED sets in order: DEC, DEC, DEC, KEEP, {}, {}, {}, {} -> +, -, -, +, +, +, +, +
    # PATH sets in order: LT, LT, LT, LT, STRAIGHT, {}, {}, LC -> +, -, -, -, +, +, +, +
    (1.0, 1.0, 1.0, 1.0, 0.4, 0.4, 1.4, 1.4, 1.0, 3.8),  # A: first use of both
    (1.0, 1.0, 1.0, 1.0, -0.4, -0.4, 0.6, 0.6, 1.0, 2.2),  # A copy: duplicates lose 0.4
    (1.0, 1.0, 1.0, 1.0, -0.4, -0.4, 0.6, 0.6, 1.0, 2.2),  # A copy
    (0.0, 1.0, 0.8, 1.0, 0.4, -0.4, 0.4, 0.6, 1.0, 2.0),  # B: KEEP new, LEFT_TURN seen
    (0.0, 0.0, 0.0, 0.8, 0.4, 0.4, 0.4, 0.4, 0.0, 0.8),  # C: empty SPEED gets +0.4; STRAIGHT new
    (0.0, 0.0, 0.0, 0.0, 0.4, 0.4, 0.4, 0.4, 0.0, 0.8),  # D: no ", " and padded: nothing, format 0 (no strip)
    (0.0, 0.0, 0.0, 0.0, 0.4, 0.4, 0.4, 0.4, 0.0, 0.8),  # E: nothing
    (0.0, 0.0, 0.0, 1.0, 0.4, 0.4, 0.4, 0.4, 0.0, 0.8),  # F: LEFT_CHANGE new, F1 0 with weight 1.0
]


@pytest.mark.parametrize(
    "variant, expected",
    [
        ("paper", PAPER_GROUP_EXPECTED),  # Algorithm 1: products, 1 - min(0.2, c/G)
        ("release", RELEASE_GROUP_EXPECTED),  # release: F1 * weight ± 0.4
    ],
)
def test_score_group_hand_computed(variant, expected):
    scores = score_group(GROUP, SOLUTION, variant)
    assert len(scores) == len(expected)
    for i, (got, want) in enumerate(zip(scores, expected)):
        assert tuple(got) == SCORE_KEYS
        assert all(type(v) is float for v in got.values()), i
        assert [got[k] for k in SCORE_KEYS] == pytest.approx(list(want), abs=1e-12), f"completion {i}"


# A group of 2 for the component ablation, solution STOP, STRAIGHT:
#  c0: right and well formed.            SPEED {STOP} F1 1 w 1.0; PATH {STRAIGHT} F1 1 w 0.8; format 1
#  c1: PATH lists LEFT_TURN too, no think. SPEED {STOP} F1 1 w 1.0; PATH {LT, STRAIGHT} F1 2/3 w 0.9; format 0
# Paper diversity with G=2 is 0.8 for every completion (1/2 and 2/2 are above the cap).
ABLATION_GROUP = [
    "<think> a </think><answer> STOP, STRAIGHT </answer>",
    "<answer> STOP, STOP, LEFT_TURN STRAIGHT </answer>",
]
ABLATION_SOLUTION = "<answer> STOP, STRAIGHT </answer>"

COMPONENT_CASES = [
    # (variant, components, expected totals)
    ("paper", None, [0.8 + 0.64 + 1, 0.8 + 2 / 3 * 0.9 * 0.8]),  # all four: F1*W*div + format
    ("paper", set(), [2.0, 1.0]),  # "base accuracy only": per-family exact match; c1's PATH is not exact
    ("paper", {"format"}, [3.0, 1.0]),  # base accuracy + format
    ("paper", {"accuracy", "format"}, [3.0, 1 + 2 / 3]),  # planning F1 + format
    ("paper", {"accuracy", "weight", "format"}, [1 + 0.8 + 1, 1 + 2 / 3 * 0.9]),  # + action weight
    ("paper", {"accuracy", "diversity", "format"}, [0.8 + 0.8 + 1, 0.8 + 2 / 3 * 0.8]),  # + diversity, no weight
    ("paper", {"accuracy", "weight", "diversity"}, [0.8 + 0.64, 0.8 + 2 / 3 * 0.9 * 0.8]),  # everything but format
    # Release parses c1 as ["STOP", "STOP", "LEFT_TURN STRAIGHT"]: SPEED {STOP} (seen: -0.4), PATH {} (+0.4).
    ("release", None, [1.4 + 1.2 + 1, 0.6 + 0.4]),  # F1*W ± 0.4 + format
    ("release", {"accuracy", "format"}, [3.0, 1.0]),  # F1 + format
    ("release", {"accuracy", "diversity", "format"}, [1.4 + 1.4 + 1, 0.6 + 0.4]),  # F1 ± 0.4 + format
    ("release", set(), [2.0, 1.0]),  # exact per family; release's c1 PATH is {} so 0
]


@pytest.mark.parametrize("variant, components, expected", COMPONENT_CASES)
def test_components(variant, components, expected):
    scores = score_group(ABLATION_GROUP, ABLATION_SOLUTION, variant, components=components)
    assert [s["total"] for s in scores] == pytest.approx(expected, abs=1e-12)
    # The measured parts never depend on the components.
    full = score_group(ABLATION_GROUP, ABLATION_SOLUTION, variant)
    measured = ("speed_f1", "path_f1", "speed_weight", "path_weight", "speed_diversity", "path_diversity", "format")
    assert [{k: s[k] for k in measured} for s in scores] == [{k: s[k] for k in measured} for s in full]


OPTION_CASES = [
    # (kwargs, expected totals of ABLATION_GROUP under the paper variant)
    ({"speed_weight": 2.0, "path_weight": 0.5, "format_weight": 0.0}, [1.6 + 0.32, 1.6 + 0.5 * 0.48]),  # family weights
    ({"diversity_cap": 0.5}, [0.5 + 0.4 + 1, 0.5 + 2 / 3 * 0.9 * 0.5]),  # cap 0.5: both counts >= G/2 -> 0.5
    ({"speed_weights": {"STOP": 0.5}, "path_weights": {"STRAIGHT": 1.0}}, [0.4 + 0.8 + 1, 0.4 + 0.8]),  # custom tables
    ({"path_weights": {"LEFT_TURN": 1.0}}, [0.8 + 0.0 + 1, 0.8 + 0.0]),  # STRAIGHT not in the vocabulary: F1 0
]


@pytest.mark.parametrize("kwargs, expected", OPTION_CASES)
def test_options(kwargs, expected):
    scores = score_group(ABLATION_GROUP, ABLATION_SOLUTION, **kwargs)
    assert [s["total"] for s in scores] == pytest.approx(expected, abs=1e-12)


def test_release_diversity_bonus_option():
    scores = score_group(ABLATION_GROUP, ABLATION_SOLUTION, "release", diversity_bonus=0.1)
    assert [s["speed_diversity"] for s in scores] == [0.1, -0.1]


def test_release_solution_without_answer_scores_planning_zero():
    # The release gives 0 (and no diversity term) when the solution has no <answer> tag.
    scores = score_group(ABLATION_GROUP, "STOP, STRAIGHT", "release")
    assert [(s["speed"], s["path"], s["speed_diversity"], s["total"]) for s in scores] == [(0.0, 0.0, 0.0, 1.0), (0.0, 0.0, 0.0, 0.0)]


def test_paper_solution_without_tags_is_parsed_whole():
    # The paper parsing falls back to the whole text for the solution too.
    assert score_group(ABLATION_GROUP, "STOP, STRAIGHT") == score_group(ABLATION_GROUP, ABLATION_SOLUTION)


def test_score_group_is_order_independent_for_paper_but_not_release():
    reordered = [GROUP[i] for i in (7, 6, 5, 4, 3, 2, 1, 0)]
    paper = score_group(GROUP, SOLUTION)
    assert score_group(reordered, SOLUTION) == paper[::-1]
    release = score_group(GROUP, SOLUTION, "release")
    assert score_group(reordered, SOLUTION, "release") != release[::-1]  # first use moves to the other end


def test_empty_group():
    assert score_group([], SOLUTION) == []
    assert score_group([], SOLUTION, "release") == []


BAD_ARGUMENT_CASES = [
    # (kwargs, message fragment)
    ({"variant": "r1"}, "unknown reward variant"),  # typo in the variant
    ({"components": {"accuracy", "kl"}}, "unknown reward component"),  # unknown component
    ({"components": "format"}, "collection of names"),  # a bare string would silently mean {"f", "o", ...}
]


@pytest.mark.parametrize("kwargs, fragment", BAD_ARGUMENT_CASES)
def test_bad_arguments(kwargs, fragment):
    with pytest.raises((ValueError, TypeError), match=fragment):
        score_group(GROUP, SOLUTION, **kwargs)


def test_ablation_components_names():
    assert ABLATION_COMPONENTS == ("accuracy", "weight", "diversity", "format")


# --------------------------------------------------------------------------------------
# The linear scans equal the regexes they replace
# --------------------------------------------------------------------------------------

FRAGMENTS = [
    "<answer>",
    "</answer>",
    "<think>",
    "</think>",
    "<answer",
    "answer>",
    "</",
    "<",
    ">",
    "/",
    "\n",
    "\r",
    " ",
    "\t",
    "\u00a0",
    "\u2028",
    ",",
    ", ",
    "KEEP",
    "STOP",
    "STRAIGHT",
    "LEFT_TURN",
    "x",
    "é",
    "|||",
]
tagged_text = st.one_of(
    st.lists(st.sampled_from(FRAGMENTS), max_size=30).map("".join),
    # dense: few fragments, so tag/newline interleavings are explored thoroughly
    st.lists(st.sampled_from(["<answer>", "</answer>", "<think>", "</think>", "\n", " ", "x"]), max_size=12).map("".join),
)
any_text = st.one_of(tagged_text, st.text(), st.text(st.characters(exclude_categories=()), max_size=200))

ANSWER_RE_DOTALL = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
ANSWER_RE_LINE = re.compile(r"<answer>(.*?)</answer>")
FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)


def _group1(match):
    return None if match is None else match.group(1)


@settings(max_examples=1500, deadline=None)
@given(tagged_text)
def test_find_answer_equals_regex(text):
    assert find_answer(text, dotall=True) == _group1(ANSWER_RE_DOTALL.search(text))
    assert find_answer(text, dotall=False) == _group1(ANSWER_RE_LINE.search(text))


@settings(max_examples=1500, deadline=None)
@given(tagged_text)
def test_format_reward_equals_regex(text):
    assert format_reward(text, "release") == (1.0 if FORMAT_RE.fullmatch(text) else 0.0)
    assert format_reward(text, "paper") == (1.0 if FORMAT_RE.fullmatch(text.strip()) else 0.0)


@settings(max_examples=1500, deadline=None)
@given(any_text)
def test_paper_words_equal_regex_split(text):
    answer = _group1(ANSWER_RE_DOTALL.search(text))
    if answer is None:
        answer = text.replace("<answer>", "").replace("</answer>", "")
    assert paper_answer_words(text) == [w for w in re.split(r"[,\s]+", answer) if w]


# --------------------------------------------------------------------------------------
# Fuzzing: never raises, values stay in range
# --------------------------------------------------------------------------------------


def _check_invariants(scores, n, variant):
    assert len(scores) == n
    for s in scores:
        assert tuple(s) == SCORE_KEYS
        assert all(isinstance(v, float) and math.isfinite(v) for v in s.values())
        assert s["format"] in (0.0, 1.0)
        assert 0.0 <= s["speed_f1"] <= 1.0 and 0.0 <= s["path_f1"] <= 1.0
        assert 0.0 <= s["speed_weight"] <= 1.0 and 0.0 <= s["path_weight"] <= 1.0
        if variant == "paper":
            assert 0.8 <= s["speed_diversity"] <= 1.0 and 0.8 <= s["path_diversity"] <= 1.0
            assert s["speed"] == pytest.approx(s["speed_f1"] * s["speed_weight"] * s["speed_diversity"])
            assert s["path"] == pytest.approx(s["path_f1"] * s["path_weight"] * s["path_diversity"])
        else:
            assert s["speed_diversity"] in (0.4, -0.4, 0.0) and s["path_diversity"] in (0.4, -0.4, 0.0)
            assert s["speed"] == pytest.approx(s["speed_f1"] * s["speed_weight"] + s["speed_diversity"])
        assert s["total"] == pytest.approx(s["speed"] + s["path"] + s["format"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(any_text, min_size=1, max_size=8), any_text, st.sampled_from(["paper", "release"]))
def test_fuzz_score_group_never_raises(completions, solution, variant):
    _check_invariants(score_group(completions, solution, variant), len(completions), variant)
    for text in completions:
        speed, path = parse_plan(text)
        assert speed is None or speed in SPEED_WEIGHTS
        assert path is None or path in PATH_WEIGHTS
        assert 0.0 <= exact_accuracy_reward(text, solution) <= 1.0


MB = 1_000_000
HUGE_CASES = [
    # (name, text): adversarial ~1 MB inputs; backtracking regexes take minutes on most of them
    ("unclosed answers", "<answer>" * (MB // 8)),
    ("think blocks, no final answer", "<think>" + "</think><answer></answer>" * (MB // 25) + "x"),
    ("many closings after one think", "<think>" + "</think> <answer>" * (MB // 17) + "</answer"),
    ("think closings padded, ends like an answer", "<think>" + ("</think>" + " " * 200 + "x") * (MB // 209) + "</answer>"),
    ("answers split by newlines", "<answer>\n</answer>" * (MB // 18)),
    ("one giant answer", "<answer>" + "KEEP, STRAIGHT, " * (MB // 16) + "</answer>"),
    ("nested answers", "<answer>" * (MB // 16) + "</answer>" * (MB // 18)),
    ("unicode soup", "日本\u2028\u00a0é🚗" * (MB // 7)),
    ("white space", " \n\t" * (MB // 3)),
]


@pytest.mark.timeout(120)  # a hang guard (backtracking regexes ran for minutes); speed: bench/adversarial_inputs.py
@pytest.mark.parametrize("name, text", HUGE_CASES, ids=[c[0] for c in HUGE_CASES])
def test_huge_adversarial_inputs_are_scored(name, text):
    for variant in ("paper", "release"):
        scores = score_group([text, text + "x", "<think> a </think><answer> STOP, STRAIGHT </answer>"], text, variant)
        _check_invariants(scores, 3, variant)
    parse_plan(text)
    find_reasoning(text)


def test_huge_valid_completion_is_scored():
    # A 1 MB reasoning still yields the right plan and format.
    text = "<think> " + "the light is red " * (MB // 17) + "</think>\n<answer> STOP, STRAIGHT </answer>"
    (score,) = score_group([text], ABLATION_SOLUTION)
    assert (score["speed_f1"], score["path_f1"], score["format"]) == (1.0, 1.0, 1.0)


def test_importing_rewards_imports_no_heavy_module():
    code = "import sys, alphadrive_ray.rewards; print(sorted(m for m in ('torch', 'numpy', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
