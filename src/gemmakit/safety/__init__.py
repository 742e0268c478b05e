"""Safety built in: guards that score text per moderation category, PII redaction, and the policy that says what
runs on input and output and what a flag does (block, redact, flag).

    >>> from gemmakit.safety import Safety, SafetyPolicy
    >>> safety = Safety()                                  # built-in guards: pii, classifier
    >>> safety.moderate("mail me at ann@example.com")["categories"]["pii"]
    True

The guards load their libraries (presidio, detect-secrets, alt-profanity-check) on first use: install them with
``pip install "gemmakit[safety]"``.
"""

from .categories import CATEGORIES, OPENAI_CATEGORIES, PII
from .classifier import ClassifierGuard
from .guard import Guard, Role, SafetyUnavailableError, Span, Verdict
from .pii import PIIGuard, Redactor, StreamRestorer
from .policy import DirectionPolicy, SafetyPolicy, SafetyPolicyError
from .service import ContentPolicyError, Decision, Safety

__all__ = ["CATEGORIES", "OPENAI_CATEGORIES", "PII", "ClassifierGuard", "Guard", "Role", "Span", "Verdict",
           "PIIGuard", "Redactor", "StreamRestorer", "SafetyUnavailableError", "DirectionPolicy", "SafetyPolicy",
           "SafetyPolicyError", "ContentPolicyError", "Decision", "Safety"]
