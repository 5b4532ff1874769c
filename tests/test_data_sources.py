"""Datasets from every source users bring: JSONL, JSON, parquet, `save_to_disk` folders and Hub
names, with images as paths or as `datasets.Image` columns. Every source is validated by the
same code with the same messages, naming the row and field. All files are built here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from PIL import Image

from alphadrive_ray.data.records import DatasetError, load_records, read_report, to_hf_dataset, write_records
from alphadrive_ray.data.sources import SourceError, open_rows, parse_hub_spec


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """6 synthetic scenes (real images, reasoning) in canonical JSONL."""
    from alphadrive_ray.data.synth import generate_dataset

    path, _ = generate_dataset(tmp_path_factory.mktemp("src"), 6, seed=4, size=64)
    return load_records(path)


@pytest.fixture(autouse=True)
def image_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALPHADRIVE_RAY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def rows_of(records, *, embed: bool = False, relative_to: Path | None = None) -> list[dict]:
    rows = [r.to_json(relative_to=relative_to) for r in records]
    if embed:
        for row, record in zip(rows, records):
            with Image.open(record.image) as img:
                row["image"] = img.convert("RGB")
    return rows


def as_dataset(rows: list[dict], *, embed: bool = False) -> datasets.Dataset:
    """Rows as a Dataset; with `embed`, the `image` column is a datasets.Image of the PIL images in it."""
    if not embed:
        return datasets.Dataset.from_list(rows)
    features = datasets.Dataset.from_list([{**row, "image": ""} for row in rows]).features.copy()
    features["image"] = datasets.Image()
    return datasets.Dataset.from_list(rows, features=features)


def same_records(a, b) -> bool:
    key = lambda r: (r.id, r.speed, r.navigation, r.speed_action, r.path_action, r.reasoning)  # noqa: E731
    return [key(r) for r in a] == [key(r) for r in b]


def same_pixels(a: str, b: str) -> bool:
    with Image.open(a) as x, Image.open(b) as y:
        return x.convert("RGB").tobytes() == y.convert("RGB").tobytes()


def test_save_to_disk_folder_with_image_paths(scenes, tmp_path):
    folder = tmp_path / "hf"
    to_hf_dataset(scenes).save_to_disk(str(folder))  # absolute image paths
    loaded = load_records(folder)
    assert same_records(loaded, scenes) and [r.image for r in loaded] == [r.image for r in scenes]


def test_relative_image_paths_resolve_against_the_folder(scenes, tmp_path):
    folder = tmp_path / "hf-rel"
    images = folder / "images"
    images.mkdir(parents=True)
    for r in scenes:
        shutil.copy(r.image, images / Path(r.image).name)
    rows = [{**row, "image": f"images/{Path(row['image']).name}"} for row in rows_of(scenes)]
    as_dataset(rows).save_to_disk(str(folder))
    loaded = load_records(folder)
    assert [r.image for r in loaded] == [str((images / Path(r.image).name).resolve()) for r in scenes]


@pytest.mark.parametrize("kind", ["save_to_disk", "parquet"])
def test_image_columns_are_written_to_the_cache(scenes, tmp_path, image_cache, kind):
    table = as_dataset(rows_of(scenes, embed=True), embed=True)
    assert isinstance(table.features["image"], datasets.Image)
    if kind == "save_to_disk":
        target = tmp_path / "hf-img"
        table.save_to_disk(str(target))
    else:
        target = tmp_path / "img.parquet"
        table.to_parquet(str(target))
    loaded = load_records(target)
    assert same_records(loaded, scenes)
    for got, want in zip(loaded, scenes):
        assert Path(got.image).is_relative_to(image_cache / "images") and same_pixels(got.image, want.image)
    # content-addressed: loading again writes nothing new
    files = sorted(image_cache.rglob("*.png"))
    load_records(target)
    assert sorted(image_cache.rglob("*.png")) == files and len(files) == len({r.image for r in loaded})


def test_json_array_and_json_lines_named_json(scenes, tmp_path):
    array = tmp_path / "array.json"
    array.write_text(json.dumps(rows_of(scenes), indent=2))
    lines = tmp_path / "lines.json"
    lines.write_text("".join(json.dumps(row) + "\n" for row in rows_of(scenes)))
    assert same_records(load_records(array), scenes) and same_records(load_records(lines), scenes)


BAD_ROWS = {2: {"speed_action": "FLY"}, 4: {"navigation": None}}  # 0-based row -> change


def _bad_rows(scenes) -> list[dict]:
    rows = rows_of(scenes)
    for i, change in BAD_ROWS.items():
        rows[i].update(change)
    return rows


def test_every_source_reports_the_same_problems(scenes, tmp_path):
    # one bad dataset, written five ways: each load names the same rows, fields and messages
    rows = _bad_rows(scenes)
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    array = tmp_path / "bad.json"
    array.write_text(json.dumps(rows))
    parquet = tmp_path / "bad.parquet"
    as_dataset(rows).to_parquet(str(parquet))
    folder = tmp_path / "bad-hf"
    as_dataset(rows).save_to_disk(str(folder))
    expected = [
        (3, "speed_action", "unknown label 'FLY'; expected one of KEEP, ACCELERATE, DECELERATE, STOP"),
        (5, "navigation", "missing required field"),
    ]
    for source in (jsonl, parquet, folder, f"hub:{folder.parent / 'hub-bad'}"):
        if str(source).startswith("hub:"):
            (folder.parent / "hub-bad").mkdir()
            shutil.copy(parquet, folder.parent / "hub-bad" / "train.parquet")
        report = read_report(source)
        got = [(p.line, p.field, p.message) for p in report.problems]
        assert got == expected, source
        assert len(report.records) == len(scenes) - 2
    report = read_report(array)  # a JSON array names items by their index
    assert [(p.index, p.field, p.message) for p in report.problems] == [(line - 1, f, m) for line, f, m in expected]
    with pytest.raises(DatasetError, match=rf"{folder}:3: speed_action: unknown label 'FLY'"):
        load_records(folder)
    assert len(load_records(folder, skip_bad=True, log=lambda line: None)) == len(scenes) - 2


def test_corrupt_embedded_image_names_row_and_field(scenes, tmp_path):
    rows = rows_of(scenes)
    table = datasets.Dataset.from_list(
        [{**row, "image": {"bytes": b"not a png" if i == 1 else Path(row["image"]).read_bytes(), "path": None}} for i, row in enumerate(rows)],
        features=as_dataset(rows_of(scenes, embed=True), embed=True).features,
    )
    folder = tmp_path / "corrupt"
    table.save_to_disk(str(folder))
    report = read_report(folder)
    assert [str(p) for p in report.problems] == [f"{folder}:2: image: the embedded image bytes are not an image (corrupt or unknown format)"]


def test_a_dataset_dict_folder_names_its_splits(scenes, tmp_path):
    root = tmp_path / "dd"
    datasets.DatasetDict({"train": to_hf_dataset(scenes[:4]), "validation": to_hf_dataset(scenes[4:])}).save_to_disk(str(root))
    report = read_report(root)
    assert "a DatasetDict with the splits train, validation; point at one split's folder" in str(report.problems[0])
    assert [r.id for r in load_records(root / "validation")] == [r.id for r in scenes[4:]]


def test_other_folders_and_missing_paths(tmp_path):
    (tmp_path / "plain").mkdir()
    cases = [
        (tmp_path / "plain", "not one written by `datasets.save_to_disk`"),
        (tmp_path / "absent.jsonl", "dataset not found"),
    ]
    for path, message in cases:
        with pytest.raises(DatasetError, match=message.replace("(", r"\(").replace("`", ".")):
            load_records(path)


HUB_SPECS = [
    # (spec, (name, split))
    ("hub:org/data", ("org/data", "train")),  # default split
    ("hub:org/data:validation", ("org/data", "validation")),
    ("hub:/abs/local/folder", ("/abs/local/folder", "train")),  # a local dataset folder
]


@pytest.mark.parametrize("spec, expected", HUB_SPECS)
def test_parse_hub_spec(spec, expected):
    assert parse_hub_spec(spec) == expected


def test_hub_dataset_through_load_dataset(scenes, tmp_path):
    # `datasets.load_dataset` on a dataset repository laid out as on the Hub (here on disk:
    # this machine has no network), images embedded as a datasets.Image column
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    as_dataset(rows_of(scenes, embed=True), embed=True).to_parquet(str(repo / "data" / "train-00000-of-00001.parquet"))
    loaded = load_records(f"hub:{repo}")
    assert same_records(loaded, scenes) and all(same_pixels(a.image, b.image) for a, b in zip(loaded, scenes))
    with pytest.raises(DatasetError, match="cannot load the Hub dataset .* \\(split 'test'\\)"):
        load_records(f"hub:{repo}:test")


def test_unreachable_hub_is_a_clear_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(
        [sys.executable, "-m", "alphadrive_ray", "data", "validate", "hub:someone/driving-scenes:validation"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr + done.stdout
    assert "cannot load the Hub dataset 'someone/driving-scenes' (split 'validation')" in done.stdout
    assert "save_to_disk(DIR)" in done.stdout


def test_training_reads_a_save_to_disk_folder(scenes, tmp_path):
    from alphadrive_ray.config import load_config
    from alphadrive_ray.train.trainer import prepare_data

    train_dir = tmp_path / "train"
    to_hf_dataset(scenes[:4]).save_to_disk(str(train_dir))
    eval_file = tmp_path / "eval.parquet"
    to_hf_dataset(scenes[4:]).to_parquet(str(eval_file))
    config = load_config(None, [f"data.train={train_dir}", f"data.eval={eval_file}"])
    train, held_out = prepare_data(config, say=lambda line: None)
    assert [r.id for r in train] == [r.id for r in scenes[:4]] and [r.id for r in held_out] == [r.id for r in scenes[4:]]


def test_rows_come_with_their_base_folder(scenes, tmp_path):
    path = tmp_path / "x" / "data.jsonl"
    write_records(path, scenes)
    assert open_rows(path).base_dir == path.parent
    with pytest.raises(SourceError):
        open_rows(tmp_path / "nope")
