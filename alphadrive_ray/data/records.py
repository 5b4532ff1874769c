"""The canonical dataset record, its validation, and reading/writing datasets.

A dataset is a JSONL file (one record per line), a JSON array, a parquet file, a folder
written by `datasets.save_to_disk` or a Hub dataset (`hub:ORG/NAME`; see sources.py), with
the same fields:

    {"id": "scene-000001", "image": "images/scene-000001.png", "speed": 8.4,
     "navigation": "turn left", "speed_action": "DECELERATE", "path_action": "LEFT_TURN",
     "reasoning": "The light ahead is red, ..."}

`image` is relative to the dataset file (or an embedded image: sources.py). `navigation` is the command text, or, for the
AlphaDrive release's commands by distance, that dict written as `navigation_text` does:
`{'100m': 'Straight', '200m': 'Straight'}` (a Python literal, keys in their order), which
the prompt template renders exactly as the release's prompt shows it. Every loader in the project goes through
`load_records`, so training, evaluation and `alphadrive-ray data validate` agree on what a
bad record is: by default the first load fails fast listing every problem (file, line,
field); with `skip_bad=True` bad records are skipped and counted, never silently.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from alphadrive_ray.actions import PATH_ACTIONS, SPEED_ACTIONS
from alphadrive_ray.errors import UserError

REQUIRED_FIELDS: tuple[str, ...] = ("id", "image", "speed", "navigation", "speed_action", "path_action")
OPTIONAL_FIELDS: tuple[str, ...] = ("reasoning",)

# Images larger than this (either side, or in total pixels) are refused: a planner input
# is a camera frame, and a huge file is almost always a mistake or a decompression bomb.
MAX_IMAGE_SIDE = 8192
MAX_IMAGE_PIXELS = 8192 * 8192
MAX_SPEED = 100.0  # m/s; anything above is a unit mistake (km/h?) rather than a vehicle speed


@dataclass(frozen=True)
class Record:
    id: str
    image: str  # absolute path (resolved against the dataset file's folder)
    speed: float  # m/s
    navigation: str
    speed_action: str
    path_action: str
    reasoning: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self, relative_to: Path | None = None) -> dict[str, Any]:
        image = self.image
        if relative_to is not None:
            image = os.path.relpath(self.image, relative_to)
        out: dict[str, Any] = {
            "id": self.id,
            "image": image,
            "speed": self.speed,
            "navigation": self.navigation,
            "speed_action": self.speed_action,
            "path_action": self.path_action,
        }
        if self.reasoning is not None:
            out["reasoning"] = self.reasoning
        out.update(self.extra)
        return out


@dataclass(frozen=True)
class Problem:
    file: str
    line: int  # 1-based; 0 for problems of the whole file (or of an item of a JSON array)
    field: str  # "" when the problem is not about one field
    message: str
    index: int | None = None  # 0-based item of a JSON array file (then `line` is 0)

    @property
    def where(self) -> str:
        """`file:line`, `file[index]` for an item of a JSON array, or `file`."""
        if self.index is not None:
            return f"{self.file}[{self.index}]"
        return f"{self.file}:{self.line}" if self.line else self.file

    @property
    def is_record_problem(self) -> bool:
        return bool(self.line) or self.index is not None

    def __str__(self) -> str:
        return f"{self.where}: {self.field}: {self.message}" if self.field else f"{self.where}: {self.message}"


def count_bad(problems: Iterable[Problem]) -> int:
    """Bad records among `problems` (a record with several problems counts once), plus problems of whole files."""
    problems = list(problems)
    records = {(p.file, p.line, p.index) for p in problems if p.is_record_problem}
    return len(records) + sum(1 for p in problems if not p.is_record_problem)


class DatasetError(UserError):
    def __init__(self, path: str | Path, problems: Sequence[Problem], n_records: int):
        self.problems = list(problems)
        shown = "\n".join(f"  {p}" for p in self.problems[:20])
        more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        super().__init__(
            f"{path}: {len(self.problems)} problem(s) in {n_records} record(s):\n{shown}{more}\n"
            f"Run `alphadrive-ray data validate {path}` for the full list, or pass --skip-bad "
            f"to skip bad records (they are counted)."
        )


@dataclass
class LoadReport:
    path: str
    records: list[Record]
    problems: list[Problem]
    n_lines: int  # records seen (valid or not)

    @property
    def n_bad(self) -> int:
        return count_bad(self.problems)


def check_image(path: Path, *, decode: bool = True) -> str | None:
    """None when `path` is a readable, complete image of sane size; else what is wrong."""
    from PIL import Image, UnidentifiedImageError

    try:
        if not path.exists():
            return f"image file not found: {path}"
        if not path.is_file():
            return f"image path is not a file: {path}"
    except OSError as exc:  # e.g. a name too long for the file system
        return f"image path cannot be checked: {exc.strerror or exc}"
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE or width * height > MAX_IMAGE_PIXELS:
                return f"image too large ({width}x{height}); at most {MAX_IMAGE_SIDE} px per side"
            if width < 1 or height < 1:
                return f"image has no pixels ({width}x{height})"
            if decode:
                img.load()  # a truncated or corrupt file fails here, not at training time
    except PermissionError:
        return f"image file not readable (permission denied): {path}"
    except UnidentifiedImageError:
        return f"not an image file (corrupt or unknown format): {path}"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return f"corrupt or truncated image: {path} ({exc})"
    return None


def _show(value: Any, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters so one bad value cannot flood the report."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_float(number: int | float) -> float:
    """`number` as a float; a JSON integer beyond the float range becomes inf (not OverflowError)."""
    try:
        return float(number)
    except OverflowError:
        return math.inf


def parse_record(obj: Any, base_dir: Path, file: str, line: int, check_images: bool = True) -> tuple[Record | None, list[Problem]]:
    """Validate one decoded JSON value; returns the record or the problems found."""
    problems: list[Problem] = []

    def bad(field_name: str, message: str) -> None:
        problems.append(Problem(file, line, field_name, message))

    if not isinstance(obj, dict):
        bad("", f"expected a JSON object, got {type(obj).__name__}")
        return None, problems
    for name in REQUIRED_FIELDS:
        if name not in obj or obj[name] is None:
            bad(name, "missing required field")
    if problems:
        return None, problems

    rid = obj["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid).strip() == "":
        bad("id", f"must be a non-empty string or integer, got {_show(rid)}")
    speed = obj["speed"]
    if isinstance(speed, bool) or not isinstance(speed, (int, float)):
        bad("speed", f"must be a number in m/s, got {_show(speed)}")
    elif not math.isfinite(_as_float(speed)) or speed < 0:
        bad("speed", f"must be a finite, non-negative number in m/s, got {_show(speed)}")
    elif speed > MAX_SPEED:
        bad("speed", f"{speed} m/s is implausible (> {MAX_SPEED}); is it in km/h? convert to m/s")
    nav = obj["navigation"]
    if not isinstance(nav, str) or not nav.strip():
        bad("navigation", f"must be a non-empty string, got {_show(nav)}")
    elif nav.strip().startswith("{"):
        # a command by distance: it must be the whole dict (a truncated "{" is corruption)
        try:
            nav = navigation_text(parse_navigation_dict(nav.strip()))
        except ValueError as exc:
            bad("navigation", f"starts like a dict of distances to commands but does not parse: {exc}")
    if obj["speed_action"] not in SPEED_ACTIONS:
        bad("speed_action", f"unknown label {_show(obj['speed_action'])}; expected one of {', '.join(SPEED_ACTIONS)}")
    if obj["path_action"] not in PATH_ACTIONS:
        bad("path_action", f"unknown label {_show(obj['path_action'])}; expected one of {', '.join(PATH_ACTIONS)}")
    reasoning = obj.get("reasoning")
    if reasoning is not None and not isinstance(reasoning, str):
        bad("reasoning", f"must be a string when present, got {type(reasoning).__name__}")
    image = obj["image"]
    image_path: Path | None = None
    if not isinstance(image, str) or not image.strip():
        bad("image", f"must be a path relative to the dataset file, got {_show(image)}")
    elif "\x00" in image:
        bad("image", f"path contains a NUL character: {_show(image)}")
    else:
        image_path = (base_dir / image).resolve()
        if check_images:
            issue = check_image(image_path)
            if issue:
                bad("image", issue)
    if problems:
        return None, problems
    extra = {k: v for k, v in obj.items() if k not in REQUIRED_FIELDS and k not in OPTIONAL_FIELDS}
    record = Record(
        id=str(rid),
        image=str(image_path),
        speed=float(speed),
        navigation=nav.strip(),
        speed_action=obj["speed_action"],
        path_action=obj["path_action"],
        reasoning=reasoning,
        extra=extra,
    )
    return record, problems


def navigation_text(value: Any) -> str:
    """The normalised text of a navigation command: a string as it is (stripped); a dict of
    distances to commands (the release's form) as its Python literal, `{'100m': 'Straight'}`.

    ValueError when a dict is empty or holds anything but non-empty strings.
    """
    if isinstance(value, str):
        return value.strip()
    if not isinstance(value, dict) or not value:
        raise ValueError(f"expected a command or a non-empty dict of distances to commands, got {value!r}")
    for key, command in value.items():
        if not (isinstance(key, str) and key.strip() and isinstance(command, str) and command.strip()):
            raise ValueError(f"expected text keys and commands, got {key!r}: {command!r}")
    return "{" + ", ".join(f"{k.strip()!r}: {c.strip()!r}" for k, c in value.items()) + "}"


def parse_navigation_dict(text: str) -> dict[str, str]:
    """`{'100m': 'Straight', ...}` (single or double quotes) -> the dict; ValueError otherwise."""
    import ast

    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
        raise ValueError(f"not a dict literal ({type(exc).__name__}: {exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"not a dict literal, got {type(value).__name__}")
    navigation_text(value)  # checks the keys and commands
    return value


def _iter_jsonl(path: Path) -> Iterable[tuple[int, Any, Problem | None]]:
    """(line number, decoded value or None, problem or None) for each non-blank line."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield lineno, None, Problem(str(path), lineno, "", f"not valid UTF-8 (byte {exc.start}: {raw[exc.start : exc.start + 1]!r})")
                continue
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                yield lineno, None, Problem(str(path), lineno, "", f"bad JSON: {exc.msg} (column {exc.colno})")
                continue
            except (ValueError, RecursionError) as exc:  # an integer of > 4300 digits, absurd nesting
                yield lineno, None, Problem(str(path), lineno, "", f"bad JSON: {str(exc)[:120]}")
                continue
            yield lineno, value, None


def _is_object_line(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):
        return False


def _iter_json_documents(path: Path, text: str) -> Iterator[tuple[int, int | None, Any, Problem | None]]:
    """JSON values written one after another, each over any number of lines (a pretty-printed
    object, or several); located by the line each starts on. Stops at the first bad one."""
    decoder = json.JSONDecoder()
    pos = 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            return
        line = text.count("\n", 0, pos) + 1
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            yield 0, None, None, Problem(str(path), exc.lineno, "", f"bad JSON: {exc.msg} (column {exc.colno})")
            return
        except (ValueError, RecursionError) as exc:
            yield 0, None, None, Problem(str(path), line, "", f"bad JSON: {str(exc)[:120]}")
            return
        yield line, None, value, None


def read_json_items(path: str | Path) -> Iterator[tuple[int, int | None, Any, Problem | None]]:
    """(line, index, value, problem) for each item of a JSON array file, a JSONL file, or a
    file of JSON objects spread over several lines each (e.g. one pretty-printed object).

    For converters whose input may be any of these. A file whose first non-blank character
    is `[` is one JSON array (items are located by their 0-based `index`, `line` is 0). A
    file of one line, or whose first line is a whole JSON object, is JSONL (located by
    `line`, `index` is None; a bad line is reported and the others still read). Any other
    file is read as JSON objects one after another, each located by the line it starts on
    (`data_tools/example.json` of the AlphaDrive release is one pretty-printed object).
    Problems of the whole file (unreadable, empty, bad JSON in an array file) come with line
    0 and index None in the tuple; their Problem names the line where one is known.
    """
    path = Path(path)
    file = str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        yield 0, None, None, Problem(file, 0, "", f"cannot read: {exc.strerror or exc}")
        return
    if not data.strip():
        yield 0, None, None, Problem(file, 0, "", "empty file: no records")
        return
    lines = [raw for raw in data.splitlines() if raw.strip()]
    array = data.lstrip().startswith(b"[")
    if not array and (len(lines) == 1 or _is_object_line(lines[0].decode("utf-8", errors="replace"))):
        for lineno, value, problem in _iter_jsonl(path):
            yield lineno, None, value, problem
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        yield 0, None, None, Problem(file, line, "", f"not valid UTF-8 (byte {exc.start}: {data[exc.start : exc.start + 1]!r})")
        return
    if not array:
        documents = list(_iter_json_documents(path, text))
        if documents[-1][3] is not None and any(_is_object_line(raw.decode("utf-8", errors="replace")) for raw in lines[1:]):
            # JSONL whose first line is broken: report it and read the other lines
            documents = [(lineno, None, value, problem) for lineno, value, problem in _iter_jsonl(path)]
        yield from documents
        return
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        yield 0, None, None, Problem(file, exc.lineno, "", f"bad JSON: {exc.msg} (column {exc.colno})")
        return
    except (ValueError, RecursionError) as exc:
        yield 0, None, None, Problem(file, 0, "", f"bad JSON: {str(exc)[:120]}")
        return
    if not isinstance(items, list):
        yield 0, None, None, Problem(file, 0, "", f"expected a JSON array of records, got {type(items).__name__}")
        return
    if not items:
        yield 0, None, None, Problem(file, 0, "", "empty JSON array: no records")
    for index, item in enumerate(items):
        yield 0, index, item, None


def read_report(path: str | Path, *, check_images: bool = True) -> LoadReport:
    """Read and validate every record of a dataset (any source of `sources.open_rows`); never raises for bad content."""
    from alphadrive_ray.data.sources import SourceError, open_rows

    file = str(path)
    try:
        source = open_rows(path)
    except SourceError as exc:
        message = str(exc)
        return LoadReport(file, [], [Problem(file, 0, "", message[len(file) + 2 :] if message.startswith(file + ": ") else message)], 0)
    records: list[Record] = []
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    n_lines = 0
    try:
        for lineno, index, obj, problem in source.rows:
            if lineno or index is not None:
                n_lines += 1
            if problem is not None:
                problems.append(problem)
                continue
            record, found = parse_record(obj, source.base_dir, file, lineno, check_images)
            if index is not None:
                found = [dataclasses.replace(p, index=index) for p in found]
            problems.extend(found)
            if record is None:
                continue
            where = f"item {index}" if index is not None else f"line {lineno}"
            if record.id in seen:
                problems.append(Problem(file, lineno, "id", f"duplicate id {record.id!r} (first on {seen[record.id]})", index))
                continue
            seen[record.id] = where
            records.append(record)
    except OSError as exc:
        problems.append(Problem(file, 0, "", f"cannot read: {exc}"))
    if n_lines == 0 and not problems:
        problems.append(Problem(file, 0, "", "no records (only blank lines)"))
    return LoadReport(file, records, problems, n_lines)


def load_records(
    path: str | Path,
    *,
    skip_bad: bool = False,
    check_images: bool = True,
    log: Callable[[str], None] = print,
) -> list[Record]:
    """Load a dataset, failing fast on any bad record unless `skip_bad`.

    With `skip_bad`, bad records are dropped and their count is logged; a dataset with
    no good record at all is still an error.
    """
    report = read_report(path, check_images=check_images)
    if report.problems:
        if not skip_bad or not report.records:
            raise DatasetError(path, report.problems, report.n_lines)
        log(f"{path}: skipped {report.n_bad} bad record(s) of {report.n_lines} (--skip-bad); first: {report.problems[0]}")
    return report.records


def write_records(path: str | Path, records: Iterable[Record]) -> int:
    """Write records as canonical JSONL with image paths relative to the file; atomic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent.resolve()
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record.to_json(relative_to=base), ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def to_hf_dataset(records: Sequence[Record]):
    """The records as a Hugging Face `datasets.Dataset` (images as absolute paths).

    Columns are the union of all records' fields; a record without one (e.g. no
    `reasoning`) gets null there. `Dataset.from_list` alone would take the columns of the
    first record and silently drop the others.
    """
    import datasets

    rows = [r.to_json() for r in records]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return datasets.Dataset.from_list([{key: row.get(key) for key in columns} for row in rows])
