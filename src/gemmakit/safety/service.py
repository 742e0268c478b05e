"""One object that applies a :class:`SafetyPolicy`: it owns the guards, screens input (block, redact, flag),
checks output, and answers moderation requests in OpenAI's shape."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable

from ..errors import GemmakitError
from .categories import CATEGORIES, PII
from .classifier import ClassifierGuard
from .guard import Guard, Role, Verdict
from .pii import PIIGuard, Redactor, resolve_overlaps
from .policy import DirectionPolicy, SafetyPolicy

logger = logging.getLogger("gemmakit.safety")


class ContentPolicyError(GemmakitError):
    """The safety policy blocks this text. ``categories`` are the flagged categories that block it; ``role`` says
    whether it was the input or the output."""

    def __init__(self, categories: list[str], role: Role) -> None:
        self.categories, self.role = categories, role
        what = "the input" if role == "input" else "the answer"
        super().__init__(f"{what} was blocked by the content policy: flagged for {', '.join(categories)}")


@dataclass
class Decision:
    """What the policy made of one direction's texts: each text's verdict, the flagged categories, those that block,
    and (input only) the texts to use, redacted where the policy says so."""

    verdicts: list[Verdict]
    flagged: list[str]
    blocked: list[str]
    texts: list[str]
    redactor: Redactor = field(default_factory=Redactor)
    actions: dict[str, str] = field(default_factory=dict)  # flagged category -> the action taken for it
    by_guard: dict[str, dict[str, float]] = field(default_factory=dict)  # guard -> its highest score per category

    @property
    def redacted(self) -> bool:
        return bool(self.redactor.originals)

    def scores(self) -> dict[str, float]:
        """The highest score of each category over the texts."""
        return Verdict.combined(self.verdicts).scores


class Safety:
    """Applies a policy with the built-in guards (``pii``, ``classifier``), built once and shared by requests."""

    def __init__(self, policy: SafetyPolicy | None = None, guard_llm: Any = None) -> None:
        """``guard_llm``: the model guard's model, already loaded (by default the policy's ``model_guard.path`` is
        loaded when the policy has a model guard)."""
        self.policy = policy or SafetyPolicy()
        c = self.policy.classifier
        self.guards: dict[str, Guard] = {
            "pii": PIIGuard(),
            "classifier": ClassifierGuard(patterns=c.get("patterns"), words=c.get("words"),
                                          builtin=c.get("builtin", True)),
        }
        if self.policy.model_guard:
            self.guards["model"] = self._model_guard(guard_llm)

    def _model_guard(self, llm: Any) -> Guard:
        from .model_guard import ModelGuard

        m = self.policy.model_guard
        if llm is None:
            from ..llm import load

            llm = load(m["path"])
        policies = {name: (p["category"], p["text"]) for name, p in m.get("policies", {}).items()} or None
        return ModelGuard(llm, style=m.get("style", "shieldgemma"), policies=policies)

    @property
    def screens_input(self) -> bool:
        return bool(self.policy.input.guards)

    @property
    def checks_output(self) -> bool:
        return bool(self.policy.output.guards)

    def warm_up(self, names: Iterable[str] | None = None) -> None:
        """Load the guards the policy runs on generation now, not in the first request."""
        for name in names if names is not None else set(self.policy.input.guards) | set(self.policy.output.guards):
            self.guards[name].warm_up()

    def verdicts(self, text: str, role: Role, guards: Iterable[str]) -> dict[str, Verdict]:
        """Each guard's verdict on ``text``."""
        return {name: self.guards[name].check(text, role) for name in guards}

    def decide(self, texts: list[str], role: Role, redactor: Redactor | None = None) -> Decision:
        """Run the direction's guards on ``texts`` and apply its actions: flagged categories whose action is
        ``block`` block, ``pii`` whose action is ``redact`` is replaced by placeholders, ``flag`` only records."""
        rules: DirectionPolicy = self.policy.input if role == "input" else self.policy.output
        per_text = [self.verdicts(t, role, rules.guards) for t in texts]
        verdicts = [Verdict.combined(by_guard.values()) for by_guard in per_text]
        decision = Decision(verdicts, [], [], list(texts), redactor or Redactor(), by_guard=_highest(per_text))
        for category in rules.flagged(decision.scores()):
            decision.flagged.append(category)
            action = decision.actions[category] = rules.action(category)
            if action == "block":
                decision.blocked.append(category)
            elif action == "redact" and category == PII and role == "input":
                decision.texts = [decision.redactor.redact(t, resolve_overlaps([s for s in v.spans if _is_pii(s.kind)]))
                                  for t, v in zip(texts, verdicts)]
        return decision

    def moderate(self, text: str) -> dict[str, Any]:
        """One result of ``POST /v1/moderations``: ``flagged``, ``categories`` and ``category_scores`` over every
        category (OpenAI's and ``pii``), flagged at the moderation thresholds (the input policy's)."""
        return self.moderation(text)[0]

    def moderation(self, text: str) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
        """:meth:`moderate`'s result, and each guard's scores (for the audit log)."""
        by_guard = self.verdicts(text, "input", self.policy.moderation_guards)
        scores = Verdict.combined(by_guard.values()).scores
        flagged = set(self.policy.input.flagged(scores))
        return self._result(scores, flagged), _highest([by_guard])

    @staticmethod
    def _result(scores: dict[str, float], flagged: set[str]) -> dict[str, Any]:
        return {"flagged": bool(flagged),
                "categories": {c: c in flagged for c in CATEGORIES},
                "category_scores": {c: round(scores.get(c, 0.0), 6) for c in CATEGORIES},
                "category_applied_input_types": {c: ["text"] for c in CATEGORIES}}


def _highest(per_text: list[dict[str, Verdict]]) -> dict[str, dict[str, float]]:
    """Each guard's highest score per category over the texts (rounded; zeros left out)."""
    out: dict[str, dict[str, float]] = {}
    for by_guard in per_text:
        for name, v in by_guard.items():
            scores = out.setdefault(name, {})
            for category, score in v.scores.items():
                if score > 0:
                    scores[category] = round(max(score, scores.get(category, 0.0)), 6)
    return out


def _is_pii(kind: str) -> bool:
    """PII spans carry their kind (EMAIL, CARD, SECRET, ...); classifier spans carry a category name."""
    return kind not in CATEGORIES
