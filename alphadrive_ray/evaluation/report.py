"""The evaluation report: `report.html` plus PNG figures, readable at a glance.

`write_report(out_dir, metrics, samples, extra=None)` is reusable: the eval command and the
training driver's periodic evaluations call it with the metrics dict of `evaluate` (the
metrics.json layout), a few sample rows, and optionally `extra`, shown first (for example a
table of accuracies of the untrained, SFT and SFT+RL models).

A sample row is a mapping with the keys
    id, image (path or None), output (raw model text), reasoning (predicted <think> text or
    None), reference_reasoning (or None), pred_speed, pred_path (None = miss), true_speed,
    true_path, and optionally scores ({"bleu4": ..., "cider": ..., "meteor": ...}).

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no global
backend switch), so reports can be written from any thread or process without a display.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from alphadrive_ray.evaluation.metrics import FAMILIES, MISS_LABEL

FIGURES: dict[str, str] = {
    "f1": "f1_per_class.png",
    "confusion_speed": "confusion_speed.png",
    "confusion_path": "confusion_path.png",
    "format": "format_rate.png",
}
THUMBNAIL_SIZE = 192  # pixels, longest side


def write_report(
    out_dir: str | os.PathLike[str],
    metrics: Mapping[str, Any],
    samples: Sequence[Mapping[str, Any]],
    extra: Mapping[str, Any] | None = None,
    *,
    title: str = "AlphaDrive evaluation",
    figures_drawn: bool = False,
) -> Path:
    """Write `out_dir/report.html` and the PNGs of `FIGURES` (unless `figures_drawn`: an earlier
    `draw_figures` of the same metrics wrote them); returns the report's path."""
    out = Path(out_dir)
    if not figures_drawn:
        draw_figures(metrics, out)
    page = render_html(metrics, samples, extra, title=title)
    path = out / "report.html"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------


def draw_figures(metrics: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> None:
    """The PNGs of `FIGURES` into `out_dir`. They need only the planning sections of `metrics`
    (planning, confusion, parse), so `evaluate` draws them while the reasoning is tokenised."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    draw_f1_bars(metrics, out / FIGURES["f1"])
    for family in FAMILIES:
        draw_confusion(metrics, family, out / FIGURES[f"confusion_{family}"])
    draw_parse_rates(metrics, out / FIGURES["format"])


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def draw_f1_bars(metrics: Mapping[str, Any], path: Path) -> None:
    """Per-class F1 for SPEED and PATH, with support and the macro F1 of each family."""
    fig = _figure(10, 3.6)
    axes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [4, 5]})
    for ax, (family, labels) in zip(axes, FAMILIES.items()):
        block = metrics["planning"][family]
        f1s = [block[label]["f1"] for label in labels]
        bars = ax.bar(range(len(labels)), f1s, color="#4477aa")
        for bar, label in zip(bars, labels):
            ax.annotate(
                f"{block[label]['f1']:.2f}\nn={block[label]['support']}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.axhline(
            block["macro_f1"],
            color="#cc6677",
            linestyle="--",
            linewidth=1,
            label=f"macro F1 {block['macro_f1']:.3f}",
        )
        ax.set_xticks(range(len(labels)), [label.replace("_", "\n") for label in labels], fontsize=8)
        ax.set_ylim(0, 1.18)
        ax.set_ylabel("F1")
        ax.set_title(f"{family.upper()}: per-class F1 (accuracy {block['accuracy']:.3f})", fontsize=10)
        ax.legend(loc="upper right", fontsize=8)
    fig.savefig(path)


def draw_confusion(metrics: Mapping[str, Any], family: str, path: Path) -> None:
    """Confusion matrix of one family: colour = share of the true class, text = count."""
    confusion = metrics["confusion"][family]
    true_labels, pred_labels, matrix = confusion["true_labels"], confusion["pred_labels"], confusion["matrix"]
    shares = [[count / sum(row) if sum(row) else 0.0 for count in row] for row in matrix]
    fig = _figure(1.3 + 1.0 * len(pred_labels), 1.2 + 0.7 * len(true_labels))
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(
                j,
                i,
                str(count),
                ha="center",
                va="center",
                fontsize=9,
                color="white" if shares[i][j] > 0.6 else "black",
            )
    ax.set_xticks(range(len(pred_labels)), [label.replace("_", "\n") for label in pred_labels], fontsize=8)
    ax.set_yticks(range(len(true_labels)), true_labels, fontsize=8)
    ax.set_xlabel(f"predicted ({MISS_LABEL} = no {family.upper()} word in the answer)")
    ax.set_ylabel("true")
    ax.set_title(f"{family.upper()} confusion (row share)", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.savefig(path)


def draw_parse_rates(metrics: Mapping[str, Any], path: Path) -> None:
    """How often the outputs are well formed and contain each part."""
    parse = metrics["parse"]
    rows = [
        ("format ok", parse["format_ok_rate"]),
        ("SPEED found", parse["speed_found_rate"]),
        ("PATH found", parse["path_found_rate"]),
        ("<think> found", parse["reasoning_found_rate"]),
    ]
    fig = _figure(6, 2.4)
    ax = fig.subplots()
    bars = ax.barh(range(len(rows)), [value for _, value in rows], color="#228833")
    for bar, (_, value) in zip(bars, rows):
        inside = value > 0.85  # label inside the bar, in white, when there is no room after it
        ax.text(
            value - 0.01 if inside else value + 0.01,
            bar.get_y() + bar.get_height() / 2,
            f"{value:.1%}",
            va="center",
            ha="right" if inside else "left",
            fontsize=9,
            color="white" if inside else "black",
        )
    ax.set_yticks(range(len(rows)), [name for name, _ in rows], fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_title("output format", fontsize=10)
    fig.savefig(path)


def thumbnail_data_uri(image_path: str | os.PathLike[str] | None, size: int = THUMBNAIL_SIZE) -> str | None:
    """A small PNG of the image as a `data:` URI, or None when it cannot be read."""
    if not image_path:
        return None
    from PIL import Image

    try:
        with Image.open(image_path) as img:
            img.draft("RGB", (size, size))  # JPEG: decode at reduced size
            thumb = img.convert("RGB")
            thumb.thumbnail((size, size))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    buffer = io.BytesIO()
    thumb.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# --------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1300px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.cards { display: flex; flex-wrap: wrap; gap: 0.8em; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 0.5em 0.9em; min-width: 8em; }
.card .v { font-size: 1.5em; font-weight: 600; } .card .k { color: #666; font-size: 0.85em; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { border: 1px solid #ddd; padding: 0.25em 0.5em; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: #1a7f37; font-weight: 600; } .bad { color: #c62828; font-weight: 600; }
.samples td { vertical-align: top; font-size: 0.9em; } .samples pre { white-space: pre-wrap; max-width: 40em; margin: 0; }
.note { color: #666; font-size: 0.9em; } img.fig { max-width: 100%; border: 1px solid #eee; margin: 0.3em 0; }
"""


def escape(value: Any) -> str:
    """`value` as HTML text (quotes escaped: safe inside attributes too)."""
    return html.escape(str(value), quote=True)


def format_value(value: Any, digits: int = 4) -> str:
    """A metric as a table shows it: – for missing, yes/no, floats to `digits` places."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _cell(value: Any) -> str:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f'<td class="num">{escape(format_value(value))}</td>' if numeric else f"<td>{escape(format_value(value))}</td>"


def render_extra(extra: Mapping[str, Any]) -> str:
    """Each entry of `extra` as a section: a table of rows (mapping of mappings or list of
    mappings), a two-column table (mapping of scalars) or a line (anything else)."""
    parts = []
    for name, value in extra.items():
        rows: list[tuple[str, Mapping[str, Any]]] | None = None
        if isinstance(value, Mapping) and value and all(isinstance(v, Mapping) for v in value.values()):
            rows = [(str(k), v) for k, v in value.items()]
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) for v in value):
            rows = [("", v) for v in value]
        if rows is not None:
            columns: list[str] = []
            for _, row in rows:
                columns.extend(str(c) for c in row if str(c) not in columns)
            head = ("<th></th>" if any(key for key, _ in rows) else "") + "".join(f"<th>{escape(c)}</th>" for c in columns)
            body = "".join(
                "<tr>"
                + (f"<th>{escape(key)}</th>" if any(k for k, _ in rows) else "")
                + "".join(_cell({str(k): v for k, v in row.items()}.get(c)) for c in columns)
                + "</tr>"
                for key, row in rows
            )
            parts.append(f"<h3>{escape(name)}</h3><table><tr>{head}</tr>{body}</table>")
        elif isinstance(value, Mapping):
            body = "".join(f"<tr><th>{escape(k)}</th>{_cell(v)}</tr>" for k, v in value.items())
            parts.append(f"<h3>{escape(name)}</h3><table>{body}</table>")
        else:
            parts.append(f"<p><b>{escape(name)}:</b> {escape(format_value(value))}</p>")
    return "\n".join(parts)


def _cards(metrics: Mapping[str, Any]) -> str:
    planning, parse, reasoning = metrics["planning"], metrics["parse"], metrics.get("reasoning") or {}
    cards = [
        ("planning accuracy", planning["accuracy"], "SPEED and PATH both right"),
        *([("ceiling", planning["ceiling"], "accuracy of always answering the most likely plan")] if "ceiling" in planning else []),
        ("SPEED macro F1", planning["speed"]["macro_f1"], f"accuracy {planning['speed']['accuracy']:.3f}"),
        ("PATH macro F1", planning["path"]["macro_f1"], f"accuracy {planning['path']['accuracy']:.3f}"),
        ("format ok", parse["format_ok_rate"], "<think>…</think><answer>…</answer>"),
    ]
    if reasoning.get("computed"):
        cards += [
            ("BLEU-4", reasoning["bleu4"], f"n={reasoning['n']}"),
            ("CIDEr", reasoning["cider"], f"n={reasoning['n']}"),
            ("METEOR", reasoning["meteor"], f"n={reasoning['n']}"),
        ]
    return (
        '<div class="cards">'
        + "".join(
            f'<div class="card"><div class="v">{escape(format_value(v))}</div>'
            f'<div class="k">{escape(k)}</div><div class="k">{escape(note)}</div></div>'
            for k, v, note in cards
        )
        + "</div>"
    )


def _class_table(metrics: Mapping[str, Any]) -> str:
    rows = []
    for family, labels in FAMILIES.items():
        block = metrics["planning"][family]
        for label in labels:
            m = block[label]
            rows.append(
                f"<tr><td>{family.upper()}</td><td>{escape(label)}</td>{_cell(m['precision'])}{_cell(m['recall'])}"
                f"{_cell(m['f1'])}{_cell(m['support'])}</tr>"
            )
        rows.append(
            f"<tr><td>{family.upper()}</td><td><i>macro F1 / miss rate</i></td><td></td><td></td>"
            f'{_cell(block["macro_f1"])}<td class="num">{block["miss_rate"]:.1%} missed</td></tr>'
        )
    return "<table><tr><th>family</th><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>" + "".join(rows) + "</table>"


def _verdict(pred: Any, true: Any) -> str:
    shown = MISS_LABEL if pred is None else pred
    css = "ok" if pred == true else "bad"
    return f'<span class="{css}">{escape(shown)}</span> / {escape(true)}'


def _sample_rows(samples: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for sample in samples:
        uri = thumbnail_data_uri(sample.get("image"))
        image = f'<img src="{uri}" alt="{escape(sample.get("id"))}">' if uri else '<span class="note">(image not readable)</span>'
        scores = sample.get("scores") or {}
        score_text = " · ".join(f"{k} {v:.3f}" for k, v in scores.items() if isinstance(v, (int, float)))
        reasoning = sample.get("reasoning")
        reference = sample.get("reference_reasoning")
        predicted = escape(reasoning) if reasoning is not None else '<span class="note">(no &lt;think&gt;)</span>'
        if score_text:
            predicted += f'</pre><div class="note">{escape(score_text)}</div><pre>'
        cells = [
            f"{escape(sample.get('id'))}<br>{image}",
            (
                f"SPEED {_verdict(sample.get('pred_speed'), sample.get('true_speed'))}<br>"
                f"PATH {_verdict(sample.get('pred_path'), sample.get('true_path'))}"
            ),
            f"<pre>{predicted}</pre>",
            f"<pre>{escape(reference) if reference else '–'}</pre>",
            f"<pre>{escape(_shorten(str(sample.get('output', ''))))}</pre>",
        ]
        rows.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    return (
        '<table class="samples"><tr><th>id / image</th><th>prediction / truth</th><th>predicted reasoning</th>'
        "<th>reference reasoning</th><th>raw output</th></tr>" + "".join(rows) + "</table>"
    )


def _shorten(text: str, limit: int = 1200) -> str:
    return text if len(text) <= limit else text[:limit] + f" … [{len(text) - limit} more characters]"


def render_html(
    metrics: Mapping[str, Any],
    samples: Sequence[Mapping[str, Any]],
    extra: Mapping[str, Any] | None = None,
    *,
    title: str = "AlphaDrive evaluation",
) -> str:
    """The report page; figures are referenced by their `FIGURES` file names."""
    ids = metrics.get("ids") or {}
    reasoning = metrics.get("reasoning") or {}
    skipped = ""
    if ids.get("missing") or ids.get("extra"):
        skipped = (
            f" <b>Skipped</b> (--skip-missing): {ids.get('missing', 0)} reference id(s) without prediction, "
            f"{ids.get('extra', 0)} prediction id(s) not in the references."
        )
    if reasoning.get("computed"):
        reasoning_note = (
            f"Reasoning metrics over the {reasoning['n']} samples with a reference reasoning "
            f"({reasoning.get('no_think', 0)} of them without a &lt;think&gt; block, scored as empty); "
            "pycocoevalcap values in [0, 1] (CIDEr up to 10); the paper's tables show them x 100."
        )
    else:
        reasoning_note = f"Reasoning metrics not computed: {escape(reasoning.get('note', 'disabled'))}."
    sections = [
        f"<h1>{escape(title)}</h1>",
        (
            f'<p class="note">{escape(metrics.get("n", 0))} samples evaluated.{skipped} '
            "A plan is the first SPEED word and the first PATH word inside &lt;answer&gt;; "
            f"an answer without one is a miss ({MISS_LABEL}), wrong but not a class.</p>"
        ),
    ]
    if extra:
        sections.append("<h2>Summary</h2>" + render_extra(extra))
    sections += [
        "<h2>Overview</h2>" + _cards(metrics) + f'<p class="note">{reasoning_note}</p>',
        "<h2>Per-class F1</h2>" + f'<img class="fig" src="{FIGURES["f1"]}" alt="per-class F1">' + _class_table(metrics),
        "<h2>Confusion matrices</h2>"
        + "".join(f'<img class="fig" src="{FIGURES[f"confusion_{family}"]}" alt="{family} confusion"> ' for family in FAMILIES),
        "<h2>Output format</h2>" + f'<img class="fig" src="{FIGURES["format"]}" alt="format rate">',
        f"<h2>Sample outputs ({len(samples)})</h2>"
        '<p class="note">Wrong plans first, then right ones. Prediction / truth: green = right, red = wrong.</p>' + _sample_rows(samples),
    ]
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n"
    )
