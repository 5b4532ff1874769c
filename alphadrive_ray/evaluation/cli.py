"""`alphadrive-ray eval`: score a predictions file against a dataset.

    alphadrive-ray eval --predictions runs/x/predictions.jsonl --references data/val.jsonl --out runs/x/eval

Writes DIR/metrics.json, DIR/report.html and its PNGs, and prints a short summary.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Mapping

from alphadrive_ray.actions import PATH_ACTIONS, SPEED_ACTIONS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="score model outputs: planning F1/accuracy, BLEU-4/CIDEr/METEOR, HTML report",
        description=(
            "Score raw model outputs against a dataset. Predictions are JSONL lines "
            '{"id": ..., "output": "<raw model text>"} with exactly the ids of the references. '
            "Writes DIR/metrics.json, DIR/predictions.jsonl (the predictions with their plans and "
            "per-sample scores, nltk's sentence BLEU among them) and DIR/report.html (with PNG figures)."
        ),
    )
    parser.add_argument(
        "--predictions",
        required=True,
        type=Path,
        metavar="P.jsonl",
        help="model outputs, one JSON object per line",
    )
    parser.add_argument(
        "--references",
        required=True,
        type=Path,
        metavar="R.jsonl",
        help="the dataset the outputs answer (.jsonl, .json, .parquet, a save_to_disk folder or hub:ORG/NAME)",
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for metrics.json and report.html")
    parser.add_argument(
        "--skip-missing",
        action="store_true",
        help="evaluate only the ids present in both files; the missing and extra ids are counted, not an error",
    )
    parser.add_argument(
        "--no-reasoning-metrics",
        action="store_true",
        help="skip BLEU-4 / CIDEr / METEOR (they need Java and take ~15 s for 10k samples)",
    )
    parser.add_argument("--samples", type=int, default=24, metavar="N", help="sample outputs shown in the report (default 24)")
    parser.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from alphadrive_ray.evaluation.captions import prestarted_meteor

    # METEOR's JVM loads its tables (seconds, one core) while the files are read and parsed
    with prestarted_meteor(enabled=not args.no_reasoning_metrics):
        from alphadrive_ray.data.records import load_records
        from alphadrive_ray.evaluation.predictions import load_predictions
        from alphadrive_ray.evaluation.run import evaluate

        # Images are not needed to score text outputs; a missing one only loses its thumbnail.
        references = load_records(args.references, check_images=False)
        predictions = load_predictions(args.predictions)
        metrics = evaluate(
            predictions.outputs,
            references,
            args.out,
            reasoning_metrics=not args.no_reasoning_metrics,
            progress=sys.stderr.isatty(),
            skip_missing=args.skip_missing,
            n_samples=args.samples,
            predictions_name=str(args.predictions),
            references_name=str(args.references),
            prediction_lines=predictions.lines,
        )
    print(format_summary(metrics))
    print(f"wrote {args.out / 'metrics.json'}, {args.out / 'predictions.jsonl'} (per-sample scores) and {args.out / 'report.html'}")
    return 0


def format_summary(metrics: Mapping[str, Any]) -> str:
    """A short plain-text table of the headline numbers."""
    planning, parse, reasoning, ids = (
        metrics["planning"],
        metrics["parse"],
        metrics["reasoning"],
        metrics["ids"],
    )
    lines = [f"evaluated {metrics['n']} samples"]
    if ids["missing"] or ids["extra"]:
        lines[0] += f" (skipped: {ids['missing']} reference id(s) without prediction, {ids['extra']} extra prediction id(s))"
    lines += [
        f"{'planning accuracy':<24}{planning['accuracy']:.4f}",
        f"{'format ok rate':<24}{parse['format_ok_rate']:.4f}",
        f"{'':<24}{'prec':>7}{'recall':>8}{'F1':>8}{'support':>9}",
    ]
    for family, labels in (("speed", SPEED_ACTIONS), ("path", PATH_ACTIONS)):
        block = planning[family]
        for label in labels:
            m = block[label]
            lines.append(f"{family.upper() + ' ' + label:<24}{m['precision']:>7.4f}{m['recall']:>8.4f}{m['f1']:>8.4f}{m['support']:>9d}")
        lines.append(f"{family.upper() + ' macro F1':<24}{'':>15}{block['macro_f1']:>8.4f}   (accuracy {block['accuracy']:.4f})")
    if reasoning["computed"]:
        shown = {k: "failed" if reasoning[k] is None else f"{reasoning[k]:.4f}" for k in ("bleu4", "cider", "meteor")}
        lines.append(f"{'reasoning (n=' + str(reasoning['n']) + ')':<24}BLEU-4 {shown['bleu4']}  CIDEr {shown['cider']}  METEOR {shown['meteor']}")
        if reasoning["note"]:
            lines.append(f"{'':<24}{reasoning['note']}")
        check = reasoning.get("bleu4_check") or {}
        if check.get("agree") is False:
            lines.append(f"{'':<24}warning: nltk's corpus BLEU-4 {check['nltk']:.6f} differs from pycocoevalcap's by {check['abs_diff']:.2g}")
    else:
        lines.append(f"{'reasoning':<24}not computed: {reasoning['note']}")
    return "\n".join(lines)
