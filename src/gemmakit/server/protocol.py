"""Request bodies of the OpenAI-compatible API, validated at the edge (pydantic)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import InvalidGrammarError

MAX_TEMPERATURE = 2.0  # OpenAI's range for temperature is [0, 2]


def _first_lone_surrogate(value: Any, where: str) -> str | None:
    """The field path of the first string holding a lone UTF-16 surrogate (JSON allows "\\ud800"; it is not text
    and no tokenizer can encode it), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _first_lone_surrogate(item, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


class TextOnly(BaseModel):
    """A request body whose strings must be valid Unicode: a lone surrogate is a 400 naming the field, not a
    tokenizer crash."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = _first_lone_surrogate(data, "")
        if where is not None:
            raise ValueError(f"{where or 'body'}: text is not valid Unicode (a lone UTF-16 surrogate)")
        return data


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(TextOnly):
    model_config = ConfigDict(extra="ignore")  # unknown OpenAI fields are ignored, known ones are checked

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1)  # at most ServerLimits.max_n
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # int64, as OpenAI's
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    # Extras beyond OpenAI's set (as in vLLM)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    ignore_eos: bool = False
    logit_bias: dict[int, float] | None = None  # JSON keys are token ids as strings
    # Seconds the request may take; past it the server stops the generation (408, or an error event).
    timeout: float | None = Field(default=None, gt=0)
    # OpenAI's service tiers: "flex" runs at low priority (batch work: interactive requests go first); the others
    # run as usual. Nobody can ask to jump the queue.
    service_tier: Literal["auto", "default", "flex", "priority", "scale"] | None = None

    @property
    def priority(self) -> int:
        return 1 if self.service_tier == "flex" else 0

    def sampling(self, max_tokens: int | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_tokens": max_tokens, "ignore_eos": self.ignore_eos}
        for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            value = getattr(self, name)
            if value is not None:
                kwargs[name] = value
        if self.logit_bias:
            kwargs["logit_bias"] = self.logit_bias
        if self.stop:
            kwargs["stop"] = [self.stop] if isinstance(self.stop, str) else self.stop
        return kwargs


class JSONSchemaFormat(BaseModel):
    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: free text, any JSON object, or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a 'json_schema' object")
        return self

    def constraint(self) -> dict[str, Any]:
        """The Python API's output-constraint argument for this format ({} for text)."""
        if self.type == "text":
            return {}
        if self.type == "json_object":
            return {"response_format": {"type": "json_object"}}
        return {"response_format": {"type": "json_schema", "json_schema": {"schema": self.json_schema.schema_}}}


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs: exactly one of a JSON schema, a regex, a list of choices, a Lark grammar."""

    model_config = ConfigDict(extra="forbid")

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "StructuredOutputs":
        given = [k for k in ("json_", "regex", "choice", "grammar", "json_object") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar, json_object")
        return self

    def constraint(self) -> dict[str, Any]:
        if self.json_object:
            return {"response_format": {"type": "json_object"}}
        if self.json_ is not None:
            schema = self.json_
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError:
                    raise InvalidGrammarError("structured_outputs.json: not valid JSON") from None
            if not isinstance(schema, dict):
                raise InvalidGrammarError("structured_outputs.json: a JSON schema is an object")
            return {"response_format": {"type": "json_schema", "json_schema": {"schema": schema}}}
        return {k: getattr(self, k) for k in ("regex", "choice", "grammar") if getattr(self, k) is not None}


def output_constraint(body: Any) -> dict[str, Any]:
    """The output constraint of a request, as the Python API's keyword arguments; both ways at once is an error."""
    response_format = getattr(body, "response_format", None)
    found = [x.constraint() for x in (response_format, body.structured_outputs) if x is not None]
    found = [c for c in found if c]
    if len(found) > 1:
        raise InvalidGrammarError("give response_format or structured_outputs, not both")
    return found[0] if found else {}


class ChatCompletionRequest(SamplingFields):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    # Gemma 4 thinking, as transformers' chat_template_kwargs / a direct flag
    enable_thinking: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    # Gemma 4's thought channel: a token budget, or OpenAI's effort levels mapped onto budgets
    max_reasoning_tokens: int | None = Field(default=None, ge=0)
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None

    def thinking(self) -> bool:
        if self.enable_thinking is not None:
            return self.enable_thinking
        return bool((self.chat_template_kwargs or {}).get("enable_thinking", False))


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]  # one prompt (text or ids), or a batch of them
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    def prompt_list(self) -> list[str | list[int]]:
        """The prompts of the request: one, or each of a batch."""
        if isinstance(self.prompt, str) or all(isinstance(t, int) for t in self.prompt):
            return [self.prompt]
        return list(self.prompt)


class TokenizeRequest(TextOnly):
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]


class ModerationTextPart(BaseModel):
    """One item of a multi-modal moderation input; only text is moderated here."""

    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class ModerationRequest(TextOnly):
    """``POST /v1/moderations``: one text, a list of texts, or a list of ``{"type": "text", "text": ...}`` parts."""

    model: str | None = None
    input: str | list[str] | list[ModerationTextPart]

    def texts(self) -> list[str]:
        if isinstance(self.input, str):
            return [self.input]
        return [item if isinstance(item, str) else item.text for item in self.input]


class FeedbackRequest(TextOnly):
    """``POST /v1/feedback``: a user's report on one answer, by the ``id`` of its response."""

    request_id: str = Field(min_length=1, max_length=128)
    rating: Literal[1, -1]
    category: str | None = Field(default=None, max_length=64)
    comment: str | None = Field(default=None, max_length=4096)


class BatchCreateRequest(TextOnly):
    """``POST /v1/batches``."""

    input_file_id: str = Field(min_length=1, max_length=128)
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
