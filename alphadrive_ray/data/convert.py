"""The shared driver of the dataset converters (`data import-release`, `data from-trajectories`).

A converter supplies one function that turns a decoded input item into a canonical
`Record` or the problems found; this module reads the input (a JSON array file, JSONL, or
JSON objects over several lines each: `records.read_json_items`),
checks ids for duplicates, reports every problem on its own line naming file, line (or
array index) and field, and writes the output only when nothing is wrong, or, with
`--skip-bad`, writes the good records and says how many were skipped.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from alphadrive_ray.data.records import Problem, Record, read_json_items, write_records
from alphadrive_ray.errors import UserError

# (decoded item, line or 0, array index or None) -> (record or None, problems)
ConvertOne = Callable[[Any, int, "int | None"], "tuple[Record | None, list[Problem]]"]


@dataclass
class Conversion:
    path: str
    records: list[Record]
    problems: list[Problem]
    n_items: int  # input items seen, good or bad
    n_bad: int  # items with at least one problem


def derived_id(path: str | Path, line: int, index: int | None) -> str:
    """The id of an item that has none: `{file stem}-{n:06d}`, n = line (1-based) or array index (0-based)."""
    return f"{Path(path).stem}-{index if index is not None else line:06d}"


def convert_items(path: str | Path, convert_one: ConvertOne) -> Conversion:
    """Convert every item of `path`; never raises for bad content."""
    file = str(path)
    records: list[Record] = []
    problems: list[Problem] = []
    first_seen: dict[str, str] = {}  # id -> where it was first seen (`file:line` or `file[index]`)
    n_items = n_bad = 0
    for line, index, value, problem in read_json_items(path):
        is_item = bool(line) or index is not None
        n_items += is_item
        if problem is not None:
            problems.append(problem)
            n_bad += is_item
            continue
        record, found = convert_one(value, line, index)
        if record is None or found:
            problems.extend(dataclasses.replace(p, index=index) if index is not None else p for p in found)
            n_bad += 1
            continue
        if record.id in first_seen:
            message = f"duplicate id {record.id!r} (first at {first_seen[record.id]})"
            problems.append(Problem(file, line, "id", message, index))
            n_bad += 1
            continue
        first_seen[record.id] = Problem(file, line, "", "", index).where
        records.append(record)
    if n_items == 0 and not problems:
        problems.append(Problem(file, 0, "", "no records (only blank lines)"))
    return Conversion(file, records, problems, n_items, n_bad)


def check_paths(in_path: str | Path, out_path: str | Path, image_root: str | Path | None) -> Path:
    """Refuse a missing input, a folder, an output that would overwrite the input, or a bad
    --image-root; return the (absolute) folder image paths are relative to."""
    src, dst = Path(in_path), Path(out_path)
    if not src.exists():
        raise UserError(f"input file not found: {src}")
    if src.is_dir():
        raise UserError(f"{src} is a folder; pass the .json or .jsonl file")
    if dst.exists() and dst.resolve() == src.resolve():
        raise UserError(f"output {dst} is the input file; choose another output path")
    if dst.is_dir():
        raise UserError(f"output {dst} is a folder; pass a .jsonl file path")
    root = Path(image_root) if image_root else src.parent
    if not root.is_dir():
        raise UserError(f"--image-root {root} is not a folder")
    return root.resolve()


def finish(conversion: Conversion, out_path: str | Path, skip_bad: bool) -> int:
    """Print the problems, write the output when allowed, and return the exit status."""
    for problem in conversion.problems:
        print(problem)
    # the same summary as `data validate`; only whole-file problems when no record was read
    counts = f"{conversion.n_bad} bad record(s) of {conversion.n_items}; " if conversion.n_items else ""
    summary = f"{conversion.path}: {counts}{len(conversion.problems)} problem(s)"
    if conversion.problems and not conversion.records:
        print(f"{summary}; nothing converted, {out_path} not written", file=sys.stderr)
        return 1
    if conversion.problems and not skip_bad:
        print(
            f"{summary}; {out_path} not written (fix them, or pass --skip-bad to convert the {len(conversion.records)} good record(s))",
            file=sys.stderr,
        )
        return 1
    n = write_records(out_path, conversion.records)
    skipped = ""
    if conversion.problems:
        skipped = f"; skipped {conversion.n_bad} bad record(s) of {conversion.n_items} (--skip-bad)"
    print(f"wrote {n} record(s) to {out_path}{skipped}")
    return 0
