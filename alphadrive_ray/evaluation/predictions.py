"""Prediction files and their alignment with the references.

A predictions file is JSONL, one object per line: `{"id": "scene-000001", "output": "<raw
model text>"}` (other keys are ignored). Every problem is a UserError that names the file,
line and field; ids that do not match the references are listed (the first few, then a count).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from alphadrive_ray.data.records import Problem, Record
from alphadrive_ray.errors import UserError

MAX_PROBLEMS_SHOWN = 20
MAX_IDS_SHOWN = 10


@dataclass
class Predictions:
    path: str
    outputs: dict[str, str]  # id -> raw model output, in file order
    lines: dict[str, int] = field(default_factory=dict)  # id -> 1-based line number


class PredictionsError(UserError):
    def __init__(self, path: str | Path, problems: Sequence[Problem]):
        self.problems = list(problems)
        shown = "\n".join(f"  {p}" for p in self.problems[:MAX_PROBLEMS_SHOWN])
        more = f"\n  ... and {len(self.problems) - MAX_PROBLEMS_SHOWN} more" if len(self.problems) > MAX_PROBLEMS_SHOWN else ""
        super().__init__(
            f"{path}: {len(self.problems)} problem(s) in the predictions file:\n{shown}{more}\n"
            'Each line must be a JSON object {"id": <reference id>, "output": "<raw model text>"}.'
        )


def parse_prediction(obj: Any, file: str, line: int) -> tuple[tuple[str, str] | None, list[Problem]]:
    """Validate one decoded JSON value: ((id, output), []) or (None, problems)."""
    if not isinstance(obj, dict):
        return None, [Problem(file, line, "", f"expected a JSON object, got {type(obj).__name__}")]
    problems = []
    pid = obj.get("id")
    if "id" not in obj:
        problems.append(Problem(file, line, "id", "missing required field"))
    elif isinstance(pid, bool) or not isinstance(pid, (str, int)) or str(pid).strip() == "":
        problems.append(Problem(file, line, "id", f"must be a non-empty string or integer, got {pid!r}"))
    if "output" not in obj:
        problems.append(Problem(file, line, "output", "missing required field (the raw model text)"))
    elif not isinstance(obj["output"], str):
        problems.append(
            Problem(
                file,
                line,
                "output",
                f"must be a string (the raw model text), got {type(obj['output']).__name__}",
            )
        )
    if problems:
        return None, problems
    return (str(pid), obj["output"]), []


def load_predictions(path: str | Path) -> Predictions:
    """Read and validate a predictions file; raises PredictionsError listing every problem."""
    path = Path(path)
    file = str(path)
    if not path.exists():
        raise PredictionsError(path, [Problem(file, 0, "", "predictions file not found")])
    if path.is_dir():
        raise PredictionsError(path, [Problem(file, 0, "", "is a folder; pass the .jsonl file")])
    outputs: dict[str, str] = {}
    lines: dict[str, int] = {}
    problems: list[Problem] = []
    try:
        for lineno, obj, problem in _iter_jsonl(path):
            if problem is not None:
                problems.append(problem)
                continue
            parsed, found = parse_prediction(obj, file, lineno)
            problems.extend(found)
            if parsed is None:
                continue
            pid, output = parsed
            if pid in lines:
                problems.append(Problem(file, lineno, "id", f"duplicate id {pid!r} (first on line {lines[pid]})"))
                continue
            outputs[pid] = output
            lines[pid] = lineno
    except OSError as exc:
        problems.append(Problem(file, 0, "", f"cannot read: {exc}"))
    if not problems and not outputs:
        problems.append(Problem(file, 0, "", "no predictions (empty file)"))
    if problems:
        raise PredictionsError(path, problems)
    return Predictions(file, outputs, lines)


def _iter_jsonl(path: Path) -> Iterable[tuple[int, Any, Problem | None]]:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield lineno, None, Problem(str(path), lineno, "", f"not valid UTF-8 (byte {exc.start})")
                continue
            if not text.strip():
                continue
            try:
                yield lineno, json.loads(text), None
            except json.JSONDecodeError as exc:
                yield (
                    lineno,
                    None,
                    Problem(str(path), lineno, "", f"bad JSON: {exc.msg} (column {exc.colno})"),
                )


@dataclass
class Alignment:
    records: list[Record]  # the references that have a prediction, in reference order
    outputs: list[str]  # the matching raw outputs
    missing: list[str]  # reference ids without a prediction
    extra: list[str]  # prediction ids not in the references

    def summary(self, n_predictions: int, n_references: int) -> dict[str, int]:
        return {
            "n_predictions": n_predictions,
            "n_references": n_references,
            "evaluated": len(self.records),
            "missing": len(self.missing),
            "extra": len(self.extra),
        }


def format_ids(ids: Sequence[str], lines: Mapping[str, int] | None = None, limit: int = MAX_IDS_SHOWN) -> str:
    """`'a', 'b' (line 3), ... and N more`."""
    shown = [f"{i!r}" + (f" (line {lines[i]})" if lines and i in lines else "") for i in ids[:limit]]
    more = f" ... and {len(ids) - limit} more" if len(ids) > limit else ""
    return ", ".join(shown) + more


def align(
    predictions: Mapping[str, str],
    references: Sequence[Record],
    *,
    skip_missing: bool = False,
    predictions_name: str = "predictions",
    references_name: str = "references",
    prediction_lines: Mapping[str, int] | None = None,
) -> Alignment:
    """Pair every reference with its prediction by id.

    Missing predictions and predictions of unknown ids are an error naming them, unless
    `skip_missing`: then they are left out and counted. No id in common is always an error.
    """
    if not references:
        raise UserError(f"{references_name}: no references to evaluate against")
    ref_ids = {record.id for record in references}
    missing = [record.id for record in references if record.id not in predictions]
    extra = [pid for pid in predictions if pid not in ref_ids]
    if (missing or extra) and not skip_missing:
        parts = []
        if missing:
            parts.append(f"{len(missing)} reference id(s) have no prediction: {format_ids(missing)}")
        if extra:
            parts.append(f"{len(extra)} prediction id(s) are not in {references_name}: {format_ids(extra, prediction_lines)}")
        raise UserError(
            f"{predictions_name}: ids do not match {references_name}:\n  " + "\n  ".join(parts) + "\n"
            "Pass --skip-missing (skip_missing=True) to evaluate only the ids in both; the skipped ids are counted."
        )
    records = [record for record in references if record.id in predictions]
    if not records:
        raise UserError(
            f"{predictions_name}: no id in common with {references_name} "
            f"(predictions: {format_ids(list(predictions), prediction_lines, 3)}; references: {format_ids([r.id for r in references], None, 3)})"
        )
    return Alignment(records, [predictions[record.id] for record in records], missing, extra)
