"""The one-page run report: built from a run directory's files, checked in a real Chromium.

The run directory here is written by the real pieces a run uses (the scene generator, the
Tracker, `evaluate` with pycocoevalcap and nltk); tests/test_train_e2e.py checks the page a
real training run writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alphadrive_ray.actions import format_completion

REPO = Path(__file__).resolve().parent.parent
N_EVAL = 10
GRPO_STEPS = 6


def _outputs(records, right_every: int, seed: int) -> dict[str, str]:
    """Plans right for every `right_every`-th scene, wrong (or malformed) otherwise."""
    outputs = {}
    for k, r in enumerate(records):
        if k % right_every == 0:
            outputs[r.id] = format_completion(r.reasoning or "", r.speed_action, r.path_action)
        elif k % 3 == seed % 3:
            outputs[r.id] = "I am not sure what to do here."
        else:
            speed = "STOP" if r.speed_action != "STOP" else "KEEP"
            outputs[r.id] = format_completion("The road is clear, so I keep going.", speed, r.path_action)
    return outputs


def build_run(root: Path, *, ceiling: float | None, name: str = "report-test") -> Path:
    """A finished run directory: config, metrics of 8 SFT and 6 GRPO steps, four evaluations."""
    from alphadrive_ray.config import load_config
    from alphadrive_ray.data.records import load_records, write_records
    from alphadrive_ray.data.synth import generate_dataset
    from alphadrive_ray.evaluation import evaluate
    from alphadrive_ray.tracking import Tracker

    data, _ = generate_dataset(root / "scenes", N_EVAL, seed=11, size=64, id_prefix="eval")
    # a user's dataset: no label distribution, so the only ceiling is the one this builder writes
    records = [dataclasses.replace(r, extra={}) for r in load_records(data)]
    write_records(data, records)
    config = load_config(
        REPO / "jobs" / "quickstart_cpu.yaml",
        [f"run.name={name}", f"run.output_dir={root / 'runs'}", f"data.eval={data}", f"eval.samples={N_EVAL}", "grpo.steps=6"],
    )
    run_dir = config.run_dir
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    tracker = Tracker(run_dir, tensorboard=False, stream=open(os.devnull, "w"))
    for step in range(1, 9):
        tracker.log("sft", step, {"loss/sft": 3.0 / step, "perf/lr": 1e-3, "perf/step_s": 0.5})
    components = ("speed_f1", "path_f1", "speed_weight", "path_weight", "speed_diversity", "path_diversity", "speed", "path", "format", "total")
    evaluations = [("untrained", 7, False), ("sft", 3, False)]
    for tag, right_every, reasoning in evaluations:
        evaluate(_outputs(records, right_every, 0), records, run_dir / "eval" / tag, reasoning_metrics=reasoning, progress=False)
        tracker.log("eval", len(evaluations), {"eval/accuracy": 0.1})
    for step in range(1, GRPO_STEPS + 1):
        metrics = {f"reward/{k}": 0.1 * step for k in components}
        metrics.update({f"reward/{k}_std": 0.05 for k in components})
        metrics.update({"loss/kl": 0.001 * step, "loss/clip_frac": 0.01, "rollout/dropped_groups": step % 3, "rollout/accuracy": 0.1 * step})
        metrics.update({"perf/step_s": 2.0, "perf/rollout_s": 1.0, "perf/learner_s": 0.5, "perf/sync_s": 0.1, "reward/rescored": 0})
        tracker.log("grpo", step, metrics)
        if step == 3:
            evaluate(_outputs(records, 2, 1), records, run_dir / "eval" / "step-000003", reasoning_metrics=False, progress=False)
    evaluate(_outputs(records, 2, 2), records, run_dir / "eval" / "final", reasoning_metrics=True, progress=False)
    tracker.close()
    if ceiling is not None:
        # the Bayes-optimal planner's accuracy on the split, as an evaluation records it
        for folder in (run_dir / "eval").iterdir():
            _add_ceiling(folder / "metrics.json", ceiling)
        _add_ceiling(run_dir / "eval" / "final" / "metrics.json", ceiling)
    summary = {
        "run_dir": str(run_dir),
        "accuracy": {"untrained": 0.1, "sft": 0.3, "final": 0.5},
        "seconds": {"startup": 3.0, "sft": 4.0, "grpo": 12.0, "total": 25.0},
        "grpo_steps": GRPO_STEPS,
        "sft_steps": 8,
        "export_dir": None,
        "peak_memory_mb": {"learner": 900.0},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def _add_ceiling(path: Path, value: float) -> None:
    metrics = json.loads(path.read_text())
    metrics["ceiling"] = value
    path.write_text(json.dumps(metrics))


@pytest.fixture(scope="module")
def run_with_ceiling(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("run-ceiling"), ceiling=0.83)


@pytest.fixture(scope="module")
def run_without_ceiling(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("run-plain"), ceiling=None)


def _page(run_dir: Path) -> str:
    from alphadrive_ray.run_report import write_run_report

    return write_run_report(run_dir).read_text(encoding="utf-8")


def test_page_has_every_section(run_with_ceiling):
    from alphadrive_ray.run_report import load_run

    page = _page(run_with_ceiling)
    for heading in (
        "Curves",
        "SFT loss",
        "GRPO rewards",
        "KL, clip fraction, dropped groups",
        "held-out accuracy",
        "Stages side by side",
        "Confusion matrices",
        "Sample scenes",
        "Every held-out scene",
        "Timings",
        "Resolved config",
    ):
        assert f">{heading}" in page, heading
    # self-contained: figures and scene images inline, nothing fetched from elsewhere
    assert page.count('src="data:image/png;base64,') == 4 + 8
    assert "http://" not in page and "https://" not in page and 'src="' not in page.replace('src="data:', "")
    run = load_run(run_with_ceiling)
    assert [e.tag for e in run.evaluations] == ["untrained", "sft", "step-000003", "final"]
    assert [e.step for e in run.evaluations] == [0, 0, 3, GRPO_STEPS]
    # the stages side by side: accuracy of each, per-class F1, reasoning scores of the final one
    final = run.evaluations[-1].metrics
    assert f"{final['planning']['accuracy']:.3f}" in page
    assert "F1 SPEED DECELERATE" in page and "F1 PATH RIGHT_CHANGE" in page and "METEOR" in page
    assert f"{final['reasoning']['bleu4']:.3f}" in page
    assert "GRPO step 3" in page  # the intermediate evaluation, in the table of every evaluation
    assert "dynamic_sampling: true" in page  # the resolved config
    assert "sentence BLEU" in page


def test_scenes_show_the_reference_and_each_stage(run_with_ceiling):
    from alphadrive_ray.run_report import load_run

    page = _page(run_with_ceiling)
    run = load_run(run_with_ceiling)
    record = run.records[0]  # right in every stage (k % right_every == 0)
    assert f"<b>{record.id}</b>" in page
    assert f"{record.speed_action}, {record.path_action}" in page
    assert "(no &lt;think&gt;)" in page  # a malformed output shows that it had no reasoning
    # the table of every scene can be sorted by sentence BLEU (a number in each cell)
    assert page.count('class="num" data-v="') >= N_EVAL


def test_ceiling_is_a_line_on_the_accuracy_curve_and_a_row_beside_accuracy(run_with_ceiling, run_without_ceiling):
    from alphadrive_ray.run_report import draw_accuracy, load_run, run_ceilings

    with_ceiling, without = load_run(run_with_ceiling), load_run(run_without_ceiling)
    assert run_ceilings(with_ceiling) == {"ceiling": 0.83}
    assert run_ceilings(without) == {}
    page = _page(run_with_ceiling)
    assert '<tr class="ceiling"><th>ceiling</th>' in page and page.count('<td class="num ceiling">0.830</td>') == 3
    assert "No ceiling metric" not in page
    # the line is drawn: the same run's curve differs only by it
    assert draw_accuracy(with_ceiling, {"ceiling": 0.83}) != draw_accuracy(with_ceiling, {})
    plain = _page(run_without_ceiling)
    assert 'class="ceiling"' not in plain and "No ceiling metric" in plain


def test_find_ceilings():
    from alphadrive_ray.run_report import find_ceilings

    # table-driven: (metrics.json, ceilings found)
    cases = [
        ({"planning": {"accuracy": 0.5}}, {}),  # none
        ({"ceiling": 0.9}, {"ceiling": 0.9}),  # top level
        (
            {"planning": {"accuracy": 0.5, "ceiling": 0.8, "speed": {"ceiling_acc": 0.95}}},
            {"planning.ceiling": 0.8, "planning.speed.ceiling_acc": 0.95},
        ),
        ({"ceiling": True, "ceiling_note": "n/a", "x_ceiling": float("nan")}, {}),  # not numbers
    ]
    for metrics, expected in cases:
        assert find_ceilings(metrics) == expected


def test_peak_gpu_memory_is_a_column_only_for_gpu_runs(run_without_ceiling, tmp_path):
    import shutil

    assert "peak GPU memory" not in _page(run_without_ceiling)  # a CPU run
    run_dir = shutil.copytree(run_without_ceiling, tmp_path / "gpu-run")
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["peak_memory_mb"] = {"learner": 900.0, "rollout": 700.0, "reward": 300.0}
    summary["peak_gpu_mb"] = {"learner": 41234.0, "rollout": 5120.0}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    page = _page(run_dir)
    assert "peak GPU memory (MB, torch's allocator, largest process)" in page
    assert "<tr><td>learner</td><td>900</td><td>41234</td></tr>" in page.replace(' class="num"', "")
    assert "<tr><td>reward</td><td>300</td><td></td></tr>" in page.replace(' class="num"', "")


def test_a_run_without_summary_or_evaluations_still_renders(tmp_path):
    from alphadrive_ray.tracking import Tracker

    run_dir = tmp_path / "partial"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"run": {"name": "partial"}, "data": {"eval": str(tmp_path / "gone.jsonl")}}))
    tracker = Tracker(run_dir, tensorboard=False, stream=open(os.devnull, "w"))
    tracker.log("sft", 1, {"loss/sft": 2.0})
    tracker.close()
    page = _page(run_dir)
    assert "has not finished" in page and "no GRPO steps were logged" in page and "No evaluation was written" in page


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alphadrive_ray", "report", *map(str, args)], capture_output=True, text=True, timeout=120)


def test_cli_writes_the_page(run_without_ceiling, tmp_path):
    out = tmp_path / "elsewhere" / "page.html"
    done = _cli(run_without_ceiling, "--out", out)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout and out.read_text().startswith("<!doctype html>")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: tmp / "nope", "run directory not found"),
        (lambda tmp: tmp, "is not a run directory"),
        (lambda tmp: (tmp / "metrics.jsonl").write_text('{"stage": "sft", "step": 1}\n{"stage": "sft", "st') and tmp, "metrics.jsonl:2: bad JSON"),
    ],
)
def test_cli_user_errors(tmp_path, make, message):
    done = _cli(make(tmp_path))
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_page_renders_in_chromium(run_with_ceiling, tmp_path):
    # a real browser: the page renders, every image loads, the console stays clean, and a
    # screenshot is kept as a test artifact
    from browser import artifacts_dir, check_page, chromium, full_page_screenshot

    from alphadrive_ray.run_report import write_run_report

    path = write_run_report(run_with_ceiling)
    with chromium(tmp_path / "profile") as driver:
        page = check_page(driver, path)
        # sorting the scene table by a column runs the page's script
        driver.execute_script("document.querySelector('table.sortable th:last-child').click()")
        errors_after_click = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        shot = full_page_screenshot(driver, artifacts_dir() / "run_report_synthetic.png")
    assert page.ready_state == "complete" and page.title == "AlphaDrive run report-test"
    assert page.images == 12 and page.broken_images == []
    assert page.console_errors == [] and errors_after_click == []
    assert "Stages side by side" in page.text and "ceiling" in page.text
    from PIL import Image

    with Image.open(shot) as img:
        assert img.size[0] >= 1000 and img.size[1] > 3000
