"""Health, metrics, the model list and the tokenizer endpoints."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ...kernels import kernel_status
from ..errors import APIError
from ..protocol import DetokenizeRequest, TokenizeRequest
from ..state import check_model, server_state

router = APIRouter()


@router.get("/health")
def health(request: Request) -> dict[str, Any]:
    # Without the compiled kernels the server still answers, tens of times slower: say so where people look.
    return {"status": "ok", "auth": bool(server_state(request).keys), "kernels": kernel_status()}


@router.get("/metrics")
def prometheus_metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(server_state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
def models(request: Request) -> dict[str, Any]:
    state = server_state(request)
    return {"object": "list", "data": [{"id": state.model_id, "object": "model", "created": 0,
                                        "owned_by": "gemmakit", "max_model_len": state.context_length}]}


@router.post("/tokenize")
def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    state = server_state(request)
    check_model(state, body.model)
    if body.messages is not None:
        ids = state.llm.apply_chat_template(body.messages, tokenize=True)
    elif body.prompt is not None:
        ids = state.llm.tokenizer.encode(body.prompt, add_bos=body.add_special_tokens)
    else:
        raise APIError(400, "give 'prompt' or 'messages'", param="prompt")
    return {"tokens": ids, "count": len(ids), "max_model_len": state.context_length}


@router.post("/detokenize")
def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    state = server_state(request)
    check_model(state, body.model)
    vocab = state.llm.config.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"token ids out of range [0, {vocab}): {bad[:5]}", param="tokens")
    return {"prompt": state.llm.tokenizer.decode(body.tokens)}
