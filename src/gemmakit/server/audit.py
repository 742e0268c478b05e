"""The audit trail in the server: an ASGI middleware that commits each audited request's row to the
:class:`~gemmakit.safety.audit.AuditLog` just before the response's last bytes go out.

Handlers mark a request as audited by giving it an id (:func:`audit_note` with ``id``: the ``id`` of the response,
which users quote in ``POST /v1/feedback``), and add what the row holds as they learn it: token counts, each
direction's safety decision, and (kept only if the log stores text) the prompt and the answer.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from ..safety.audit import AuditLog, AuditRecord, key_hash


def audit_note(request: Request, **fields: Any) -> None:
    """Add fields to the request's audit row (``id``, ``endpoint``, ``prompt_tokens``, ``prompt``, ...)."""
    if not hasattr(request.state, "audit"):
        request.state.audit = {}
    request.state.audit.update(fields)


def audit_decision(request: Request, role: str, scores: dict[str, float], actions: dict[str, str],
                   by_guard: dict[str, dict[str, float]]) -> None:
    """Record one direction's safety decision: the flagged categories with their scores and the action taken for
    each, the strongest action, and each guard's scores."""
    if not hasattr(request.state, "audit"):
        request.state.audit = {}
    decisions = request.state.audit.setdefault("decisions", {})
    earlier = decisions.get(role, {"flagged": {}, "actions": {}, "guards": {}})
    merged_actions = {**earlier["actions"], **actions}
    flagged = {**earlier["flagged"], **{c: round(scores.get(c, 1.0), 6) for c in actions}}
    strongest = next((a for a in ("block", "redact", "flag") if a in merged_actions.values()), "none")
    decisions[role] = {"flagged": flagged, "actions": merged_actions, "action": strongest,
                       "guards": {**earlier["guards"], **by_guard}}


def audit_answer(request: Request, text: str) -> None:
    """Append answer text to the row (call it only when the log stores text)."""
    if not hasattr(request.state, "audit"):
        request.state.audit = {}
    request.state.audit.setdefault("answer", []).append(text)


class AuditTrail:
    """ASGI middleware: for a request a handler gave an audit id, write its row before the last body message."""

    def __init__(self, app, log: AuditLog | None, model_id: str) -> None:
        self.app, self.log, self.model_id = app, log, model_id

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.log is None:
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), {"code": None}
        authorization = dict(scope["headers"]).get(b"authorization", b"")

        async def send_after_audit(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                await self._write(scope, status["code"], authorization, time.perf_counter() - start)
            await send(message)

        await self.app(scope, receive, send_after_audit)

    async def _write(self, scope, status: int | None, authorization: bytes, latency: float) -> None:
        fields, log = scope.get("state", {}).get("audit"), scope.get("state", {}).get("log", {})
        if not fields or "id" not in fields:
            return
        key = authorization[7:].strip() if authorization[:7].lower() == b"bearer " else b""
        rec = AuditRecord(id=fields["id"], endpoint=scope["path"], key_hash=key_hash(key), model=self.model_id,
                          status=status, prompt_tokens=log.get("prompt_tokens"),
                          completion_tokens=log.get("completion_tokens"), decisions=fields.get("decisions", {}),
                          latency_s=round(latency, 4), prompt=fields.get("prompt"),
                          answer="".join(fields["answer"]) if "answer" in fields else None)
        await run_in_threadpool(self.log.record, rec)
