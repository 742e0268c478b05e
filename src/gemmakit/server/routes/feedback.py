"""``POST /v1/feedback``: users report answers (+1 or -1, an optional category and comment), stored in the audit
log beside the request's row."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from ..errors import APIError
from ..protocol import FeedbackRequest
from ..state import server_state

router = APIRouter()


@router.post("/v1/feedback")
async def feedback(body: FeedbackRequest, request: Request) -> dict[str, Any]:
    state = server_state(request)
    if state.audit is None:
        raise APIError(501, "feedback is kept in the audit log, and this server keeps none (start it with "
                       "--audit-db FILE)", "server_error", code="feedback_unavailable")
    report = await run_in_threadpool(state.audit.add_feedback, body.request_id, body.rating, body.category,
                                     body.comment)
    if report is None:
        raise APIError(404, f"no request with id {body.request_id!r} in the audit log", param="request_id",
                       code="request_not_found")
    return {"id": report, "object": "feedback", "request_id": body.request_id, "rating": body.rating}
