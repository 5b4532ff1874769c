"""`distill run`: ask a teacher for the reasoning of every sample, filter it, write the dataset.

    OPENAI_API_KEY=... alphadrive-ray distill run artifacts/scenes/data.jsonl artifacts/reasoning.jsonl \\
        --base-url https://api.openai.com/v1 --model gpt-4o --price-in 2.5 --price-out 10

The loop: load and validate the input (`load_records`) -> for each sample build the
request and its hash -> answer from the cache where possible -> ask the teacher for the
rest (bounded concurrency, retries; each answer cached the moment it arrives) -> filter ->
write every input record, in order, with `reasoning` and a `review` field (see review.py)
-> print the summary. Review decisions already made in OUT survive a rerun as long as the
teacher's text is unchanged.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

from alphadrive_ray.data.records import DatasetError, Record, load_records, write_records
from alphadrive_ray.distill.cache import ResponseCache, TeacherResponse, cache_key
from alphadrive_ray.distill.filters import FILTERS, FilterLimits, check_reasoning, normalise_reasoning
from alphadrive_ray.distill.prompt import build_messages, request_hash, truncate_data_urls
from alphadrive_ray.distill.review import DECIDED, counts, format_counts, journal_path, load_reviewed, review_of
from alphadrive_ray.distill.teacher import CallStats, Job, TeacherSettings
from alphadrive_ray.errors import UserError

DEFAULT_CACHE_DIR = ".distill-cache"  # next to the output file


@dataclass(frozen=True)
class DistillOptions:
    in_path: str
    out_path: str
    teacher: TeacherSettings
    template: str
    api_key_env: str = "OPENAI_API_KEY"
    cache_dir: str | None = None
    limit: int | None = None
    dry_run: bool = False
    skip_bad: bool = False
    temperature: float = 0.2
    max_tokens: int = 160
    seed: int | None = None
    image_detail: str | None = None
    price_in: float = 0.0  # USD per 1M prompt tokens
    price_out: float = 0.0  # USD per 1M completion tokens
    limits: FilterLimits = FilterLimits()

    @property
    def cache_folder(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.out_path).parent / DEFAULT_CACHE_DIR


def build_body(record: Record, opts: DistillOptions) -> dict:
    """The exact chat-completions request for one sample."""
    body = {
        "model": opts.teacher.model,
        "messages": build_messages(record, opts.template, opts.image_detail),
        "temperature": opts.temperature,
        "max_tokens": opts.max_tokens,
    }
    if opts.seed is not None:
        body["seed"] = opts.seed
    return body


def body_hash(body: dict) -> str:
    return request_hash({k: v for k, v in body.items() if k != "model"})


def print_dry_run(record: Record, n_samples: int, opts: DistillOptions, out: IO[str]) -> None:
    body = build_body(record, opts)
    shown = {"base_url": opts.teacher.base_url, **truncate_data_urls(body)}
    key_set = "set" if os.environ.get(opts.api_key_env) else "NOT set"
    print(f"dry run: the request for sample {record.id!r}, the first of {n_samples}; nothing is sent", file=out)
    print(json.dumps(shown, indent=2, ensure_ascii=False), file=out)
    print(f"request hash {body_hash(body)}; cache {opts.cache_folder / 'responses.sqlite'}", file=out)
    print(
        f"timeout {opts.teacher.timeout:g}s, {opts.teacher.max_retries} retries, concurrency {opts.teacher.concurrency}; "
        f"API key from ${opts.api_key_env} ({key_set})",
        file=out,
    )


def previous_output(out_path: Path) -> dict[str, Record]:
    """Records of an existing output (with unsaved review decisions), to carry decisions over."""
    if not out_path.exists():
        return {}
    try:
        return {r.id: r for r in load_reviewed(out_path)}
    except DatasetError as exc:
        raise UserError(
            f"{out_path} exists but cannot be read as a dataset, so its review decisions cannot be kept; "
            f"move it away or pick another output path.\n{exc}"
        ) from None


def output_record(
    record: Record,
    response: TeacherResponse | None,
    error: str | None,
    opts: DistillOptions,
    rhash: str,
    previous: Record | None,
) -> tuple[Record, list]:
    """The output record for one sample and the filter flags of its reasoning."""
    extra = {k: v for k, v in record.extra.items() if k != "review"}
    review: dict = {"teacher_model": opts.teacher.model, "request_hash": rhash}
    if response is None:
        review.update(status="failed", error=error or "no response")
        return replace(record, reasoning=None, extra={**extra, "review": review}), []
    text = normalise_reasoning(response.content)
    flags = check_reasoning(
        text,
        record.speed_action,
        record.path_action,
        record.navigation,
        finish_reason=response.finish_reason,
        limits=opts.limits,
    )
    review.update(status="filtered" if flags else "pending", teacher_reasoning=text, filters=[str(f) for f in flags])
    reasoning = None if flags else text
    if previous is not None:
        old = review_of(previous)
        if old.get("status") in DECIDED and old.get("teacher_reasoning") == text and old.get("teacher_model") == opts.teacher.model:
            review = {**review, **{k: v for k, v in old.items() if k not in ("request_hash", "filters")}}
            reasoning = previous.reasoning
    return replace(record, reasoning=reasoning, extra={**extra, "review": review}), flags


def run_distill(opts: DistillOptions, out: IO[str] | None = None, err: IO[str] | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    records = load_records(opts.in_path, skip_bad=opts.skip_bad, log=lambda m: print(m, file=err))
    if opts.limit:
        records = records[: opts.limit]
    if opts.dry_run:
        print_dry_run(records[0], len(records), opts, out)
        return 0
    api_key = os.environ.get(opts.api_key_env, "")
    if not api_key:
        raise UserError(
            f"no API key: set the environment variable {opts.api_key_env} (or name another one with --api-key-env); "
            f"for a local server that does not check keys any value works, e.g. {opts.api_key_env}=EMPTY"
        )
    out_path = Path(opts.out_path)
    previous = previous_output(out_path)

    cache = ResponseCache(opts.cache_folder)
    responses: dict[str, TeacherResponse] = {}
    hashes: dict[str, str] = {}
    failures: dict[str, str] = {}
    jobs: list[Job] = []
    for record in records:
        rhash = body_hash(build_body(record, opts))
        hashes[record.id] = rhash
        key = cache_key(record.id, rhash, opts.teacher.model)
        hit = cache.get(key)
        if hit is not None:
            responses[record.id] = hit
        else:
            jobs.append(Job(record.id, key, rhash, build_body=functools.partial(build_body, record, opts)))
    from_cache = len(responses)
    stats = CallStats()
    if jobs:
        import asyncio

        from tqdm import tqdm

        from alphadrive_ray.distill.teacher import run_jobs

        bar = tqdm(total=len(jobs), unit="sample", desc="distill", file=err, disable=not err.isatty())

        def on_response(job, response: TeacherResponse) -> None:
            cache.put(job.key, job.sample_id, opts.teacher.model, job.request_hash, response)
            responses[job.sample_id] = response
            bar.update(1)

        def on_failure(job, message: str) -> None:
            failures[job.sample_id] = message
            bar.update(1)

        try:
            asyncio.run(run_jobs(jobs, opts.teacher, api_key, on_response, on_failure, stats))
        except KeyboardInterrupt:
            bar.close()
            print(
                f"interrupted: {len(responses) - from_cache} answer(s) received this run are cached in "
                f"{cache.path}; rerun the same command to continue where it stopped",
                file=err,
            )
            raise
        finally:
            bar.close()
            cache.close()
    else:
        cache.close()

    results = []
    flag_counts: Counter = Counter()
    for record in records:
        new, flags = output_record(record, responses.get(record.id), failures.get(record.id), opts, hashes[record.id], previous.get(record.id))
        results.append(new)
        flag_counts.update({f.filter for f in flags})
    write_records(out_path, results)
    journal_path(out_path).unlink(missing_ok=True)  # its decisions are in `previous`, now written

    _print_summary(out, opts, records, results, stats, from_cache, len(jobs), flag_counts, failures)
    if failures:
        first_id, first = next(iter(failures.items()))
        print(
            f"error: {len(failures)} sample(s) got no answer (first: {first_id}: {first}); rerun the same command to retry only those",
            file=err,
        )
        return 1
    return 0


def _print_summary(out, opts, records, results, stats: CallStats, from_cache, asked, flag_counts, failures) -> None:
    status = counts(results)
    retried = sum(stats.retries.values())
    causes = ", ".join(f"{k}: {v}" for k, v in sorted(stats.retries.items()))
    cost = stats.prompt_tokens * opts.price_in / 1e6 + stats.completion_tokens * opts.price_out / 1e6
    lines = [
        f"distill: {len(records)} sample(s) from {opts.in_path}; teacher {opts.teacher.model} at {opts.teacher.base_url}",
        f"  cache:    {from_cache} answered from {opts.cache_folder}, {asked} asked",
        f"  requests: {stats.requests} sent, {stats.ok} answered, {retried} retried"
        + (f" ({causes})" if causes else "")
        + f", {len(failures)} failed",
        f"  tokens:   {stats.prompt_tokens} prompt + {stats.completion_tokens} completion this run"
        + (
            f"; estimated cost ${cost:.4f} (at ${opts.price_in:g} / ${opts.price_out:g} per 1M tokens)"
            if opts.price_in or opts.price_out
            else "; cost not estimated (pass --price-in / --price-out, USD per 1M tokens)"
        ),
        f"  filters:  {status['filtered']} of {len(results) - len(failures)} answer(s) filtered out; "
        + ", ".join(f"{name} {flag_counts[name]}" for name in FILTERS),
        f"  review:   {format_counts(status)}" + (f" -> alphadrive-ray distill review {opts.out_path}" if status["pending"] else ""),
        f"wrote {len(results)} record(s) to {opts.out_path}",
    ]
    print("\n".join(lines), file=out)
