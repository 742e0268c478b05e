"""The audit log: one SQLite row per generation or moderation request, and the users' reports beside them.

SQLite in WAL mode, one row committed per request *before* the response's last bytes go out, so a client that got
its answer can count on the row even if the server is killed the next instant (``synchronous=NORMAL``: a killed
process loses nothing committed; only a power cut can take the last transactions). A row holds the request id
(the ``id`` of the response), time, a hash of the API key (never the key), model, endpoint, status, token counts,
each direction's safety decision (flagged categories with scores, action) and latency. Prompt and answer text are
kept only when the log is told to (``store_text``), and rows older than ``retention_days`` are deleted.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import InvalidParameterError

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY, time REAL NOT NULL, key_hash TEXT, model TEXT, endpoint TEXT NOT NULL, status INTEGER,
    prompt_tokens INTEGER, completion_tokens INTEGER, action TEXT, decisions TEXT NOT NULL, latency_s REAL,
    prompt TEXT, answer TEXT
);
CREATE INDEX IF NOT EXISTS requests_time ON requests(time);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL REFERENCES requests(id) ON DELETE CASCADE,
    time REAL NOT NULL, rating INTEGER NOT NULL, category TEXT, comment TEXT
);
CREATE INDEX IF NOT EXISTS feedback_request ON feedback(request_id);
"""
PURGE_EVERY_S = 3600.0


def key_hash(key: bytes | str | None) -> str | None:
    """What the log keeps of an API key: the first 16 hex digits of its SHA-256 (tells keys apart, reveals none)."""
    if not key:
        return None
    raw = key.encode() if isinstance(key, str) else key
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass
class AuditRecord:
    """One request's row. ``decisions`` maps a direction (input, output, moderation) to its flagged categories'
    scores and the action taken; ``action`` is the strongest of them (block > redact > flag > none)."""

    id: str
    endpoint: str
    time: float = field(default_factory=time.time)
    key_hash: str | None = None
    model: str | None = None
    status: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    decisions: dict[str, Any] = field(default_factory=dict)
    latency_s: float | None = None
    prompt: Any = None
    answer: str | None = None

    @property
    def action(self) -> str:
        actions = {d.get("action", "none") for d in self.decisions.values()}
        return next((a for a in ("block", "redact", "flag") if a in actions), "none")


class AuditLog:
    """The audit database at ``path`` (created if missing). Thread-safe: the server writes from worker threads.

    Args:
        store_text: keep prompt and answer text in the rows (off: ids, counts, decisions and timings only).
        retention_days: delete rows (and their reports) older than this; None keeps everything.
    """

    def __init__(self, path: str | Path, store_text: bool = False, retention_days: float | None = None) -> None:
        if retention_days is not None and retention_days <= 0:
            raise InvalidParameterError(f"the audit retention is a positive number of days, not {retention_days}")
        self.path, self.store_text, self.retention_days = Path(path), store_text, retention_days
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise InvalidParameterError(f"cannot open the audit log {self.path}: {exc}") from None
        self._lock = threading.Lock()
        self._last_purge = 0.0

    def record(self, rec: AuditRecord) -> None:
        """Insert (or replace) one request's row and commit it."""
        prompt = json.dumps(rec.prompt, ensure_ascii=False) if self.store_text and rec.prompt is not None else None
        answer = rec.answer if self.store_text else None
        row = (rec.id, rec.time, rec.key_hash, rec.model, rec.endpoint, rec.status, rec.prompt_tokens,
               rec.completion_tokens, rec.action, json.dumps(rec.decisions), rec.latency_s, prompt, answer)
        with self._lock:
            self.db.execute("INSERT OR REPLACE INTO requests VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", row)
            if self.retention_days is not None and rec.time - self._last_purge > PURGE_EVERY_S:
                self._purge(rec.time)

    def _purge(self, now: float) -> None:
        self._last_purge = now
        self.db.execute("DELETE FROM requests WHERE time < ?", (now - self.retention_days * 86400,))

    def purge(self, now: float | None = None) -> None:
        """Delete what is past the retention period now."""
        if self.retention_days is not None:
            with self._lock:
                self._purge(time.time() if now is None else now)

    def add_feedback(self, request_id: str, rating: int, category: str | None = None,
                     comment: str | None = None) -> int | None:
        """Store a user's report on a request; its id, or None when no such request is in the log."""
        with self._lock:
            if self.db.execute("SELECT 1 FROM requests WHERE id = ?", (request_id,)).fetchone() is None:
                return None
            cur = self.db.execute("INSERT INTO feedback (request_id, time, rating, category, comment) "
                                  "VALUES (?,?,?,?,?)", (request_id, time.time(), rating, category, comment))
            return int(cur.lastrowid)

    def rows(self, since: float | None = None) -> Iterator[dict[str, Any]]:
        """Every request row (oldest first) with its reports, as dicts (``decisions`` parsed)."""
        with self._lock:
            requests = self.db.execute("SELECT * FROM requests WHERE time >= ? ORDER BY time",
                                       (since or 0.0,)).fetchall()
            names = [d[0] for d in self.db.execute("SELECT * FROM requests LIMIT 0").description]
            reports = self.db.execute("SELECT request_id, time, rating, category, comment FROM feedback "
                                      "ORDER BY id").fetchall()
        by_request: dict[str, list[dict[str, Any]]] = {}
        for rid, t, rating, category, comment in reports:
            by_request.setdefault(rid, []).append({"time": t, "rating": rating, "category": category,
                                                   "comment": comment})
        for values in requests:
            row = dict(zip(names, values))
            row["decisions"] = json.loads(row["decisions"])
            row["feedback"] = by_request.get(row["id"], [])
            yield row

    def close(self) -> None:
        with self._lock:
            self.db.close()


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Requests, flags per category and actions per day, and the users' reports."""
    days: dict[str, dict[str, Any]] = {}
    reports = {"up": 0, "down": 0, "categories": {}}
    for row in rows:
        day = days.setdefault(time.strftime("%Y-%m-%d", time.gmtime(row["time"])),
                              {"requests": 0, "flags": {}, "actions": {}})
        day["requests"] += 1
        day["actions"][row["action"]] = day["actions"].get(row["action"], 0) + 1
        for decision in row["decisions"].values():
            for category in decision.get("flagged", {}):
                day["flags"][category] = day["flags"].get(category, 0) + 1
        for report in row["feedback"]:
            reports["up" if report["rating"] > 0 else "down"] += 1
            if report["category"]:
                reports["categories"][report["category"]] = reports["categories"].get(report["category"], 0) + 1
    return {"days": days, "reports": reports}


__all__ = ["AuditLog", "AuditRecord", "key_hash", "summarize"]
