"""What every guard shares: the text's role, the verdict it returns, and the :class:`Guard` interface."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal, Protocol

from ..errors import GemmakitError
from .categories import parent

Role = Literal["input", "output"]  # a user's (or a tool's) text going in, or the model's text coming out


class SafetyUnavailableError(GemmakitError):
    """A guard's library is not installed; the message says what to install."""


def needs_safety_extra(exc: ImportError) -> SafetyUnavailableError:
    return SafetyUnavailableError(f"the safety guards need {exc.name or 'their libraries'}, which is not installed: "
                                  "pip install 'gemmakit[safety]'")


@dataclass(frozen=True)
class Span:
    """One finding inside the text: characters ``[start, end)``, what it is (``EMAIL_ADDRESS``, ``violence``...)
    and how sure the guard is (0..1)."""

    start: int
    end: int
    kind: str
    score: float


@dataclass
class Verdict:
    """A guard's answer for one text: a score in [0, 1] per category it looks at, and the spans behind them
    (PII items, matched words) where it can point at them."""

    scores: dict[str, float] = field(default_factory=dict)
    spans: list[Span] = field(default_factory=list)

    def merge(self, other: "Verdict") -> "Verdict":
        """Both verdicts in one: the higher score of each category, every span."""
        scores = dict(self.scores)
        for category, score in other.scores.items():
            scores[category] = max(score, scores.get(category, 0.0))
        return Verdict(scores, self.spans + other.spans)

    @staticmethod
    def combined(verdicts: Iterable["Verdict"]) -> "Verdict":
        """All the verdicts in one (see :meth:`merge`)."""
        out = Verdict()
        for v in verdicts:
            out = out.merge(v)
        return out

    def with_parents(self) -> "Verdict":
        """Each sub-category's score raised into its parent's (OpenAI flags ``harassment`` with
        ``harassment/threatening``)."""
        scores = dict(self.scores)
        for category, score in self.scores.items():
            top = parent(category)
            scores[top] = max(score, scores.get(top, 0.0))
        return Verdict(scores, list(self.spans))


class Guard(Protocol):
    """Scores a text. ``name`` is how policies refer to it; ``check`` must be thread-safe (the server calls it
    from worker threads) and return scores only for categories it knows."""

    name: str

    def check(self, text: str, role: Role) -> Verdict: ...
