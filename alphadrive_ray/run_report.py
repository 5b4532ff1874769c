"""`alphadrive-ray report RUN_DIR`: one self-contained HTML page for a whole run.

    alphadrive-ray report runs/quickstart                 # -> runs/quickstart/run_report.html
    alphadrive-ray report runs/quickstart --out page.html

`train` writes it at the end of every run. Everything is inside the one file (figures and
scene images as `data:` URIs, no script or style from elsewhere), so it can be mailed or
attached to an issue. It reads what a run directory holds:

    config.yaml                 the resolved config          -> shown, and where the held-out split is
    metrics.jsonl               one line per step             -> curves against steps
    eval/<tag>/metrics.json     each evaluation (untrained, sft, step-000020, ...)
    eval/<tag>/predictions.jsonl  its outputs with per-sample scores
    report/metrics.json, report/predictions.jsonl   the final evaluation
    summary.json                accuracies, timings, peak memory (absent while a run is going)

Sections: the curves (SFT loss; per GRPO step the mean and spread of each reward component,
KL, clip fraction, dropped groups; held-out accuracy at each evaluation), the stages side by
side (planning accuracy, per-class F1, confusion matrices, BLEU-4 / CIDEr / METEOR, nltk's
sentence BLEU), sample scenes with each stage's reasoning and plan next to the reference, a
sortable table of every held-out scene, the timings and the resolved config. Metrics whose
name contains "ceiling" (e.g. the accuracy of the Bayes-optimal planner on a split with noisy
labels) are drawn as horizontal lines on the accuracy curve and shown beside the accuracy.
Parts a run does not have (no SFT, no reasoning metrics, no ceiling, a dataset that moved)
are left out with a note.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from alphadrive_ray.errors import UserError
from alphadrive_ray.evaluation.report import escape, format_value

REPORT_NAME = "run_report.html"
MAIN_STAGES = ("untrained", "sft", "final")
STAGE_LABELS = {"untrained": "untrained", "sft": "after SFT", "final": "final"}
N_SCENES = 8  # sample scenes shown with their images
MAX_TABLE_ROWS = 2000  # rows of the sortable table of held-out scenes
CLASSES = {
    "speed": ("KEEP", "ACCELERATE", "DECELERATE", "STOP"),
    "path": ("STRAIGHT", "LEFT_TURN", "RIGHT_TURN", "LEFT_CHANGE", "RIGHT_CHANGE"),
}


@dataclass
class Evaluation:
    tag: str  # untrained, sft, step-000020, final
    step: int  # GRPO steps done when it ran
    metrics: dict[str, Any]
    predictions: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> scored prediction row

    @property
    def label(self) -> str:
        return STAGE_LABELS.get(self.tag, f"GRPO step {self.step}")


@dataclass
class RunData:
    run_dir: Path
    config: dict[str, Any]
    config_text: str
    rows: list[dict[str, Any]]  # metrics.jsonl, a step logged twice (a resume) keeps its last line
    evaluations: list[Evaluation]
    summary: dict[str, Any] | None
    records: list[Any]  # the evaluated held-out records (data.Record), [] when unreadable
    records_note: str = ""

    def stage_rows(self, stage: str) -> list[dict[str, Any]]:
        return [row for row in self.rows if row.get("stage") == stage]

    def main_evaluations(self) -> list[Evaluation]:
        return [e for e in self.evaluations if e.tag in MAIN_STAGES]


# --------------------------------------------------------------------------------------
# Reading a run directory
# --------------------------------------------------------------------------------------


def load_run(run_dir: str | os.PathLike[str]) -> RunData:
    """Everything the page shows, read from `run_dir`; a UserError when it is not a run directory."""
    import yaml

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    config_file, metrics_file = run_dir / "config.yaml", run_dir / "metrics.jsonl"
    if not config_file.is_file() and not metrics_file.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml or metrics.jsonl); pass runs/<run name>")
    config_text = config_file.read_text(encoding="utf-8") if config_file.is_file() else ""
    try:
        config = (yaml.safe_load(config_text) or {}) if config_text else {}
    except yaml.YAMLError as exc:
        raise UserError(f"{config_file}: not valid YAML ({exc})") from None
    rows = read_metrics(metrics_file) if metrics_file.is_file() else []
    summary = _read_json(run_dir / "summary.json")
    last_grpo = max((row["step"] for row in rows if row.get("stage") == "grpo"), default=0)
    if summary and summary.get("grpo_steps"):
        last_grpo = summary["grpo_steps"]
    evaluations = []
    for folder, tag in _evaluation_folders(run_dir):
        metrics = _read_json(folder / "metrics.json")
        if metrics is None:
            continue
        step = last_grpo if tag == "final" else int(tag.split("-")[1]) if tag.startswith("step-") else 0
        evaluations.append(Evaluation(tag, step, metrics, _read_predictions(folder / "predictions.jsonl")))
    records, note = _held_out_records(config, run_dir)
    return RunData(run_dir, config, config_text, rows, evaluations, summary, records, note)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The lines of metrics.jsonl; where a step was logged twice (interrupted, then resumed) the last wins."""
    by_key: dict[tuple, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: bad JSON ({exc.msg}); is the file truncated?") from None
            if not isinstance(row, dict) or "stage" not in row or "step" not in row:
                raise UserError(f"{path}:{lineno}: expected an object with `stage` and `step`")
            # evaluations are logged by weight version, which repeats; keep each of them
            key = (row["stage"], row["step"]) if row["stage"] != "eval" else ("eval", lineno)
            by_key.pop(key, None)
            by_key[key] = row
    return list(by_key.values())


def _evaluation_folders(run_dir: Path) -> list[tuple[Path, str]]:
    out = []
    eval_root = run_dir / "eval"
    if eval_root.is_dir():
        tags = [p.name for p in eval_root.iterdir() if p.is_dir()]
        order = {"untrained": 0, "sft": 1, "final": 3}
        for tag in sorted(tags, key=lambda t: (order.get(t, 2), t)):
            out.append((eval_root / tag, tag))
    if (run_dir / "report").is_dir() and not (eval_root / "final").is_dir():  # runs of before 2026-11-30
        out.append((run_dir / "report", "final"))
    return out


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: bad JSON ({exc.msg} at line {exc.lineno})") from None


def _read_predictions(path: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return out
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "id" in row:
                out[str(row["id"])] = row
    return out


def _held_out_records(config: Mapping[str, Any], run_dir: Path) -> tuple[list[Any], str]:
    """The records the evaluations scored (the first `eval.samples` of `data.eval`)."""
    from alphadrive_ray.data.records import load_records

    path = (config.get("data") or {}).get("eval")
    if not path:
        return [], "the config names no held-out split (data.eval)"
    try:
        records = load_records(path, check_images=False, log=lambda line: None)
    except UserError as exc:
        first = str(exc).splitlines()[0]
        return [], f"the held-out split could not be read ({first}); scenes are shown without images and references"
    samples = (config.get("eval") or {}).get("samples") or 0
    return records[: samples or None], ""


# --------------------------------------------------------------------------------------
# What the page computes
# --------------------------------------------------------------------------------------


def find_ceilings(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric entries of a metrics dict (nested) whose name contains "ceiling", by dotted key."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(find_ceilings(value, name))
        elif "ceiling" in str(key).lower() and isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(float(value)):
                out[name] = float(value)
    return out


def evaluation_ceilings(run: RunData, evaluation: Evaluation) -> dict[str, float]:
    """Ceilings of one evaluation: from its metrics.json, else from its line in metrics.jsonl."""
    found = find_ceilings(evaluation.metrics)
    if found:
        return found
    lines = [row for row in run.rows if row.get("stage") == "eval"]
    index = [e for e in run.evaluations].index(evaluation)
    if index < len(lines):
        return {k: float(v) for k, v in lines[index].items() if "ceiling" in k.lower() and isinstance(v, (int, float))}
    return {}


def run_ceilings(run: RunData) -> dict[str, float]:
    """Every ceiling of the run, the latest evaluation's value of each."""
    out: dict[str, float] = {}
    for evaluation in run.evaluations:
        out.update(evaluation_ceilings(run, evaluation))
    if not out:  # evaluations written elsewhere: the eval lines of metrics.jsonl alone
        for row in run.stage_rows("eval"):
            out.update({k: float(v) for k, v in row.items() if "ceiling" in k.lower() and isinstance(v, (int, float))})
    return out


def reward_components(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """`reward/<name>` means logged per GRPO step (not their `_std` spreads), in logged order."""
    names: list[str] = []
    for row in rows:
        for key in row:
            if key.startswith("reward/") and not key.endswith("_std") and key != "reward/rescored" and key not in names:
                names.append(key)
    return names


def mean_sentence_bleu(evaluation: Evaluation) -> float | None:
    values = [row["sentence_bleu"] for row in evaluation.predictions.values() if isinstance(row.get("sentence_bleu"), (int, float))]
    return sum(values) / len(values) if values else None


# --------------------------------------------------------------------------------------
# Figures (matplotlib's object API on the Agg canvas, as PNG data URIs)
# --------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png_uri(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(row["step"], float(row[key])) for row in rows if isinstance(row.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def draw_sft_loss(rows: Sequence[Mapping[str, Any]]) -> str | None:
    steps, loss = _series(rows, "loss/sft")
    if not steps:
        return None
    fig = _figure(7, 3)
    ax = fig.subplots()
    ax.plot(steps, loss, color="#4477aa", linewidth=1, label="loss/sft")
    if len(loss) >= 20:  # a moving average shows the trend through the batch noise
        k = max(5, len(loss) // 25)
        smooth = [sum(loss[max(0, i - k + 1) : i + 1]) / len(loss[max(0, i - k + 1) : i + 1]) for i in range(len(loss))]
        ax.plot(steps, smooth, color="#cc6677", linewidth=1.5, label=f"mean of {k} steps")
    ax.set_xlabel("SFT step")
    ax.set_ylabel("next-token loss")
    ax.set_title("SFT warm-up: loss", fontsize=10)
    ax.legend(fontsize=8)
    return _png_uri(fig)


def draw_rewards(rows: Sequence[Mapping[str, Any]]) -> str | None:
    names = reward_components(rows)
    if not rows or not names:
        return None
    cols = min(5, len(names))
    nrows = math.ceil(len(names) / cols)
    fig = _figure(2.6 * cols, 2.1 * nrows + 0.3)
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax, name in zip([a for row in axes for a in row], names):
        steps, mean = _series(rows, name)
        _, spread = _series(rows, f"{name}_std")
        ax.plot(steps, mean, color="#228833", linewidth=1.2, marker="o" if len(steps) < 15 else None, markersize=3)
        if len(spread) == len(mean):
            ax.fill_between(
                steps, [m - s for m, s in zip(mean, spread)], [m + s for m, s in zip(mean, spread)], color="#228833", alpha=0.2, linewidth=0
            )
        ax.set_title(name.split("/", 1)[1], fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in [a for row in axes for a in row][len(names) :]:
        ax.set_visible(False)
    fig.suptitle("GRPO rewards per step: mean over the step's completions, band = ± one standard deviation", fontsize=10)
    fig.supxlabel("GRPO step", fontsize=9)
    return _png_uri(fig)


def draw_grpo_stats(rows: Sequence[Mapping[str, Any]]) -> str | None:
    panels = [
        ("loss/kl", "KL to the reference (loss/kl)", "#aa3377"),
        ("loss/clip_frac", "clip fraction (loss/clip_frac)", "#ee6677"),
        ("rollout/dropped_groups", "dropped groups (uniform rewards)", "#4477aa"),
        ("rollout/accuracy", "accuracy of the sampled plans", "#228833"),
    ]
    panels = [p for p in panels if _series(rows, p[0])[0]]
    if not panels:
        return None
    fig = _figure(3.2 * len(panels), 2.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, title, color) in zip(axes, panels):
        steps, values = _series(rows, key)
        if key == "rollout/dropped_groups":
            ax.bar(steps, values, color=color, width=0.8)
        else:
            ax.plot(steps, values, color=color, linewidth=1.2, marker="o" if len(steps) < 15 else None, markersize=3)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("GRPO step", fontsize=8)
        ax.tick_params(labelsize=7)
    return _png_uri(fig)


def draw_accuracy(run: RunData, ceilings: Mapping[str, float]) -> str | None:
    evaluations = run.evaluations
    if not evaluations:
        return None
    fig = _figure(7, 3.4)
    ax = fig.subplots()
    line = [e for e in evaluations if e.tag != "untrained"]
    ax.plot(
        [e.step for e in line],
        [e.metrics["planning"]["accuracy"] for e in line],
        color="#4477aa",
        marker="o",
        markersize=4,
        label="held-out accuracy",
    )
    for e in evaluations:
        if e.tag in MAIN_STAGES:
            ax.annotate(e.label, (e.step, e.metrics["planning"]["accuracy"]), textcoords="offset points", xytext=(4, -12), fontsize=8)
    untrained = [e for e in evaluations if e.tag == "untrained"]
    if untrained:
        ax.scatter([0], [untrained[0].metrics["planning"]["accuracy"]], color="#999999", marker="s", zorder=3, label="untrained")
    steps, sampled = _series(run.stage_rows("grpo"), "rollout/accuracy")
    if steps:
        ax.plot(steps, sampled, color="#228833", linewidth=0.8, alpha=0.6, label="sampled plans (training batch)")
    styles = ["--", ":", "-.", (0, (5, 1))]
    for k, (name, value) in enumerate(ceilings.items()):
        ax.axhline(value, color="#cc3311", linestyle=styles[k % len(styles)], linewidth=1.2, label=f"{name} {value:.3f}")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("GRPO step (untrained and SFT evaluations at 0)")
    ax.set_ylabel("planning accuracy")
    ax.set_title("Held-out planning accuracy at each evaluation", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    return _png_uri(fig)


# --------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1400px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
h3 { font-size: 1.0em; margin-bottom: 0.3em; }
.cards { display: flex; flex-wrap: wrap; gap: 0.8em; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 0.5em 0.9em; min-width: 8em; }
.card .v { font-size: 1.5em; font-weight: 600; } .card .k { color: #666; font-size: 0.85em; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { border: 1px solid #ddd; padding: 0.25em 0.5em; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: #1a7f37; font-weight: 600; } .bad { color: #c62828; font-weight: 600; }
.note { color: #666; font-size: 0.9em; } img.fig { max-width: 100%; border: 1px solid #eee; margin: 0.3em 0; }
.ceiling { color: #cc3311; }
.scenes td { vertical-align: top; font-size: 0.85em; max-width: 22em; } .scenes pre { white-space: pre-wrap; margin: 0; font-family: inherit; }
.confusions { display: flex; flex-wrap: wrap; gap: 1.5em; } .confusion td { min-width: 2.2em; text-align: right; }
table.sortable th { cursor: pointer; } table.sortable th:hover { background: #e8e8e8; }
pre.config { background: #f8f8f8; border: 1px solid #eee; padding: 0.8em; max-height: 40em; overflow: auto; }
"""

# Click a column header of a `sortable` table to sort by it (again: the other way round).
_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      var dir = th.dataset.dir === "asc" ? -1 : 1;
      th.dataset.dir = dir === 1 ? "asc" : "desc";
      rows.sort(function (a, b) {
        var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
        var nx = parseFloat(x), ny = parseFloat(y);
        if (!isNaN(nx) && !isNaN(ny)) { return dir * (nx - ny); }
        return dir * String(x).localeCompare(String(y));
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def _num(value: Any, digits: int = 3, css: str = "") -> str:
    cls = f"num {css}".strip()
    return f'<td class="{cls}">{escape(format_value(value, digits))}</td>'


def _img(uri: str | None, alt: str) -> str:
    return f'<img class="fig" src="{uri}" alt="{escape(alt)}">' if uri else ""


def _get(metrics: Mapping[str, Any], *path: str) -> Any:
    node: Any = metrics
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def _header(run: RunData, ceilings: Mapping[str, float]) -> str:
    name = (run.config.get("run") or {}).get("name") or run.run_dir.name
    cards = []
    for e in run.main_evaluations():
        cards.append((f"accuracy {e.label}", e.metrics["planning"]["accuracy"], f"n={e.metrics.get('n')}", ""))
    for key, value in ceilings.items():
        cards.append((key, value, "ceiling", "ceiling"))
    if run.summary:
        total = (run.summary.get("seconds") or {}).get("total")
        if total is not None:
            cards.append(
                ("total time", f"{total / 60:.1f} min", f"SFT {run.summary.get('sft_steps', 0)} / GRPO {run.summary.get('grpo_steps', 0)} steps", "")
            )
    body = "".join(
        f'<div class="card {css}"><div class="v">{escape(format_value(v, 3))}</div>'
        f'<div class="k">{escape(k)}</div><div class="k">{escape(note)}</div></div>'
        for k, v, note, css in cards
    )
    state = "" if run.summary else '<p class="note">No summary.json: the run has not finished (or stopped); this page shows what it wrote so far.</p>'
    return f'<h1>AlphaDrive run {escape(name)}</h1><p class="note">{escape(run.run_dir)}</p>{state}<div class="cards">{body}</div>'


def _curves(run: RunData, ceilings: Mapping[str, float]) -> str:
    sft, grpo = run.stage_rows("sft"), run.stage_rows("grpo")
    parts = ["<h2>Curves</h2>"]
    figures = [
        (draw_sft_loss(sft), "SFT loss", "no SFT steps were logged"),
        (draw_rewards(grpo), "GRPO rewards", "no GRPO steps were logged"),
        (draw_grpo_stats(grpo), "KL, clip fraction, dropped groups", None),
        (draw_accuracy(run, ceilings), "held-out accuracy", "no evaluation was written"),
    ]
    for uri, alt, missing in figures:
        if uri:
            parts.append(f"<h3>{escape(alt)}</h3>" + _img(uri, alt))
        elif missing:
            parts.append(f'<h3>{escape(alt)}</h3><p class="note">{escape(missing)}.</p>')
    if not ceilings:
        parts.append('<p class="note">No ceiling metric in this run\'s evaluations (keys containing "ceiling").</p>')
    return "\n".join(parts)


def _stage_table(run: RunData) -> str:
    evaluations = run.main_evaluations() or run.evaluations[-1:]
    if not evaluations:
        return '<h2>Stages side by side</h2><p class="note">No evaluation was written.</p>'
    ceiling_keys: list[str] = []
    ceilings = {e.tag: evaluation_ceilings(run, e) for e in evaluations}
    for found in ceilings.values():
        ceiling_keys += [k for k in found if k not in ceiling_keys]
    head = "<tr><th>metric</th>" + "".join(f"<th>{escape(e.label)}</th>" for e in evaluations) + "</tr>"
    rows: list[tuple[str, list[Any], str]] = [("planning accuracy", [e.metrics["planning"]["accuracy"] for e in evaluations], "")]
    for key in ceiling_keys:
        rows.append((key, [ceilings[e.tag].get(key) for e in evaluations], "ceiling"))
    for family, labels in CLASSES.items():
        rows.append((f"{family.upper()} accuracy", [_get(e.metrics, "planning", family, "accuracy") for e in evaluations], ""))
        rows.append((f"{family.upper()} macro F1", [_get(e.metrics, "planning", family, "macro_f1") for e in evaluations], ""))
        for label in labels:
            rows.append((f"F1 {family.upper()} {label}", [_get(e.metrics, "planning", family, label, "f1") for e in evaluations], ""))
    rows.append(("format ok", [_get(e.metrics, "parse", "format_ok_rate") for e in evaluations], ""))
    for key, name in (("bleu4", "BLEU-4"), ("cider", "CIDEr"), ("meteor", "METEOR")):
        rows.append((name, [_get(e.metrics, "reasoning", key) for e in evaluations], ""))
    rows.append(("mean sentence BLEU (nltk)", [mean_sentence_bleu(e) for e in evaluations], ""))
    rows.append(("samples", [e.metrics.get("n") for e in evaluations], ""))
    body = "".join(f'<tr class="{css}"><th>{escape(name)}</th>' + "".join(_num(v, css=css) for v in values) + "</tr>" for name, values, css in rows)
    note = (
        '<p class="note">Held-out split, greedy decoding. Reasoning scores are pycocoevalcap corpus values in [0, 1] (CIDEr up to 10); '
        "the mean sentence BLEU is nltk's smoothed sentence BLEU-4 averaged over the samples with a reference reasoning.</p>"
    )
    every = ""
    if len(run.evaluations) > len(evaluations):
        every = (
            "<h3>Every evaluation</h3><table><tr><th>evaluation</th><th>GRPO step</th><th>accuracy</th>"
            "<th>SPEED macro F1</th><th>PATH macro F1</th><th>BLEU-4</th></tr>"
        )
        every += "".join(
            f"<tr><td>{escape(e.label)}</td>{_num(e.step)}{_num(e.metrics['planning']['accuracy'])}"
            f"{_num(_get(e.metrics, 'planning', 'speed', 'macro_f1'))}{_num(_get(e.metrics, 'planning', 'path', 'macro_f1'))}"
            f"{_num(_get(e.metrics, 'reasoning', 'bleu4'))}</tr>"
            for e in run.evaluations
        )
        every += "</table>"
    return f"<h2>Stages side by side</h2><table>{head}{body}</table>{note}{every}{_confusions(evaluations)}"


def _confusions(evaluations: Sequence[Evaluation]) -> str:
    parts = ["<h3>Confusion matrices (rows: truth; columns: prediction; colour: share of the row)</h3>"]
    for family in CLASSES:
        blocks = []
        for e in evaluations:
            confusion = _get(e.metrics, "confusion", family)
            if not confusion:
                continue
            head = "<tr><th></th>" + "".join(f"<th>{escape(p)}</th>" for p in confusion["pred_labels"]) + "</tr>"
            body = ""
            for true, row in zip(confusion["true_labels"], confusion["matrix"]):
                total = sum(row) or 1
                cells = "".join(
                    f'<td style="background: rgba(68, 119, 170, {count / total:.2f}); '
                    f'color: {"#fff" if count / total > 0.6 else "#222"}">{count}</td>'
                    for count in row
                )
                body += f"<tr><th>{escape(true)}</th>{cells}</tr>"
            blocks.append(f'<div><b>{family.upper()}, {escape(e.label)}</b><table class="confusion">{head}{body}</table></div>')
        parts.append('<div class="confusions">' + "".join(blocks) + "</div>")
    return "".join(parts)


def _plan_text(row: Mapping[str, Any] | None) -> tuple[str, str | None]:
    """(reasoning, 'SPEED, PATH') read from a scored prediction row."""
    if not row:
        return "", None
    from alphadrive_ray.evaluation.metrics import MISS_LABEL, parse_output

    parsed = parse_output(row.get("output", ""))
    return parsed.reasoning or "", f"{parsed.speed or MISS_LABEL}, {parsed.path or MISS_LABEL}"


def _scene_ids(run: RunData, n: int = N_SCENES) -> list[str]:
    """Scenes to show: half where the final plan is wrong, half right, spread over the split."""
    from alphadrive_ray.evaluation.run import spread

    final = next((e for e in reversed(run.evaluations) if e.predictions), None)
    ids = [r.id for r in run.records] or (list(final.predictions) if final else [])
    if final is None:
        return spread(ids, n)
    wrong = [i for i in ids if final.predictions.get(i, {}).get("correct") is False]
    right = [i for i in ids if final.predictions.get(i, {}).get("correct") is True]
    n_wrong = min(len(wrong), max(n - len(right), n // 2))
    chosen = spread(wrong, n_wrong) + spread(right, min(len(right), n - n_wrong))
    return chosen or spread(ids, n)


def _scenes(run: RunData) -> str:
    from alphadrive_ray.evaluation.report import thumbnail_data_uri

    stages = [e for e in run.main_evaluations() if e.predictions] or [e for e in run.evaluations if e.predictions][-1:]
    ids = _scene_ids(run)
    if not ids:
        return ""
    records = {r.id: r for r in run.records}
    head = "<tr><th>scene</th><th>reference</th>" + "".join(f"<th>{escape(e.label)}</th>" for e in stages) + "</tr>"
    rows = []
    for sid in ids:
        record = records.get(sid)
        if record is not None:
            uri = thumbnail_data_uri(record.image)
            image = f'<img src="{uri}" alt="{escape(sid)}">' if uri else '<span class="note">(image not readable)</span>'
            scene = f"<b>{escape(sid)}</b><br>{image}<br>speed {record.speed:g} m/s, navigation: {escape(record.navigation)}"
            truth = f"{record.speed_action}, {record.path_action}"
            reference = f"<b>{escape(truth)}</b><pre>{escape(record.reasoning or '–')}</pre>"
        else:
            scene, truth, reference = f"<b>{escape(sid)}</b>", None, '<span class="note">(record not available)</span>'
        cells = []
        for e in stages:
            row = e.predictions.get(sid)
            reasoning, plan = _plan_text(row)
            if plan is None:
                cells.append('<td><span class="note">(no prediction)</span></td>')
                continue
            assert row is not None  # _plan_text gives a plan only for a row
            css = "" if row.get("correct") is None else ("ok" if row["correct"] else "bad")
            score = row.get("sentence_bleu")
            score_text = f'<div class="note">sentence BLEU {score:.3f}</div>' if isinstance(score, (int, float)) else ""
            cells.append(f'<td><span class="{css}">{escape(plan)}</span>{score_text}<pre>{escape(reasoning or "(no <think>)")}</pre></td>')
        rows.append(f"<tr><td>{scene}</td><td>{reference}</td>{''.join(cells)}</tr>")
    note = f'<p class="note">{escape(run.records_note)}</p>' if run.records_note else ""
    return (
        f"<h2>Sample scenes ({len(ids)})</h2>{note}"
        '<p class="note">Wrong final plans first, then right ones. Green: the plan equals the reference; red: it does not.</p>'
        f'<table class="scenes">{head}{"".join(rows)}</table>'
    )


def _scene_table(run: RunData) -> str:
    stages = [e for e in run.main_evaluations() if e.predictions]
    if not stages:
        return ""
    final = stages[-1]
    records = {r.id: r for r in run.records}
    ids = [r.id for r in run.records if r.id in final.predictions] or list(final.predictions)
    shown = ids[:MAX_TABLE_ROWS]
    head = (
        "<tr><th>scene</th><th>truth</th>"
        + "".join(f"<th>{escape(e.label)} plan</th><th>{escape(e.label)} sentence BLEU</th>" for e in stages)
        + "</tr>"
    )
    body = []
    for sid in shown:
        record = records.get(sid)
        truth = f"{record.speed_action}, {record.path_action}" if record else "–"
        cells = [f'<td data-v="{escape(sid)}">{escape(sid)}</td>', f'<td data-v="{escape(truth)}">{escape(truth)}</td>']
        for e in stages:
            row = e.predictions.get(sid) or {}
            _, plan = _plan_text(row) if row else ("", None)
            css = "" if row.get("correct") is None else ("ok" if row["correct"] else "bad")
            score = row.get("sentence_bleu")
            cells.append(f'<td data-v="{escape(plan or "")}" class="{css}">{escape(plan or "–")}</td>')
            cells.append(f'<td class="num" data-v="{score if isinstance(score, (int, float)) else -1}">{escape(format_value(score, 3))}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    more = f" (the first {len(shown)} of {len(ids)})" if len(ids) > len(shown) else ""
    return (
        f"<h2>Every held-out scene{more}</h2>"
        '<p class="note">Click a column header to sort, e.g. by sentence BLEU to find the scenes whose reasoning is furthest from the reference.</p>'
        f'<table class="sortable"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>'
    )


def _timings(run: RunData) -> str:
    parts = ["<h2>Timings</h2>"]
    if run.summary:
        seconds = run.summary.get("seconds") or {}
        parts.append(
            "<table><tr><th>part</th><th>seconds</th></tr>"
            + "".join(f"<tr><td>{escape(k)}</td>{_num(v, 1)}</tr>" for k, v in seconds.items())
            + "</table>"
        )
        memory = run.summary.get("peak_memory_mb") or {}
        gpu = run.summary.get("peak_gpu_mb") or {}
        if memory:
            header = "<tr><th>role</th><th>peak resident memory (MB, largest process)</th>"
            if gpu:  # roles that used a GPU (GPU runs only)
                header += "<th>peak GPU memory (MB, torch's allocator, largest process)</th>"
            memory_rows = []
            for role, rss in memory.items():
                cells = _num(rss, 0) + ((_num(gpu[role], 0) if role in gpu else "<td></td>") if gpu else "")
                memory_rows.append(f"<tr><td>{escape(role)}</td>{cells}</tr>")
            parts.append(f"<table>{header}</tr>{''.join(memory_rows)}</table>")
    per_step = []
    for stage in ("sft", "grpo"):
        rows = run.stage_rows(stage)
        keys = [
            k
            for k in ("perf/step_s", "perf/rollout_s", "perf/reward_s", "perf/learner_s", "perf/sync_s", "perf/samples_per_s")
            if any(k in r for r in rows)
        ]
        for key in keys:
            values = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            per_step.append((stage, key, sum(values) / len(values), max(values)))
    if per_step:
        parts.append(
            "<h3>Per step</h3><table><tr><th>stage</th><th>metric</th><th>mean</th><th>max</th></tr>"
            + "".join(f"<tr><td>{s}</td><td>{escape(k)}</td>{_num(m)}{_num(x)}</tr>" for s, k, m, x in per_step)
            + "</table>"
        )
    evals = [(e.label, (e.metrics.get("timing_s") or {}).get("total")) for e in run.evaluations]
    if any(t is not None for _, t in evals):
        parts.append(
            "<h3>Evaluations (scoring and report, seconds)</h3><table><tr><th>evaluation</th><th>seconds</th></tr>"
            + "".join(f"<tr><td>{escape(label)}</td>{_num(t, 1)}</tr>" for label, t in evals)
            + "</table>"
        )
    if len(parts) == 1:
        parts.append('<p class="note">No timings were written yet.</p>')
    return "".join(parts)


def render_run_report(run: RunData) -> str:
    """The page as one HTML string."""
    ceilings = run_ceilings(run)
    name = (run.config.get("run") or {}).get("name") or run.run_dir.name
    sections = [
        _header(run, ceilings),
        _curves(run, ceilings),
        _stage_table(run),
        _scenes(run),
        _scene_table(run),
        _timings(run),
        "<h2>Resolved config</h2>"
        + (f'<pre class="config">{escape(run.config_text)}</pre>' if run.config_text else '<p class="note">No config.yaml.</p>'),
    ]
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>AlphaDrive run {escape(name)}</title>'
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(s for s in sections if s) + f"\n<script>{_SCRIPT}</script>\n</body></html>\n"
    )


def write_run_report(run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Write the page (default `run_dir/run_report.html`, atomically); returns its path."""
    run = load_run(run_dir)
    path = Path(out) if out is not None else Path(run_dir) / REPORT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    page = render_run_report(run)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------
