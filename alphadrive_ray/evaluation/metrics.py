"""Planning metrics: parse model outputs, per-class precision/recall/F1, accuracy, confusion.

Pure functions over plain lists of labels. A plan is read the paper's way
(`alphadrive_ray.rewards.parse_plan`): the first SPEED word and the first PATH word inside
the answer. A family without any vocabulary word is a *miss* (None): it is wrong, and counts
as a false negative of the true class, but it is not a class of its own, so it is never a
false positive of any class. This is scikit-learn's one-vs-rest
`precision_recall_fscore_support(y_true, y_pred, labels=VOCAB, average=None, zero_division=0)`
with misses as a label outside `labels`, and the tests check that equality.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from alphadrive_ray.actions import PATH_ACTIONS, SPEED_ACTIONS
from alphadrive_ray.rewards import find_reasoning, format_reward, parse_plan

MISS_LABEL = "(none)"  # how a miss is shown in confusion matrices and reports
FAMILIES: dict[str, tuple[str, ...]] = {"speed": SPEED_ACTIONS, "path": PATH_ACTIONS}


@dataclass(frozen=True)
class ParsedOutput:
    """What evaluation reads from one raw model output."""

    speed: str | None  # first SPEED word of the answer; None = miss
    path: str | None  # first PATH word of the answer; None = miss
    format_ok: bool  # the paper's format reward is 1
    reasoning: str | None  # stripped text of the first <think>…</think>; None when absent


def parse_output(text: str) -> ParsedOutput:
    """Parse one raw model output; never raises for any string."""
    speed, path = parse_plan(text)
    return ParsedOutput(speed, path, format_reward(text) == 1.0, find_reasoning(text))


def compute_class_metrics(y_true: Sequence[str], y_pred: Sequence[str | None], labels: Sequence[str]) -> dict[str, dict[str, float | int]]:
    """One-vs-rest precision, recall, F1 and support for each label.

    `precision = TP / (TP + FP)`, `recall = TP / (TP + FN)`, `F1 = 2TP / (2TP + FP + FN)`,
    each 0 when its denominator is 0; `support` = number of true samples of the label. A
    prediction outside `labels` (a miss) is a false negative of its true label only.
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    tp = dict.fromkeys(labels, 0)
    n_true = dict.fromkeys(labels, 0)
    n_pred = dict.fromkeys(labels, 0)
    for true, pred in zip(y_true, y_pred):
        if true in n_true:
            n_true[true] += 1
        if pred in n_pred:
            n_pred[pred] += 1
            if pred == true:
                tp[pred] += 1
    out: dict[str, dict[str, float | int]] = {}
    for label in labels:
        hits, true_count, pred_count = tp[label], n_true[label], n_pred[label]
        out[label] = {
            "precision": hits / pred_count if pred_count else 0.0,
            "recall": hits / true_count if true_count else 0.0,
            "f1": 2 * hits / (true_count + pred_count) if true_count + pred_count else 0.0,
            "support": true_count,
        }
    return out


def present_labels(y_true: Sequence[str], y_pred: Sequence[str | None], labels: Sequence[str]) -> list[str]:
    """The labels that occur in the truth or the predictions, in vocabulary order."""
    seen = set(y_true) | set(y_pred)
    return [label for label in labels if label in seen]


def compute_macro_f1(class_metrics: dict[str, dict[str, float | int]], labels: Sequence[str]) -> float:
    """Unweighted mean F1 over `labels` (0 when there are none).

    Evaluation averages over `present_labels`: the labels that occur in the truth or the
    predictions (scikit-learn's default label set), so a class that a validation split does
    not contain and the model never predicts does not drag the mean to 0.
    """
    return sum(class_metrics[label]["f1"] for label in labels) / len(labels) if labels else 0.0


def compute_accuracy(y_true: Sequence[str], y_pred: Sequence[str | None]) -> float:
    """Fraction of exact hits; a miss is wrong."""
    return sum(1 for true, pred in zip(y_true, y_pred) if pred == true) / len(y_true) if y_true else 0.0


def compute_confusion(y_true: Sequence[str], y_pred: Sequence[str | None], labels: Sequence[str]) -> list[list[int]]:
    """Counts `[i][j]` of true `labels[i]` predicted as `labels[j]`; the last column counts misses.

    Predictions outside `labels` (None or anything else) are misses.
    """
    index: dict[str | None, int] = {label: i for i, label in enumerate(labels)}
    miss = len(labels)
    matrix = [[0] * (len(labels) + 1) for _ in labels]
    for true, pred in zip(y_true, y_pred):
        row = index.get(true)
        if row is not None:
            matrix[row][index.get(pred, miss)] += 1
    return matrix


def compute_family_metrics(y_true: Sequence[str], y_pred: Sequence[str | None], labels: Sequence[str]) -> dict[str, Any]:
    """Per-class metrics (keyed by class name) plus `accuracy`, `macro_f1`, `macro_f1_labels`, `miss_rate`."""
    per_class = compute_class_metrics(y_true, y_pred, labels)
    present = present_labels(y_true, y_pred, labels)
    out: dict[str, Any] = dict(per_class)
    out["accuracy"] = compute_accuracy(y_true, y_pred)
    out["macro_f1"] = compute_macro_f1(per_class, present)
    out["macro_f1_labels"] = present
    out["miss_rate"] = sum(1 for pred in y_pred if pred not in per_class) / len(y_pred) if y_pred else 0.0
    return out


def compute_planning_metrics(parsed: Sequence[ParsedOutput], true_speed: Sequence[str], true_path: Sequence[str]) -> dict[str, Any]:
    """The `planning`, `parse` and `confusion` sections of metrics.json for aligned samples."""
    if not (len(parsed) == len(true_speed) == len(true_path)):
        raise ValueError(f"{len(parsed)} outputs, {len(true_speed)} SPEED and {len(true_path)} PATH labels")
    n = len(parsed)
    pred_speed = [p.speed for p in parsed]
    pred_path = [p.path for p in parsed]
    both = sum(1 for p, s, t in zip(parsed, true_speed, true_path) if p.speed == s and p.path == t)

    def rate(count: int) -> float:
        return count / n if n else 0.0

    return {
        "planning": {
            "accuracy": rate(both),
            "speed": compute_family_metrics(true_speed, pred_speed, SPEED_ACTIONS),
            "path": compute_family_metrics(true_path, pred_path, PATH_ACTIONS),
        },
        "parse": {
            "format_ok_rate": rate(sum(p.format_ok for p in parsed)),
            "speed_found_rate": rate(sum(p.speed is not None for p in parsed)),
            "path_found_rate": rate(sum(p.path is not None for p in parsed)),
            "reasoning_found_rate": rate(sum(p.reasoning is not None for p in parsed)),
        },
        "confusion": {
            family: {
                "true_labels": list(labels),
                "pred_labels": [*labels, MISS_LABEL],
                "matrix": compute_confusion(y_true, y_pred, labels),
            }
            for family, labels, y_true, y_pred in (
                ("speed", SPEED_ACTIONS, true_speed, pred_speed),
                ("path", PATH_ACTIONS, true_path, pred_path),
            )
        },
    }


def flatten_metrics(metrics: dict[str, Any], prefix: str = "eval/") -> dict[str, float]:
    """The scalar metrics as flat `prefix + "a.b.c"` keys, for loggers (confusion matrices left out).

    `flatten_metrics(m)["eval/planning.speed.KEEP.f1"]`; None values (metrics not computed)
    and non-numeric values are left out.
    """
    out: dict[str, float] = {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            for name, value in node.items():
                if key == "" and name == "confusion":
                    continue
                walk(value, f"{key}.{name}" if key else str(name))
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            out[prefix + key] = float(node)

    walk(metrics, "")
    return out


# --- noisy labels: the ceiling and significance ---------------------------------------------


def compute_ceiling(
    truth: Sequence[tuple[str, str]],
    most_likely: Sequence[tuple[str, str]],
    p_most_likely: Sequence[float],
    predictions: Sequence[tuple[str | None, str | None]],
) -> dict[str, float | int]:
    """What a planner can reach when labels are one draw of what drivers do.

    truth: the logged (SPEED, PATH) of each sample; most_likely: its most likely pair (the
    Bayes-optimal plan); p_most_likely: that pair's probability; predictions: the planner's.
      ceiling            share of samples whose logged pair is the most likely one: the
                         planning accuracy of always answering the most likely pair
      ceiling_expected   mean probability of the most likely pair (the ceiling's expectation)
      bayes_agreement    share of predictions equal to the most likely pair (free of label noise)
    """
    n = len(truth)
    if not (n == len(most_likely) == len(p_most_likely) == len(predictions)):
        raise ValueError("truth, most_likely, p_most_likely and predictions must have the same length")
    if n == 0:
        return {"n": 0, "ceiling": 0.0, "ceiling_expected": 0.0, "bayes_agreement": 0.0}
    return {
        "n": n,
        "ceiling": sum(t == m for t, m in zip(truth, most_likely)) / n,
        "ceiling_expected": sum(p_most_likely) / n,
        "bayes_agreement": sum(tuple(p) == m for p, m in zip(predictions, most_likely)) / n,
    }


def mcnemar_exact(fixed: int, broken: int) -> float:
    """One-sided exact McNemar p-value that B beats A on paired samples.

    `fixed`: samples A got wrong and B right; `broken`: A right, B wrong. Under the null the
    fixed ones are Binomial(fixed + broken, 1/2); p = P(X >= fixed). 1.0 when nothing changed.
    """
    if fixed < 0 or broken < 0:
        raise ValueError("counts must be >= 0")
    n = fixed + broken
    if n == 0:
        return 1.0
    from math import comb

    return sum(comb(n, k) for k in range(fixed, n + 1)) / 2**n


def compare_paired(right_a: Sequence[bool], right_b: Sequence[bool]) -> dict[str, float | int]:
    """Per-sample correctness of two planners on the same samples: fixed, broken, the change in
    accuracy and the one-sided exact McNemar p-value that B is better than A."""
    if len(right_a) != len(right_b):
        raise ValueError(f"{len(right_a)} and {len(right_b)} samples: the two planners must be scored on the same samples")
    fixed = sum(1 for a, b in zip(right_a, right_b) if not a and b)
    broken = sum(1 for a, b in zip(right_a, right_b) if a and not b)
    n = len(right_a)
    return {
        "n": n,
        "fixed": fixed,
        "broken": broken,
        "delta": (fixed - broken) / n if n else 0.0,
        "p_value": mcnemar_exact(fixed, broken),
    }
