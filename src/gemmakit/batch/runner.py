"""Run a batch file through the same engine and request handlers as ``gemmakit serve``: the app runs in-process
(no socket) behind an ASGI transport, so each result's ``status_code`` and ``body`` are exactly what the server
would answer, errors included, and the engine batches the requests that are in flight together."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .files import BatchRequest, ResultWriter, done_ids, read_input

logger = logging.getLogger("gemmakit.batch")


@dataclass
class BatchSummary:
    total: int  # requests and bad lines in the input
    skipped: int  # already answered by an earlier run
    succeeded: int
    failed: int


async def _run_one(client, request: BatchRequest, writer: ResultWriter, progress) -> bool:
    r = await client.post(request.url, json=request.body, timeout=None)
    body: Any = r.json()
    request_id = body.get("id") if isinstance(body, dict) and r.status_code == 200 else None
    writer.write(request.custom_id, {"status_code": r.status_code, "request_id": request_id, "body": body}, None)
    usage = body.get("usage", {}) if isinstance(body, dict) else {}
    progress.update(1)
    progress.tokens += usage.get("completion_tokens", 0)
    progress.set_postfix_str(f"{progress.tokens / max(progress.format_dict['elapsed'], 1e-9):.1f} tok/s")
    return r.status_code == 200


async def _run_all(app, requests: list[BatchRequest], writer: ResultWriter, in_flight: int, progress) -> int:
    """Send the requests with at most ``in_flight`` at once; the number that succeeded."""
    import httpx

    gate = asyncio.Semaphore(in_flight)

    async def bounded(request: BatchRequest) -> bool:
        async with gate:
            return await _run_one(client, request, writer, progress)

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://batch") as client:
        results = await asyncio.gather(*(bounded(r) for r in requests))
    return sum(results)


def run_batch(llm, input_path: Path, output: Path, errors: Path, max_batch: int = 16,
              context_length: int | None = None, kv_cache_bytes: int = 1 << 30, show_progress: bool = True,
              app_options: dict[str, Any] | None = None) -> BatchSummary:
    """Answer every request of ``input_path`` not already in ``output`` or ``errors``, appending each result as it
    finishes (see :mod:`gemmakit.batch.files`)."""
    from tqdm import tqdm

    from ..server import create_app

    requests, bad = read_input(input_path)
    done = done_ids(output) | done_ids(errors)
    todo = [r for r in requests if r.custom_id not in done]
    bad_todo = [b for b in bad if b.key not in done]
    constrained = any(k in r.body for r in todo for k in ("response_format", "tools", "guided_json", "regex"))
    app = create_app(llm, model_name="batch", max_batch=max_batch, max_waiting=max(64, 4 * max_batch),
                     context_length=context_length, kv_cache_bytes=kv_cache_bytes,
                     prebuild_grammar_vocab=constrained, **(app_options or {}))
    writer = ResultWriter(output, errors)
    try:
        for b in bad_todo:
            writer.write(b.custom_id, None, b.error())
        progress = tqdm(total=len(todo), unit="req", disable=not show_progress, dynamic_ncols=True)
        progress.tokens = 0
        with progress:
            ok = asyncio.run(_run_all(app, todo, writer, 2 * max_batch, progress))
    finally:
        writer.close()
        app.state.engine.shutdown()
    skipped = len(requests) + len(bad) - len(todo) - len(bad_todo)
    return BatchSummary(len(requests) + len(bad), skipped, ok, len(todo) - ok + len(bad_todo))
