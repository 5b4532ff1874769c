"""`alphadrive-ray eval` end to end (real subprocesses, real JVMs), the report, and user errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from alphadrive_ray.data.records import Record, write_records
from alphadrive_ray.evaluation import evaluate, flatten_metrics
from alphadrive_ray.evaluation.metrics import compute_planning_metrics, parse_output
from alphadrive_ray.evaluation.report import FIGURES

pytestmark = pytest.mark.timeout(180)

# (id, true speed, true path, reference reasoning, raw model output)
SAMPLES = [
    ("s00", "STOP", "STRAIGHT", "The light is red, so I stop.", "<think> The light is red, so I stop. </think>\n<answer> STOP, STRAIGHT </answer>"),
    ("s01", "KEEP", "LEFT_TURN", "Clear road; turn left as navigated.", "<think> Clear road, turn left. </think>\n<answer> KEEP, LEFT_TURN </answer>"),
    ("s02", "DECELERATE", "STRAIGHT", "A pedestrian crosses ahead.", "<think> A pedestrian\ncrosses. </think><answer> KEEP, STRAIGHT </answer>"),
    ("s03", "ACCELERATE", "RIGHT_CHANGE", None, "<think> Fast lane free. </think><answer> ACCELERATE, RIGHT_CHANGE </answer>"),
    ("s04", "KEEP", "STRAIGHT", "Steady traffic, keep going.", "<answer> KEEP </answer>"),
    ("s05", "STOP", "LEFT_TURN", "Red light at the junction.", "I would stop and turn left."),
    ("s06", "KEEP", "RIGHT_TURN", "Turn right at the next street.", "<think> <script>alert(1)</script> </think><answer> KEEP, RIGHT_TURN </answer>"),
    ("s07", "DECELERATE", "LEFT_CHANGE", "Slow car ahead, change left.", "<think> Slow car. </think><answer> DECELERATE, LEFT_CHANGE, STRAIGHT </answer>"),
    ("s08", "KEEP", "STRAIGHT", "Nothing ahead.", "<think> Nothing ahead. </think><answer> KEEP, STRAIGHT"),
    ("s09", "STOP", "STRAIGHT", "Stop sign.", "<think> Stop sign. </think><answer> STOP, STRAIGHT </answer>"),
]
MISSING_IMAGE_ID = "s09"


def _write_dataset(root: Path) -> tuple[Path, Path]:
    records = []
    for k, (sid, speed, path, reasoning, _) in enumerate(SAMPLES):
        image = root / "images" / f"{sid}.png"
        if sid != MISSING_IMAGE_ID:
            image.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 18), (20 * k, 100, 200 - 15 * k)).save(image)
        records.append(Record(sid, str(image), 5.0, "go straight", speed, path, reasoning))
    references = root / "references.jsonl"
    write_records(references, records)
    predictions = root / "predictions.jsonl"
    _write_predictions(predictions, [(sid, output) for sid, *_, output in SAMPLES])
    return references, predictions


def _write_predictions(path: Path, pairs) -> Path:
    path.write_text("".join(json.dumps({"id": sid, "output": out}) + "\n" for sid, out in pairs), encoding="utf-8")
    return path


def _eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alphadrive_ray", "eval", *map(str, args)], capture_output=True, text=True, timeout=170)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return _write_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def full_run(dataset, tmp_path_factory):
    references, predictions = dataset
    out = tmp_path_factory.mktemp("eval") / "out"
    done = _eval("--predictions", predictions, "--references", references, "--out", out)
    return done, out


def test_full_run_succeeds_and_prints_a_summary(full_run):
    done, out = full_run
    assert done.returncode == 0, done.stderr
    assert "planning accuracy       0.7000" in done.stdout
    assert "SPEED KEEP" in done.stdout and "PATH macro F1" in done.stdout and "METEOR" in done.stdout
    assert f"wrote {out / 'metrics.json'}" in done.stdout


def test_full_run_metrics_json(full_run):
    _, out = full_run
    metrics = json.loads((out / "metrics.json").read_text())
    parsed = [parse_output(output) for *_, output in SAMPLES]
    expected = compute_planning_metrics(parsed, [s[1] for s in SAMPLES], [s[2] for s in SAMPLES])
    assert metrics["planning"] == expected["planning"]
    assert metrics["parse"] == expected["parse"]
    assert metrics["confusion"] == expected["confusion"]
    # By hand: right are s00, s01, s03, s06, s07 (first PATH word), s08 (unclosed answer: whole
    # text), s09; wrong are s02 (SPEED), s04 (PATH miss), s05 (lower case: two misses).
    assert metrics["planning"]["accuracy"] == pytest.approx(0.7)
    assert metrics["parse"]["format_ok_rate"] == pytest.approx(0.7)  # s04, s05, s08 fail the format
    reasoning = metrics["reasoning"]
    assert reasoning["computed"] is True
    assert reasoning["n"] == 9  # s03 has no reference reasoning
    assert reasoning["no_think"] == 2  # s04 and s05 have no <think> block
    for name in ("bleu4", "meteor"):
        assert 0.0 < reasoning[name] <= 1.0
    assert reasoning["cider"] > 0.0
    assert metrics["ids"] == {"n_predictions": 10, "n_references": 10, "evaluated": 10, "missing": 0, "extra": 0}
    assert metrics["n"] == 10
    for family in ("speed", "path"):
        for value in flatten_metrics({"planning": {family: metrics["planning"][family]}}).values():
            assert value >= 0.0
    assert set(metrics["timing_s"]) >= {"parse", "planning", "tokenize", "bleu", "cider", "meteor", "report", "total"}
    assert reasoning["bleu4_check"]["agree"] is True and 0 < reasoning["bleu4_check"]["n"] <= 9
    assert 0.0 < reasoning["bleu4_nltk"] <= 1.0


def test_full_run_scored_predictions(full_run):
    # every prediction with its plan and per-sample scores, nltk's sentence BLEU among them,
    # so that scenes can be sorted by reasoning quality; still a valid predictions file
    _, out = full_run
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [sid for sid, *_ in SAMPLES]
    by_id = {r["id"]: r for r in rows}
    assert by_id["s02"]["correct"] is False and by_id["s00"]["correct"] is True
    assert by_id["s04"]["path"] is None  # a PATH miss
    assert "sentence_bleu" not in by_id["s03"]  # no reference reasoning: no reasoning scores
    scored = [r for r in rows if "sentence_bleu" in r]
    assert len(scored) == 9 and all(0.0 <= r["sentence_bleu"] <= 1.0 for r in scored)
    assert {"bleu4", "cider", "meteor"} <= set(scored[0])
    assert by_id["s04"]["sentence_bleu"] == 0.0  # no <think>: an empty reasoning
    best = max(scored, key=lambda r: r["sentence_bleu"])
    assert best["sentence_bleu"] > 0.3
    from alphadrive_ray.evaluation.predictions import load_predictions

    assert load_predictions(out / "predictions.jsonl").outputs == {sid: output for sid, *_, output in SAMPLES}


def test_scoring_a_predictions_file_in_its_own_folder_keeps_it(dataset, tmp_path):
    # --out is the folder of the predictions: the scored file replaces it, a superset
    references, predictions = dataset
    copy = tmp_path / "predictions.jsonl"
    pairs = [(sid, output) for sid, *_, output in SAMPLES] + [("not-a-reference", "<answer> KEEP, STRAIGHT </answer>")]
    _write_predictions(copy, pairs)
    done = _eval("--predictions", copy, "--references", references, "--out", tmp_path, "--skip-missing", "--no-reasoning-metrics")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in copy.read_text().splitlines()]
    assert {r["id"]: r["output"] for r in rows} == dict(pairs)
    assert rows[-1] == {"id": "not-a-reference", "output": "<answer> KEEP, STRAIGHT </answer>"}


def test_full_run_report(full_run):
    _, out = full_run
    for name in FIGURES.values():
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100
    page = (out / "report.html").read_text(encoding="utf-8")
    for name in FIGURES.values():
        assert f'src="{name}"' in page
    assert page.count('src="data:image/png;base64,') == len(SAMPLES) - 1  # thumbnails; one image is missing
    assert "(image not readable)" in page
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # escaped
    for sid, *_ in SAMPLES:
        assert f">{sid}<" in page  # every sample fits in the default table of 24
    assert "METEOR" in page and "planning accuracy" in page


def test_progress_bar_stays_out_of_non_terminals(full_run):
    done, _ = full_run
    assert "eval:" not in done.stderr and "Traceback" not in done.stderr


def test_no_reasoning_metrics(dataset, tmp_path):
    references, predictions = dataset
    done = _eval("--predictions", predictions, "--references", references, "--out", tmp_path, "--no-reasoning-metrics")
    assert done.returncode == 0, done.stderr
    reasoning = json.loads((tmp_path / "metrics.json").read_text())["reasoning"]
    assert reasoning["computed"] is False and reasoning["bleu4"] is None and reasoning["n"] == 9
    assert "not computed: disabled (--no-reasoning-metrics)" in done.stdout


def test_skip_missing_counts_the_skipped_ids(dataset, tmp_path):
    references, _ = dataset
    pairs = [(sid, out) for sid, *_, out in SAMPLES[:7]] + [("ghost-1", "x"), ("ghost-2", "y")]
    predictions = _write_predictions(tmp_path / "p.jsonl", pairs)
    done = _eval("--predictions", predictions, "--references", references, "--out", tmp_path / "o", "--skip-missing", "--no-reasoning-metrics")
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["ids"] == {"n_predictions": 9, "n_references": 10, "evaluated": 7, "missing": 3, "extra": 2}
    assert metrics["n"] == 7
    assert "skipped: 3 reference id(s) without prediction, 2 extra prediction id(s)" in done.stdout
    assert "Skipped" in (tmp_path / "o" / "report.html").read_text(encoding="utf-8")


def _mismatch_missing(tmp_path):
    return _write_predictions(tmp_path / "p.jsonl", [(sid, out) for sid, *_, out in SAMPLES[:8]])


def _mismatch_extra(tmp_path):
    return _write_predictions(tmp_path / "p.jsonl", [(sid, out) for sid, *_, out in SAMPLES] + [("ghost", "x")])


def _many_missing(tmp_path):
    return _write_predictions(tmp_path / "p.jsonl", [("s00", "x")] + [(f"ghost-{i:02d}", "x") for i in range(14)])


def _lines(*lines: str):
    def make(tmp_path: Path) -> Path:
        path = tmp_path / "p.jsonl"
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return path

    return make


GOOD = json.dumps({"id": "s00", "output": "x"})

CLI_ERROR_CASES = [
    # (make predictions file, expected fragments of stderr)
    (_mismatch_missing, ["ids do not match", "2 reference id(s) have no prediction: 's08', 's09'", "--skip-missing"]),  # missing ids
    (_mismatch_extra, ["1 prediction id(s) are not in", "'ghost' (line 11)"]),  # extra id, with its line
    (_many_missing, ["14 prediction id(s)", "... and 4 more", "9 reference id(s) have no prediction"]),  # truncated list
    (_lines(GOOD, "{not json"), ["p.jsonl:2: bad JSON"]),  # malformed line
    (_lines(GOOD, '{"id": "s01"}'), ["p.jsonl:2: output: missing required field"]),  # missing output
    (_lines('{"output": "x"}'), ["p.jsonl:1: id: missing required field"]),  # missing id
    (_lines(GOOD, '{"id": "s01", "output": ["STOP"]}'), ["p.jsonl:2: output: must be a string", "got list"]),  # non-string
    (_lines(GOOD, GOOD), ["p.jsonl:2: id: duplicate id 's00' (first on line 1)"]),  # duplicate
    (_lines(), ["no predictions (empty file)"]),  # empty file
    (lambda tmp_path: tmp_path / "absent.jsonl", ["absent.jsonl: predictions file not found"]),  # no file
]


@pytest.mark.parametrize(
    "make, fragments",
    CLI_ERROR_CASES,
    ids=["missing", "extra", "many", "json", "no-output", "no-id", "list-output", "duplicate", "empty", "no-file"],
)
def test_cli_user_errors(dataset, tmp_path, make, fragments):
    references, _ = dataset
    predictions = make(tmp_path)
    done = _eval("--predictions", predictions, "--references", references, "--out", tmp_path / "o")
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("error: ")
    assert "Traceback" not in done.stderr
    for fragment in fragments:
        assert fragment in done.stderr
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_cli_skip_missing_without_common_ids_still_fails(dataset, tmp_path):
    references, _ = dataset
    predictions = _write_predictions(tmp_path / "p.jsonl", [("ghost", "x")])
    done = _eval("--predictions", predictions, "--references", references, "--out", tmp_path / "o", "--skip-missing")
    assert done.returncode == 2 and "no id in common" in done.stderr


def test_cli_bad_references_are_a_user_error(tmp_path):
    references = tmp_path / "r.jsonl"
    references.write_text('{"id": "a"}\n')
    predictions = _write_predictions(tmp_path / "p.jsonl", [("a", "x")])
    done = _eval("--predictions", predictions, "--references", references, "--out", tmp_path / "o")
    assert done.returncode == 2 and "r.jsonl:1: image: missing required field" in done.stderr


def test_evaluate_in_process_with_extra_table(dataset, tmp_path):
    # The training driver's path: a dict of outputs, records, and a comparison table on top.
    from alphadrive_ray.data.records import load_records

    references, _ = dataset
    records = load_records(references, check_images=False)
    outputs = {sid: output for sid, *_, output in SAMPLES}
    extra = {"planning accuracy by stage": {"untrained": {"accuracy": 0.1369}, "SFT": {"accuracy": 0.5584}, "SFT+RL": {"accuracy": 0.7712}}}
    metrics = evaluate(outputs, records, tmp_path, reasoning_metrics=False, progress=False, extra=extra, n_samples=4)
    assert metrics == json.loads((tmp_path / "metrics.json").read_text())
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert page.index("planning accuracy by stage") < page.index("Overview")  # extra comes first
    assert "<th>SFT+RL</th>" in page and "0.7712" in page
    assert "Sample outputs (4)" in page


def test_evaluate_rejects_non_text_outputs(dataset, tmp_path):
    # A driver bug (a failed generation left as None) is named, not a crash deep in parsing.
    from alphadrive_ray.data.records import load_records

    records = load_records(dataset[0], check_images=False)
    outputs = {sid: output for sid, *_, output in SAMPLES} | {"s03": None}
    with pytest.raises(TypeError, match="'s03'"):
        evaluate(outputs, records, tmp_path, reasoning_metrics=False, progress=False)
