"""`distill review`: the terminal session, driven through stdin, and its resumability."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alphadrive_ray.cli import main
from alphadrive_ray.data.records import Record, load_records, write_records
from alphadrive_ray.distill.review import journal_path, load_reviewed, review_session

TEACHER = {
    "s0": "The light ahead is red, so I slow down and stay in my lane.",
    "s1": "A pedestrian is crossing ahead, so I slow down before the crossing.",
    "s2": "Cones close my lane, so I slow down and keep to my lane for now.",
    "s3": "A car ahead is braking, so I slow down to keep a safe gap.",
    "s4": "The road is clear, so I accelerate.",  # contradicts DECELERATE: filtered
}


@pytest.fixture
def out(tmp_path) -> Path:
    """A distill output: s0-s3 pending, s4 filtered, s5 failed."""
    from PIL import Image

    image = tmp_path / "img.png"
    Image.new("RGB", (32, 32), (90, 90, 90)).save(image)
    records = []
    for i in range(6):
        sid = f"s{i}"
        text = TEACHER.get(sid)
        review = {"teacher_model": "t", "request_hash": "h"}
        if i < 4:
            review.update(status="pending", teacher_reasoning=text, filters=[])
        elif i == 4:
            review.update(status="filtered", teacher_reasoning=text, filters=["contradiction: says 'accelerate'"])
        else:
            review.update(status="failed", error="HTTP 500")
        records.append(
            Record(
                id=sid,
                image=str(image),
                speed=9.0,
                navigation="go straight",
                speed_action="DECELERATE",
                path_action="STRAIGHT",
                reasoning=text if i < 4 else None,
                extra={"review": review, "scene": {"k": i}},
            )
        )
    path = tmp_path / "out.jsonl"
    write_records(path, records)
    return path


def review_cli(out: Path, stdin: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "alphadrive_ray", "distill", "review", str(out), *flags],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def by_id(path: Path) -> dict[str, Record]:
    return {r.id: r for r in load_records(path, check_images=False)}


def test_session_through_stdin(out):
    edit = "The signal ahead is red, so I brake gently and stay in my lane."
    proc = review_cli(out, f"a\nwhat\nr\ne\n{edit}\ns\n")  # then EOF
    assert proc.returncode == 0, proc.stderr
    assert "[1/4] s0" in proc.stdout and "[4/4] s3" in proc.stdout  # pending samples only
    assert "s4" not in proc.stdout  # filtered ones need --include-filtered
    assert "unknown command 'what'" in proc.stdout
    assert "3 decision(s) this session" in proc.stdout
    records = by_id(out)
    assert records["s0"].extra["review"]["status"] == "accepted" and records["s0"].reasoning == TEACHER["s0"]
    assert records["s1"].extra["review"]["status"] == "rejected" and records["s1"].reasoning is None
    assert records["s2"].extra["review"]["status"] == "edited" and records["s2"].reasoning == edit
    assert records["s2"].extra["review"]["teacher_reasoning"] == TEACHER["s2"]  # the original is kept
    assert records["s3"].extra["review"]["status"] == "pending"  # skipped
    assert records["s4"].extra["review"]["status"] == "filtered" and records["s5"].extra["review"]["status"] == "failed"
    assert records["s0"].extra["scene"] == {"k": 0}  # other fields survive
    assert not journal_path(out).exists()  # folded into the output


def test_quit_then_resume(out):
    first = review_cli(out, "accept\nq\nr\n")  # the "r" after quit is never read
    assert first.returncode == 0
    assert by_id(out)["s1"].extra["review"]["status"] == "pending"
    second = review_cli(out, "r\n")
    assert "3 to review" in second.stdout and "[1/3] s1" in second.stdout  # starts where it stopped
    statuses = {k: r.extra["review"]["status"] for k, r in by_id(out).items()}
    assert statuses == {"s0": "accepted", "s1": "rejected", "s2": "pending", "s3": "pending", "s4": "filtered", "s5": "failed"}


def test_a_killed_session_loses_no_decision(out):
    proc = subprocess.Popen(
        [sys.executable, "-m", "alphadrive_ray", "distill", "review", str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdin.write("a\nr\n")
    proc.stdin.flush()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if journal_path(out).exists() and len(journal_path(out).read_text().splitlines()) == 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    # the output itself was not rewritten, but the journal has both decisions ...
    assert by_id(out)["s0"].extra["review"]["status"] == "pending"
    statuses = {r.id: r.extra["review"]["status"] for r in load_reviewed(out)}
    assert statuses["s0"] == "accepted" and statuses["s1"] == "rejected"
    # ... and the next session starts after them
    shown = io.StringIO()
    review_session(out, io.StringIO("q\n"), shown)
    assert "[1/2] s2" in shown.getvalue()
    assert by_id(out)["s1"].extra["review"]["status"] == "rejected" and not journal_path(out).exists()


def test_filtered_samples_can_be_overruled(out):
    shown = io.StringIO()
    review_session(out, io.StringIO("s\ns\ns\ns\na\n"), shown, include_filtered=True)
    assert "filtered:   contradiction" in shown.getvalue()
    s4 = by_id(out)["s4"]
    assert s4.extra["review"]["status"] == "accepted" and s4.reasoning == TEACHER["s4"]  # restored


def test_revisit_decided_samples(out):
    review_session(out, io.StringIO("r\n"), io.StringIO())
    assert by_id(out)["s0"].reasoning is None
    shown = io.StringIO()
    review_session(out, io.StringIO("a\n"), shown, revisit=True)  # s0 first again, now accepted
    assert "[1/4] s0   status: rejected" in shown.getvalue()
    assert by_id(out)["s0"].reasoning == TEACHER["s0"]


def test_edit_details(out):
    shown = io.StringIO()
    # an empty edit cancels; an edit that trips a filter is kept but noted; EOF mid-edit quits
    review_session(out, io.StringIO("e\n\ne\n  I accelerate hard now.  \ne\n"), shown)
    text = shown.getvalue()
    assert "edit cancelled" in text and "note: the edit trips the filters: contradiction" in text
    records = by_id(out)
    assert records["s0"].extra["review"]["status"] == "edited" and records["s0"].reasoning == "I accelerate hard now."
    assert records["s1"].extra["review"]["status"] == "pending"


def test_review_errors(tmp_path, capsys):
    assert main(["distill", "review", str(tmp_path / "missing.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err
    from alphadrive_ray.data.synth import generate_dataset

    plain, _ = generate_dataset(tmp_path / "scenes", 2, seed=0, size=64)
    assert main(["distill", "review", str(plain)]) == 2
    assert "has no review fields" in capsys.readouterr().err


def test_journal_with_a_torn_last_line(out):
    journal_path(out).write_text(json.dumps({"id": "s0", "status": "rejected"}) + "\n" + '{"id": "s1", "sta')
    statuses = {r.id: r.extra["review"]["status"] for r in load_reviewed(out)}
    assert statuses["s0"] == "rejected" and statuses["s1"] == "pending"
