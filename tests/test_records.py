"""Dataset validation: every bad-input kind of issue 2, through `data validate` and `load_records`.

Each bad case writes a dataset of three records whose middle one (line 2) is bad, and
checks that both the CLI (a real subprocess) and the in-process loader name file, line 2
and the field, count one bad record of three, and never print a traceback.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from alphadrive_ray.data import records as records_module
from alphadrive_ray.data.records import (
    MAX_IMAGE_SIDE,
    DatasetError,
    Problem,
    Record,
    count_bad,
    load_records,
    read_report,
    to_hf_dataset,
    write_records,
)
from alphadrive_ray.data.synth import generate_dataset


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alphadrive_ray", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def scene_file(tmp_path_factory) -> Path:
    """Three rendered synthetic scenes (64 px) and their valid data.jsonl."""
    out = tmp_path_factory.mktemp("scenes")
    path, _ = generate_dataset(out, 3, seed=1, size=64)
    return path


def good_rows(scene_file: Path) -> list[dict]:
    return [json.loads(line) for line in scene_file.read_text().splitlines()]


def png_bytes(scene_file: Path) -> bytes:
    return (scene_file.parent / good_rows(scene_file)[0]["image"]).read_bytes()


def dataset_with_bad_middle(tmp: Path, scene_file: Path, bad_line: bytes) -> Path:
    """data.jsonl in `tmp`: good record, `bad_line`, good record (images referenced across folders)."""
    rows = good_rows(scene_file)
    for row in rows:
        row["image"] = os.path.relpath(scene_file.parent / row["image"], tmp)
    path = tmp / "data.jsonl"
    path.write_bytes(json.dumps(rows[0]).encode() + b"\n" + bad_line + b"\n" + json.dumps(rows[2]).encode() + b"\n")
    return path


def record_line(scene_file: Path, tmp: Path, **changes) -> bytes:
    """The second scene's record with `changes` (None removes a field), image paths relative to `tmp`."""
    row = good_rows(scene_file)[1]
    row["image"] = os.path.relpath(scene_file.parent / row["image"], tmp)
    for key, value in changes.items():
        if value is None:
            row.pop(key)
        else:
            row[key] = value
    return json.dumps(row).encode()


def image_record(scene_file: Path, tmp: Path, name: str, data: bytes) -> bytes:
    (tmp / name).write_bytes(data)
    return record_line(scene_file, tmp, image=name)


def corrupt_png(data: bytes) -> bytes:
    """Flip bytes inside the compressed pixel data (the IDAT chunk); header and size stay intact."""
    start = data.index(b"IDAT") + 8
    out = bytearray(data)
    for i in range(start, min(start + 40, len(out) - 16)):
        out[i] ^= 0x5A
    return bytes(out)


def oversized_png() -> bytes:
    """A 1-pixel-high PNG wider than MAX_IMAGE_SIDE: a few hundred bytes that claim a huge frame."""
    import io

    buf = io.BytesIO()
    Image.new("L", (MAX_IMAGE_SIDE + 1, 1)).save(buf, format="PNG")
    return buf.getvalue()


# (case id, bad line builder (scene_file, tmp) -> bytes, field named, words in the message)
BAD_CASES = [
    # the image file does not exist
    ("missing_image", lambda s, t: record_line(s, t, image="images/nope.png"), "image", "not found"),
    # the image is cut in half (an interrupted download)
    ("truncated_image", lambda s, t: image_record(s, t, "half.png", png_bytes(s)[: len(png_bytes(s)) // 2]), "image", "truncated"),
    # the header is fine but the compressed pixel data is garbage
    ("corrupt_image_bytes", lambda s, t: image_record(s, t, "bad.png", corrupt_png(png_bytes(s))), "image", "corrupt"),
    # not an image at all (text with a .png name)
    ("not_an_image", lambda s, t: image_record(s, t, "text.png", b"hello, I am not a PNG\n"), "image", "not an image"),
    # an empty image file
    ("empty_image_file", lambda s, t: image_record(s, t, "empty.png", b""), "image", "not an image"),
    # the image path is a folder
    ("image_is_folder", lambda s, t: record_line(s, t, image="."), "image", "not a file"),
    # a PNG whose header claims a frame wider than MAX_IMAGE_SIDE
    ("oversized_image", lambda s, t: image_record(s, t, "wide.png", oversized_png()), "image", "too large"),
    # the image field is not a path
    ("image_not_a_string", lambda s, t: record_line(s, t, image=["a.png"]), "image", "must be a path"),
    # the line is not JSON (a missing closing brace)
    ("bad_json", lambda s, t: record_line(s, t)[:-1], "", "bad JSON"),
    # valid JSON but not an object
    ("json_not_an_object", lambda s, t: b"[1, 2, 3]", "", "expected a JSON object"),
    # a required field is absent
    ("missing_field", lambda s, t: record_line(s, t, navigation=None), "navigation", "missing required field"),
    # a required field is null
    ("null_field", lambda s, t: record_line(s, t).replace(b'"speed": ', b'"speed": null, "x": '), "speed", "missing required field"),
    # a SPEED label outside the vocabulary (lower case counts as unknown)
    ("unknown_speed_label", lambda s, t: record_line(s, t, speed_action="keep"), "speed_action", "unknown label"),
    # a PATH label outside the vocabulary
    ("unknown_path_label", lambda s, t: record_line(s, t, path_action="U_TURN"), "path_action", "unknown label"),
    # negative speed
    ("negative_speed", lambda s, t: record_line(s, t, speed=-0.5), "speed", "non-negative"),
    # non-numeric speed (a string that looks like a number is still a string)
    ("non_numeric_speed", lambda s, t: record_line(s, t, speed="8.4"), "speed", "must be a number"),
    # boolean speed (true is an int in Python, not a speed)
    ("boolean_speed", lambda s, t: record_line(s, t, speed=True), "speed", "must be a number"),
    # NaN speed (json.dumps writes NaN, json.loads reads it)
    ("nan_speed", lambda s, t: record_line(s, t, speed=math.nan), "speed", "finite"),
    # an integer too large for a float (used to raise OverflowError)
    ("huge_integer_speed", lambda s, t: record_line(s, t, speed=10**400), "speed", "finite"),
    # km/h by mistake
    ("implausible_speed", lambda s, t: record_line(s, t, speed=150.0), "speed", "km/h"),
    # bytes that are not UTF-8 (latin-1 text)
    ("non_utf8_bytes", lambda s, t: record_line(s, t, navigation="X").replace(b'"X"', b'"tourner \xe0 gauche"'), "", "not valid UTF-8"),
    # nesting deep enough to exhaust the JSON decoder's recursion (used to raise RecursionError)
    ("deeply_nested_json", lambda s, t: b"[" * 100_000 + b"]" * 100_000, "", "bad JSON"),
    # the id of line 1 again
    ("duplicate_id", lambda s, t: record_line(s, t, id=good_rows(s)[0]["id"]), "id", "duplicate id"),
    # an empty id
    ("empty_id", lambda s, t: record_line(s, t, id="  "), "id", "non-empty"),
    # reasoning that is not text
    ("reasoning_not_a_string", lambda s, t: record_line(s, t, reasoning=["a"]), "reasoning", "must be a string"),
]


@pytest.mark.parametrize("name,make,field,words", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_record_in_process(scene_file, tmp_path, name, make, field, words):
    path = dataset_with_bad_middle(tmp_path, scene_file, make(scene_file, tmp_path))
    report = read_report(path)
    assert [(p.line, p.field) for p in report.problems] == [(2, field)], report.problems
    assert words in report.problems[0].message
    assert report.n_bad == 1 and report.n_lines == 3 and len(report.records) == 2

    with pytest.raises(DatasetError) as err:
        load_records(path)
    assert f"{path}:2: " in str(err.value) and "--skip-bad" in str(err.value)

    logged: list[str] = []
    kept = load_records(path, skip_bad=True, log=logged.append)
    assert [r.id for r in kept] == [good_rows(scene_file)[0]["id"], good_rows(scene_file)[2]["id"]]
    assert len(logged) == 1 and "skipped 1 bad record(s) of 3" in logged[0]


@pytest.mark.parametrize("name,make,field,words", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_record_cli(scene_file, tmp_path, name, make, field, words):
    path = dataset_with_bad_middle(tmp_path, scene_file, make(scene_file, tmp_path))
    result = run_cli("data", "validate", str(path))
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stdout.splitlines()
    assert len(lines) == 1, lines  # one line per bad record
    expected_prefix = f"{path}:2: {field}: " if field else f"{path}:2: "
    assert lines[0].startswith(expected_prefix) and words in lines[0], lines[0]
    assert f"{path}: 1 bad record(s) of 3; 1 problem(s)" in result.stderr


def test_unreadable_image(scene_file, tmp_path):
    line = image_record(scene_file, tmp_path, "locked.png", png_bytes(scene_file))
    locked = tmp_path / "locked.png"
    locked.chmod(0)
    try:
        try:
            locked.read_bytes()
        except PermissionError:
            pass
        else:
            pytest.skip("chmod 000 does not stop this user from reading (running as root): unreadable-image case not testable here")
        path = dataset_with_bad_middle(tmp_path, scene_file, line)
        report = read_report(path)
        assert [(p.line, p.field) for p in report.problems] == [(2, "image")]
        assert "permission denied" in report.problems[0].message
        result = run_cli("data", "validate", str(path))
        assert result.returncode == 1 and f"{path}:2: image: " in result.stdout and "Traceback" not in result.stderr
    finally:
        locked.chmod(0o644)


def test_image_over_the_pixel_budget(scene_file, tmp_path, monkeypatch):
    # 64 x 64 = 4096 pixels against a budget of 4095: the total-pixel limit, not the side limit
    monkeypatch.setattr(records_module, "MAX_IMAGE_PIXELS", 64 * 64 - 1)
    report = read_report(scene_file)
    assert {(p.field, "too large" in p.message) for p in report.problems} == {("image", True)}
    assert report.n_bad == 3 and not report.records


def test_several_problems_in_one_record_count_once(scene_file, tmp_path):
    path = dataset_with_bad_middle(tmp_path, scene_file, record_line(scene_file, tmp_path, speed=-1, speed_action="FAST", image="x.png"))
    report = read_report(path)
    assert sorted(p.field for p in report.problems) == ["image", "speed", "speed_action"]
    assert report.n_bad == 1
    result = run_cli("data", "validate", str(path))
    assert result.returncode == 1 and len(result.stdout.splitlines()) == 3
    assert "1 bad record(s) of 3; 3 problem(s)" in result.stderr


# (case id, file content or None for "no file", words of the one whole-file problem)
FILE_CASES = [
    ("empty_file", b"", "empty file"),  # zero bytes
    ("only_blank_lines", b"\n  \n\n", "no records"),  # a file of white space
    ("missing_file", None, "not found"),  # the path does not exist
]


@pytest.mark.parametrize("name,content,words", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_whole_file_problems(tmp_path, name, content, words):
    path = tmp_path / "data.jsonl"
    if content is not None:
        path.write_bytes(content)
    report = read_report(path)
    assert len(report.problems) == 1 and report.problems[0].line == 0 and words in report.problems[0].message
    with pytest.raises(DatasetError, match=words):
        load_records(path)
    with pytest.raises(DatasetError):  # nothing good to keep: still an error with skip_bad
        load_records(path, skip_bad=True, log=lambda _: None)
    result = run_cli("data", "validate", str(path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stdout.splitlines() == [f"{path}: {report.problems[0].message}"]
    assert f"{path}: 1 bad record(s) of 0; 1 problem(s)" in result.stderr


def test_folder_instead_of_file(tmp_path):
    result = run_cli("data", "validate", str(tmp_path))
    assert result.returncode == 1 and "is a folder" in result.stdout and "Traceback" not in result.stderr


def test_valid_file_exit_zero(scene_file):
    result = run_cli("data", "validate", str(scene_file))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"{scene_file}: 3 record(s), all valid" and result.stderr == ""


def test_no_images_flag_skips_image_checks(scene_file, tmp_path):
    path = dataset_with_bad_middle(tmp_path, scene_file, record_line(scene_file, tmp_path, image="images/nope.png"))
    assert run_cli("data", "validate", str(path)).returncode == 1
    assert run_cli("data", "validate", str(path), "--no-images").returncode == 0


def test_skip_bad_keeps_every_good_record(scene_file, tmp_path):
    bad = record_line(scene_file, tmp_path, speed=-3)
    path = dataset_with_bad_middle(tmp_path, scene_file, bad)
    with path.open("ab") as fh:  # two more bad lines after the good ones: 3 bad of 5
        fh.write(b"{not json\n" + record_line(scene_file, tmp_path, id="other", path_action="LEFT") + b"\n")
    logged: list[str] = []
    kept = load_records(path, skip_bad=True, log=logged.append)
    assert len(kept) == 2 and "skipped 3 bad record(s) of 5" in logged[0]


def test_records_resolve_images_against_the_file(scene_file):
    rows = good_rows(scene_file)
    loaded = load_records(scene_file)
    assert [r.id for r in loaded] == [row["id"] for row in rows]
    assert all(Path(r.image).is_absolute() and Path(r.image).is_file() for r in loaded)
    assert loaded[0].extra["scene"] == rows[0]["scene"]  # unknown fields are kept


def test_write_records_round_trip(scene_file, tmp_path):
    loaded = load_records(scene_file)
    out = tmp_path / "nested" / "copy.jsonl"
    assert write_records(out, loaded) == 3
    assert all(not Path(json.loads(line)["image"]).is_absolute() for line in out.read_text().splitlines())
    again = load_records(out)
    assert again == loaded and [r.extra for r in again] == [r.extra for r in loaded]


def test_parquet_round_trip(scene_file, tmp_path):
    import datasets

    loaded = load_records(scene_file)
    # the first record has no reasoning and an extra field the others lack: columns are the union
    first = Record(
        loaded[0].id,
        loaded[0].image,
        loaded[0].speed,
        loaded[0].navigation,
        loaded[0].speed_action,
        loaded[0].path_action,
        reasoning=None,
        extra={"source": "hand"},
    )
    records = [first, *loaded[1:]]
    ds = to_hf_dataset(records)
    assert set(ds.column_names) >= {"id", "image", "speed", "reasoning", "scene", "source"}
    path = tmp_path / "data.parquet"
    ds.to_parquet(str(path))

    again = load_records(path)
    assert again == records  # same id, image, speed, navigation, labels and reasoning
    assert again[0].reasoning is None and again[1].reasoning == loaded[1].reasoning
    assert again[1].extra["scene"]["navigation"] == loaded[1].extra["scene"]["navigation"]
    direct = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf"))
    assert direct["id"] == [r.id for r in records] and direct["speed_action"] == [r.speed_action for r in records]


def test_parquet_bad_row_is_reported(scene_file, tmp_path):
    rows = [r.to_json() for r in load_records(scene_file)]
    rows[1]["speed"] = -2.0
    rows[2]["path_action"] = "SIDEWAYS"
    import datasets

    path = tmp_path / "bad.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    report = read_report(path)
    assert [(p.line, p.field) for p in report.problems] == [(2, "speed"), (3, "path_action")]
    result = run_cli("data", "validate", str(path))
    assert result.returncode == 1 and f"{path}:2: speed: " in result.stdout and f"{path}:3: path_action: " in result.stdout


def test_not_a_parquet_file(tmp_path):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1 but not really")
    report = read_report(path)
    assert len(report.problems) == 1 and "cannot read parquet" in report.problems[0].message
    result = run_cli("data", "validate", str(path))
    assert result.returncode == 1 and "Traceback" not in result.stderr


# (problems, bad records counted)
COUNT_BAD_CASES = [
    ([], 0),  # nothing wrong
    ([Problem("f", 2, "a", "x"), Problem("f", 2, "b", "y")], 1),  # two problems of one record
    ([Problem("f", 2, "a", "x"), Problem("f", 3, "a", "y")], 2),  # two records
    ([Problem("f", 0, "", "empty")], 1),  # a whole-file problem counts once
    ([Problem("f", 0, "a", "x", index=0), Problem("f", 0, "b", "x", index=0), Problem("f", 0, "a", "x", index=1)], 2),  # array items
]


@pytest.mark.parametrize("problems,expected", COUNT_BAD_CASES)
def test_count_bad(problems, expected):
    assert count_bad(problems) == expected


# (problem, how it prints)
PROBLEM_FORMAT_CASES = [
    (Problem("d.jsonl", 3, "speed", "bad"), "d.jsonl:3: speed: bad"),  # a field of a line
    (Problem("d.jsonl", 3, "", "bad JSON"), "d.jsonl:3: bad JSON"),  # a whole line
    (Problem("d.jsonl", 0, "", "empty file"), "d.jsonl: empty file"),  # the whole file
    (Problem("d.json", 0, "image", "missing", index=4), "d.json[4]: image: missing"),  # an item of a JSON array
]


@pytest.mark.parametrize("problem,text", PROBLEM_FORMAT_CASES)
def test_problem_format(problem, text):
    assert str(problem) == text
