"""The persistent cache of teacher responses: one SQLite file in WAL mode.

A response is stored (and committed) the moment it arrives, keyed by sample id + request
hash + model, so a rerun, or a run restarted after a crash or Ctrl-C, sends no request
whose answer it already has and loses none it received. WAL with `synchronous=NORMAL`
survives a killed process (the commit is in the OS once `put` returns); it can lose the
last commits on a power failure, which only costs re-asking for them. Several processes
may share one cache file (SQLite locks; writers wait up to `busy_timeout`).

The cache stores what the teacher said (raw text, finish reason, token usage), never the
request's credentials.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from alphadrive_ray.errors import UserError

CACHE_FILE = "responses.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    sample_id TEXT NOT NULL,
    model TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    content TEXT NOT NULL,
    finish_reason TEXT,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    created REAL NOT NULL
)
"""


@dataclass(frozen=True)
class TeacherResponse:
    content: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


def cache_key(sample_id: str, request_hash: str, model: str) -> str:
    return hashlib.sha256("\x1f".join((sample_id, request_hash, model)).encode("utf-8")).hexdigest()


class ResponseCache:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / CACHE_FILE
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise UserError(f"cannot open the distill cache at {self.path}: {exc}; pass --cache DIR to use another folder") from None

    def get(self, key: str) -> TeacherResponse | None:
        row = self._db.execute("SELECT content, finish_reason, prompt_tokens, completion_tokens FROM responses WHERE key = ?", (key,)).fetchone()
        return TeacherResponse(*row) if row else None

    def put(self, key: str, sample_id: str, model: str, request_hash: str, response: TeacherResponse) -> None:
        # autocommit mode: the row is durable against a killed process when this returns
        self._db.execute(
            "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                key,
                sample_id,
                model,
                request_hash,
                response.content,
                response.finish_reason,
                response.prompt_tokens,
                response.completion_tokens,
                time.time(),
            ),
        )

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def sample_ids(self) -> set[str]:
        return {row[0] for row in self._db.execute("SELECT sample_id FROM responses")}

    def close(self) -> None:
        self._db.close()
