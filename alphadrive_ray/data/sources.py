"""Where a dataset can come from: the rows of a file, a `save_to_disk` folder or a Hub dataset.

`data.train`, `data.eval`, `alphadrive-ray data validate` and `alphadrive-ray eval
--references` accept any of

    artifacts/scenes/data.jsonl       JSON Lines (one record per line)
    release/train.json                a JSON array of records (or JSON Lines named .json)
    data/train.parquet                parquet with the record's columns
    data/hf-train                     a folder written by `datasets.Dataset.save_to_disk`
                                      (of a DatasetDict: one split's folder, e.g. data/hf/train)
    hub:ORG/NAME  or  hub:ORG/NAME:SPLIT   `datasets.load_dataset(ORG/NAME, split=SPLIT or "train")`,
                                      where the network allows (or a local dataset folder after `hub:`)

and `records.read_report` validates every row the same way, whatever the source, naming the
row and field of each problem. The `image` column holds a path (relative to the dataset file
or folder; for the Hub, absolute or relative to the working directory) or, as
`datasets.Image` columns do, the image itself: its bytes are written once to a
content-addressed cache (`$ALPHADRIVE_RAY_CACHE/images`, default `~/.cache/alphadrive-ray`)
and the record points there. NOTE: on a multi-node cluster, put that cache on storage every
node reads, as for image paths.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from alphadrive_ray.errors import UserError

HUB_PREFIX = "hub:"
DEFAULT_HUB_SPLIT = "train"
CACHE_ENV = "ALPHADRIVE_RAY_CACHE"


class SourceError(UserError):
    """A dataset that cannot be opened at all (no such file, an unreadable folder, no network)."""


@dataclass
class Rows:
    """The rows of a dataset: (line or row number, 0-based index of a JSON array item or None,
    decoded value or None, a `records.Problem` or None), and the folder image paths are relative to."""

    rows: Iterator[tuple[int, int | None, Any, Any]]
    base_dir: Path


def open_rows(spec: str | os.PathLike[str]) -> Rows:
    """The rows of the dataset named by `spec` (see the module doc); SourceError when it cannot be opened."""
    from alphadrive_ray.data.records import _iter_jsonl, read_json_items

    text = str(spec)
    if text.startswith(HUB_PREFIX):
        return Rows(_dataset_rows(_load_hub(text), text), Path.cwd())
    path = Path(spec)
    if not path.exists():
        raise SourceError(f"{path}: dataset not found (a .jsonl, .json or .parquet file, a save_to_disk folder, or hub:ORG/NAME)")
    if path.is_dir():
        return Rows(_dataset_rows(_load_from_disk(path), str(path)), path)
    try:
        if path.stat().st_size == 0:
            raise SourceError(f"{path}: empty file: no records")
    except OSError as exc:
        raise SourceError(f"{path}: cannot read: {exc}") from None
    if path.suffix == ".parquet":
        return Rows(_parquet_rows(path), path.parent)
    if path.suffix == ".json":
        return Rows(read_json_items(path), path.parent)
    return Rows(((line, None, value, problem) for line, value, problem in _iter_jsonl(path)), path.parent)


def _parquet_rows(path: Path) -> Iterator[tuple[int, int | None, Any, Any]]:
    import datasets

    from alphadrive_ray.data.records import Problem

    try:
        table = datasets.Dataset.from_parquet(str(path))
    except Exception as exc:  # noqa: BLE001 - any reader failure is the user's file
        yield 0, None, None, Problem(str(path), 0, "", f"cannot read parquet file: {exc}")
        return
    yield from _dataset_rows(table, str(path))


def _load_from_disk(folder: Path):
    import datasets

    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        raise SourceError(
            f"{folder}: a DatasetDict with the splits {', '.join(splits)}; point at one split's folder, "
            f"e.g. {folder / (splits[0] if splits else 'train')}"
        )
    if not (folder / "dataset_info.json").is_file() or not (folder / "state.json").is_file():
        raise SourceError(f"{folder}: is a folder but not one written by `datasets.save_to_disk`; pass a .jsonl, .json or .parquet file")
    try:
        return datasets.load_from_disk(str(folder))
    except Exception as exc:  # noqa: BLE001 - a damaged folder is the user's
        raise SourceError(f"{folder}: cannot load the save_to_disk folder: {exc}") from None


def parse_hub_spec(spec: str) -> tuple[str, str]:
    """`hub:ORG/NAME[:SPLIT]` -> (name, split)."""
    body = spec[len(HUB_PREFIX) :]
    name, sep, split = body.rpartition(":")
    if not sep:
        name, split = body, ""
    if not name.strip():
        raise SourceError(f"{spec}: expected hub:ORG/NAME or hub:ORG/NAME:SPLIT")
    return name, split or DEFAULT_HUB_SPLIT


def _load_hub(spec: str):
    import datasets

    name, split = parse_hub_spec(spec)
    try:
        table = datasets.load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 - no network, no such dataset, no such split
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceError(
            f"{spec}: cannot load the Hub dataset {name!r} (split {split!r}): {first}. Without network access, "
            f"save it elsewhere with `datasets.load_dataset({name!r}, split={split!r}).save_to_disk(DIR)` "
            "and point the config at DIR"
        ) from None
    if not isinstance(table, datasets.Dataset):
        raise SourceError(f"{spec}: expected one split of rows, got {type(table).__name__}")
    return table


def _dataset_rows(table, label: str) -> Iterator[tuple[int, int | None, Any, Any]]:
    """Rows of a `datasets.Dataset` as plain dicts, numbered from 1; an Image column is read undecoded."""
    import datasets

    from alphadrive_ray.data.records import Problem

    if isinstance(table.features.get("image"), datasets.Image):
        table = table.cast_column("image", datasets.Image(decode=False))
    for number, row in enumerate(table, start=1):
        image = row.get("image")
        if image is not None and not isinstance(image, str):
            try:
                row = {**row, "image": materialize_image(image)}
            except ValueError as exc:
                yield number, None, None, Problem(label, number, "image", str(exc))
                continue
        yield number, None, row, None


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "alphadrive-ray")


def materialize_image(value: Any) -> str:
    """An embedded image as a file path: bytes (a `datasets.Image` cell {"bytes", "path"}, raw bytes
    or a PIL image) are written once to the content-addressed cache; a cell with only a path gives it."""
    data: bytes | None = None
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if not data:
            if isinstance(path, str) and path:
                return path
            raise ValueError("an image cell with neither bytes nor a path")
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif hasattr(value, "save") and hasattr(value, "mode"):  # a decoded PIL image
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        data = buffer.getvalue()
    else:
        raise ValueError(f"must be a path or an image, got {type(value).__name__}")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            kind = (img.format or "img").lower()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise ValueError("the embedded image bytes are not an image (corrupt or unknown format)") from None
    digest = hashlib.sha256(data).hexdigest()
    target = cache_dir() / "images" / digest[:2] / f"{digest}.{kind}"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    return str(target)
