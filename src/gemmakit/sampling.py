"""Sampling parameters and the logits -> token step.

Order of operations (vLLM's): repetition penalty (prompt and output tokens), presence and frequency penalties
(output tokens), logit bias, temperature, top-k, top-p, min-p, then a draw from the remaining distribution.
Temperature 0 is greedy. Reported log-probabilities are those of the model itself (log-softmax of the raw
logits), as the OpenAI API reports them, so they do not move with the sampling knobs.

The step runs in C (kernels/csrc/sample.c: one call for every row of a decode step, rows in parallel), with the
PyTorch functions below as its reference and fallback. The draw is an inverse CDF over the token ids with one
uniform number from a counter-based generator keyed by the request's seed and its draw count, so a seed gives the
same tokens alone or batched, in C or in PyTorch.
"""

from __future__ import annotations

import ctypes
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Sequence

import torch

from .errors import GemmakitError, InvalidParameterError
from .kernels import kernels
from .kernels.abi import struct

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    """How to pick each new token and when to stop.

    Attributes:
        max_tokens: most new tokens to generate (None: until the context is full).
        temperature: 0 for greedy; otherwise logits are divided by it.
        top_k: keep the k most likely tokens (0 disables).
        top_p: keep the smallest set of tokens whose probability reaches p (1.0 disables).
        min_p: drop tokens less likely than min_p times the most likely one (0 disables).
        repetition_penalty: divide positive (multiply negative) logits of tokens already seen, prompt included.
        presence_penalty: subtract from the logit of every token already generated.
        frequency_penalty: subtract this times the count of each token already generated.
        seed: seed of the random draws; the same seed gives the same text.
        stop: strings that end generation; the text is cut before the first one.
        ignore_eos: keep generating past end-of-sequence / end-of-turn tokens.
        logprobs: None for none, else the number (0-20) of top alternatives to report with each token's
            own log-probability (of the model's raw distribution).
        logit_bias: token id -> a number in [-100, 100] added to that token's logit before each pick (OpenAI's
            logit_bias: -100 in effect bans a token, 100 forces it).
        prompt_logprobs: None for none, else the number (0-20) of top alternatives to report with the
            log-probability of each prompt token given the ones before it (the first has none: None).
    """

    # The defaults are Gemma's recommended settings (its model cards and generation_config.json), the same for the
    # Python API, the CLI and the server; a checkpoint that ships its own replaces them (checkpoint_defaults).
    max_tokens: int | None = 256
    temperature: float = 1.0
    top_k: int = 64
    top_p: float = 0.95
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        self._validate()

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "SamplingParams":
        """Build from keyword arguments, rejecting unknown names with a clear error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise InvalidParameterError(
                f"unknown sampling parameter(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        return cls(**kwargs)

    def _validate(self) -> None:
        def bad(name: str, rule: str) -> InvalidParameterError:
            return InvalidParameterError(f"{name}={getattr(self, name)!r}: {rule}")

        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(name, "must be a finite number")
            return float(value)

        if self.max_tokens is not None and (
            isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            raise bad("max_tokens", "must be a positive integer or None")
        if number("temperature") < 0:
            raise bad("temperature", "must be >= 0")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "must be an integer >= 0 (0 disables)")
        if not 0 < number("top_p") <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not 0 <= number("min_p") <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if number("repetition_penalty") <= 0:
            raise bad("repetition_penalty", "must be > 0 (1.0 disables)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= number(name) <= 2:
                raise bad(name, "must be in [-2, 2]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -(2**63) <= self.seed < 2**64):  # what torch.Generator takes
            raise bad("seed", "must be None or an integer in [-2**63, 2**64)")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be a non-empty string or a list of non-empty strings")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value <= MAX_LOGPROBS):
                raise bad(name, f"must be None or an integer in [0, {MAX_LOGPROBS}]")
        if not isinstance(self.logit_bias, dict) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 and isinstance(b, (int, float))
            and not isinstance(b, bool) and -100 <= b <= 100 for t, b in self.logit_bias.items()
        ):
            raise bad("logit_bias", "must map token ids (integers >= 0) to numbers in [-100, 100]")

    def replace(self, **changes: Any) -> "SamplingParams":
        """A copy with some fields changed (validated like a new object; unknown names are an error)."""
        current = {f.name: getattr(self, f.name) for f in fields(self)}
        return SamplingParams.from_kwargs(**{**current, **changes})

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


# generation_config.json keys -> SamplingParams fields (transformers' names).
_HF_GENERATION_KEYS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                       "repetition_penalty": "repetition_penalty"}
# GGUF general.sampling.* keys (llama.cpp's) -> SamplingParams fields.
_GGUF_SAMPLING_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_k": "top_k",
                       "general.sampling.top_p": "top_p", "general.sampling.min_p": "min_p",
                       "general.sampling.penalty_repeat": "repetition_penalty"}


def gguf_sampling_keys(defaults: dict[str, Any]) -> dict[str, Any]:
    """:func:`checkpoint_defaults`' settings as the ``general.sampling.*`` keys llama.cpp reads (the inverse)."""
    return {key: defaults[name] for key, name in _GGUF_SAMPLING_KEYS.items() if name in defaults}


def checkpoint_defaults(generation_config: dict[str, Any] | None = None,
                        gguf_metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """The sampling settings a checkpoint recommends: from a Hugging Face ``generation_config.json`` (its
    ``do_sample: false`` means greedy) or a GGUF's ``general.sampling.*`` keys. Values of the wrong type or out of
    range are left out, so a checkpoint can never make loading fail."""
    found: dict[str, Any] = {}
    if generation_config:
        found = {field_name: generation_config[key] for key, field_name in _HF_GENERATION_KEYS.items()
                 if key in generation_config}
        if generation_config.get("do_sample") is False:
            found["temperature"] = 0.0
    elif gguf_metadata:
        found = {field_name: gguf_metadata[key] for key, field_name in _GGUF_SAMPLING_KEYS.items()
                 if key in gguf_metadata}
    usable = {}
    for name, value in found.items():
        value = int(value) if name == "top_k" and isinstance(value, float) and value.is_integer() else value
        try:
            SamplingParams.from_kwargs(**{name: value})
        except InvalidParameterError:
            continue
        usable[name] = value
    return usable


_MASK64 = (1 << 64) - 1


def request_seed(seed: int | None) -> int:
    """The 64-bit key of a request's draws: its seed (negative seeds wrap), or a random one."""
    return (seed & _MASK64) if seed is not None else int.from_bytes(os.urandom(8), "little")


def uniform(seed: int, counter: int) -> float:
    """The draw's number in [0, 1) for (seed, counter): SplitMix64 at step counter + 1, as the C sampler."""
    z = (seed + (counter + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return ((z ^ (z >> 31)) >> 11) * 2.0**-53


class TokenHistory:
    """The tokens the penalties look at, kept sparse (the C sampler reads them as arrays): the distinct tokens
    of the prompt and the output (repetition penalty) and how often each output token was generated (presence
    and frequency penalties). Only what the request's penalties use is kept."""

    def __init__(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        self.track_seen = params.repetition_penalty != 1.0
        self.track_counts = bool(params.presence_penalty or params.frequency_penalty)
        distinct = sorted(set(prompt_ids)) if self.track_seen else []
        self._seen_index = {t: i for i, t in enumerate(distinct)}
        self.seen_ids = torch.tensor(distinct + [0] * max(16, len(distinct)), dtype=torch.int64)
        self._count_index: dict[int, int] = {}
        self.count_ids = torch.zeros(16, dtype=torch.int64)
        self.counts = torch.zeros(16, dtype=torch.float32)

    @property
    def n_seen(self) -> int:
        return len(self._seen_index)

    @property
    def n_counts(self) -> int:
        return len(self._count_index)

    def add(self, token: int) -> None:
        """Record a generated token."""
        if self.track_seen and token not in self._seen_index:
            self.seen_ids = _append(self.seen_ids, self.n_seen, token)
            self._seen_index[token] = self.n_seen
        if self.track_counts:
            at = self._count_index.get(token)
            if at is None:
                at = self._count_index[token] = len(self._count_index)
                self.count_ids = _append(self.count_ids, at, token)
                self.counts = _append(self.counts, at, 0.0)
            self.counts[at] += 1

    def dense(self, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(seen (V,) bool, counts (V,) float32) for the PyTorch reference."""
        seen = torch.zeros(vocab, dtype=torch.bool)
        seen[self.seen_ids[: self.n_seen]] = True
        counts = torch.zeros(vocab, dtype=torch.float32)
        counts[self.count_ids[: self.n_counts]] = self.counts[: self.n_counts]
        return seen, counts


def _append(buffer: torch.Tensor, at: int, value: float) -> torch.Tensor:
    """buffer[at] = value, doubling the buffer when full (amortized O(1) per token)."""
    if at >= buffer.numel():
        buffer = torch.cat([buffer, torch.zeros_like(buffer)])
    buffer[at] = value
    return buffer


@dataclass
class DrawSpec:
    """Everything one row's pick needs besides its logits: the knobs, the penalty history, the output rules'
    mask (``bitmask``: (ceil(V/32),) int32, bit set = allowed) and bans, and the draw's (seed, counter)."""

    params: SamplingParams
    history: TokenHistory
    seed: int
    counter: int
    bitmask: torch.Tensor | None = None
    banned: list[int] = field(default_factory=list)


def apply_penalties(
    logits: torch.Tensor,  # (V,) float32
    params: SamplingParams,
    seen: torch.Tensor,  # (V,) bool: token appears in prompt or output
    counts: torch.Tensor,  # (V,) float32: times each token was generated
) -> torch.Tensor:
    if params.repetition_penalty != 1.0:
        penalized = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        # A tiny penalty may overflow a logit to +inf: FLT_MAX keeps the sums after it finite (NaN stays NaN).
        logits = torch.where(seen, penalized, logits).clamp_(max=torch.finfo(torch.float32).max)
    if params.presence_penalty or params.frequency_penalty:
        logits = logits - params.presence_penalty * (counts > 0).float() - params.frequency_penalty * counts
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
        logits = logits.index_add(0, ids, torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype))
    return logits


def filter_logits(logits: torch.Tensor, params: SamplingParams, top_k_applied: bool = False) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p on (V,) logits; filtered-out entries become -inf. The result is
    shifted so that its largest entry is 0 (the same distribution), which keeps a tiny temperature finite.
    ``top_k_applied``: the logits are already top-k's candidates (see sample_token)."""
    logits = (logits - logits.max()) / max(params.temperature, torch.finfo(torch.float32).tiny)
    if params.top_k and params.top_k < logits.shape[-1] and not top_k_applied:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first token always stays).
        drop_sorted = (probs.cumsum(-1) - probs) >= params.top_p
        drop_sorted[0] = False  # also when top_p rounds to 0 in float32
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if params.min_p > 0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def argmax(logits: torch.Tensor) -> int:
    """Index of the first largest of (V,) logits, as torch.argmax (NaN ranks highest), in one C pass on CPU."""
    lib = kernels()
    if lib is not None and logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 1:
        flat = logits.contiguous()
        i = lib.argmax_f32(ctypes.c_void_p(flat.data_ptr()), flat.numel())
        if i >= 0:
            return int(i)
    return int(torch.argmax(logits))


def mask_logits(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """A copy of (V,) float32 logits with -inf wherever bit i of the (ceil(V/32),) int32 token mask is clear (the
    tokens a grammar does not allow; llguidance's layout), in one C pass on CPU."""
    out = logits.contiguous().clone()
    bits = bitmask.contiguous()
    lib = kernels()
    if lib is not None and out.device.type == "cpu" and out.dtype == torch.float32 and out.dim() == 1:
        lib.mask_logits(ctypes.c_void_p(out.data_ptr()), ctypes.c_void_p(bits.data_ptr()), out.numel())
        return out
    allowed = ((bits.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).view(-1)[: out.numel()].bool()
    return out.masked_fill_(~allowed, float("-inf"))


def top_k_candidates(logits: torch.Tensor, top_k: int) -> torch.Tensor | None:
    """Ids of the entries of (V,) logits that top-k keeps (ties with the k-th value included, as filter_logits
    keeps them), or None when top-k keeps everything."""
    if not top_k or top_k >= logits.shape[-1]:
        return None
    kth = torch.topk(logits, top_k).values[-1]
    if kth == float("-inf"):  # fewer than k tokens allowed (a grammar's mask): the allowed ones, not all 262k
        return (logits > kth).nonzero().squeeze(1)
    return (logits >= kth).nonzero().squeeze(1)


def sample_token(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor, counts: torch.Tensor,
                 u: float) -> int:
    """The reference pick (PyTorch) of the next token from (V,) float32 logits, ``u`` the draw's uniform number.

    With top-k on, the rest of the filters and the draw work on the k candidates alone: the same distribution as
    on the whole vocabulary (every other entry has probability 0 there). The draw is the first token, in id
    order, whose cumulative probability passes ``u`` (what the C sampler computes).
    """
    logits = apply_penalties(logits, params, seen, counts)
    if params.greedy:
        return argmax(logits)
    if torch.isnan(logits.max()):  # NaN is the max of any vector that holds one
        raise GemmakitError("sampling failed: the model's logits are not finite (NaN)")
    candidates = top_k_candidates(logits, params.top_k)
    if candidates is not None:
        logits = logits[candidates]  # (n,), n >= top_k
    probs = torch.softmax(filter_logits(logits, params, top_k_applied=candidates is not None), dim=-1)
    if not bool(torch.isfinite(probs).all()):
        raise GemmakitError("sampling failed: the model's logits are not finite (NaN)")
    cumulative = probs.double().cumsum(0)
    pick = int(torch.searchsorted(cumulative, u * float(cumulative[-1]), right=True))
    pick = min(pick, int(probs.nonzero()[-1]))  # rounding past the end: the last token with probability
    return int(candidates[pick]) if candidates is not None else pick


def reference_token(logits: torch.Tensor, spec: DrawSpec) -> int:
    """:func:`sample_token` for one :class:`DrawSpec`, the output rules' mask and bans applied first."""
    if spec.bitmask is not None or spec.banned:
        logits = mask_logits(logits, spec.bitmask) if spec.bitmask is not None else logits.clone()
        logits[spec.banned] = float("-inf")
    seen, counts = spec.history.dense(logits.shape[-1])
    return sample_token(logits, spec.params, seen, counts, uniform(spec.seed, spec.counter))


def _sample_row(spec: DrawSpec, keep: list[torch.Tensor]) -> ctypes.Structure:
    """The C sampler's SampleRow for ``spec``; the arrays it points into are appended to ``keep``, which the
    caller holds until the call returns."""
    p, h = spec.params, spec.history
    bias_ids = bias = banned = None
    if p.logit_bias:
        keep += [torch.tensor(list(p.logit_bias), dtype=torch.int64),
                 torch.tensor(list(p.logit_bias.values()), dtype=torch.float32)]
        bias_ids, bias = keep[-2].data_ptr(), keep[-1].data_ptr()
    if spec.banned:
        keep.append(torch.tensor(spec.banned, dtype=torch.int64))
        banned = keep[-1].data_ptr()
    return struct("SampleRow")(
        p.temperature, p.top_p, p.min_p, p.top_k, p.repetition_penalty, p.presence_penalty, p.frequency_penalty,
        h.seen_ids.data_ptr(), h.n_seen, h.count_ids.data_ptr(), h.counts.data_ptr(), h.n_counts,
        bias_ids, bias, len(p.logit_bias), banned, len(spec.banned),
        spec.bitmask.data_ptr() if spec.bitmask is not None else None, spec.seed, spec.counter)


def pick_tokens(logits: torch.Tensor, specs: Sequence[DrawSpec]) -> list[int | GemmakitError]:
    """The next token of each row of (n, V) float32 logits, in one C call for all rows (in parallel); a row the C
    sampler cannot take (non-finite logits, nothing allowed, no kernels) goes through :func:`reference_token`,
    and its error, if any, is returned in its place (one row's failure is not the batch's)."""
    lib = kernels()
    picks: list[int | GemmakitError | None] = [None] * len(specs)
    if lib is not None and logits.device.type == "cpu" and logits.dtype == torch.float32 and specs:
        flat = logits.contiguous()
        for spec in specs:
            if spec.bitmask is not None:
                spec.bitmask = spec.bitmask.contiguous()
        keep: list[torch.Tensor] = []
        rows = (struct("SampleRow") * len(specs))(*[_sample_row(spec, keep) for spec in specs])
        out = torch.empty(len(specs), dtype=torch.int64)
        lib.sample_rows(ctypes.c_void_p(flat.data_ptr()), len(specs), flat.shape[-1], rows,
                        ctypes.c_void_p(out.data_ptr()), torch.get_num_threads())
        picks = [t if t >= 0 else None for t in out.tolist()]
    for i, spec in enumerate(specs):
        if picks[i] is None:
            try:
                picks[i] = reference_token(logits[i], spec)
            except GemmakitError as exc:
                picks[i] = exc
    return picks  # type: ignore[return-value]


@dataclass
class TokenLogprob:
    """A token's log-probability under the model, with the top alternatives when asked."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprob(logits: torch.Tensor, token_id: int, n_top: int) -> TokenLogprob:
    logprobs = torch.log_softmax(logits, dim=-1)
    top: list[tuple[int, float]] = []
    if n_top:
        values, ids = torch.topk(logprobs, n_top)
        top = [(int(i), float(v)) for i, v in zip(ids, values)]
    return TokenLogprob(token_id, float(logprobs[token_id]), top)
