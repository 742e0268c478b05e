"""``POST /v1/chat/completions``: OpenAI's chat endpoint, plain and streamed."""

from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request

from ...engine import RequestStream
from ...generate import Completion
from ...sampling import SamplingParams, TokenLogprob
from ...structured.plan import OutputPlan
from ...safety import Redactor
from ..protocol import ChatCompletionRequest, output_constraint
from ..audit import audit_note
from ..safety import (Screened, StreamedAnswer, answer_blocked, keeps_text, refuse_streamed_logprobs,
                      screen_messages)
from ..sse import framed, sse, stream_response
from ..state import (ServerState, check_model, complete, note, off_loop, refuse_hopeless_prompt, server_state,
                     submit, usage)

router = APIRouter()


def logprob_entry(tokenizer, lp: TokenLogprob, top: int) -> dict[str, Any]:
    """One token of a chat choice's ``logprobs.content``: its text, logprob, bytes and top alternatives."""

    def item(token_id: int, value: float) -> dict[str, Any]:
        raw = tokenizer.token_bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": value, "bytes": list(raw)}

    entry = item(lp.token_id, lp.logprob)
    entry["top_logprobs"] = [item(i, v) for i, v in lp.top[:top]]
    return entry


def plan_request(state: ServerState, body: ChatCompletionRequest) -> tuple[list[int], OutputPlan]:
    """The prompt ids and output plan of a chat request (grammars compile here, in a worker thread)."""
    return state.llm.plan_chat(body.messages, body.tools, body.tool_choice, body.parallel_tool_calls,
                               body.thinking(), body.max_reasoning_tokens, body.reasoning_effort,
                               **output_constraint(body))


def chat_params(state: ServerState, body: ChatCompletionRequest, index: int) -> SamplingParams:
    params = body.sampling(body.max_completion_tokens or body.max_tokens)
    if body.seed is not None:
        params["seed"] = body.seed + index
    if body.logprobs:
        params["logprobs"] = body.top_logprobs or 0
    return state.llm.sampling_params(**params)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = server_state(request)
    check_model(state, body.model)
    state.limits.check_request(body)
    refuse_hopeless_prompt(state, [m["content"] for m in body.messages if isinstance(m.get("content"), str)])
    refuse_streamed_logprobs(state, body)
    cid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
    audit_note(request, id=cid)  # a blocked request has its row too
    body.messages, screened = await screen_messages(state, request, body.messages)
    if keeps_text(state):
        audit_note(request, prompt=body.messages)  # as the model sees them: redacted where the policy says so
    # Rendering and tokenizing grow with the input: a worker thread does them, the event loop keeps serving.
    ids, plan = await off_loop(body.timeout, plan_request, state, body)
    n_prompt = len(ids)
    if body.max_tokens is None and body.max_completion_tokens is None:
        # OpenAI's default is "until the context is full"; fill what is left after the prompt.
        body.max_tokens = max(state.context_length - n_prompt, 1)
    note(request, prompt_tokens=n_prompt, n=body.n, **({"messages": body.messages} if state.log_prompts else {}))
    streams = await submit(state, [(ids, chat_params(state, body, i), plan.rules) for i in range(body.n)],
                           body.timeout, body.priority)
    if body.stream:
        return stream_response(chat_sse(state, body, streams, cid, created, n_prompt, request, plan, screened),
                               request)
    results = await complete(state, streams, [n_prompt] * body.n, body.logprobs, request, plan.splitter)
    note(request, completion_tokens=sum(c.usage.completion_tokens for c in results))
    blocked = [await answer_blocked(state, request, "\n".join(filter(None, [c.reasoning, c.text])), screened)
               for c in results]
    return {"id": cid, "object": "chat.completion", "created": created, "model": state.model_id,
            "choices": [chat_choice(state, body, i, c, screened.redactor, b)
                        for i, (c, b) in enumerate(zip(results, blocked))],
            "usage": usage(results, n_prompt)}


def chat_choice(state: ServerState, body: ChatCompletionRequest, index: int, c: Completion, redactor: Redactor,
                blocked: bool) -> dict[str, Any]:
    if blocked:  # OpenAI's shape for a filtered answer: no content, finish_reason "content_filter"
        return {"index": index, "message": {"role": "assistant", "content": None}, "logprobs": None,
                "finish_reason": "content_filter"}
    message: dict[str, Any] = {"role": "assistant", "content": redactor.restore(c.text)}
    finish = c.finish_reason
    if c.reasoning:
        message["reasoning_content"] = redactor.restore(c.reasoning)
    if c.tool_calls:
        message["tool_calls"] = c.tool_calls
        finish = "tool_calls" if finish == "stop" else finish  # a call cut off by max_tokens: "length"
    logprobs = None
    if body.logprobs and c.logprobs is not None:
        top = body.top_logprobs or 0
        logprobs = {"content": [logprob_entry(state.llm.tokenizer, lp, top) for lp in c.logprobs]}
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}


def tool_call_deltas(calls: list[dict[str, Any]], first_index: int) -> list[dict[str, Any]]:
    """OpenAI's streamed tool calls: per call, one delta with its index, id, type and name (empty arguments),
    then one with its arguments."""
    deltas = []
    for k, call in enumerate(calls):
        index = first_index + k
        deltas.append({"index": index, "id": call["id"], "type": "function",
                       "function": {"name": call["function"]["name"], "arguments": ""}})
        deltas.append({"index": index, "function": {"arguments": call["function"]["arguments"]}})
    return deltas


def chat_sse(state: ServerState, body: ChatCompletionRequest, streams: list[RequestStream], cid: str, created: int,
             prompt_tokens: int, request: Request, plan: OutputPlan, screened: Screened) -> AsyncIterator[str]:
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": state.model_id}

    def chunk(index: int, delta: dict[str, Any], logprobs: Any = None, finish: str | None = None) -> str:
        return sse({**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": finish}]})

    async def choice_chunks(index: int, stream: RequestStream, count: dict[str, int]) -> AsyncIterator[str]:
        yield chunk(index, {"role": "assistant", "content": ""})
        splitter, calls = plan.splitter(), 0
        content, reasoning = StreamedAnswer(state, request, screened), StreamedAnswer(state, request, screened)
        async for ev in state.metrics.observe(stream, prompt_tokens):
            splitter.split(ev)
            count["completion_tokens"] += not ev.stop_token
            logprobs = None
            if body.logprobs and ev.logprob is not None and not ev.stop_token:
                logprobs = {"content": [logprob_entry(state.llm.tokenizer, ev.logprob, body.top_logprobs or 0)]}
            last = ev.finish_reason is not None
            thought = await reasoning.release(ev.reasoning or "", last)
            text = await content.release(ev.content or "", last)
            if content.blocked or reasoning.blocked:  # what was held back is dropped; the stream ends here
                stream.cancel()
                yield chunk(index, {}, None, "content_filter")
                return
            if thought:
                yield chunk(index, {"reasoning_content": thought})
            for delta in tool_call_deltas(ev.tool_calls or [], calls):
                yield chunk(index, {"tool_calls": [delta]})
            calls += len(ev.tool_calls or [])
            finish = "tool_calls" if calls and ev.finish_reason == "stop" else ev.finish_reason
            if text or logprobs or finish:
                yield chunk(index, {"content": text} if text else {}, logprobs, finish)

    return framed(body, streams, base, prompt_tokens, request, choice_chunks)
