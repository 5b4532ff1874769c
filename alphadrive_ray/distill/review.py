"""The human review of distilled reasoning: a terminal session, one command per line.

    alphadrive-ray distill review artifacts/reasoning.jsonl

Each sample shows its id, image path, speed, navigation, true plan and the teacher's
reasoning; the reviewer answers `a` (accept), `r` (reject), `e` (edit: the next line is
the replacement text), `s` (skip for this session) or `q` (quit). Commands come from stdin,
so a session can be scripted (`printf 'a\\nr\\nq\\n' | alphadrive-ray distill review OUT`).

Resumable: every decision is appended to a journal next to the output
(`OUT.review-journal.jsonl`, flushed and fsynced) before the next sample is shown; quitting
or finishing folds the journal into the output (atomically) and removes it. A session that
was killed leaves the journal, which the next session (or `distill run`) applies first.

The `review` field of each record holds the state:

    status             pending | accepted | edited | rejected | filtered | failed
    teacher_reasoning  what the teacher wrote (normalised to one line)
    filters            the automatic filters it failed (status "filtered")

`reasoning` follows the status: the teacher's text when pending or accepted, the reviewer's
text when edited, absent when rejected, filtered or failed. A record without reasoning is
still a valid planning sample (for RL); SFT uses the records that have one. To train only
on human-checked reasoning, keep `review.status` in (accepted, edited).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import IO, Iterable

from alphadrive_ray.data.records import Record, load_records, write_records
from alphadrive_ray.errors import UserError

STATUSES: tuple[str, ...] = ("pending", "accepted", "edited", "rejected", "filtered", "failed")
DECIDED: tuple[str, ...] = ("accepted", "edited", "rejected")

HELP = "[a]ccept  [r]eject  [e]dit  [s]kip  [q]uit"


def journal_path(out_path: str | Path) -> Path:
    out = Path(out_path)
    return out.with_name(out.name + ".review-journal.jsonl")


def review_of(record: Record) -> dict:
    review = record.extra.get("review")
    return review if isinstance(review, dict) else {}


def status_of(record: Record) -> str:
    return str(review_of(record).get("status", "pending" if record.reasoning else "failed"))


def apply_decision(record: Record, status: str, text: str | None = None) -> Record:
    """The record after a reviewer's decision (`text` is the edit, for "edited")."""
    if status not in DECIDED:
        raise ValueError(f"not a review decision: {status!r}")
    review = dict(review_of(record))
    review["status"] = status
    review["reviewed_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if status == "accepted":
        reasoning = review.get("teacher_reasoning") or record.reasoning
    elif status == "edited":
        if not text:
            raise ValueError("an edit needs the new text")
        reasoning = text
    else:
        reasoning = None
    return replace(record, reasoning=reasoning, extra={**record.extra, "review": review})


def read_journal(path: Path) -> list[dict]:
    """Decisions in order; a torn last line (the process died mid-write) is ignored."""
    if not path.exists():
        return []
    entries = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and entry.get("status") in DECIDED and isinstance(entry.get("id"), str):
                entries.append(entry)
    return entries


def apply_journal(records: list[Record], entries: Iterable[dict]) -> list[Record]:
    index = {r.id: i for i, r in enumerate(records)}
    out = list(records)
    for entry in entries:
        i = index.get(entry["id"])
        if i is not None:
            out[i] = apply_decision(out[i], entry["status"], entry.get("reasoning"))
    return out


def load_reviewed(out_path: str | Path) -> list[Record]:
    """The records of a distill output with any unsaved review decisions applied."""
    records = load_records(out_path, check_images=False)
    return apply_journal(records, read_journal(journal_path(out_path)))


def save_reviewed(out_path: str | Path, records: list[Record]) -> None:
    write_records(out_path, records)
    journal_path(out_path).unlink(missing_ok=True)


def counts(records: Iterable[Record]) -> Counter:
    return Counter(status_of(r) for r in records)


def format_counts(c: Counter) -> str:
    return ", ".join(f"{s} {c[s]}" for s in STATUSES if c[s] or s in ("pending",) + DECIDED)


class Journal:
    def __init__(self, path: Path):
        self.path = path
        self._fh: IO[str] | None = None

    def append(self, entry: dict) -> None:
        if self._fh is None:
            self._fh = open(self.path, "a", encoding="utf-8")
        self._fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def review_session(
    out_path: str | Path,
    stdin: IO[str],
    stdout: IO[str],
    *,
    include_filtered: bool = False,
    revisit: bool = False,
) -> Counter:
    """Run the session of the module docstring; returns the final status counts."""
    from alphadrive_ray.distill.filters import check_reasoning, normalise_reasoning

    out_path = Path(out_path)
    records = load_reviewed(out_path)
    wanted = {"pending"} | ({"filtered"} if include_filtered else set()) | (set(DECIDED) if revisit else set())
    queue = [i for i, r in enumerate(records) if status_of(r) in wanted and review_of(r).get("teacher_reasoning")]
    before = counts(records)

    def say(text: str = "") -> None:
        stdout.write(text + "\n")
        stdout.flush()

    def ask(prompt: str) -> str | None:
        stdout.write(prompt)
        stdout.flush()
        line = stdin.readline()
        return None if line == "" else line.rstrip("\r\n")

    say(f"{out_path}: {len(records)} record(s) ({format_counts(before)}); {len(queue)} to review")
    if not queue:
        say("nothing to review" + ("" if include_filtered else " (pass --include-filtered to review filtered samples)"))
    journal = Journal(journal_path(out_path))
    decided = 0
    try:
        for n, i in enumerate(queue, start=1):
            record = records[i]
            review = review_of(record)
            say("")
            say(f"[{n}/{len(queue)}] {record.id}   status: {status_of(record)}")
            say(f"  image:      {record.image}")
            say(f"  speed:      {record.speed:.1f} m/s   navigation: '{record.navigation}'")
            say(f"  true plan:  {record.speed_action}, {record.path_action}")
            say(f"  reasoning:  {record.reasoning or review.get('teacher_reasoning', '')}")
            if review.get("filters"):
                say(f"  filtered:   {'; '.join(review['filters'])}")
            quit_now = False
            while True:
                answer = ask(f"{HELP} > ")
                if answer is None:
                    quit_now = True
                    break
                command = answer.strip().lower()
                if command in ("q", "quit"):
                    quit_now = True
                    break
                if command in ("s", "skip"):
                    break
                if command in ("a", "accept", "r", "reject"):
                    status = "accepted" if command.startswith("a") else "rejected"
                    entry = {"id": record.id, "status": status}
                elif command in ("e", "edit"):
                    text = ask("new reasoning (one line; empty to cancel) > ")
                    if text is None:
                        quit_now = True
                        break
                    text = normalise_reasoning(text)
                    if not text:
                        say("  edit cancelled")
                        continue
                    flags = check_reasoning(text, record.speed_action, record.path_action, record.navigation)
                    if flags:
                        say("  note: the edit trips the filters: " + "; ".join(map(str, flags)))
                    entry = {"id": record.id, "status": "edited", "reasoning": text}
                else:
                    say(f"  unknown command {answer.strip()!r}; {HELP}")
                    continue
                journal.append(entry)
                records[i] = apply_decision(record, entry["status"], entry.get("reasoning"))
                decided += 1
                say(f"  -> {entry['status']}")
                break
            if quit_now:
                break
    finally:
        journal.close()
        if decided or journal.path.exists():
            save_reviewed(out_path, records)
    after = counts(records)
    say(f"{decided} decision(s) this session; {format_counts(after)}; saved {out_path}")
    return after


def run_review(args) -> int:
    import sys

    path = Path(args.out)
    if not path.exists():
        raise UserError(f"{path} not found; write it first with `alphadrive-ray distill run IN {path} ...`")
    records = load_records(path, check_images=False)
    if not any("review" in r.extra for r in records):
        raise UserError(f"{path} has no review fields; is it the output of `alphadrive-ray distill run`?")
    review_session(path, sys.stdin, sys.stdout, include_filtered=args.include_filtered, revisit=args.all)
    return 0
