"""`evaluate`: planning and reasoning metrics of one set of predictions, metrics.json and the report.

Called by `alphadrive-ray eval` and by the training driver for periodic and final evaluation:

    from alphadrive_ray.evaluation import evaluate
    metrics = evaluate({"scene-1": "<think> … </think><answer> KEEP, STRAIGHT </answer>"},
                       records, "runs/x/eval/step-100")
    metrics["planning"]["accuracy"]
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar, cast

from alphadrive_ray.data.records import Record
from alphadrive_ray.evaluation.metrics import ParsedOutput, compute_planning_metrics, parse_output
from alphadrive_ray.evaluation.predictions import align, format_ids

DEFAULT_SAMPLES = 24
REASONING_STAGES = ("tokenize", "bleu", "cider", "nltk_bleu", "meteor")  # in the order they end
PER_SAMPLE_SCORES = ("bleu4", "cider", "meteor", "sentence_bleu")
SCORED_PREDICTIONS = "predictions.jsonl"


def evaluate(
    predictions: Mapping[str, str],
    references: Sequence[Record],
    out_dir: str | os.PathLike[str],
    *,
    reasoning_metrics: bool = True,
    progress: bool = True,
    skip_missing: bool = False,
    extra: Mapping[str, Any] | None = None,
    n_samples: int = DEFAULT_SAMPLES,
    predictions_name: str = "predictions",
    references_name: str = "references",
    prediction_lines: Mapping[str, int] | None = None,
    title: str = "AlphaDrive evaluation",
) -> dict[str, Any]:
    """Score raw outputs (id -> model text) against the references; write metrics.json and report.html.

    Returns the metrics dict written to `out_dir/metrics.json`:
      n                     samples evaluated
      planning.accuracy     SPEED and PATH both right
      planning.ceiling      (records with `most_likely`/`label_distribution` only) the accuracy of
                            always answering each sample's most likely pair; ceiling_expected,
                            bayes_agreement (see metrics.compute_ceiling)
      planning.<family>     per class {precision, recall, f1, support}; accuracy, macro_f1
                            (over the classes present in truth or predictions),
                            macro_f1_labels, miss_rate  (family: speed, path)
      parse                 format_ok_rate, speed_found_rate, path_found_rate, reasoning_found_rate
      reasoning             computed, n (samples with a reference reasoning), bleu4, cider,
                            meteor (None when not computed), no_think, note, bleu4_nltk
                            (nltk's corpus BLEU-4), bleu4_check (nltk's and pycocoevalcap's
                            corpus BLEU-4 where defined alike: n, nltk, pycocoevalcap,
                            abs_diff, agree; see nltk_bleu)
      ids                   n_predictions, n_references, evaluated, missing, extra
      confusion.<family>    true_labels, pred_labels (last: "(none)" = miss), matrix (counts)
      timing_s              seconds per stage
    `out_dir/predictions.jsonl` gets every prediction with its plan and per-sample scores
    (`write_scored_predictions`). Ids are `Record.id` strings and must match unless `skip_missing` (then the mismatches are
    counted under `ids`); a mismatch is a UserError naming the ids. `extra` is shown at the top
    of the report (see `report.render_extra`).
    """
    not_text = [pid for pid, output in predictions.items() if not isinstance(output, str)]
    if not_text:
        raise TypeError(f"outputs must be strings (the raw model text); not for id(s) {format_ids(not_text)}")
    started = time.perf_counter()
    timing: dict[str, float] = {}
    stages = [
        "parse",
        "planning",
        *(list(REASONING_STAGES) if reasoning_metrics else []),
        "report",
    ]
    bar = _progress_bar(len(stages), progress)
    last = [started]

    def stage(name: str) -> None:
        now = time.perf_counter()
        timing[name] = round(now - last[0], 3)
        last[0] = now
        bar.set_postfix_str(name)
        bar.update(1)

    try:
        alignment = align(
            predictions,
            references,
            skip_missing=skip_missing,
            predictions_name=predictions_name,
            references_name=references_name,
            prediction_lines=prediction_lines,
        )
        parsed = [parse_output(text) for text in alignment.outputs]
        stage("parse")
        metrics: dict[str, Any] = {"n": len(parsed)}
        planning = compute_planning_metrics(parsed, [r.speed_action for r in alignment.records], [r.path_action for r in alignment.records])
        metrics["planning"] = planning["planning"]
        ceiling = ceiling_of(alignment.records, parsed)
        if ceiling is not None:
            metrics["planning"].update({k: ceiling[k] for k in ("ceiling", "ceiling_expected", "bayes_agreement")})
        metrics["parse"] = planning["parse"]
        stage("planning")
        out = Path(out_dir)
        drawn: list[bool] = []

        def figures_while_tokenizing() -> None:  # the planning figures, while the JVM tokenises the reasoning
            from alphadrive_ray.evaluation.report import draw_figures

            draw_figures({**metrics, "confusion": planning["confusion"]}, out)
            drawn.append(True)

        metrics["reasoning"], per_sample = compute_reasoning_metrics(
            parsed, alignment.records, enabled=reasoning_metrics, on_stage=stage, while_tokenizing=figures_while_tokenizing
        )
        metrics["ids"] = alignment.summary(len(predictions), len(references))
        metrics["confusion"] = planning["confusion"]

        out.mkdir(parents=True, exist_ok=True)
        samples = build_samples(alignment.records, alignment.outputs, parsed, per_sample, n_samples)
        write_json(out / "metrics.json", metrics)  # first, so that a failing report loses nothing
        write_scored_predictions(out / SCORED_PREDICTIONS, predictions, alignment.records, parsed, per_sample)
        from alphadrive_ray.evaluation.report import write_report

        write_report(out, metrics, samples, extra, title=title, figures_drawn=bool(drawn))
        stage("report")
        timing["total"] = round(time.perf_counter() - started, 3)
        metrics["timing_s"] = timing
        write_json(out / "metrics.json", metrics)
    finally:
        bar.close()
    return metrics


def ceiling_of(records: Sequence[Record], parsed: Sequence[ParsedOutput]) -> dict[str, Any] | None:
    """`metrics.compute_ceiling` of records that carry their most likely pair and label
    distribution (`most_likely`, `label_distribution`: the synthetic generator writes them);
    None when any record lacks them (real data: the label distribution is unknown)."""
    from alphadrive_ray.data.synth import pair_key
    from alphadrive_ray.evaluation.metrics import compute_ceiling

    modes, probs = [], []
    for record in records:
        mode, dist = record.extra.get("most_likely"), record.extra.get("label_distribution")
        if not (isinstance(mode, (list, tuple)) and len(mode) == 2 and isinstance(dist, dict)):
            return None
        modes.append((str(mode[0]), str(mode[1])))
        probs.append(float(dist.get(pair_key(*modes[-1]), 0.0)))
    if not records:
        return None
    truth = [(r.speed_action, r.path_action) for r in records]
    return compute_ceiling(truth, modes, probs, [(p.speed, p.path) for p in parsed])


def compute_reasoning_metrics(
    parsed: Sequence[ParsedOutput],
    records: Sequence[Record],
    *,
    enabled: bool = True,
    on_stage: Callable[[str], None] | None = None,
    while_tokenizing: Callable[[], None] | None = None,
) -> tuple[dict[str, Any], dict[int, dict[str, float]]]:
    """The `reasoning` section and per-sample scores (by sample index) for the report.

    Pairs are (predicted <think> text, reference reasoning) over the samples whose reference
    has a non-blank reasoning; an output without a <think> block is scored as an empty text.
    `while_tokenizing` runs in this thread while the PTB tokenizer's JVM works (only when
    there is something to score; see `compute_caption_metrics`).
    """
    with_reference = [i for i, record in enumerate(records) if record.reasoning and record.reasoning.strip()]
    no_think = sum(1 for i in with_reference if parsed[i].reasoning is None)
    section: dict[str, Any] = {
        "computed": False,
        "n": len(with_reference),
        "bleu4": None,
        "cider": None,
        "meteor": None,
        "bleu4_nltk": None,
        "bleu4_check": None,
        "no_think": no_think,
        "note": "",
    }
    if not enabled:
        section["note"] = "disabled (--no-reasoning-metrics)"
        return section, {}
    if not with_reference:
        section["note"] = "no reference has a reasoning"
        for name in REASONING_STAGES:
            if on_stage:
                on_stage(name)
        return section, {}
    from alphadrive_ray.evaluation.captions import compute_caption_metrics

    scores = compute_caption_metrics(
        [parsed[i].reasoning or "" for i in with_reference],
        [[cast(str, records[i].reasoning)] for i in with_reference],  # with_reference: those with a reasoning
        on_stage=on_stage,
        while_tokenizing=while_tokenizing,
    )
    section.update(computed=True, bleu4=scores["bleu4"], cider=scores["cider"], meteor=scores["meteor"])
    if scores["failures"]:  # the other scores are kept; say which one failed and why, in one line
        names = {"bleu4": "BLEU-4", "cider": "CIDEr", "meteor": "METEOR", "bleu4_nltk": "nltk's BLEU"}
        section["note"] = "; ".join(f"{names[k]} failed: {why}" for k, why in scores["failures"].items())
    section["bleu4_nltk"], section["bleu4_check"] = scores["bleu4_nltk"], scores["bleu4_check"]
    per_sample = {i: {name: scores["per_sample"][name][k] for name in PER_SAMPLE_SCORES} for k, i in enumerate(with_reference)}
    return section, per_sample


def build_samples(
    records: Sequence[Record],
    outputs: Sequence[str],
    parsed: Sequence[ParsedOutput],
    per_sample: Mapping[int, Mapping[str, float]],
    n: int = DEFAULT_SAMPLES,
) -> list[dict[str, Any]]:
    """Rows for the report's sample table: up to n/2 wrong plans, then right ones (more wrong
    ones if there are too few right), each group spread evenly over the evaluation set."""
    wrong = [i for i, (r, p) in enumerate(zip(records, parsed)) if (p.speed, p.path) != (r.speed_action, r.path_action)]
    right = [i for i, (r, p) in enumerate(zip(records, parsed)) if (p.speed, p.path) == (r.speed_action, r.path_action)]
    n_wrong = min(len(wrong), max(n - len(right), n // 2 + n % 2))
    chosen = spread(wrong, n_wrong) + spread(right, min(len(right), n - n_wrong))
    return [
        {
            "id": records[i].id,
            "image": records[i].image,
            "output": outputs[i],
            "reasoning": parsed[i].reasoning,
            "reference_reasoning": records[i].reasoning,
            "pred_speed": parsed[i].speed,
            "pred_path": parsed[i].path,
            "true_speed": records[i].speed_action,
            "true_path": records[i].path_action,
            "scores": dict(per_sample.get(i, {})),
        }
        for i in chosen
    ]


def write_scored_predictions(
    path: Path,
    predictions: Mapping[str, str],
    records: Sequence[Record],
    parsed: Sequence[ParsedOutput],
    per_sample: Mapping[int, Mapping[str, float]],
) -> None:
    """The predictions with what evaluation read from them, one JSON object per line.

    Evaluated ids first, in reference order: `{"id", "output", "speed", "path" (None = miss),
    "correct", "sentence_bleu", "bleu4", "cider", "meteor"}` (the scores when the reference has a
    reasoning and reasoning metrics ran); then the other predictions as they were (`--skip-missing`).
    Still a predictions file (`load_predictions` ignores the other keys), so when it replaces the
    input file nothing is lost; sort scenes by reasoning quality with e.g.
    `jq -s 'sort_by(.sentence_bleu)' predictions.jsonl`.
    """
    evaluated = set()
    lines = []
    for i, (record, p) in enumerate(zip(records, parsed)):
        evaluated.add(record.id)
        row: dict[str, Any] = {"id": record.id, "output": predictions[record.id], "speed": p.speed, "path": p.path}
        row["correct"] = (p.speed, p.path) == (record.speed_action, record.path_action)
        row.update(per_sample.get(i, {}))
        lines.append(json.dumps(row, ensure_ascii=False))
    lines += [json.dumps({"id": pid, "output": text}, ensure_ascii=False) for pid, text in predictions.items() if pid not in evaluated]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)


T = TypeVar("T")


def spread(items: Sequence[T], k: int) -> list[T]:
    """k items evenly spaced over `items` (first and last included), in order."""
    if k <= 0 or not items:
        return []
    if k >= len(items):
        return list(items)
    if k == 1:
        return [items[0]]
    return [items[round(j * (len(items) - 1) / (k - 1))] for j in range(k)]


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="eval", unit="stage", disable=not enabled, file=sys.stderr, leave=False)
