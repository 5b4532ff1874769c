"""`distill run` against a real HTTP teacher on loopback that injects faults.

The teacher is a `http.server` speaking the chat-completions API. Each sample is known to
it by the hash of its image data URL; a script of faults per sample (429 with Retry-After,
500, slow answers beyond the client timeout, dropped connections, malformed JSON, 4xx)
is played before it answers. It counts every request, so the tests can prove that
retries happen, that the cache prevents duplicates, and that a killed run resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from alphadrive_ray.cli import main
from alphadrive_ray.data.records import Record, load_records, write_records
from alphadrive_ray.distill.prompt import image_data_url

KEY = "sk-sentinel-7f3a9c1e5b2d4f60a8e9c7b1d3f5a2c4"
DECISION = re.compile(r"decision for the next three seconds is '([^']+)'")


def sensible_reply(prompt: str) -> str:
    """What a good teacher says: the decision, explained, in one sentence."""
    decision = DECISION.search(prompt).group(1).replace(", ", " and ")
    return f"Given the traffic around me and the road ahead, I {decision}."


class Teacher:
    """A chat-completions server with scripted faults per sample (see the module docstring)."""

    def __init__(self, faults=None, default_faults=(), reply=sensible_reply, delay=0.0, slow_s=2.0, retry_after="0.05", gate_after=None):
        self.faults = {k: list(v) for k, v in (faults or {}).items()}
        self.default_faults = list(default_faults)
        self.reply = reply
        self.delay = delay
        self.slow_s = slow_s
        self.retry_after = retry_after
        # answer `gate_after` requests, then hold every later one until `gate` is set
        self.gate_after = gate_after
        self.gate = threading.Event()
        self.n_answered = 0
        self.log: list[tuple[str, str, float]] = []  # (sample key, outcome, arrival time)
        self.auth: list[str] = []
        self.lock = threading.Lock()
        teacher = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                teacher.handle(self, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def next_outcome(self, key: str) -> str:
        with self.lock:
            if key not in self.faults:
                self.faults[key] = list(self.default_faults)
            script = self.faults[key]
            return script.pop(0) if script else "ok"

    def handle(self, h: BaseHTTPRequestHandler, body: dict) -> None:
        content = body["messages"][0]["content"]
        url = next(p["image_url"]["url"] for p in content if p["type"] == "image_url")
        prompt = next(p["text"] for p in content if p["type"] == "text")
        key = sample_key(url)
        outcome = self.next_outcome(key)
        with self.lock:
            self.log.append((key, outcome, time.monotonic()))
            self.auth.append(h.headers.get("Authorization", ""))
        if self.delay:
            time.sleep(self.delay)
        if outcome == "drop":
            h.close_connection = True
            return
        if outcome == "slow":
            time.sleep(self.slow_s)
            outcome = "ok"
        if outcome == "ok":
            if self.gate_after is not None:
                with self.lock:
                    self.n_answered += 1
                    held = self.n_answered > self.gate_after
                if held:
                    self.gate.wait(timeout=60)
            text = self.reply(prompt)
            payload = {
                "id": "x",
                "object": "chat.completion",
                "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110},
            }
            return self.send(h, 200, json.dumps(payload).encode())
        if outcome == "malformed":
            return self.send(h, 200, b'{"choices": [{"message": {"content": "trunc')
        status = int(outcome.split("-")[0])
        # a hostile server echoing the credentials back in its error message
        message = f"error {status}; you sent {h.headers.get('Authorization')}"
        headers = {"Retry-After": self.retry_after} if status == 429 else {}
        self.send(h, status, json.dumps({"error": {"message": message, "type": "x"}}).encode(), headers)

    @staticmethod
    def send(h, status: int, data: bytes, headers=None) -> None:
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout); that is the point of "slow"

    def requests_per_sample(self) -> Counter:
        with self.lock:
            return Counter(k for k, _, _ in self.log)


def sample_key(data_url: str) -> str:
    return hashlib.sha256(data_url.encode()).hexdigest()[:16]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from alphadrive_ray.data.synth import generate_dataset

    path, _ = generate_dataset(tmp_path_factory.mktemp("dataset"), 8, seed=3, size=64)
    return path


@pytest.fixture
def keys(dataset) -> dict[str, str]:
    """sample id -> the teacher's key for it."""
    return {r.id: sample_key(image_data_url(r.image)) for r in load_records(dataset)}


@pytest.fixture
def teacher():
    servers = []

    def start(**kw) -> Teacher:
        servers.append(Teacher(**kw))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def distill_args(dataset: Path, out: Path, url: str, *extra: str) -> list[str]:
    return [
        "distill",
        "run",
        str(dataset),
        str(out),
        "--base-url",
        url,
        "--model",
        "teacher-1",
        "--timeout",
        "0.5",
        "--backoff-base",
        "0.01",
        "--backoff-max",
        "0.2",
        *extra,
    ]


def statuses(out: Path) -> dict[str, str]:
    return {r.id: r.extra["review"]["status"] for r in load_records(out)}


def test_every_fault_is_retried_then_answered(dataset, keys, teacher, tmp_path, capsys):
    ids = sorted(keys)
    script = {
        ids[0]: ["429"],
        ids[1]: ["500"],
        ids[2]: ["slow"],  # beyond the 0.5 s timeout
        ids[3]: ["drop"],
        ids[4]: ["malformed"],
        ids[5]: ["503", "429", "502"],  # several in a row
    }
    t = teacher(faults={keys[i]: f for i, f in script.items()})
    out = tmp_path / "out.jsonl"
    rc = main(distill_args(dataset, out, t.url, "--concurrency", "4"))
    printed = capsys.readouterr().out
    assert rc == 0, printed
    # each sample: one request per scripted fault, then exactly one answer
    per_sample = t.requests_per_sample()
    for sample_id, key in keys.items():
        assert per_sample[key] == len(script.get(sample_id, [])) + 1, sample_id
    assert set(statuses(out).values()) == {"pending"}
    for record in load_records(out):
        assert record.reasoning.startswith("Given the traffic around me")
    assert "8 retried (429: 2, 5xx: 3, connection: 1, malformed: 1, timeout: 1), 0 failed" in printed
    assert f"requests: {len(keys) + 8} sent, {len(keys)} answered" in printed
    assert "tokens:   800 prompt + 80 completion this run" in printed


def test_retry_after_is_honoured(dataset, keys, teacher, tmp_path, capsys):
    ids = sorted(keys)
    t = teacher(faults={keys[ids[0]]: ["429"], keys[ids[1]]: ["500"]}, retry_after="1")
    rc = main(distill_args(dataset, tmp_path / "out.jsonl", t.url, "--limit", "2"))
    assert rc == 0, capsys.readouterr()
    times = defaultdict(list)
    for key, _, at in t.log:
        times[key].append(at)
    # the 429 said "Retry-After: 1": the retry waited at least that long ...
    assert times[keys[ids[0]]][1] - times[keys[ids[0]]][0] >= 1.0
    # ... while a 500 without the header is retried after the (tiny) exponential delay
    assert times[keys[ids[1]]][1] - times[keys[ids[1]]][0] < 0.9


def test_retries_run_out_then_a_rerun_asks_only_for_the_failures(dataset, keys, teacher, tmp_path, capsys):
    ids = sorted(keys)
    t = teacher(faults={keys[ids[0]]: ["500"] * 10, keys[ids[1]]: ["400"]})
    out = tmp_path / "out.jsonl"
    rc = main(distill_args(dataset, out, t.url, "--max-retries", "2"))
    captured = capsys.readouterr()
    assert rc == 1
    assert "2 sample(s) got no answer" in captured.err and "rerun" in captured.err
    assert t.requests_per_sample()[keys[ids[0]]] == 3  # 1 + 2 retries
    assert t.requests_per_sample()[keys[ids[1]]] == 1  # a 400 is not retried
    status = statuses(out)
    assert status[ids[0]] == status[ids[1]] == "failed"
    assert sum(s == "pending" for s in status.values()) == len(keys) - 2
    failed = {r.id: r for r in load_records(out)}[ids[1]]
    assert failed.reasoning is None and "HTTP 400" in failed.extra["review"]["error"]

    # the server recovers: the rerun asks for the two failures only
    t.faults.clear()
    before = t.requests_per_sample()
    assert main(distill_args(dataset, out, t.url)) == 0
    new = t.requests_per_sample() - before
    assert new == Counter({keys[ids[0]]: 1, keys[ids[1]]: 1})
    assert set(statuses(out).values()) == {"pending"}


def test_a_rejected_key_stops_the_run(dataset, keys, teacher, tmp_path, capsys):
    t = teacher(default_faults=["401"] * 100)
    rc = main(distill_args(dataset, tmp_path / "out.jsonl", t.url, "--concurrency", "2"))
    err = capsys.readouterr().err
    assert rc == 2
    assert "HTTP 401" in err and "--api-key-env" in err  # the server's status, and our hint
    assert len(t.log) <= 2  # no retries, no further samples: at most the requests in flight
    assert not (tmp_path / "out.jsonl").exists()


def test_cache_makes_reruns_free(dataset, keys, teacher, tmp_path, capsys):
    t = teacher()
    out = tmp_path / "out.jsonl"
    assert main(distill_args(dataset, out, t.url)) == 0
    assert len(t.log) == len(keys)
    first = out.read_text()

    assert main(distill_args(dataset, out, t.url)) == 0
    printed = capsys.readouterr().out
    assert len(t.log) == len(keys)  # not one request more
    assert f"cache:    {len(keys)} answered from" in printed and "0 asked" in printed
    assert out.read_text() == first

    # the key names the model and the request: another model, or another prompt, asks again
    assert main(distill_args(dataset, out, t.url) + ["--model", "teacher-2"]) == 0
    assert len(t.log) == 2 * len(keys)
    template = tmp_path / "prompt.txt"
    template.write_text("Speed {speed} m/s, navigation '{navigation}', decision for the next three seconds is '{decision}'. Why?")
    assert main(distill_args(dataset, out, t.url, "--prompt-template", str(template))) == 0
    assert len(t.log) == 3 * len(keys)


def cached_ids(cache: Path) -> set[str]:
    """Sample ids in the cache, read directly (as another process sees them)."""
    if not (cache / "responses.sqlite").exists():
        return set()
    db = sqlite3.connect(cache / "responses.sqlite")
    try:
        return {row[0] for row in db.execute("SELECT sample_id FROM responses")}
    except sqlite3.OperationalError:  # the table is not created yet
        return set()
    finally:
        db.close()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_a_killed_run_resumes_without_duplicates(sig, dataset, keys, teacher, tmp_path):
    t = teacher(gate_after=4)  # 4 answers, then the server holds the requests in flight
    out = tmp_path / "out.jsonl"
    cache = tmp_path / "cache"
    args = distill_args(dataset, out, t.url, "--concurrency", "2", "--timeout", "5", "--cache", str(cache))
    proc = subprocess.Popen(
        [sys.executable, "-m", "alphadrive_ray", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OPENAI_API_KEY": KEY},
    )
    deadline = time.monotonic() + 60
    while (len(cached_ids(cache)) < 4 or len(t.log) < 6) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)  # with 4 answers cached and 2 requests in flight
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode != 0
    if sig == signal.SIGINT:
        assert proc.returncode == 130
        assert "interrupted" in stderr and "rerun the same command" in stderr
        assert "Traceback" not in stderr
    assert not out.exists()  # it never got to the end

    cached = cached_ids(cache)
    assert len(cached) == 4  # every answer it received was kept

    before = t.requests_per_sample()
    t.gate.set()
    assert main(args) == 0
    rerun = t.requests_per_sample() - before
    # zero requests for the samples it had finished, exactly one for each of the others
    assert rerun == Counter({keys[i]: 1 for i in keys if i not in cached})
    assert set(statuses(out).values()) == {"pending"} and len(statuses(out)) == len(keys)


def test_api_key_never_leaks(dataset, keys, teacher, tmp_path, monkeypatch):
    ids = sorted(keys)
    # the server echoes the Authorization header in its error bodies, for a 429 and a 400
    t = teacher(faults={keys[ids[0]]: ["429"], keys[ids[1]]: ["400"]})
    out = tmp_path / "data" / "out.jsonl"
    monkeypatch.delenv("OPENAI_API_KEY")
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    env["MY_TEACHER_KEY"] = KEY
    base = [sys.executable, "-m", "alphadrive_ray", *distill_args(dataset, out, t.url, "--api-key-env", "MY_TEACHER_KEY")]
    runs = [
        subprocess.run(base, capture_output=True, text=True, env=env, timeout=120),
        subprocess.run(base + ["--dry-run"], capture_output=True, text=True, env=env, timeout=120),
        subprocess.run(
            [sys.executable, "-m", "alphadrive_ray", "distill", "review", str(out)],
            input="a\nr\ne\nThe light is red, so I stop now.\nq\n",
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        ),
    ]
    assert runs[0].returncode == 1  # the 400 sample failed
    assert "HTTP 400" in runs[0].stderr and "***" in runs[0].stderr  # its message, redacted
    assert runs[1].returncode == 0 and "MY_TEACHER_KEY (set)" in runs[1].stdout
    assert runs[2].returncode == 0
    # the key was really used ...
    assert set(t.auth) == {f"Bearer {KEY}"}
    # ... and is nowhere else: not printed, not in the output, the cache or any file written
    for run in runs:
        assert KEY not in run.stdout and KEY not in run.stderr
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "responses.sqlite" for p in files) and out in files
    for path in files:
        assert KEY.encode() not in path.read_bytes(), path


def test_dry_run_prints_the_request_and_sends_nothing(dataset, teacher, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")  # not needed for a dry run
    t = teacher()
    out = tmp_path / "out.jsonl"
    rc = main(distill_args(dataset, out, t.url, "--dry-run", "--seed", "7"))
    printed = capsys.readouterr().out
    assert rc == 0
    assert t.log == []
    request = json.loads(printed[printed.index("{") : printed.rindex("}") + 1])
    assert request["model"] == "teacher-1" and request["base_url"] == t.url
    assert request["temperature"] == 0.2 and request["max_tokens"] == 160 and request["seed"] == 7
    url = request["messages"][0]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,") and re.search(r"\.\.\.\(\d+ chars\)$", url)
    first = load_records(dataset)[0]
    assert f"'{first.id}'" in printed
    assert f"Your current speed is {first.speed:.1f}m/s" in request["messages"][0]["content"][1]["text"]
    assert "OPENAI_API_KEY (NOT set)" in printed
    assert not out.exists() and not (tmp_path / ".distill-cache").exists()


def _write_bad(tmp_path: Path, dataset: Path, kind: str) -> Path:
    rows = [json.loads(line) for line in dataset.read_text().splitlines()]
    for row in rows:
        row["image"] = str((dataset.parent / row["image"]).resolve())
    if kind == "missing image":
        rows[2]["image"] = str(tmp_path / "nope.png")
    else:
        rows[2]["speed_action"] = "HOVER"
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("kind,message", [("missing image", "image file not found"), ("unknown label", "unknown label 'HOVER'")])
def test_bad_inputs_are_clear_errors(kind, message, dataset, teacher, tmp_path):
    t = teacher()
    bad = _write_bad(tmp_path, dataset, kind)
    proc = subprocess.run(
        [sys.executable, "-m", "alphadrive_ray", *distill_args(bad, tmp_path / "out.jsonl", t.url)],
        capture_output=True,
        text=True,
        env={**os.environ, "OPENAI_API_KEY": KEY},
        timeout=120,
    )
    assert proc.returncode == 2
    assert message in proc.stderr and "bad.jsonl:3" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert t.log == []


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--prompt-template", "/nonexistent/prompt.txt"], "cannot read --prompt-template"),
        (["--concurrency", "0"], "--concurrency must be 1-256"),
        (["--base-url", "localhost:8000"], "--base-url must start with http"),
    ],
)
def test_bad_flags_are_clear_errors(argv, message, dataset, tmp_path, capsys):
    assert main(distill_args(dataset, tmp_path / "out.jsonl", "http://127.0.0.1:9/v1") + argv) == 2
    assert message in capsys.readouterr().err


def test_missing_api_key_is_a_clear_error(dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    assert main(distill_args(dataset, tmp_path / "out.jsonl", "http://127.0.0.1:9/v1")) == 2
    assert "set the environment variable OPENAI_API_KEY" in capsys.readouterr().err


def test_filters_are_counted_in_the_summary(dataset, teacher, tmp_path, capsys):
    # one sample per kind of answer; the teacher picks its answer by the speed in the prompt
    answers = {
        "1.0": "The crossing ahead is busy with people, so I wait here until it is clear.",  # kept
        "2.0": "I'm sorry, but I can't help with analysing this image.",  # refusal
        "3.0": "前方有行人，所以我停车等待。",  # wrong language
        "4.0": "The road ahead is empty, so I accelerate to cruising speed.",  # contradicts STOP
        "5.0": "There is a pedestrian ahead. <answer> STOP, STRAIGHT </answer>",  # leak
        "6.0": " ".join(["There is a pedestrian on the crossing ahead of me."] * 8),  # too long
        "7.0": "",  # empty
    }
    images = [r.image for r in load_records(dataset)]
    records = [
        Record(
            id=f"s{i}",
            image=images[i],
            speed=float(i + 1),
            navigation="go straight",
            speed_action="STOP",
            path_action="STRAIGHT",
            reasoning="rule-based text",
        )
        for i in range(len(answers))
    ]
    data = tmp_path / "in.jsonl"
    write_records(data, records)
    t = teacher(reply=lambda prompt: answers[re.search(r"speed is (\d+\.\d)m/s", prompt).group(1)])
    out = tmp_path / "out.jsonl"
    rc = main(distill_args(data, out, t.url, "--price-in", "1000", "--price-out", "2000"))
    printed = capsys.readouterr().out
    assert rc == 0
    assert ("filters:  6 of 7 answer(s) filtered out; empty 1, refusal 1, answer_leak 1, wrong_language 1, too_long 1, contradiction 1") in printed
    assert "estimated cost $0.8400" in printed  # 700 * 1000 / 1e6 + 70 * 2000 / 1e6
    assert "review:   pending 1" in printed and "filtered 6" in printed
    result = {r.id: r for r in load_records(out)}
    assert result["s0"].reasoning == answers["1.0"] and result["s0"].extra["review"]["status"] == "pending"
    for i in range(1, 7):
        review = result[f"s{i}"].extra["review"]
        # filtered: no reasoning to train on (the rule-based text is not kept either), but the
        # teacher's text and the reasons stay in the record for the review
        assert result[f"s{i}"].reasoning is None and review["status"] == "filtered" and review["filters"]
        assert review["teacher_reasoning"] == " ".join(answers[f"{i + 1}.0"].split())


def test_review_decisions_survive_a_rerun(dataset, keys, teacher, tmp_path):
    import io

    from alphadrive_ray.distill.review import journal_path, review_session

    t = teacher()
    out = tmp_path / "out.jsonl"
    args = distill_args(dataset, out, t.url)
    assert main(args) == 0
    ids = [r.id for r in load_records(out)]
    edit = "The signal ahead is red, so I brake gently and stay in my lane."
    review_session(out, io.StringIO(f"a\nr\ne\n{edit}\nq\n"), io.StringIO())
    # and one decision only in the journal, as a killed review session leaves it
    journal_path(out).write_text(json.dumps({"id": ids[3], "status": "rejected"}) + "\n")

    assert main(args) == 0
    assert len(t.log) == len(keys)  # all from the cache
    result = {r.id: r for r in load_records(out)}
    assert [result[i].extra["review"]["status"] for i in ids[:4]] == ["accepted", "rejected", "edited", "rejected"]
    assert result[ids[2]].reasoning == edit and result[ids[1]].reasoning is None
    assert {result[i].extra["review"]["status"] for i in ids[4:]} == {"pending"}
    assert not journal_path(out).exists()


def test_a_changed_teacher_answer_is_reviewed_again():
    from alphadrive_ray.distill.cache import TeacherResponse
    from alphadrive_ray.distill.run import DistillOptions, output_record
    from alphadrive_ray.distill.teacher import TeacherSettings

    opts = DistillOptions("in", "out", TeacherSettings("http://x/v1", "t"), template="{decision}")
    record = Record(id="a", image="/i.png", speed=3.0, navigation="go straight", speed_action="KEEP", path_action="STRAIGHT")
    old_text = "The road ahead is clear, so I keep my speed in my lane."
    accepted = Record(
        **{**record.__dict__, "reasoning": old_text, "extra": {"review": {"status": "accepted", "teacher_reasoning": old_text, "teacher_model": "t"}}}
    )
    same, _ = output_record(record, TeacherResponse(old_text, "stop", 1, 1), None, opts, "h", accepted)
    assert same.extra["review"]["status"] == "accepted"
    new_text = "Traffic flows freely ahead, so I keep my speed in this lane."
    changed, _ = output_record(record, TeacherResponse(new_text, "stop", 1, 1), None, opts, "h", accepted)
    assert changed.extra["review"]["status"] == "pending" and changed.reasoning == new_text
    other_model = DistillOptions("in", "out", TeacherSettings("http://x/v1", "t2"), template="{decision}")
    moved, _ = output_record(record, TeacherResponse(old_text, "stop", 1, 1), None, other_model, "h", accepted)
    assert moved.extra["review"]["status"] == "pending"
