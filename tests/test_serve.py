"""`alphadrive-ray serve` on loopback, called by the real `openai` client, and distillation through it.

One server process (the tiny Qwen2-VL, HF engine on CPU) is started for the module.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from alphadrive_ray.cli import main
from alphadrive_ray.data.records import load_records
from alphadrive_ray.prompts import planning_prompt

NAME = "tiny-planner"
KEY = "sk-sentinel-serve-5d1e8b0c2a7f4e93"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from alphadrive_ray.data.synth import generate_dataset

    path, _ = generate_dataset(tmp_path_factory.mktemp("serve-scenes"), 3, seed=5, size=96)
    return path


@pytest.fixture(scope="module")
def server(tiny_vl_dir, dataset, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    port = free_port()
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "alphadrive_ray",
                "serve",
                tiny_vl_dir,
                "--port",
                str(port),
                "--served-model-name",
                NAME,
                "--allowed-local-media-path",
                str(dataset.parent / "images"),
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            pytest.fail(f"serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"serve did not come up:\n{log.read_text()}")
        time.sleep(0.2)
    yield {"url": url, "port": port, "log": log, "proc": proc}
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server['url']}/v1", api_key=KEY, max_retries=0, timeout=120)


def data_url(path: str) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def planning_messages(record, image_url: str | None = None) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_url or data_url(record.image)}},
                {"type": "text", "text": planning_prompt(record.speed, record.navigation)},
            ],
        }
    ]


def test_health_and_models(server, client):
    assert httpx.get(f"{server['url']}/health").json()["status"] == "ok"
    assert [m.id for m in client.models.list().data] == [NAME]


def test_sampling_n_seed_and_usage(client, dataset):
    record = load_records(dataset)[0]

    def ask(seed):
        return client.chat.completions.create(
            model=NAME,
            messages=planning_messages(record),
            n=2,
            max_tokens=6,
            temperature=1.0,
            seed=seed,
        )

    first, again, other = ask(11), ask(11), ask(12)
    assert len(first.choices) == 2 and [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]  # seeded
    assert [c.message.content for c in first.choices] != [c.message.content for c in other.choices]
    assert first.choices[0].message.content != first.choices[1].message.content  # n samples, not one copied
    for c in first.choices:
        assert c.finish_reason in ("stop", "length") and c.message.role == "assistant"
    # usage: the prompt includes the image's 16 placeholder tokens; both choices are counted
    assert first.usage.prompt_tokens > 16 + 20
    assert 2 <= first.usage.completion_tokens <= 12
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    assert first.model == NAME and first.object == "chat.completion"


def test_greedy_answer_equals_the_rollout_engine(client, dataset, tiny_vl_dir):
    """The served planner answers exactly as the HF engine does for the same prompt and image."""
    from alphadrive_ray.engines.base import SamplingParams
    from alphadrive_ray.engines.hf import HFEngine

    record = load_records(dataset)[1]
    (group,) = HFEngine(tiny_vl_dir).generate([record], SamplingParams(greedy=True, max_new_tokens=8))
    served = client.chat.completions.create(model=NAME, messages=planning_messages(record), max_tokens=8, temperature=0)
    assert served.choices[0].message.content == group.completions[0].text
    assert served.usage.completion_tokens == len(group.completions[0].token_ids)
    # greedy with n > 1: the one arg-max answer, n times
    several = client.chat.completions.create(model=NAME, messages=planning_messages(record), max_tokens=8, temperature=0, n=2)
    assert [c.message.content for c in several.choices] == [group.completions[0].text] * 2

    # `stop` cuts the text before the stop string
    text = served.choices[0].message.content
    assert len(text) >= 4, text
    stop = text[2:4]
    cut = client.chat.completions.create(model=NAME, messages=planning_messages(record), max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_local_image_files_under_the_allowed_folder(client, dataset):
    record = load_records(dataset)[0]
    by_path = client.chat.completions.create(model=NAME, messages=planning_messages(record, record.image), max_tokens=4, temperature=0)
    by_data = client.chat.completions.create(model=NAME, messages=planning_messages(record), max_tokens=4, temperature=0)
    assert by_path.choices[0].message.content == by_data.choices[0].message.content


def _png_data_url() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _message(image_url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": "plan"}]}]


# (case, request body, status, text in the error message)
ERRORS = [
    ("bad base64", {"messages": _message("data:image/png;base64,@@not-base64@@")}, 400, "not valid base64"),
    ("not an image", {"messages": _message("data:image/png;base64," + base64.b64encode(b"hello").decode())}, 400, "not an image"),
    ("not a data URL", {"messages": _message("data:image/png,rawbytes")}, 400, "only base64 data URLs"),
    ("file outside the allowed folder", {"messages": _message("/etc/hostname")}, 400, "outside the allowed media folder"),
    ("unknown scheme", {"messages": _message("ftp://example.com/a.png")}, 400, "unsupported URL"),
    # image URLs are not fetched unless --allowed-media-domains names their host (SSRF)
    ("remote image URL", {"messages": _message("http://169.254.169.254/latest/meta-data")}, 400, "does not fetch image URLs"),
    ("missing messages", {}, 400, "messages: Field required"),
    ("empty messages", {"messages": []}, 400, "messages"),
    ("unknown part", {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, 400, "unsupported content part"),
    ("unknown role", {"messages": [{"role": "tool", "content": "x"}]}, 400, "is not supported"),
    ("n too large", {"messages": [{"role": "user", "content": "x"}], "n": 100}, 400, "n: "),
    ("temperature out of range", {"messages": [{"role": "user", "content": "x"}], "temperature": 5}, 400, "temperature"),
    ("max_tokens above the limit", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}, 400, "above this server's limit"),
    ("streaming", {"messages": [{"role": "user", "content": "x"}], "stream": True}, 400, "streaming is not supported"),
    ("unknown model", {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}, 404, "does not exist"),
]


@pytest.mark.parametrize("case,body,status,message", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_are_openai_style(server, case, body, status, message):
    response = httpx.post(f"{server['url']}/v1/chat/completions", json={"model": NAME, **body}, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"]
    assert error["type"] == "invalid_request_error" and "param" in error and "code" in error


def test_errors_through_the_openai_client(client, server):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=NAME, messages=_message("data:image/png;base64,AAAA"))
    assert info.value.body["code"] == "invalid_image"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    # malformed JSON and unknown routes are answered in the same shape
    bad = httpx.post(f"{server['url']}/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "error" in bad.json()
    missing = httpx.get(f"{server['url']}/v1/embeddings")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    # a good image still works after all that
    ok = client.chat.completions.create(model=NAME, messages=_message(_png_data_url()), max_tokens=2)
    assert len(ok.choices) == 1


def test_distill_through_serve(server, dataset, tmp_path, capsys, monkeypatch):
    """The full distill flow, the real openai client against the real server.

    The random model writes garbage, so most answers are filtered; the flow must complete and
    count every answer exactly once.
    """
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = tmp_path / "out.jsonl"
    argv = [
        "distill",
        "run",
        str(dataset),
        str(out),
        "--base-url",
        f"{server['url']}/v1",
        "--model",
        NAME,
        "--max-tokens",
        "8",
        "--concurrency",
        "2",
        "--timeout",
        "120",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "requests: 3 sent, 3 answered, 0 retried, 0 failed" in printed
    records = load_records(out)
    statuses = [r.extra["review"]["status"] for r in records]
    assert len(records) == 3 and set(statuses) <= {"pending", "filtered"}
    filtered = statuses.count("filtered")
    assert f"filters:  {filtered} of 3 answer(s) filtered out" in printed
    for r in records:
        assert isinstance(r.extra["review"]["teacher_reasoning"], str)
        assert (r.reasoning is None) == (r.extra["review"]["status"] == "filtered")
    # the server's usage made it into the summary
    prompt_tokens = int(printed.split("tokens:   ")[1].split(" prompt")[0])
    assert prompt_tokens > 3 * 16
    # a rerun is answered from the cache
    assert main(argv) == 0
    assert "requests: 0 sent" in capsys.readouterr().out
    assert KEY not in server["log"].read_text()


def test_serve_errors(tiny_vl_dir, server, tmp_path):
    def serve(*args):
        return subprocess.run([sys.executable, "-m", "alphadrive_ray", "serve", *args], capture_output=True, text=True, timeout=120)

    cases = [
        ((str(tmp_path / "nope"), "--port", str(free_port())), "model folder not found"),
        ((tiny_vl_dir, "--port", str(server["port"])), "cannot listen"),
        ((tiny_vl_dir, "--allowed-local-media-path", str(tmp_path / "nope"), "--port", str(free_port())), "is not a folder"),
        ((tiny_vl_dir, "--allowed-media-domains", "https://x.org/a", "--port", str(free_port())), "takes host names"),
        ((tiny_vl_dir, "--enforce-eager", "--port", str(free_port())), "--enforce-eager is an option of --engine vllm"),
    ]
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        cases.append(((tiny_vl_dir, "--engine", "vllm", "--port", str(free_port())), "needs vLLM, which is not installed"))
    for args, message in cases:
        proc = serve(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_local_files_are_off_by_default(dataset):
    from alphadrive_ray.serve.app import ApiError, load_image_url

    image = load_records(dataset)[0].image
    with pytest.raises(ApiError, match="local image files are disabled"):
        load_image_url(image, "image_url")
    with pytest.raises(ApiError, match="local image files are disabled"):
        load_image_url(f"file://{image}", "image_url")
    allowed = load_image_url(f"file://{image}", "image_url", Path(image).parent)
    assert allowed.size == (96, 96) and allowed.mode == "RGB"
    # a path that climbs out of the allowed folder is refused even when it starts inside
    with pytest.raises(ApiError, match="outside the allowed media folder"):
        load_image_url(str(Path(image).parent / ".." / "data.jsonl"), "image_url", Path(image).parent)


@pytest.fixture
def image_host():
    """A loopback HTTP server with /image.png and /redirect (to `location`); records each path asked."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import urlparse

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 10, 10)).save(buf, format="PNG")
    state = {"asked": [], "location": ""}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            state["asked"].append(urlparse(self.path).path)
            if self.path.startswith("/redirect"):
                self.send_response(302)
                self.send_header("Location", state["location"])
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(buf.getvalue())

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state["port"] = httpd.server_address[1]
    yield state
    httpd.shutdown()


def test_image_urls_are_fetched_only_from_allowed_hosts(image_host):
    from alphadrive_ray.serve.app import ApiError, load_image_url

    url = f"http://127.0.0.1:{image_host['port']}/image.png"
    with pytest.raises(ApiError) as info:  # the default: no fetching at all
        load_image_url(url, "image_url")
    assert info.value.status == 400 and info.value.code == "remote_media_disabled"
    assert "data URL" in info.value.message and "--allowed-media-domains" in info.value.message
    with pytest.raises(ApiError) as info:
        load_image_url(url, "image_url", allowed_media_domains=("localhost", "images.example.com"))
    assert info.value.status == 400 and info.value.code == "media_domain_not_allowed" and "'127.0.0.1'" in info.value.message
    assert image_host["asked"] == []  # refused before any request left the server
    assert load_image_url(url, "image_url", allowed_media_domains=("127.0.0.1",)).size == (8, 6)
    assert image_host["asked"] == ["/image.png"]


def test_a_redirect_to_another_host_is_refused(image_host):
    from alphadrive_ray.serve.app import ApiError, load_image_url

    image_host["location"] = f"http://localhost:{image_host['port']}/image.png"
    with pytest.raises(ApiError) as info:
        load_image_url(f"http://127.0.0.1:{image_host['port']}/redirect", "image_url", allowed_media_domains=("127.0.0.1",))
    assert info.value.code == "media_domain_not_allowed" and "'localhost'" in info.value.message
    assert image_host["asked"] == ["/redirect"]
    image_host["location"] = "/image.png"  # a redirect within the allowed host is followed
    image = load_image_url(f"http://127.0.0.1:{image_host['port']}/redirect", "image_url", allowed_media_domains=("127.0.0.1",))
    assert image.size == (8, 6)
