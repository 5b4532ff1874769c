"""Calling the teacher: the `openai` client, bounded concurrency, retries with backoff.

The client's own retries are turned off (`max_retries=0`) so that one loop decides and
counts every retry:

- retried: HTTP 408 / 409 / 429 / 5xx, timeouts, connection errors, and 200 responses
  that are not a chat completion (malformed JSON, no `choices`);
- a failure of the sample (not cached, so a rerun asks again): any other 4xx, or the
  retries running out;
- fatal, the run stops: 401 / 403 (the key) and 404 (the model or the base URL), which
  would fail every sample the same way.

Delays grow exponentially with "equal jitter" (half fixed, half random), so concurrent
workers that fail together do not retry together; a server's `Retry-After` (or OpenAI's
`retry-after-ms`) is a floor. The API key goes to the client and nowhere else: every
error message is passed through `redact` before it is stored or printed.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping, Sequence

from alphadrive_ray import interrupts
from alphadrive_ray.distill.cache import TeacherResponse
from alphadrive_ray.errors import UserError

RETRY_AFTER_MAX_S = 600.0  # a longer Retry-After is a misconfigured server; don't sleep for hours
FATAL_STATUS = {401: "the API key was rejected", 403: "the API key is not allowed to use this model", 404: "not found"}


@dataclass(frozen=True)
class TeacherSettings:
    base_url: str
    model: str
    concurrency: int = 8
    timeout: float = 60.0
    """Seconds per request (connect + response)."""
    max_retries: int = 6
    """Retries per sample after the first attempt."""
    backoff_base: float = 1.0
    backoff_max: float = 60.0


@dataclass
class CallStats:
    requests: int = 0  # HTTP attempts sent
    ok: int = 0
    retries: Counter = field(default_factory=Counter)  # cause -> count
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class FatalTeacherError(UserError):
    pass


class MalformedResponse(Exception):
    pass


@dataclass
class Attempt:
    """What one failed attempt means for the loop."""

    cause: str  # "429", "5xx", "timeout", "connection", "malformed", "http 400", ...
    message: str
    retryable: bool
    fatal: bool = False
    retry_after: float | None = None


def redact(text: str, secret: str | None) -> str:
    if secret and len(secret) >= 4:
        text = text.replace(secret, "***")
    return text


def parse_retry_after(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms` or `Retry-After` (seconds or an HTTP date); None if absent."""
    if not headers:
        return None
    lower = {k.lower(): v for k, v in headers.items()}
    ms = lower.get("retry-after-ms")
    if ms is not None:
        try:
            return min(max(float(ms) / 1000.0, 0.0), RETRY_AFTER_MAX_S)
        except ValueError:
            pass
    value = lower.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_MAX_S)


def backoff_delay(retry: int, base: float, cap: float, retry_after: float | None, rng: random.Random) -> float:
    """Seconds before retry number `retry` (0 = the first retry).

    Exponential with equal jitter: d = min(cap, base * 2**retry), wait in [d/2, d]. A
    server's Retry-After is honoured as a floor, plus up to one `base` of jitter.
    """
    d = min(cap, base * (2.0**retry))
    delay = d / 2 + rng.uniform(0.0, d / 2)
    if retry_after is not None:
        delay = max(delay, retry_after + rng.uniform(0.0, base))
    return delay


def parse_completion(text: str) -> TeacherResponse:
    """The first choice of a chat completion body; MalformedResponse when it is not one."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MalformedResponse(f"response is not JSON ({exc.msg if hasattr(exc, 'msg') else exc})") from None
    if not isinstance(data, dict):
        raise MalformedResponse(f"response is a JSON {type(data).__name__}, not an object")
    if isinstance(data.get("error"), dict):
        raise MalformedResponse(f"response carries an error: {str(data['error'].get('message', ''))[:200]}")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise MalformedResponse("response has no choices")
    message = choices[0].get("message")
    if not isinstance(message, dict):
        raise MalformedResponse("response choice has no message")
    content = message.get("content")
    if content is None and isinstance(message.get("refusal"), str):
        content = message["refusal"]  # a structured refusal is still the teacher's answer
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise MalformedResponse(f"message content is a {type(content).__name__}, not text")
    usage: dict = data["usage"] if isinstance(data.get("usage"), dict) else {}

    def tokens(name: str) -> int:
        value = usage.get(name)
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 else 0

    finish = choices[0].get("finish_reason")
    return TeacherResponse(
        content=content,
        finish_reason=finish if isinstance(finish, str) else None,
        prompt_tokens=tokens("prompt_tokens"),
        completion_tokens=tokens("completion_tokens"),
    )


def classify_error(exc: BaseException, settings: TeacherSettings) -> Attempt:
    import openai

    if isinstance(exc, MalformedResponse):
        return Attempt("malformed", str(exc), retryable=True)
    if isinstance(exc, openai.APITimeoutError):
        return Attempt("timeout", f"no response within {settings.timeout:g}s", retryable=True)
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc.__context__
        detail = f" ({type(cause).__name__}: {cause})" if cause else ""
        return Attempt("connection", f"connection error{detail}", retryable=True)
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        message = f"HTTP {status}: {exc.message}"
        retry_after = parse_retry_after(dict(exc.response.headers)) if exc.response is not None else None
        if status == 429:
            return Attempt("429", message, retryable=True, retry_after=retry_after)
        if status >= 500:
            return Attempt("5xx", message, retryable=True, retry_after=retry_after)
        if status in (408, 409):
            return Attempt(str(status), message, retryable=True, retry_after=retry_after)
        if status in FATAL_STATUS:
            return Attempt(f"http {status}", message, retryable=False, fatal=True)
        return Attempt(f"http {status}", message, retryable=False)
    if isinstance(exc, openai.APIError):  # any other failure the client reports: worth another try
        return Attempt("error", f"{type(exc).__name__}: {exc}", retryable=True)
    raise exc


class SampleFailed(Exception):
    pass


async def call_teacher(
    client: Any,
    body: dict,
    settings: TeacherSettings,
    stats: CallStats,
    rng: random.Random,
    api_key: str | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> TeacherResponse:
    """One sample's request, retried per the module docstring."""
    for retry in range(settings.max_retries + 1):
        stats.requests += 1
        try:
            raw = await client.chat.completions.with_raw_response.create(**body)
            response = parse_completion(raw.text)
        except Exception as exc:  # noqa: BLE001 - classify_error re-raises what it does not know
            attempt = classify_error(exc, settings)
            message = redact(attempt.message, api_key)
            if attempt.fatal:
                hint = {
                    "http 401": " Check the key in the environment variable named by --api-key-env.",
                    "http 403": " Check the key's permissions for this model.",
                    "http 404": " Check --model and --base-url (it usually ends in /v1).",
                }.get(attempt.cause, "")
                raise FatalTeacherError(f"the teacher at {settings.base_url} refused the request: {message}.{hint}") from None
            if not attempt.retryable or retry == settings.max_retries:
                stats.failed += 1
                tries = retry + 1
                raise SampleFailed(f"{message} (after {tries} attempt{'s' if tries > 1 else ''})") from None
            stats.retries[attempt.cause] += 1
            await sleep(backoff_delay(retry, settings.backoff_base, settings.backoff_max, attempt.retry_after, rng))
            continue
        stats.ok += 1
        stats.prompt_tokens += response.prompt_tokens
        stats.completion_tokens += response.completion_tokens
        return response
    raise AssertionError("unreachable")


@dataclass
class Job:
    sample_id: str
    key: str
    request_hash: str
    build_body: Callable[[], dict]


async def run_jobs(
    jobs: Sequence[Job],
    settings: TeacherSettings,
    api_key: str,
    on_response: Callable[[Job, TeacherResponse], None],
    on_failure: Callable[[Job, str], None],
    stats: CallStats,
    seed: int | None = None,
) -> None:
    """Send every job through `concurrency` workers; callbacks run on the event loop thread.

    `on_response` is called as each response arrives (the caller caches it there). A fatal
    error stops the workers from taking new jobs and is raised once in-flight ones end.
    """
    import openai

    rng = random.Random(seed)
    queue: asyncio.Queue[Job] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    fatal: list[BaseException] = []
    client = openai.AsyncOpenAI(
        base_url=settings.base_url,
        api_key=api_key,
        max_retries=0,
        timeout=settings.timeout,
    )

    async def worker() -> None:
        while not fatal:
            interrupts.check()  # a Ctrl-C lost elsewhere still stops the run, between requests
            try:
                job = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            try:
                response = await call_teacher(client, job.build_body(), settings, stats, rng, api_key)
            except SampleFailed as exc:
                on_failure(job, str(exc))
            except FatalTeacherError as exc:
                fatal.append(exc)
                return
            else:
                on_response(job, response)

    try:
        await asyncio.gather(*(worker() for _ in range(max(1, min(settings.concurrency, len(jobs))))))
    finally:
        await client.close()
    if fatal:
        raise fatal[0]
