"""The four AlphaDrive planning rewards as small pure functions, and one entry point per GRPO group.

AlphaDrive (arXiv 2503.07608, Sec. 3.2) scores each completion of a GRPO group with, per
family (SPEED and PATH, computed separately):

1. planning accuracy: F1 between the predicted and the true set of actions,
2. action weight: the mean importance weight of the predicted actions,
3. planning diversity: a penalty for answers that many completions of the group share,

plus 4. a format reward (`<think>…</think> <answer>…</answer>`). Two variants are offered:

- `"paper"` (default, Algorithm 1 of the paper): `speed = F1 * weight * diversity` with
  `diversity = 1 - min(cap, c_i / G)` (c_i completions of the G in the group predict the same
  set). The answer is the text inside the first `<answer>…</answer>` (DOTALL), or the whole
  completion with the tags removed; words are split on commas and/or white space.
- `"release"` (the authors' code): `speed = F1 * weight ± 0.4`, +0.4 when every predicted word
  is used for the first time in the group (in group order, one counter), -0.4 otherwise; the
  answer regex is not DOTALL (the tag-stripped fallback is not stripped of white space) and
  words are split on `", "` only. The release guards its F1 and mean weight with `+ 1e-6`
  terms; we compute them exactly (the product differs by at most 2.5e-6), so both variants share
  `f1_reward` and `action_weight_reward`.

The vocabulary of each family is the key set of its weight table (as in the release), so
custom weights also define custom vocabularies.

Everything here takes plain strings and never raises for any completion text: parsing uses
`str.find` scans that run in linear time even on adversarial input (nested or unclosed tags,
megabytes of text), where the equivalent backtracking regexes can take quadratic time. The
tests check these scans against the regexes they replace.

    from alphadrive_ray.rewards import score_group
    score_group(["<think> red light </think><answer> STOP, STRAIGHT </answer>"],
                "<answer> STOP, STRAIGHT </answer>")
"""

from __future__ import annotations

import re
from collections import Counter
from typing import AbstractSet, Collection, Iterable, Mapping, Sequence

from alphadrive_ray.actions import PATH_ACTIONS, PATH_WEIGHTS, SPEED_ACTIONS, SPEED_WEIGHTS

VARIANTS: tuple[str, ...] = ("paper", "release")

# The keys of every dict returned by `score_group`, in logging order (`reward/<key>`).
SCORE_KEYS: tuple[str, ...] = (
    "speed_f1",
    "path_f1",
    "speed_weight",
    "path_weight",
    "speed_diversity",
    "path_diversity",
    "speed",
    "path",
    "format",
    "total",
)

# The switchable parts of the reward, for the paper's reward ablation (Table 4). See
# `score_group` for what leaving each one out means.
ABLATION_COMPONENTS: tuple[str, ...] = ("accuracy", "weight", "diversity", "format")

ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

_SPEED_SET = frozenset(SPEED_ACTIONS)
_PATH_SET = frozenset(PATH_ACTIONS)
_ALL_ACTIONS = _SPEED_SET | _PATH_SET

# The head of the format regex `<think>.*?</think>\s*<answer>.*?</answer>`: matched with
# `.match`, its lazy `.*?` stops at the first `</think>` that is followed by white space and
# `<answer>`, in linear time. `format_reward` checks the tail (`.*?</answer>` up to the end)
# with `endswith` instead of letting the regex backtrack over every `</think>`.
_THINK_THEN_ANSWER = re.compile(r"<think>.*?</think>\s*<answer>", re.DOTALL)


# --------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------


def find_answer(text: str, *, dotall: bool = True) -> str | None:
    """The text of the first `<answer>…</answer>`, or None when there is none.

    Equal to `re.search(r"<answer>(.*?)</answer>", text, re.DOTALL).group(1)` (or without
    DOTALL: an answer may not span a newline) but linear in the length of the text.
    """
    start = text.find(ANSWER_OPEN)
    while start != -1:
        inner = start + len(ANSWER_OPEN)
        end = text.find(ANSWER_CLOSE, inner)
        if end == -1:
            return None  # no closing tag after this opening, hence none after any later one
        if dotall:
            return text[inner:end]
        newline = text.find("\n", inner, end)
        if newline == -1:
            return text[inner:end]
        # Every opening tag before the newline reaches the same closing tag across it.
        start = text.find(ANSWER_OPEN, newline + 1)
    return None


def strip_answer_tags(text: str) -> str:
    """The release's fallback when no complete answer is found: the text without the tags."""
    return text.replace(ANSWER_OPEN, "").replace(ANSWER_CLOSE, "")


def paper_answer_words(text: str) -> list[str]:
    """All words of the answer, paper parsing, in order (vocabulary or not).

    The answer is the first `<answer>…</answer>` (DOTALL) or, without one, the whole text with
    the tags removed; words are separated by commas and/or white space (`re.split(r"[,\\s]+")`).
    """
    answer = find_answer(text, dotall=True)
    if answer is None:
        answer = strip_answer_tags(text)
    return answer.replace(",", " ").split()


def release_answer_words(text: str) -> list[str]:
    """All words of the answer, release parsing: non-DOTALL answer regex, split on `", "`."""
    answer = find_answer(text, dotall=False)
    # The release strips the matched answer but not the tag-stripped fallback.
    answer = strip_answer_tags(text) if answer is None else answer.strip()
    return answer.split(", ")


def parse_answer(text: str, variant: str = "paper", vocabulary: Collection[str] = _ALL_ACTIONS) -> frozenset[str]:
    """The set of vocabulary words in the answer of `text` (matched exactly, case-sensitive)."""
    words = paper_answer_words(text) if _check_variant(variant) == "paper" else release_answer_words(text)
    return frozenset(word for word in words if word in vocabulary)


def parse_plan(text: str) -> tuple[str | None, str | None]:
    """The first SPEED word and the first PATH word of the answer (paper parsing); None if absent.

    This is how evaluation (and the training loop's accuracy) reads a plan: a completion that
    lists several actions is judged by the first of each family, and a family without any
    vocabulary word is a miss, not a class.
    """
    speed: str | None = None
    path: str | None = None
    for word in paper_answer_words(text):
        if speed is None and word in _SPEED_SET:
            speed = word
            if path is not None:
                break
        elif path is None and word in _PATH_SET:
            path = word
            if speed is not None:
                break
    return speed, path


def find_reasoning(text: str) -> str | None:
    """The stripped text of the first `<think>…</think>` (DOTALL), or None when there is none."""
    start = text.find(THINK_OPEN)
    if start == -1:
        return None
    inner = start + len(THINK_OPEN)
    end = text.find(THINK_CLOSE, inner)
    return None if end == -1 else text[inner:end].strip()


# --------------------------------------------------------------------------------------
# The rewards of one completion
# --------------------------------------------------------------------------------------


def f1_reward(pred_set: AbstractSet[str], true_set: AbstractSet[str]) -> float:
    """Planning accuracy: 2TP / (2TP + FP + FN) between two action sets; 0 if either is empty.

    F1 rather than exact match: exact match was unstable early in training, and "the truth
    appears anywhere" let the model list every action (the paper, Sec. 3.2).
    """
    if not pred_set or not true_set:
        return 0.0
    tp = len(pred_set & true_set)
    return 2.0 * tp / (len(pred_set) + len(true_set))  # FP + FN + 2TP = |pred| + |true|


def exact_match_reward(pred_set: AbstractSet[str], true_set: AbstractSet[str]) -> float:
    """Base accuracy of one family: 1 when the predicted set is exactly the (non-empty) true set."""
    return 1.0 if true_set and pred_set == true_set else 0.0


def action_weight_reward(pred_set: Iterable[str], weights: Mapping[str, float]) -> float:
    """Action weight: the mean importance weight of the predicted actions; 0 for none.

    Words missing from `weights` weigh 0 (they are not actions of this family).
    """
    total = 0.0
    n = 0
    for word in pred_set:
        total += weights.get(word, 0.0)
        n += 1
    return total / n if n else 0.0


def diversity_rewards(pred_sets: Sequence[AbstractSet[str]], cap: float = 0.2) -> list[float]:
    """Paper diversity (Algorithm 1): `1 - min(cap, c_i / G)` for each completion of a group.

    c_i is the number of completions of the group (itself included) that predict the same set,
    G the group size: an answer shared by many completions is penalised, at most by `cap`.
    """
    group_size = len(pred_sets)
    counts = Counter(pred_sets)
    return [1.0 - min(cap, counts[s] / group_size) for s in pred_sets]


def release_diversity(pred_sets: Sequence[AbstractSet[str]], bonus: float = 0.4) -> list[float]:
    """Release diversity: `+bonus` for the first use of a decision in the group, `-bonus` after.

    One counter over the group, in group order (the release's `global_decision_count`): a
    completion gets `+bonus` when none of its words was predicted by an earlier completion,
    else `-bonus`. An empty prediction gets `+bonus` (the release's `all([])`).
    """
    seen: set[str] = set()
    out: list[float] = []
    for words in pred_sets:
        first_use = seen.isdisjoint(words)
        seen.update(words)
        out.append(bonus if first_use else -bonus)
    return out


def format_reward(text: str, variant: str = "paper") -> float:
    """1 when the whole completion is `<think>…</think>` + white space + `<answer>…</answer>`.

    Equal to `re.fullmatch(r"<think>.*?</think>\\s*<answer>.*?</answer>", text, re.DOTALL)`
    (the paper's variant first strips surrounding white space; the release does not), in
    linear time.
    """
    if _check_variant(variant) == "paper":
        text = text.strip()
    if not text.endswith(ANSWER_CLOSE):
        return 0.0
    # The head's `<answer>` cannot overlap the final `</answer>` (no suffix of one is a prefix
    # of the other), so `.*?</answer>` up to the end matches whenever the text ends with it.
    return 1.0 if _THINK_THEN_ANSWER.match(text) is not None else 0.0


def exact_accuracy_reward(completion: str, solution: str) -> float:
    """The paper's "base accuracy" (reward ablation): 1 when SPEED and PATH are both exactly right.

    Both texts are parsed the paper's way into action sets; the completion must predict exactly
    the true SPEED set and exactly the true PATH set. `score_group` without the "accuracy"
    component uses the same exact match, but per family (see there).
    """
    pred = parse_answer(completion)
    true = parse_answer(solution)
    return exact_match_reward(pred & _SPEED_SET, true & _SPEED_SET) * exact_match_reward(pred & _PATH_SET, true & _PATH_SET)


# --------------------------------------------------------------------------------------
# One GRPO group
# --------------------------------------------------------------------------------------


def score_group(
    completions: Sequence[str],
    solution: str,
    variant: str = "paper",
    *,
    speed_weight: float = 1.0,
    path_weight: float = 1.0,
    format_weight: float = 1.0,
    speed_weights: Mapping[str, float] = SPEED_WEIGHTS,
    path_weights: Mapping[str, float] = PATH_WEIGHTS,
    diversity_cap: float = 0.2,
    diversity_bonus: float = 0.4,
    components: Collection[str] | None = None,
) -> list[dict[str, float]]:
    """The rewards of every completion of one GRPO group (all completions of one prompt).

    Returns one dict per completion with the float keys of `SCORE_KEYS`:
    `speed_f1`, `path_f1` (planning F1), `speed_weight`, `path_weight` (mean action weight),
    `speed_diversity`, `path_diversity` (paper: the `1 - min(cap, c/G)` factor; release: the
    ±`diversity_bonus` term), `speed`, `path` (the family rewards), `format` and
    `total = speed_weight * speed + path_weight * path + format_weight * format`.

    `diversity_cap` is the paper's cap, `diversity_bonus` the release's ±term; each applies to
    its variant only. `speed_weights` / `path_weights` also define the vocabularies.

    `components` (None = all of `ABLATION_COMPONENTS`) switches parts off for the paper's
    reward ablation; the measured keys (`*_f1`, `*_weight`, `*_diversity`, `format`) always
    hold their values, only `speed`, `path` and `total` change:
      - without "weight" the family reward has no weight factor (paper: F1 x diversity;
        release: F1 ± bonus), without "diversity" no diversity term (F1 x weight);
      - without "format" the format reward is left out of `total`;
      - without "accuracy" the planning F1 is replaced by the paper's *base accuracy*, an
        exact match of the family's predicted set with the true set (1 or 0), multiplied by
        the weight and diversity factors that remain. The ablation rows map to: "base accuracy
        only" = `set()`, "+ format" = `{"format"}`, "planning F1 + format" =
        `{"accuracy", "format"}`, "+ action weight" = `{"accuracy", "weight", "format"}`,
        "+ diversity" = `{"accuracy", "diversity", "format"}`, "all four" = None. The exact
        match is per family because the paper computes every planning reward per family;
        `exact_accuracy_reward` gives the joint "both actions right" form.

    Never raises for any completion or solution text. Identical completions, which GRPO groups
    are full of, are parsed once.
    """
    release = _check_variant(variant) == "release"
    use = _check_components(components)
    speed_vocab = frozenset(speed_weights)
    path_vocab = frozenset(path_weights)

    if release:
        # The release scores a family 0 (no diversity, not counted) when the solution has no
        # answer tag at all.
        truth = find_answer(solution, dotall=False)
        true_words = None if truth is None else frozenset(truth.strip().split(", "))
        words_of = release_answer_words
    else:
        true_words = frozenset(paper_answer_words(solution))
        words_of = paper_answer_words

    parsed: dict[str, tuple[frozenset[str], frozenset[str], float]] = {}
    speed_sets: list[frozenset[str]] = []
    path_sets: list[frozenset[str]] = []
    formats: list[float] = []
    for text in completions:
        hit = parsed.get(text)
        if hit is None:
            words = frozenset(words_of(text))
            hit = parsed[text] = (words & speed_vocab, words & path_vocab, format_reward(text, variant))
        speed_sets.append(hit[0])
        path_sets.append(hit[1])
        formats.append(hit[2])

    if true_words is None:
        zeros = [0.0] * len(completions)
        speed_parts = path_parts = (zeros, zeros, zeros, zeros)
    else:
        speed_parts = _family_rewards(speed_sets, true_words & speed_vocab, speed_weights, release, use, diversity_cap, diversity_bonus)
        path_parts = _family_rewards(path_sets, true_words & path_vocab, path_weights, release, use, diversity_cap, diversity_bonus)

    use_format = "format" in use
    out: list[dict[str, float]] = []
    for i, fmt in enumerate(formats):
        speed = speed_parts[3][i]
        path = path_parts[3][i]
        out.append(
            {
                "speed_f1": speed_parts[0][i],
                "path_f1": path_parts[0][i],
                "speed_weight": speed_parts[1][i],
                "path_weight": path_parts[1][i],
                "speed_diversity": speed_parts[2][i],
                "path_diversity": path_parts[2][i],
                "speed": speed,
                "path": path,
                "format": fmt,
                "total": speed_weight * speed + path_weight * path + (format_weight * fmt if use_format else 0.0),
            }
        )
    return out


def _family_rewards(
    pred_sets: list[frozenset[str]],
    true_set: frozenset[str],
    weights: Mapping[str, float],
    release: bool,
    use: frozenset[str],
    cap: float,
    bonus: float,
) -> tuple[list[float], list[float], list[float], list[float]]:
    """(F1, weight, diversity, family reward) per completion, for one family of one group."""
    per_set: dict[frozenset[str], tuple[float, float, float]] = {}
    f1s: list[float] = []
    action_weights: list[float] = []
    for pred in pred_sets:
        hit = per_set.get(pred)
        if hit is None:
            f1 = f1_reward(pred, true_set)
            accuracy = f1 if "accuracy" in use else exact_match_reward(pred, true_set)
            hit = per_set[pred] = (f1, action_weight_reward(pred, weights), accuracy)
        f1s.append(hit[0])
        action_weights.append(hit[1])
    diversities = release_diversity(pred_sets, bonus) if release else diversity_rewards(pred_sets, cap)

    use_weight = "weight" in use
    use_diversity = "diversity" in use
    rewards: list[float] = []
    for pred, weight, diversity in zip(pred_sets, action_weights, diversities):
        reward = per_set[pred][2]
        if use_weight:
            reward *= weight
        if use_diversity:
            reward = reward + diversity if release else reward * diversity
        rewards.append(reward)
    return f1s, action_weights, diversities, rewards


def _check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown reward variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    return variant


def _check_components(components: Collection[str] | None) -> frozenset[str]:
    if components is None:
        return frozenset(ABLATION_COMPONENTS)
    if isinstance(components, str):
        raise TypeError(f"components must be a collection of names, got the string {components!r}")
    unknown = sorted(set(components) - set(ABLATION_COMPONENTS))
    if unknown:
        raise ValueError(f"unknown reward component(s) {', '.join(unknown)}; expected a subset of {', '.join(ABLATION_COMPONENTS)}")
    return frozenset(components)
