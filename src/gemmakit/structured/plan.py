"""From a request's knobs (response format, tools and tool_choice, thinking and its budget) to what the engine
enforces (:class:`~gemmakit.structured.constraint.OutputRules`) and how the answer is read back
(:class:`~gemmakit.structured.output.ChatOutputSplitter`), for the model's chat family."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..errors import InvalidGrammarError, InvalidParameterError
from .constraint import OutputRules
from .grammars import Grammar, checked
from .output import ChatOutputSplitter
from .tools import chosen_functions, gemma4_tool_grammar, json_tool_grammar, json_tool_instructions

# OpenAI's reasoning_effort -> most thought-channel tokens (None: no limit; "none" turns thinking off).
REASONING_EFFORT_BUDGETS: dict[str, int | None] = {"minimal": 256, "low": 1024, "medium": 4096, "high": None}
GEMMA4_MARKUP = ("<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", '<|"|>')


@dataclass
class OutputPlan:
    """How one chat request's answer is produced and read.

    Attributes:
        messages: the conversation to render (Gemma 1-3 with tools: the tools explained in a system message).
        tools: the tools the chat template renders (Gemma 4), or None.
        enable_thinking: whether the template opens thinking.
        rules: what decoding enforces, or None for free output.
        grammar: the answer's own grammar (JSON schema, regex, ...), to parse it back (``Completion.parsed``).
    """

    messages: list[Mapping[str, Any]]
    tools: list[Mapping[str, Any]] | None
    enable_thinking: bool
    rules: OutputRules | None
    grammar: Grammar | None
    architecture: str
    hold_for_tools: bool = False
    declared: list[Mapping[str, Any]] = field(default_factory=list)

    def splitter(self) -> ChatOutputSplitter:
        return ChatOutputSplitter(self.architecture, self.declared, self.hold_for_tools)


def thinking_budget(max_reasoning_tokens: int | None, reasoning_effort: str | None) -> tuple[bool | None, int | None]:
    """(thinking on/off, or None for as asked; the thought-channel budget) from the two ways to ask."""
    if max_reasoning_tokens is not None and (isinstance(max_reasoning_tokens, bool)
                                             or not isinstance(max_reasoning_tokens, int) or max_reasoning_tokens < 0):
        raise InvalidParameterError(f"max_reasoning_tokens={max_reasoning_tokens!r}: must be an integer >= 0")
    if reasoning_effort is None:
        return None, max_reasoning_tokens
    if reasoning_effort == "none":
        return False, None
    if reasoning_effort not in REASONING_EFFORT_BUDGETS:
        raise InvalidParameterError(f"reasoning_effort={reasoning_effort!r}: one of none, "
                                    f"{', '.join(REASONING_EFFORT_BUDGETS)}")
    budget = REASONING_EFFORT_BUDGETS[reasoning_effort]
    return True, budget if max_reasoning_tokens is None else max_reasoning_tokens


def _check_tool_choice(tool_choice: Any, tools: Sequence[Any] | None) -> None:
    if tool_choice in (None, "none", "auto", "required"):
        if tool_choice == "required" and not tools:
            raise InvalidGrammarError("tool_choice 'required' needs tools")
        return
    if not isinstance(tool_choice, Mapping) or tool_choice.get("type") != "function":
        raise InvalidGrammarError("tool_choice must be 'none', 'auto', 'required' or "
                                  "{'type': 'function', 'function': {'name': ...}}")
    if not tools:
        raise InvalidGrammarError("tool_choice names a function but no tools were given")


def plan_chat(llm, messages: Sequence[Mapping[str, Any]], *, grammar: Grammar | None = None,
              tools: Sequence[Mapping[str, Any]] | None = None, tool_choice: Any = None,
              parallel_tool_calls: bool = True, enable_thinking: bool = False,
              reasoning_budget: int | None = None) -> OutputPlan:
    """The :class:`OutputPlan` of a chat request on ``llm``'s model family."""
    _check_tool_choice(tool_choice, tools)
    tools = list(tools or []) or None
    forced = tools is not None and (tool_choice == "required" or isinstance(tool_choice, Mapping))
    functions = chosen_functions(tools, tool_choice) if tools else []
    if llm.config.architecture == "gemma4":
        return _plan_gemma4(llm, list(messages), grammar, tools, tool_choice, forced, functions,
                            parallel_tool_calls, enable_thinking, reasoning_budget)
    if grammar is None and forced:
        grammar = checked(json_tool_grammar(functions, parallel_tool_calls), llm.tokenizer)
    elif grammar is not None:
        grammar = checked(grammar, llm.tokenizer)
    messages = list(messages)
    use_tools = tools is not None and tool_choice != "none"
    if use_tools:
        messages = _with_tool_instructions(messages, tools)
    rules = OutputRules(grammar) if grammar is not None else None
    answer = None if forced else grammar
    return OutputPlan(messages, None, False, rules, answer, llm.config.architecture, hold_for_tools=use_tools,
                      declared=tools or [])


def _with_tool_instructions(messages: list[Mapping[str, Any]], tools: list[Mapping[str, Any]]) -> list:
    """Gemma 1-3: the tools explained at the top of the system message (made when there is none)."""
    instructions = json_tool_instructions(tools)
    if messages and messages[0].get("role") in ("system", "developer") and isinstance(messages[0].get("content"), str):
        return [{**messages[0], "content": instructions + "\n\n" + messages[0]["content"]}] + messages[1:]
    return [{"role": "system", "content": instructions}] + messages


def _plan_gemma4(llm, messages, grammar, tools, tool_choice, forced, functions, parallel, enable_thinking,
                 reasoning_budget) -> OutputPlan:
    tok = llm.tokenizer
    missing = [p for p in GEMMA4_MARKUP if not tok.has_piece(p)]
    if missing:
        raise InvalidGrammarError(f"this Gemma 4 vocabulary lacks {', '.join(missing)}")
    ids = {p: tok.token_id(p) for p in GEMMA4_MARKUP}
    trigger = None
    answer = grammar
    if forced:
        grammar = gemma4_tool_grammar(functions, ids, lazy=False, parallel=parallel)
        answer = None
    elif tools and tool_choice != "none" and grammar is None:
        grammar, trigger = gemma4_tool_grammar(functions, ids, lazy=True, parallel=parallel), ids["<|tool_call>"]
    banned = set()
    if not enable_thinking:
        banned.add(ids["<|channel>"])  # thinking off holds on every model size: the channel cannot open
    if tools and tool_choice == "none":
        banned.add(ids["<|tool_call>"])
    if grammar is not None:
        grammar = checked(grammar, tok)
    rules = None
    if grammar is not None or banned or (enable_thinking and reasoning_budget is not None):
        rules = OutputRules(grammar, trigger=trigger,
                            thought_open=ids["<|channel>"] if enable_thinking else None,
                            thought_close=ids["<channel|>"] if enable_thinking else None,
                            reasoning_budget=reasoning_budget if enable_thinking else None,
                            banned=frozenset(banned), repeat_trigger=parallel)
    return OutputPlan(messages, tools, enable_thinking, rules, answer, "gemma4", declared=tools or [])
