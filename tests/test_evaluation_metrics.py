"""Planning metrics (equal to scikit-learn), prediction files and id alignment, sample selection."""

from __future__ import annotations

import json
import random

import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from alphadrive_ray.actions import PATH_ACTIONS, SPEED_ACTIONS
from alphadrive_ray.data.records import Record
from alphadrive_ray.errors import UserError
from alphadrive_ray.evaluation.metrics import (
    MISS_LABEL,
    ParsedOutput,
    compare_paired,
    compute_accuracy,
    compute_ceiling,
    compute_class_metrics,
    compute_confusion,
    compute_macro_f1,
    mcnemar_exact,
    compute_planning_metrics,
    flatten_metrics,
    parse_output,
    present_labels,
)
from alphadrive_ray.evaluation.predictions import PredictionsError, align, load_predictions
from alphadrive_ray.evaluation.run import build_samples, spread

PARSE_OUTPUT_CASES = [
    # (raw output, expected ParsedOutput)
    ("<think> red </think>\n<answer> STOP, STRAIGHT </answer>", ParsedOutput("STOP", "STRAIGHT", True, "red")),  # canonical
    ("<answer> STOP, STRAIGHT </answer>", ParsedOutput("STOP", "STRAIGHT", False, None)),  # no reasoning: format fails
    ("<think> a </think><answer> KEEP, STOP, LEFT_TURN </answer>", ParsedOutput("KEEP", "LEFT_TURN", True, "a")),  # first word
    ("<think> a </think><answer> STOP </answer>", ParsedOutput("STOP", None, True, "a")),  # PATH miss
    ("<think> truncated reasoning", ParsedOutput(None, None, False, None)),  # unclosed think, nothing else
    ("", ParsedOutput(None, None, False, None)),  # empty output
]


@pytest.mark.parametrize("text, expected", PARSE_OUTPUT_CASES)
def test_parse_output(text, expected):
    assert parse_output(text) == expected


CLASS_METRIC_CASES = [
    # (y_true, y_pred, label, expected {precision, recall, f1, support})
    (["KEEP", "KEEP", "STOP"], ["KEEP", "STOP", "STOP"], "KEEP", (1.0, 0.5, 2 / 3, 2)),  # tp 1, fn 1
    (["KEEP", "KEEP", "STOP"], ["KEEP", "STOP", "STOP"], "STOP", (0.5, 1.0, 2 / 3, 1)),  # tp 1, fp 1
    (["KEEP", "STOP"], [None, None], "KEEP", (0.0, 0.0, 0.0, 1)),  # misses: false negatives only
    (["KEEP", "STOP"], [None, None], "STOP", (0.0, 0.0, 0.0, 1)),  # ...and no false positive anywhere
    (["KEEP", "KEEP"], ["ACCELERATE", "KEEP"], "ACCELERATE", (0.0, 0.0, 0.0, 0)),  # predicted, never true
    (["KEEP"], ["KEEP"], "DECELERATE", (0.0, 0.0, 0.0, 0)),  # absent everywhere: all 0
]


@pytest.mark.parametrize("y_true, y_pred, label, expected", CLASS_METRIC_CASES)
def test_class_metrics_hand_computed(y_true, y_pred, label, expected):
    m = compute_class_metrics(y_true, y_pred, SPEED_ACTIONS)[label]
    assert (m["precision"], m["recall"], m["f1"], m["support"]) == pytest.approx(expected, abs=1e-15)


def _random_labels(seed: int, labels: tuple[str, ...], n: int, miss_rate: float, drop: str | None):
    """Fixed random label sets: some misses, some classes absent from the truth."""
    rng = random.Random(seed)
    pool = [label for label in labels if label != drop]
    y_true = [rng.choice(pool) for _ in range(n)]
    y_pred = [None if rng.random() < miss_rate else (t if rng.random() < 0.6 else rng.choice(labels)) for t in y_true]
    return y_true, y_pred


SKLEARN_CASES = [
    # (seed, labels, n, miss rate, class absent from the truth)
    (0, SPEED_ACTIONS, 500, 0.1, None),  # typical
    (1, PATH_ACTIONS, 500, 0.1, None),  # typical, PATH
    (2, PATH_ACTIONS, 300, 0.0, "LEFT_CHANGE"),  # a class never true (but predicted)
    (3, SPEED_ACTIONS, 50, 0.5, "STOP"),  # many misses, small set
    (4, SPEED_ACTIONS, 7, 1.0, None),  # every prediction is a miss
]


@pytest.mark.parametrize("seed, labels, n, miss_rate, drop", SKLEARN_CASES)
def test_class_metrics_equal_sklearn(seed, labels, n, miss_rate, drop):
    y_true, y_pred = _random_labels(seed, labels, n, miss_rate, drop)
    sk_pred = [MISS_LABEL if p is None else p for p in y_pred]
    precision, recall, f1, support = precision_recall_fscore_support(y_true, sk_pred, labels=list(labels), average=None, zero_division=0)
    ours = compute_class_metrics(y_true, y_pred, labels)
    for k, label in enumerate(labels):
        assert ours[label]["precision"] == pytest.approx(precision[k], abs=1e-12), label
        assert ours[label]["recall"] == pytest.approx(recall[k], abs=1e-12), label
        assert ours[label]["f1"] == pytest.approx(f1[k], abs=1e-12), label
        assert ours[label]["support"] == support[k], label

    present = present_labels(y_true, y_pred, labels)
    if present:
        expected_macro = f1_score(y_true, sk_pred, labels=present, average="macro", zero_division=0)
        assert compute_macro_f1(ours, present) == pytest.approx(expected_macro, abs=1e-12)
    assert compute_accuracy(y_true, y_pred) == pytest.approx(accuracy_score(y_true, sk_pred), abs=1e-12)
    expected_confusion = confusion_matrix(y_true, sk_pred, labels=[*labels, MISS_LABEL])[: len(labels)].tolist()
    assert compute_confusion(y_true, y_pred, labels) == expected_confusion


def test_macro_f1_ignores_classes_absent_everywhere():
    # DECELERATE and STOP occur nowhere: the macro F1 averages KEEP and ACCELERATE only.
    y_true, y_pred = ["KEEP", "KEEP", "ACCELERATE"], ["KEEP", "ACCELERATE", "ACCELERATE"]
    per_class = compute_class_metrics(y_true, y_pred, SPEED_ACTIONS)
    assert present_labels(y_true, y_pred, SPEED_ACTIONS) == ["KEEP", "ACCELERATE"]
    assert compute_macro_f1(per_class, ["KEEP", "ACCELERATE"]) == pytest.approx((2 / 3 + 2 / 3) / 2)


def test_planning_metrics_hand_computed():
    parsed = [
        ParsedOutput("STOP", "STRAIGHT", True, "a"),  # both right
        ParsedOutput("STOP", "LEFT_TURN", True, "b"),  # PATH wrong
        ParsedOutput(None, "STRAIGHT", False, None),  # SPEED miss
        ParsedOutput("KEEP", None, False, "c"),  # both wrong (PATH miss)
    ]
    m = compute_planning_metrics(parsed, ["STOP", "STOP", "STOP", "ACCELERATE"], ["STRAIGHT", "STRAIGHT", "STRAIGHT", "LEFT_TURN"])
    assert m["planning"]["accuracy"] == 0.25
    assert m["planning"]["speed"]["accuracy"] == 0.5 and m["planning"]["path"]["accuracy"] == 0.5
    assert m["planning"]["speed"]["STOP"] == {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3}
    assert m["planning"]["speed"]["miss_rate"] == 0.25 and m["planning"]["path"]["miss_rate"] == 0.25
    assert m["parse"] == {"format_ok_rate": 0.5, "speed_found_rate": 0.75, "path_found_rate": 0.75, "reasoning_found_rate": 0.75}
    # rows: true STOP, ACCELERATE; columns: ... + (none)
    speed_confusion = m["confusion"]["speed"]
    assert speed_confusion["pred_labels"][-1] == MISS_LABEL
    assert speed_confusion["matrix"][SPEED_ACTIONS.index("STOP")] == [0, 0, 0, 2, 1]
    assert speed_confusion["matrix"][SPEED_ACTIONS.index("ACCELERATE")] == [1, 0, 0, 0, 0]


def test_flatten_metrics():
    parsed = [ParsedOutput("STOP", "STRAIGHT", True, "a")]
    metrics = compute_planning_metrics(parsed, ["STOP"], ["STRAIGHT"])
    metrics["reasoning"] = {"computed": False, "bleu4": None, "n": 0}
    flat = flatten_metrics(metrics)
    assert flat["eval/planning.accuracy"] == 1.0
    assert flat["eval/planning.speed.STOP.f1"] == 1.0
    assert flat["eval/planning.speed.STOP.support"] == 1.0
    assert flat["eval/reasoning.n"] == 0.0
    assert "eval/reasoning.bleu4" not in flat and "eval/reasoning.computed" not in flat  # None and bool left out
    assert not any(k.startswith("eval/confusion") for k in flat)


# --------------------------------------------------------------------------------------
# Prediction files
# --------------------------------------------------------------------------------------

OK = '{"id": "a", "output": "<answer> STOP, STRAIGHT </answer>"}'

BAD_FILE_CASES = [
    # (lines (str) or raw bytes, expected fragments of the message)
    ([OK, "{not json"], [":2: bad JSON"]),  # a broken line
    ([OK, '{"output": "x"}'], [":2: id: missing required field"]),  # no id
    ([OK, '{"id": "b"}'], [":2: output: missing required field"]),  # no output
    ([OK, '{"id": "b", "output": 7}'], [":2: output: must be a string", "got int"]),  # non-string output
    ([OK, '{"id": "b", "output": null}'], [":2: output: must be a string", "got NoneType"]),  # null output
    ([OK, '{"id": true, "output": "x"}'], [":2: id: must be a non-empty string or integer"]),  # boolean id
    ([OK, '{"id": "", "output": "x"}'], [":2: id: must be a non-empty string"]),  # empty id
    ([OK, OK], [":2: id: duplicate id 'a' (first on line 1)"]),  # duplicate
    (['{"id": 1, "output": "x"}', '{"id": "1", "output": "y"}'], [":2: id: duplicate id '1'"]),  # 1 and "1" are one id
    ([OK, "[1, 2]"], [":2: expected a JSON object, got list"]),  # not an object
    ([], ["no predictions (empty file)"]),  # empty file
    (b'{"id": "a", "output": "\xff"}\n', [":1: not valid UTF-8"]),  # bad bytes
    ([OK, "{bad", '{"id": "c"}'], ["2 problem(s)", ":2: bad JSON", ":3: output: missing"]),  # all problems listed
]


@pytest.mark.parametrize("content, fragments", BAD_FILE_CASES)
def test_bad_prediction_files(tmp_path, content, fragments):
    path = tmp_path / "p.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text("".join(line + "\n" for line in content), encoding="utf-8")
    with pytest.raises(PredictionsError) as info:
        load_predictions(path)
    message = str(info.value)
    assert message.startswith(str(path))
    for fragment in fragments:
        assert fragment in message


def test_many_problems_are_truncated(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("{bad\n" * 30, encoding="utf-8")
    with pytest.raises(PredictionsError, match=r"30 problem\(s\)") as info:
        load_predictions(path)
    assert "... and 10 more" in str(info.value) and ":21:" not in str(info.value)


def test_prediction_file_not_found(tmp_path):
    with pytest.raises(UserError, match="predictions file not found"):
        load_predictions(tmp_path / "nope.jsonl")


def test_load_predictions_keeps_order_lines_and_extra_keys(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": 2, "output": "x", "step": 5}\n\n{"id": "b", "output": ""}\n', encoding="utf-8")
    predictions = load_predictions(path)
    assert predictions.outputs == {"2": "x", "b": ""}
    assert predictions.lines == {"2": 1, "b": 3}  # blank lines keep the numbering


def _record(i: int) -> Record:
    return Record(f"s{i}", f"/nonexistent/{i}.png", 1.0, "go straight", "KEEP", "STRAIGHT", None)


ALIGN_CASES = [
    # (prediction ids, reference ids, expected fragments)
    (["s0"], ["s0", "s1"], ["1 reference id(s) have no prediction: 's1'"]),  # one missing
    (["s0", "x"], ["s0"], ["1 prediction id(s) are not in refs: 'x' (line 2)"]),  # one extra, with its line
    ([], [f"s{i}" for i in range(15)], ["15 reference id(s)", "'s9' ... and 5 more"]),  # many: truncated
    (["s0", "x"], ["s0", "s1"], ["have no prediction: 's1'", "not in refs: 'x'"]),  # both at once
]


@pytest.mark.parametrize("pred_ids, ref_ids, fragments", ALIGN_CASES)
def test_align_mismatch_names_the_ids(pred_ids, ref_ids, fragments):
    predictions = {pid: "" for pid in pred_ids}
    references = [_record(int(rid[1:])) for rid in ref_ids]
    lines = {pid: k + 1 for k, pid in enumerate(pred_ids)}
    with pytest.raises(UserError) as info:
        align(predictions, references, predictions_name="p.jsonl", references_name="refs", prediction_lines=lines)
    message = str(info.value)
    assert message.startswith("p.jsonl: ids do not match refs")
    assert "--skip-missing" in message
    for fragment in fragments:
        assert fragment in message


def test_align_skip_missing_counts():
    predictions = {"s0": "a", "x": "b", "s2": "c"}
    alignment = align(predictions, [_record(0), _record(1), _record(2)], skip_missing=True)
    assert [r.id for r in alignment.records] == ["s0", "s2"] and alignment.outputs == ["a", "c"]
    assert alignment.summary(3, 3) == {"n_predictions": 3, "n_references": 3, "evaluated": 2, "missing": 1, "extra": 1}


def test_align_nothing_in_common_is_an_error_even_with_skip():
    with pytest.raises(UserError, match="no id in common"):
        align({"x": ""}, [_record(0)], skip_missing=True)


# --------------------------------------------------------------------------------------
# Sample selection for the report
# --------------------------------------------------------------------------------------

SPREAD_CASES = [
    # (items, k, expected)
    ([1, 2, 3, 4, 5], 3, [1, 3, 5]),  # ends and middle
    ([1, 2, 3], 5, [1, 2, 3]),  # fewer items than asked
    ([1, 2, 3], 1, [1]),  # one
    ([], 3, []),  # none
    ([1, 2, 3], 0, []),  # zero asked
]


@pytest.mark.parametrize("items, k, expected", SPREAD_CASES)
def test_spread(items, k, expected):
    assert spread(items, k) == expected


def test_build_samples_puts_wrong_first_and_fills_up():
    records = [_record(i) for i in range(10)]
    outputs = ["<answer> KEEP, STRAIGHT </answer>" if i % 5 else "<answer> STOP </answer>" for i in range(10)]
    parsed = [parse_output(o) for o in outputs]
    samples = build_samples(records, outputs, parsed, {0: {"bleu4": 0.5}}, n=4)
    assert [s["id"] for s in samples] == ["s0", "s5", "s1", "s9"]  # the 2 wrong ones, then 2 right spread out
    assert samples[0]["scores"] == {"bleu4": 0.5} and samples[0]["pred_path"] is None
    assert len(build_samples(records, outputs, parsed, {}, n=100)) == 10
    json.dumps(samples)  # plain data


# --- noisy labels: the ceiling and McNemar's test ---------------------------------------------


@pytest.mark.parametrize(
    "fixed, broken, expected",
    [
        (0, 0, 1.0),  # nothing changed: no evidence
        (5, 0, 1 / 32),  # five fixed, none broken: 0.5^5
        (0, 5, 1.0),  # only broken: P(X >= 0) = 1
        (3, 3, 42 / 64),  # a tie: P(X >= 3 | n = 6) = (20 + 15 + 6 + 1) / 64
        (10, 2, 79 / 4096),  # (C(12,10) + C(12,11) + C(12,12)) / 2^12 = (66 + 12 + 1) / 4096
    ],
)
def test_mcnemar_exact(fixed, broken, expected):
    assert mcnemar_exact(fixed, broken) == pytest.approx(expected)


def test_mcnemar_rejects_negative_counts():
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


def test_compare_paired_counts_fixed_and_broken():
    a = [True, False, False, True, False, True]
    b = [True, True, True, False, False, True]
    out = compare_paired(a, b)
    # scene 1 and 2 fixed, scene 3 broken, the rest unchanged
    assert out == {"n": 6, "fixed": 2, "broken": 1, "delta": pytest.approx(1 / 6), "p_value": pytest.approx(0.5)}
    with pytest.raises(ValueError, match="same samples"):
        compare_paired(a, b[:-1])


def test_compute_ceiling():
    truth = [("KEEP", "STRAIGHT"), ("STOP", "STRAIGHT"), ("ACCELERATE", "LEFT_CHANGE"), ("KEEP", "STRAIGHT")]
    most_likely = [("KEEP", "STRAIGHT"), ("DECELERATE", "STRAIGHT"), ("ACCELERATE", "LEFT_CHANGE"), ("KEEP", "STRAIGHT")]
    p = [0.9, 0.6, 0.7, 0.9]
    predictions = [("KEEP", "STRAIGHT"), ("STOP", "STRAIGHT"), ("ACCELERATE", None), ("KEEP", "STRAIGHT")]
    out = compute_ceiling(truth, most_likely, p, predictions)
    assert out["ceiling"] == pytest.approx(3 / 4)  # scene 2's driver did the unlikely thing
    assert out["ceiling_expected"] == pytest.approx(0.775)
    # the planner that stopped in scene 2 matched the label, not the most likely plan
    assert out["bayes_agreement"] == pytest.approx(2 / 4)
    assert compute_ceiling([], [], [], [])["n"] == 0
    with pytest.raises(ValueError):
        compute_ceiling(truth, most_likely, p[:2], predictions)
