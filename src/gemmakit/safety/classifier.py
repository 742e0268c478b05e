"""The built-in text classifier: alt-profanity-check's linear model (trained on ~200k labelled comments, shipped
inside its wheel: nothing is fetched) for insults and abuse, plus word and pattern lists per category.

The linear model gives one number, P(offensive); it is reported as ``harassment``. The lists carry the rest
(threats, self-harm, violence, illicit instructions): a match scores 1.0 in its category. They are a lexical
baseline, not a model: they catch what they name and nothing else, and a policy adds its own
(``[classifier.patterns]``). A model guard (a policy prompt on a Gemma model) is the tool for paraphrases.
"""

from __future__ import annotations

import functools
import re
import threading
from typing import Mapping

from .categories import check_category
from .guard import Role, Span, Verdict, needs_safety_extra

# Whole-word, case-insensitive regular expressions per category. Kept short and unambiguous: each one is a
# statement of intent or an instruction request, not a topic (a history question about a war must pass).
BUILTIN_PATTERNS: dict[str, tuple[str, ...]] = {
    "harassment/threatening": (
        r"i(?:'m| am)? (?:going to|gonna|will) (?:kill|hurt|beat|stab|shoot) you",
        r"you(?:'re| are) (?:going to|gonna) die",
        r"i know where you live",
    ),
    "self-harm/intent": (
        r"i (?:want|plan|am going|'m going) to (?:kill|hurt|cut) myself",
        r"i (?:want|wanna) to die",
        r"i(?:'m| am) going to end (?:it all|my life)",
    ),
    "self-harm/instructions": (
        r"(?:best|easiest|painless) ways? to (?:kill myself|commit suicide|end my life)",
        r"how (?:much|many) \w+ (?:to|would) (?:overdose|kill myself)",
    ),
    "violence": (
        r"(?:kill|murder|slaughter) (?:them|him|her|everyone|all of them)",
        r"shoot up (?:the|a) (?:school|office|church|mosque|synagogue)",
    ),
    "illicit/violent": (
        r"how (?:do i|to|can i) (?:make|build) (?:a )?(?:pipe )?(?:bomb|explosive)",
        r"how (?:do i|to|can i) (?:buy|get) (?:an? )?(?:untraceable|unregistered) (?:gun|firearm)",
    ),
    "illicit": (
        r"how (?:do i|to|can i) (?:cook|make|synthesi[sz]e) (?:meth|methamphetamine|fentanyl|heroin)",
        r"how (?:do i|to|can i) launder (?:money|cash)",
    ),
}


def compile_patterns(patterns: Mapping[str, list[str] | tuple[str, ...]], where: str) -> list[tuple[str, re.Pattern]]:
    """(category, compiled pattern) pairs; a ValueError names a bad category or regular expression."""
    compiled = []
    for category, items in patterns.items():
        check_category(category, where)
        for item in items:
            try:
                compiled.append((category, re.compile(rf"\b(?:{item})\b", re.IGNORECASE)))
            except re.error as exc:
                raise ValueError(f"{where}: pattern {item!r} of {category!r} is not a regular expression: {exc}") \
                    from None
    return compiled


@functools.lru_cache(maxsize=1)
def _profanity_model():
    from profanity_check import predict_prob

    return predict_prob


class ClassifierGuard:
    """The ``classifier`` guard: P(offensive) as ``harassment``, and 1.0 in each category whose words or
    patterns occur (with the matches as spans).

    Args:
        patterns: more regular expressions per category (whole-word, case-insensitive), added to the built-in ones.
        words: plain words or phrases per category, matched whole-word and case-insensitive.
        builtin: keep the built-in patterns (off: only yours).
    """

    name = "classifier"

    def __init__(self, patterns: Mapping[str, list[str]] | None = None, words: Mapping[str, list[str]] | None = None,
                 builtin: bool = True) -> None:
        self.patterns = compile_patterns(BUILTIN_PATTERNS, "built-in patterns") if builtin else []
        self.patterns += compile_patterns(patterns or {}, "classifier patterns")
        escaped = {category: [re.escape(w) for w in items] for category, items in (words or {}).items()}
        self.patterns += compile_patterns(escaped, "classifier words")
        self._lock = threading.Lock()

    def warm_up(self) -> None:
        """Load the linear model now (~1 s of scikit-learn import) rather than in the first request."""
        with self._lock:
            try:
                _profanity_model()
            except ImportError as exc:
                raise needs_safety_extra(exc) from None

    def check(self, text: str, role: Role) -> Verdict:
        self.warm_up()
        scores = {"harassment": float(_profanity_model()([text])[0])}
        spans = []
        for category, pattern in self.patterns:
            for m in pattern.finditer(text):
                scores[category] = 1.0
                spans.append(Span(m.start(), m.end(), category, 1.0))
        return Verdict(scores, spans).with_parents()
