"""``POST /v1/completions``: OpenAI's text completions, one prompt or a batch, with echo and logprobs."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request

from ...engine import RequestStream
from ...generate import Completion
from ...sampling import SamplingParams, TokenLogprob
from ..errors import APIError
from ...safety import Redactor
from ..protocol import CompletionRequest, output_constraint
from ..audit import audit_note
from ..safety import Screened, StreamedAnswer, answer_blocked, keeps_text, refuse_streamed_logprobs, screen_prompts
from ..sse import framed, sse, stream_response
from ..state import (ServerState, check_model, complete, note, off_loop, refuse_hopeless_prompt, server_state,
                     submit, usage)

router = APIRouter()

MAX_CHOICES = 64  # engine requests one HTTP request may make (prompts x n)


class CompletionLogprobs:
    """The logprobs object of a /v1/completions choice (tokens, token_logprobs, top_logprobs, text_offset),
    built token by token; ``text_offset`` counts characters of the choice's text from its start."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.entries: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        self.offset = 0

    def add(self, tokens: list[tuple[int, TokenLogprob | None]], silent_first: bool = False) -> dict[str, list]:
        """Append (token id, its logprob or None) pairs and return the entries for just these. ``silent_first``:
        the first token is not in the text (a BOS that encoding added)."""
        part: dict[str, list] = {key: [] for key in self.entries}
        for k, (token_id, lp) in enumerate(tokens):
            text = self.tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")
            part["tokens"].append(text)
            part["token_logprobs"].append(lp.logprob if lp is not None else None)
            part["top_logprobs"].append({self.tokenizer.decode([t]): v for t, v in lp.top} if lp is not None else None)
            part["text_offset"].append(self.offset)
            if not (silent_first and k == 0):
                self.offset += len(text)
        for key, values in part.items():
            self.entries[key] += values
        return part


@dataclass
class PromptBatch:
    """The prompts of one request: their ids, their text (for echo), whether encoding added a BOS that is not in
    that text, and which prompt each choice continues (OpenAI's order: each prompt's n choices in turn)."""

    ids: list[list[int]]
    texts: list[str]
    added_bos: list[bool]
    prompt_of: list[int]


def read_prompts(state: ServerState, body: CompletionRequest) -> PromptBatch:
    prompts = body.prompt_list()
    if len(prompts) * body.n > MAX_CHOICES:
        raise APIError(400, f"{len(prompts)} prompts x n={body.n} make {len(prompts) * body.n} choices; at most "
                       f"{MAX_CHOICES} per request", param="prompt")
    llm = state.llm
    for p in prompts:
        if isinstance(p, str):
            refuse_hopeless_prompt(state, [p])
    ids = [llm.prompt_ids(p) for p in prompts]
    texts = [p if isinstance(p, str) else llm.tokenizer.decode(p) for p in prompts]
    added_bos = [isinstance(p, str) and x[:1] == [llm.tokenizer.bos_id] for p, x in zip(prompts, ids)]
    return PromptBatch(ids, texts, added_bos, [k // body.n for k in range(len(prompts) * body.n)])


def completion_params(state: ServerState, body: CompletionRequest, choice: int) -> SamplingParams:
    p = body.sampling(body.max_tokens)
    if body.seed is not None:
        p["seed"] = body.seed + choice
    if body.logprobs is not None:
        p["logprobs"] = body.logprobs
        if body.echo:  # OpenAI's echo + logprobs scores the prompt's tokens too
            p["prompt_logprobs"] = body.logprobs
    return state.llm.sampling_params(**p)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    state = server_state(request)
    check_model(state, body.model)
    state.limits.check_request(body)
    refuse_streamed_logprobs(state, body)
    cid, created = "cmpl-" + uuid.uuid4().hex, int(time.time())
    audit_note(request, id=cid)  # a blocked request has its row too
    prompts, screened = await screen_prompts(state, request, body.prompt_list())
    body.prompt = prompts if len(prompts) > 1 else prompts[0]
    if keeps_text(state):
        audit_note(request, prompt=body.prompt)  # as the model sees it: redacted where the policy says so
    # Tokenizing grows with the input: a worker thread does it, the event loop keeps serving.
    batch = await off_loop(body.timeout, read_prompts, state, body)
    note(request, prompt_tokens=sum(map(len, batch.ids)), n=body.n,
         **({"prompt": batch.texts if len(batch.texts) > 1 else batch.texts[0]} if state.log_prompts else {}))
    rules = await off_loop(body.timeout, state.llm.output_rules, **output_constraint(body))
    jobs = [(batch.ids[k], completion_params(state, body, c), rules) for c, k in enumerate(batch.prompt_of)]
    streams = await submit(state, jobs, body.timeout, body.priority)
    if body.stream:
        return stream_response(completion_sse(state, body, streams, cid, created, batch, request, screened),
                               request)
    results = await complete(state, streams, [len(batch.ids[k]) for k in batch.prompt_of], body.logprobs is not None,
                             request)
    note(request, completion_tokens=sum(c.usage.completion_tokens for c in results))
    choices = []
    for c, result in enumerate(results):
        if await answer_blocked(state, request, result.text, screened):
            choices.append({"index": c, "text": "", "logprobs": None, "finish_reason": "content_filter"})
        else:
            choices.append(completion_choice(state, body, batch, c, result, screened.redactor))
    return {"id": cid, "object": "text_completion", "created": created, "model": state.model_id,
            "choices": choices, "usage": usage(results, sum(map(len, batch.ids)))}


def completion_choice(state: ServerState, body: CompletionRequest, batch: PromptBatch, index: int,
                      result: Completion, redactor: Redactor) -> dict[str, Any]:
    k = batch.prompt_of[index]
    text = (batch.texts[k] if body.echo else "") + redactor.restore(result.text)
    logprobs = None
    if body.logprobs is not None and result.logprobs is not None:
        table = CompletionLogprobs(state.llm.tokenizer)
        if body.echo:
            table.add(list(zip(batch.ids[k], result.prompt_logprobs)), silent_first=batch.added_bos[k])
        table.add([(lp.token_id, lp) for lp in result.logprobs])
        logprobs = table.entries
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": result.finish_reason}


def completion_sse(state: ServerState, body: CompletionRequest, streams: list[RequestStream], cid: str, created: int,
                   batch: PromptBatch, request: Request, screened: Screened) -> AsyncIterator[str]:
    base = {"id": cid, "object": "text_completion", "created": created, "model": state.model_id}

    def chunk(index: int, text: str, logprobs: dict[str, Any] | None, finish: str | None = None) -> str:
        return sse({**base, "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]})

    async def choice_chunks(index: int, stream: RequestStream, count: dict[str, int]) -> AsyncIterator[str]:
        k = batch.prompt_of[index]
        table = CompletionLogprobs(state.llm.tokenizer) if body.logprobs is not None else None
        echo_pending = body.echo
        if echo_pending and table is None:
            yield chunk(index, batch.texts[k], None)
            echo_pending = False
        answer = StreamedAnswer(state, request, screened)
        async for ev in state.metrics.observe(stream, len(batch.ids[k])):
            if echo_pending:  # the prompt's logprobs come with the first generated token
                yield chunk(index, batch.texts[k], table.add(list(zip(batch.ids[k], ev.prompt_logprobs)),
                                                             silent_first=batch.added_bos[k]))
                echo_pending = False
            count["completion_tokens"] += not ev.stop_token
            logprobs = None
            if table is not None and ev.logprob is not None and not ev.stop_token:
                logprobs = table.add([(ev.token_id, ev.logprob)])
            text = await answer.release(ev.text, ev.finish_reason is not None)
            if answer.blocked:  # what was held back is dropped; the stream ends here
                stream.cancel()
                yield chunk(index, "", None, "content_filter")
                return
            if text or ev.finish_reason or logprobs:
                yield chunk(index, text, logprobs, ev.finish_reason)

    return framed(body, streams, base, sum(map(len, batch.ids)), request, choice_chunks)
