"""The server's batch worker: one asyncio task that runs the stored batches through the server's own app at low
priority, appending results as they finish, and picks up where it was after a restart.

Interactive requests come first: the worker sends a batch request only while no request waits for a KV cache row
and one row stays free, so an interactive request is admitted at the next step. A cancelled or expired batch stops
sending, lets the requests in flight finish, and keeps every line already done in its output and error files.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from ..errors import InvalidParameterError
from .files import BatchRequest, ResultWriter, done_ids, read_input
from .store import BatchStore

logger = logging.getLogger("gemmakit.batch")
IDLE_POLL_S = 5.0  # how often an idle worker looks for expired batches
TURN_POLL_S = 0.02


class BatchWorker:
    """Runs ``store``'s batches through ``app`` (in-process, no socket) beside the interactive traffic of
    ``engine``. ``key``: an API key the app accepts, when it needs one."""

    def __init__(self, app, store: BatchStore, engine, key: bytes | None = None) -> None:
        self.app, self.store, self.engine = app, store, engine
        self.headers = {"Authorization": f"Bearer {key.decode()}"} if key else {}
        self.reserve = 1 if engine.max_batch > 1 else 0  # rows left for interactive requests
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def notify(self) -> None:
        """A batch was created or cancelled: look now rather than at the next poll."""
        if self._wake is not None:
            self._wake.set()

    async def _loop(self) -> None:
        while True:
            for batch in self.store.active_batches():
                try:
                    await self._run(batch)
                except asyncio.CancelledError:
                    raise
                except Exception:  # one broken batch must not stop the others
                    logger.exception("batch %s failed", batch["id"])
                    self.store.update_batch(batch["id"], status="failed", errors=_errors("internal_error",
                                                                                         "the batch failed"))
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), IDLE_POLL_S)
            except asyncio.TimeoutError:
                pass

    async def _run(self, batch: dict[str, Any]) -> None:
        batch = self.store.get_batch(batch["id"])  # a cancel may have come since the list was read
        if batch["status"] == "validating":
            batch = await self._validate(batch)
            if batch["status"] == "failed":
                return
        if batch["status"] == "in_progress" and not self._stopping(batch):
            await self._send_all(batch)
        await self._finalize(self.store.get_batch(batch["id"]))

    async def _validate(self, batch: dict[str, Any]) -> dict[str, Any]:
        path = self.store.file_path(batch["input_file_id"])
        try:
            requests, bad = await asyncio.to_thread(read_input, path)
        except InvalidParameterError as exc:
            return self.store.update_batch(batch["id"], status="failed", errors=_errors("invalid_file", str(exc)))
        total = len(requests) + len(bad)
        return self.store.update_batch(batch["id"], status="in_progress",
                                       request_counts={"total": total, "completed": 0, "failed": 0})

    def _stopping(self, batch: dict[str, Any]) -> bool:
        current = self.store.get_batch(batch["id"])
        return current["status"] == "cancelling" or time.time() >= current["expires_at"]

    async def _send_all(self, batch: dict[str, Any]) -> None:
        import httpx

        folder = self.store.batch_dir(batch["id"])
        output, errors = folder / "output.jsonl", folder / "errors.jsonl"
        requests, bad = await asyncio.to_thread(read_input, self.store.file_path(batch["input_file_id"]))
        done = done_ids(output) | done_ids(errors)
        writer = ResultWriter(output, errors)
        writer.counts = {**batch["request_counts"], "completed": _count_lines(output), "failed": _count_lines(errors)}
        try:
            for b in bad:
                if b.key not in done:
                    writer.write(b.custom_id, None, b.error())
                    writer.counts["failed"] += 1
            todo = [r for r in requests if r.custom_id not in done]
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://batch", headers=self.headers) as c:
                await self._send(c, batch, todo, writer)
        finally:
            writer.close()

    async def _send(self, client, batch: dict[str, Any], todo: list[BatchRequest], writer: ResultWriter) -> None:
        in_flight: set[asyncio.Task] = set()
        for request in todo:
            await self._wait_turn(in_flight)
            if self._stopping(batch):
                break
            task = asyncio.create_task(self._one(client, batch, request, writer))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        await asyncio.gather(*in_flight, return_exceptions=True)

    async def _wait_turn(self, in_flight: set[asyncio.Task]) -> None:
        """Until a request may go: none waits for a row, a row stays free for interactive requests."""
        limit = max(1, self.engine.max_batch - self.reserve)
        while self.engine.waiting > 0 or self.engine.running >= limit or len(in_flight) >= limit:
            await asyncio.sleep(TURN_POLL_S)

    async def _one(self, client, batch: dict[str, Any], request: BatchRequest, writer: ResultWriter) -> None:
        if request.url != batch["endpoint"]:
            result: tuple = (None, {"code": "invalid_url", "message": f"{request.custom_id}: url {request.url} is "
                                    f"not this batch's endpoint {batch['endpoint']}"})
        else:
            # "flex": the engine admits interactive requests first and lets them read their prompts alone.
            r = await client.post(request.url, json={**request.body, "service_tier": "flex"}, timeout=None)
            body = r.json()
            request_id = body.get("id") if r.status_code == 200 else None
            result = ({"status_code": r.status_code, "request_id": request_id, "body": body}, None)
        await asyncio.to_thread(writer.write, request.custom_id, *result)
        writer.counts["completed" if result[0] is not None and result[0]["status_code"] == 200 else "failed"] += 1
        self.store.update_batch(batch["id"], request_counts=dict(writer.counts))

    async def _finalize(self, batch: dict[str, Any]) -> None:
        """Publish the result files and set the final status (cancelled, expired or completed)."""
        folder = self.store.batch_dir(batch["id"])
        expired = batch["status"] != "cancelling" and time.time() >= batch["expires_at"]
        final = "cancelled" if batch["status"] == "cancelling" else "expired" if expired else "completed"
        changes: dict[str, Any] = {}
        for name, key in (("output.jsonl", "output_file_id"), ("errors.jsonl", "error_file_id")):
            path = folder / name
            if path.exists() and path.stat().st_size and batch[key] is None:
                changes[key] = self.store.add_file(path, f"{batch['id']}_{name}", "batch_output")["id"]
        self.store.update_batch(batch["id"], status=final, **changes)


def _count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _errors(code: str, message: str) -> dict[str, Any]:
    return {"object": "list", "data": [{"code": code, "message": message, "param": None, "line": None}]}
