"""The server's batch state: uploaded files in a data directory and file and batch records in SQLite (WAL), in
OpenAI's shapes (``file`` and ``batch`` objects), so a restarted server finds its jobs where they were."""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import InvalidParameterError

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, data TEXT NOT NULL);
"""
COMPLETION_WINDOWS = {"24h": 24 * 3600}
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
TIMESTAMPS = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
              "cancelled_at")


class BatchStore:
    """Files under ``data_dir/files``, each batch's results under ``data_dir/batches/<id>``, records in
    ``data_dir/batches.db``. Thread-safe (the worker and the handlers share it)."""

    def __init__(self, data_dir: str | Path) -> None:
        self.dir = Path(data_dir)
        try:
            (self.dir / "files").mkdir(parents=True, exist_ok=True)
            (self.dir / "batches").mkdir(exist_ok=True)
            self.db = sqlite3.connect(self.dir / "batches.db", check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise InvalidParameterError(f"cannot use the data directory {self.dir}: {exc}") from None
        self._lock = threading.Lock()

    # -- files ----------------------------------------------------------------------------------------------

    def file_path(self, file_id: str) -> Path:
        return self.dir / "files" / file_id

    def add_file(self, source: BinaryIO | Path, filename: str, purpose: str) -> dict[str, Any]:
        """Store an upload (a readable binary stream) or a file written elsewhere (moved in)."""
        file_id = "file-" + uuid.uuid4().hex
        target = self.file_path(file_id)
        if isinstance(source, Path):
            shutil.move(source, target)
        else:
            with open(target, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
        record = (file_id, filename, purpose, target.stat().st_size, int(time.time()))
        with self._lock:
            self.db.execute("INSERT INTO files VALUES (?,?,?,?,?)", record)
        return self.file_object(record)

    @staticmethod
    def file_object(row: tuple) -> dict[str, Any]:
        file_id, filename, purpose, size, created = row
        return {"id": file_id, "object": "file", "bytes": size, "created_at": created, "filename": filename,
                "purpose": purpose, "status": "processed"}

    def get_file(self, file_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self.db.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        return self.file_object(row) if row else None

    def list_files(self, purpose: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            rows = self.db.execute("SELECT * FROM files WHERE ? IS NULL OR purpose = ? ORDER BY created_at",
                                   (purpose, purpose)).fetchall()
        return [self.file_object(r) for r in rows]

    def delete_file(self, file_id: str) -> bool:
        with self._lock:
            gone = self.db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount
        self.file_path(file_id).unlink(missing_ok=True)
        return bool(gone)

    # -- batches --------------------------------------------------------------------------------------------

    def batch_dir(self, batch_id: str) -> Path:
        return self.dir / "batches" / batch_id

    def add_batch(self, input_file_id: str, endpoint: str, window: str, metadata: dict | None) -> dict[str, Any]:
        now = int(time.time())
        batch = {"id": "batch_" + uuid.uuid4().hex, "object": "batch", "endpoint": endpoint, "errors": None,
                 "input_file_id": input_file_id, "completion_window": window, "status": "validating",
                 "output_file_id": None, "error_file_id": None, "created_at": now,
                 "expires_at": now + COMPLETION_WINDOWS[window], "request_counts": {"total": 0, "completed": 0,
                                                                                     "failed": 0},
                 "metadata": metadata, **{k: None for k in TIMESTAMPS}}
        self.batch_dir(batch["id"]).mkdir()
        with self._lock:
            self.db.execute("INSERT INTO batches VALUES (?,?,?)", (batch["id"], now, json.dumps(batch)))
        return batch

    def get_batch(self, batch_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self.db.execute("SELECT data FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def update_batch(self, batch_id: str, **changes: Any) -> dict[str, Any]:
        """Apply ``changes`` (a ``status`` change also stamps its ``<status>_at`` time) and return the batch."""
        with self._lock:
            batch = json.loads(self.db.execute("SELECT data FROM batches WHERE id = ?", (batch_id,)).fetchone()[0])
            if "status" in changes and f"{changes['status']}_at" in batch:
                batch[f"{changes['status']}_at"] = int(time.time())
            batch.update(changes)
            self.db.execute("UPDATE batches SET data = ? WHERE id = ?", (json.dumps(batch), batch_id))
        return batch

    def list_batches(self, after: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        """Newest first, starting after the batch ``after``."""
        with self._lock:
            rows = self.db.execute("SELECT id, data FROM batches ORDER BY created_at DESC, id DESC").fetchall()
        ids = [r[0] for r in rows]
        start = ids.index(after) + 1 if after in ids else 0
        return [json.loads(data) for _, data in rows[start:start + limit]]

    def active_batches(self) -> list[dict[str, Any]]:
        """Batches not yet finished, oldest first (what a restarted server resumes)."""
        with self._lock:
            rows = self.db.execute("SELECT data FROM batches ORDER BY created_at, id").fetchall()
        return [b for b in map(json.loads, (r[0] for r in rows)) if b["status"] in ACTIVE]

    def close(self) -> None:
        with self._lock:
            self.db.close()
