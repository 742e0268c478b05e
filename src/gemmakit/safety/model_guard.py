"""The model guard: a Gemma model asked whether a text breaks a policy, run by our own engine beside the served model.

Two prompt styles:

- **ShieldGemma** (Gemma 2 guard models): one Yes/No question per policy, in the model card's words; the score is
  P("Yes") against P("No") at the first answer token, from one prefill per policy. The policies' prompts share
  everything before the policy text (instructions and the text under test), so that prefix runs once; every
  policy's rest then runs in one batched forward from copies of the prefix's cache rows.
- **Llama Guard** (guard models trained on its format): the categories listed ``S1: ...``, one prompt, a greedy
  answer ``safe`` or ``unsafe\\nS1,S3``; each listed category scores P("unsafe") at the first answer token.

Any GGUF or Hugging Face folder gemmakit loads can be the guard model.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import torch

from ..errors import InvalidParameterError
from ..generate import prefill
from ..kv_cache import KVCache
from .guard import Role, Verdict

# ShieldGemma's four harm types (its model card's definitions), with the category each one scores.
SHIELDGEMMA_POLICIES: dict[str, tuple[str, str]] = {
    "dangerous": ("violence", '"No Dangerous Content": {subject} shall not contain or seek generation of content '
                  "that harming oneself and/or others (e.g., accessing or building firearms and explosive devices, "
                  "promotion of terrorism, instructions for suicide)."),
    "harassment": ("harassment", '"No Harassment": {subject} shall not contain or seek generation of content that '
                   "is malicious, intimidating, bullying, or abusive content targeting another individual (e.g., "
                   "physical threats, denial of tragic events, disparaging victims of violence)."),
    "hate": ("hate", '"No Hate Speech": {subject} shall not contain or seek generation of content that targeting '
             "identity and/or protected attributes (e.g., racial slurs, promotion of discrimination, calls to violence "
             "against protected groups) or dehumanizing/belittling/vilifying on the bases of race, ethnicity, "
             "religion, disability, age, nationality, veteran status, sexual orientation, gender, gender identity, "
             "caste, or any other protected status. We do allow content that includes a reference to a protected "
             "individual or group in a positive manner."),
    "sexual": ("sexual", '"No Sexually Explicit Information": {subject} shall not contain or seek generation of '
               "content that contains references to sexual acts or other lewd content (e.g., sexually graphic "
               "descriptions, content aimed at causing arousal). Medical or scientific terms related to human "
               "anatomy or sex education are permitted."),
}

SHIELDGEMMA_PROMPT = {
    "input": ("You are a policy expert trying to help determine whether a user prompt is in violation of the defined "
              "safety policies.\n\n<start_of_turn>\nHuman Question: {text}\n<end_of_turn>\n\nOur safety principle "
              "is defined in the below:\n\n* {policy}\n\nDoes the human question violate the above principle? Your "
              "answer must start with 'Yes' or 'No'. And then walk through step by step to be sure we answer "
              "correctly.\n"),
    "output": ("You are a policy expert trying to help determine whether an AI response to prompt is in violation of "
               "the defined safety policies.\n\n<start_of_turn>\nChatbot Response: {text}\n<end_of_turn>\n\nOur "
               "safety principle is defined in the below:\n\n* {policy}\n\nDoes the Chatbot Response violate the "
               "above principle? Your answer must start with 'Yes' or 'No'. And then walk through step by step to be "
               "sure we answer correctly.\n"),
}
SUBJECT = {"input": "The prompt", "output": "The chatbot"}

# Llama Guard 3's categories, with the category each one scores (None: outside OpenAI's list).
LLAMA_GUARD_CATEGORIES: list[tuple[str, str | None]] = [
    ("Violent Crimes", "violence"), ("Non-Violent Crimes", "illicit"), ("Sex-Related Crimes", "sexual"),
    ("Child Sexual Exploitation", "sexual/minors"), ("Defamation", "harassment"), ("Specialized Advice", None),
    ("Privacy", "pii"), ("Intellectual Property", None), ("Indiscriminate Weapons", "illicit/violent"),
    ("Hate", "hate"), ("Suicide & Self-Harm", "self-harm"), ("Sexual Content", "sexual"), ("Elections", None),
    ("Code Interpreter Abuse", "illicit"),
]
LLAMA_GUARD_PROMPT = (
    "Task: Check if there is unsafe content in '{agent}' messages in conversations according our safety policy with "
    "the below categories.\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n{categories}\n<END UNSAFE CONTENT CATEGORIES>\n\n"
    "<BEGIN CONVERSATION>\n\n{agent}: {text}\n\n<END CONVERSATION>\n\nProvide your safety assessment for ONLY THE "
    "LAST {agent} message in the above conversation:\n - First line must read 'safe' or 'unsafe'.\n - If unsafe, a "
    "second line must include a comma-separated list of violated categories.")
MAX_VERDICT_TOKENS = 12  # "unsafe\nS1,S2,..." is a few tokens


def shieldgemma_prompt(text: str, role: Role, policy: str) -> str:
    """ShieldGemma's question for one policy (``policy`` may hold ``{subject}``: "The prompt" / "The chatbot")."""
    return SHIELDGEMMA_PROMPT[role].format(text=text, policy=policy.format(subject=SUBJECT[role]))


def llama_guard_prompt(text: str, role: Role, categories: Sequence[tuple[str, str | None]]) -> str:
    listed = "\n".join(f"S{i + 1}: {name}." for i, (name, _) in enumerate(categories))
    return LLAMA_GUARD_PROMPT.format(agent="User" if role == "input" else "Agent", categories=listed, text=text)


def common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest prefix all rows share, leaving each at least one token of its own."""
    n = min(len(r) for r in rows) - 1
    for i in range(n):
        if any(r[i] != rows[0][i] for r in rows):
            return i
    return n


@dataclass
class ModelGuard:
    """A guard that asks a Gemma model (``llm``, a :class:`~gemmakit.LLM`).

    Args:
        style: ``shieldgemma`` (P(Yes) per policy) or ``llamaguard`` (``safe``/``unsafe`` with category codes).
        policies: ShieldGemma policies as {name: (category, text)} (default: its four harm types); the text may
            hold ``{subject}``.
        name: how policies refer to this guard.
    """

    llm: object
    style: Literal["shieldgemma", "llamaguard"] = "shieldgemma"
    policies: Mapping[str, tuple[str, str]] | None = None
    name: str = "model"

    def __post_init__(self) -> None:
        if self.style not in ("shieldgemma", "llamaguard"):
            raise InvalidParameterError(f"guard model style {self.style!r}: use shieldgemma or llamaguard")
        self.policies = dict(self.policies or SHIELDGEMMA_POLICIES)
        first = {w: self.llm.tokenizer.encode(w, add_bos=False)[0] for w in ("Yes", "No", "safe", "unsafe")}
        if first["Yes"] == first["No"] or first["safe"] == first["unsafe"]:
            raise InvalidParameterError("the guard model's vocabulary cannot tell 'Yes' from 'No' (or 'safe' from "
                                        "'unsafe') by their first token")
        self._first = first
        self._lock = threading.Lock()  # one check at a time: the guard model has one set of weights and caches

    def warm_up(self) -> None:
        """The guard model is loaded when the guard is made."""

    def prompt_ids(self, prompt: str) -> list[int]:
        """The guard prompt's token ids. ShieldGemma's prompt carries its own turn markers and is encoded as it is
        (BOS first, ``<start_of_turn>`` read as the control token), as its model card does; a Llama Guard prompt
        becomes a user turn of the guard model's chat format, ready for the answer."""
        if self.style == "shieldgemma":
            return self.llm.tokenizer.encode(prompt, add_bos=True, parse_special=True)
        return self.llm.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True)

    def check(self, text: str, role: Role) -> Verdict:
        if self.style == "llamaguard":
            with self._lock, torch.inference_mode():
                return self._llama_guard(text, role)
        scores: dict[str, float] = {}
        for name, p in self.yes_probabilities(text, role).items():
            category = self.policies[name][0]
            scores[category] = max(p, scores.get(category, 0.0))
        return Verdict(scores).with_parents()

    def yes_probabilities(self, text: str, role: Role) -> dict[str, float]:
        """P("Yes") per ShieldGemma policy name."""
        names = list(self.policies)
        rows = [self.prompt_ids(shieldgemma_prompt(text, role, self.policies[n][1])) for n in names]
        with self._lock, torch.inference_mode():
            last = self._last_logits(rows)  # (P, V)
        pair = torch.stack([last[:, self._first["Yes"]], last[:, self._first["No"]]], dim=-1)
        return dict(zip(names, torch.softmax(pair, dim=-1)[:, 0].tolist()))

    def _last_logits(self, rows: list[list[int]]) -> torch.Tensor:
        """Next-token logits (P, V) after each row: the shared prefix prefilled once in row 0 and copied to the
        other rows' cache, then every row's rest in one padded forward."""
        model, shared = self.llm.model, common_prefix(rows)
        longest = max(len(r) for r in rows)
        if longest > self.llm.context_length:
            raise InvalidParameterError(f"the guard prompt takes {longest} tokens, more than the guard model's "
                                        f"context of {self.llm.context_length}")
        cache = KVCache(self.llm.config, len(rows), longest, model.activation_dtype)
        prefill(model, rows[0][:shared], cache.narrow(0, 1))
        cache.copy_row(0, slice(1, len(rows)))
        rest = max(len(r) - shared for r in rows)
        tokens = torch.zeros(len(rows), rest, dtype=torch.long)
        positions = torch.full((len(rows), rest), -1, dtype=torch.long)
        for b, r in enumerate(rows):
            tokens[b, : len(r) - shared] = torch.tensor(r[shared:])
            positions[b, : len(r) - shared] = torch.arange(shared, len(r))
        hidden = model(tokens, positions, cache)  # (P, rest, E)
        ends = torch.tensor([len(r) - shared - 1 for r in rows])
        return model.logits(hidden[torch.arange(len(rows)), ends])

    def _llama_guard(self, text: str, role: Role) -> Verdict:
        ids = self.prompt_ids(llama_guard_prompt(text, role, LLAMA_GUARD_CATEGORIES))
        first = self._last_logits([ids])[0]
        pair = torch.stack([first[self._first["unsafe"]], first[self._first["safe"]]])
        p_unsafe = float(torch.softmax(pair, dim=-1)[0])
        answer = self.llm.generate(ids, max_tokens=MAX_VERDICT_TOKENS, temperature=0.0).text
        return Verdict({c: p_unsafe for c in parse_llama_guard(answer)}).with_parents()


def parse_llama_guard(answer: str, categories: Sequence[tuple[str, str | None]] = LLAMA_GUARD_CATEGORIES) -> list[str]:
    """Our categories named by a Llama Guard answer (``unsafe\\nS1,S10`` -> violence, hate); none for ``safe``."""
    lines = answer.strip().splitlines()
    if not lines or lines[0].strip().lower() != "unsafe":
        return []
    found = []
    for code in (lines[1] if len(lines) > 1 else "").replace(" ", "").split(","):
        if code[:1].upper() == "S" and code[1:].isdigit() and 1 <= int(code[1:]) <= len(categories):
            category = categories[int(code[1:]) - 1][1]
            if category is not None and category not in found:
                found.append(category)
    return found
