"""``POST /v1/moderations``: OpenAI's moderation endpoint, answered by the policy's moderation guards (by default
the built-in ``pii`` and ``classifier``), with ``pii`` among the categories beside OpenAI's."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from ..audit import audit_decision, audit_note
from ..errors import APIError
from ..protocol import ModerationRequest
from ..safety import keeps_text
from ..state import server_state

router = APIRouter()

MAX_INPUTS = 256  # texts in one request (each is bounded by the body size limit)
MODEL_ID = "gemmakit-moderation"


@router.post("/v1/moderations")
async def moderations(body: ModerationRequest, request: Request) -> dict[str, Any]:
    state = server_state(request)
    texts = body.texts()
    if not texts:
        raise APIError(400, "input: give at least one text to moderate", param="input")
    if len(texts) > MAX_INPUTS:
        raise APIError(400, f"input: {len(texts)} texts; this server moderates at most {MAX_INPUTS} per request",
                       param="input", code="limit_exceeded")
    # The guards take milliseconds per text: a worker thread runs them, the event loop keeps serving streams.
    answers = await run_in_threadpool(lambda: [state.safety.moderation(t) for t in texts])
    mid = "modr-" + uuid.uuid4().hex
    audit_note(request, id=mid, **({"prompt": texts} if keeps_text(state) else {}))
    for result, by_guard in answers:
        flags = {c: "flag" for c, on in result["categories"].items() if on}
        state.metrics.safety("moderation", flags)
        audit_decision(request, "moderation", result["category_scores"], flags, by_guard)
    return {"id": mid, "model": body.model or MODEL_ID, "results": [result for result, _ in answers]}
