"""Request bodies of the OpenAI-compatible API, validated at the edge (pydantic)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
    response_format: dict[str, Any] | None = None

    @field_validator("response_format")
    @classmethod
    def _plain_text_only(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        # Refused rather than ignored: a client asking for JSON must not silently get free text.
        if value is not None and value.get("type", "text") != "text":
            raise ValueError(f"type {value.get('type')!r} is not supported (no constrained decoding yet); "
                             "leave response_format out or use {'type': 'text'}")
        return value


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]  # one prompt (text or ids), or a batch of them
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)

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
