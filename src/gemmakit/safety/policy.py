"""The safety policy: which guards run on input and on output, the threshold per category, and the action.

A policy file (TOML or YAML; ``gemmakit serve --safety FILE``) reads::

    [input]
    guards = ["pii", "classifier"]
    action = "block"                 # what a flagged category does: block | redact | flag
    [input.actions]
    pii = "redact"                   # per category; "redact" applies to pii only
    [input.thresholds]
    default = 0.5
    harassment = 0.8                 # a sub-category without its own threshold takes its parent's

    [output]
    guards = ["classifier"]
    action = "block"                 # a blocked answer ends with finish_reason "content_filter"

    [moderation]
    guards = ["pii", "classifier"]   # what POST /v1/moderations runs (this is the default)

    [classifier]
    builtin = true
    [classifier.words]
    violence = ["my own word"]
    [classifier.patterns]
    illicit = ["how (to|do i) pick a lock"]

    [model_guard]                    # the "model" guard: a Gemma guard model loaded beside the served one
    path = "shieldgemma-2b.Q8_0.gguf"
    style = "shieldgemma"            # or "llamaguard"

Unknown keys, guards, categories and actions are refused with a message naming them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from ..errors import InvalidParameterError
from .categories import CATEGORIES, PII, check_category, parent
from .classifier import ClassifierGuard

Action = Literal["block", "redact", "flag"]
ACTIONS = ("block", "redact", "flag")
BUILTIN_GUARDS = ("pii", "classifier")
DEFAULT_THRESHOLD = 0.5


class SafetyPolicyError(InvalidParameterError):
    """A safety policy (file or mapping) cannot be used; the message names the key at fault."""


def _known_keys(section: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(section) - allowed
    if unknown:
        raise SafetyPolicyError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; expected "
                                f"{', '.join(sorted(allowed))}")


@dataclass(frozen=True)
class DirectionPolicy:
    """What happens to one direction's text (input or output)."""

    guards: tuple[str, ...] = ()
    thresholds: Mapping[str, float] = field(default_factory=lambda: {"default": DEFAULT_THRESHOLD})
    actions: Mapping[str, Action] = field(default_factory=lambda: {"default": "block"})

    def threshold(self, category: str) -> float:
        """The category's own threshold, else its parent's, else the default."""
        t = self.thresholds
        return t.get(category, t.get(parent(category), t.get("default", DEFAULT_THRESHOLD)))

    def action(self, category: str) -> Action:
        a = self.actions
        return a.get(category, a.get(parent(category), a.get("default", "block")))

    def flagged(self, scores: Mapping[str, float]) -> list[str]:
        """The categories whose score reaches their threshold, in the catalogue's order."""
        return [c for c in CATEGORIES if c in scores and scores[c] >= self.threshold(c)]

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any], where: str,
                     known_guards: tuple[str, ...] = BUILTIN_GUARDS) -> "DirectionPolicy":
        _known_keys(section, {"guards", "action", "actions", "thresholds"}, where)
        guards = _guards(section.get("guards", ()), known_guards, f"{where}.guards")
        actions = {"default": section.get("action", "block"), **dict(section.get("actions", {}))}
        for category, action in actions.items():
            _check(check_category, category, f"{where}.actions")
            if action not in ACTIONS:
                raise SafetyPolicyError(f"{where}.actions: {category} = {action!r}; the actions are "
                                        f"{', '.join(ACTIONS)}")
            if action == "redact" and category not in (PII, "default"):
                raise SafetyPolicyError(f"{where}.actions: {category} = 'redact': only pii can be redacted")
        thresholds = {"default": DEFAULT_THRESHOLD, **dict(section.get("thresholds", {}))}
        for category, value in thresholds.items():
            _check(check_category, category, f"{where}.thresholds")
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise SafetyPolicyError(f"{where}.thresholds: {category} = {value!r}; a threshold is in [0, 1]")
        return cls(guards, {k: float(v) for k, v in thresholds.items()}, actions)


def _guards(names: Any, known: tuple[str, ...], where: str) -> tuple[str, ...]:
    for g in names:
        if g not in known:
            hint = " (the model guard needs a [model_guard] section)" if g == "model" else ""
            raise SafetyPolicyError(f"{where}: unknown guard {g!r}; the guards are {', '.join(known)}{hint}")
    return tuple(names)


def _check(fn, value: str, where: str) -> None:
    try:
        fn(value, where)
    except ValueError as exc:
        raise SafetyPolicyError(str(exc)) from None


@dataclass(frozen=True)
class SafetyPolicy:
    """Guards and actions for input and output, the guards of ``/v1/moderations``, and the classifier's lists.

    The default runs no guard on generation and the built-in guards on the moderation endpoint.
    """

    input: DirectionPolicy = field(default_factory=DirectionPolicy)
    output: DirectionPolicy = field(default_factory=DirectionPolicy)
    moderation_guards: tuple[str, ...] = BUILTIN_GUARDS
    classifier: Mapping[str, Any] = field(default_factory=dict)
    model_guard: Mapping[str, Any] = field(default_factory=dict)  # path, style, policies (see ModelGuard)

    @property
    def guards_in_use(self) -> set[str]:
        return set(self.input.guards) | set(self.output.guards) | set(self.moderation_guards)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str = "safety policy") -> "SafetyPolicy":
        _known_keys(data, {"input", "output", "moderation", "classifier", "model_guard"}, where)
        model_guard = dict(data.get("model_guard", {}))
        _known_keys(model_guard, {"path", "style", "policies"}, f"{where}: model_guard")
        if model_guard and "path" not in model_guard:
            raise SafetyPolicyError(f"{where}: model_guard: give the guard model's path (a GGUF file or HF folder)")
        for name, item in model_guard.get("policies", {}).items():
            if not isinstance(item, Mapping) or set(item) != {"category", "text"} or not isinstance(item["text"], str):
                raise SafetyPolicyError(f"{where}: model_guard.policies.{name}: give a category and a text")
            _check(check_category, item["category"], f"{where}: model_guard.policies.{name}")
        known = BUILTIN_GUARDS + (("model",) if model_guard else ())
        moderation = data.get("moderation", {})
        _known_keys(moderation, {"guards"}, f"{where}: moderation")
        guards = _guards(moderation.get("guards", BUILTIN_GUARDS), known, f"{where}: moderation.guards")
        classifier = dict(data.get("classifier", {}))
        _known_keys(classifier, {"builtin", "words", "patterns"}, f"{where}: classifier")
        try:  # the lists compile now: a bad category or regular expression is the policy's error
            ClassifierGuard(patterns=classifier.get("patterns"), words=classifier.get("words"))
        except (ValueError, TypeError, AttributeError) as exc:
            raise SafetyPolicyError(f"{where}: classifier: {exc}") from None
        output = DirectionPolicy.from_mapping(data.get("output", {}), f"{where}: output", known)
        if "redact" in output.actions.values():
            raise SafetyPolicyError(f"{where}: output: 'redact' applies to input (the model reads placeholders); an "
                                    "answer is checked, not rewritten: use block or flag")
        return cls(DirectionPolicy.from_mapping(data.get("input", {}), f"{where}: input", known), output, guards,
                   classifier, model_guard)

    @classmethod
    def from_file(cls, path: str | Path) -> "SafetyPolicy":
        """Read a TOML (``.toml``) or YAML (``.yaml``/``.yml``) policy file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SafetyPolicyError(f"cannot read the safety policy {path}: {exc.strerror}") from None
        data = _parse(path, text)
        if not isinstance(data, dict):
            raise SafetyPolicyError(f"{path}: the policy must be a table of sections")
        return cls.from_mapping(data, str(path))


def _parse(path: Path, text: str) -> Any:
    if path.suffix == ".toml":
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise SafetyPolicyError(f"{path}: not valid TOML: {exc}") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise SafetyPolicyError(f"{path}: not valid YAML: {exc}") from None
    raise SafetyPolicyError(f"{path}: a safety policy is a .toml or .yaml file")
