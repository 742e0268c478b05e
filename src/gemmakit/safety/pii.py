"""Personal data and secrets in text: find them, replace them with typed placeholders, put them back.

The recognizers are well-kept libraries' rather than our own regexes:

- presidio's pattern recognizers (no NLP model: none is fetched) for emails, payment cards (Luhn-checked), IBANs
  (checksum), IP addresses and US SSNs (presidio drops numbers no SSN can be); presidio's phone recognizer is
  Google's libphonenumber (``phonenumbers``), which validates numbers per region rather than matching digits;
- detect-secrets' detectors for API keys and tokens with well-known prefixes (AWS, GitHub, GitLab, OpenAI, Slack,
  Stripe, ...) and private-key headers, each match widened to the whole token;
- long high-entropy tokens of letters and digits (detect-secrets' Shannon entropy) for secrets without a prefix.

Overlapping findings keep the surer one (then the longer). ``pii`` scores 1.0 when anything is found: the
recognizers say "this is an email", not "probably personal".
"""

from __future__ import annotations

import functools
import re
import threading
from dataclasses import dataclass, field

from .categories import PII
from .guard import Role, Span, Verdict, needs_safety_extra

# presidio's entity name -> our placeholder's kind, and the least score of a match we accept (presidio's weak
# patterns, such as any 9 digits for an SSN, would flag every order number).
PRESIDIO_KINDS: dict[str, tuple[str, float]] = {
    "EMAIL_ADDRESS": ("EMAIL", 0.5),
    "PHONE_NUMBER": ("PHONE", 0.4),
    "CREDIT_CARD": ("CARD", 0.3),
    "IBAN_CODE": ("IBAN", 0.5),
    "IP_ADDRESS": ("IP", 0.5),
    "US_SSN": ("SSN", 0.5),
}
# Digits written 3-2-4 are an SSN's shape, not a phone's: when presidio has ruled it out as an SSN (a number no SSN
# can be, such as 078-05-1120), libphonenumber must not take it for a phone number of some region.
SSN_SHAPE = re.compile(r"\d{3}-\d{2}-\d{4}")
SECRET_DETECTORS = ("aws.AWSKeyDetector", "github_token.GitHubTokenDetector", "gitlab_token.GitLabTokenDetector",
                    "openai.OpenAIDetector", "slack.SlackDetector", "stripe.StripeDetector",
                    "private_key.PrivateKeyDetector", "jwt.JwtTokenDetector", "pypi_token.PypiTokenDetector",
                    "npm.NpmDetector", "sendgrid.SendGridDetector", "twilio.TwilioKeyDetector",
                    "discord.DiscordBotTokenDetector", "telegram_token.TelegramBotTokenDetector",
                    "mailchimp.MailchimpDetector", "square_oauth.SquareOAuthDetector",
                    "artifactory.ArtifactoryDetector", "azure_storage_key.AzureStorageKeyDetector")
TOKEN_CHARS = re.compile(r"[A-Za-z0-9_\-./+=]*")
# Candidates for prefix-less secrets: 24+ characters of a key alphabet, with both letters and digits.
# ("=" only as base64 padding: in "key=value" it separates).
LONG_TOKEN = re.compile(r"(?<![A-Za-z0-9_\-/+])[A-Za-z0-9_\-/+]{24,}={0,2}(?![A-Za-z0-9_\-/+=])")
MIN_ENTROPY_BITS = 4.0  # per character; English words and paths sit near 3, random base64 keys near 5


@functools.lru_cache(maxsize=1)
def _presidio_recognizers() -> list:
    """(recognizer, what a text needs before it is worth running): most text has no '@' and few digits, and the
    recognizers cost milliseconds each (libphonenumber's matcher runs once per region)."""
    from presidio_analyzer.predefined_recognizers import (CreditCardRecognizer, IbanRecognizer, IpRecognizer,
                                                          PhoneRecognizer, UsSsnRecognizer)

    return [(OfflineEmailRecognizer.make(), lambda text, digits: "@" in text),
            (PhoneRecognizer(), lambda text, digits: digits >= 5),
            (CreditCardRecognizer(), lambda text, digits: digits >= 12),
            (IbanRecognizer(), lambda text, digits: digits >= 8),
            (IpRecognizer(), lambda text, digits: (digits >= 4 and "." in text) or ":" in text),
            (UsSsnRecognizer(), lambda text, digits: digits >= 9)]


class OfflineEmailRecognizer:
    """presidio's email recognizer with its domain check on the public-suffix list bundled in tldextract:
    presidio's own check downloads the list on first use (a hang, then a traceback, on a machine offline)."""

    @staticmethod
    def make():
        import tldextract
        from presidio_analyzer.predefined_recognizers import EmailRecognizer

        extract = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

        class Recognizer(EmailRecognizer):
            def validate_result(self, pattern_text: str) -> bool:
                return extract(pattern_text.rsplit("@", 1)[-1]).fqdn != ""

        return Recognizer()


@functools.lru_cache(maxsize=1)
def _secret_patterns() -> list[re.Pattern]:
    import importlib

    patterns = []
    for path in SECRET_DETECTORS:
        module, name = path.rsplit(".", 1)
        detector = getattr(importlib.import_module(f"detect_secrets.plugins.{module}"), name)
        patterns.extend(detector().denylist)
    return patterns


@functools.lru_cache(maxsize=1)
def _base64_entropy():
    from detect_secrets.plugins.high_entropy_strings import Base64HighEntropyString

    return Base64HighEntropyString().calculate_shannon_entropy


def _entropy(token: str) -> float:
    """Shannon entropy in bits per character over the base64 alphabet (detect-secrets')."""
    return _base64_entropy()(token)


def find_secrets(text: str) -> list[Span]:
    """API keys and tokens: prefixed ones (detect-secrets' detectors), then long high-entropy tokens."""
    spans = []
    for pattern in _secret_patterns():
        for m in pattern.finditer(text):
            end = m.end() + TOKEN_CHARS.match(text, m.end()).end() - m.end()  # the whole token, not its prefix
            spans.append(Span(m.start(), end, "SECRET", 1.0))
    for m in LONG_TOKEN.finditer(text):
        token = m.group(0)
        has_digit, has_letter = any(c.isdigit() for c in token), any(c.isalpha() for c in token)
        if has_digit and has_letter and _entropy(token) >= MIN_ENTROPY_BITS:
            spans.append(Span(m.start(), m.end(), "SECRET", 0.8))
    return spans


def find_personal_data(text: str) -> list[Span]:
    """Emails, phones, payment cards, IBANs, IPs and SSNs (presidio's recognizers)."""
    spans = []
    digits = sum(c.isdigit() for c in text)
    for recognizer, worth_running in _presidio_recognizers():
        if not worth_running(text, digits):
            continue
        for r in recognizer.analyze(text, recognizer.supported_entities, None):
            kind, least = PRESIDIO_KINDS.get(r.entity_type, (r.entity_type, 0.5))
            if r.score >= least and not (kind == "PHONE" and SSN_SHAPE.fullmatch(text, r.start, r.end)):
                spans.append(Span(r.start, r.end, kind, float(r.score)))
    return spans


def resolve_overlaps(spans: list[Span]) -> list[Span]:
    """Non-overlapping spans in text order: where two overlap the surer one stays, then the longer."""
    kept: list[Span] = []
    for s in sorted(spans, key=lambda s: (-s.score, -(s.end - s.start), s.start)):
        if all(s.end <= k.start or s.start >= k.end for k in kept):
            kept.append(s)
    return sorted(kept, key=lambda s: s.start)


class PIIGuard:
    """The ``pii`` guard: personal data and secrets, with the spans a redaction replaces."""

    name = "pii"

    def __init__(self) -> None:
        self._lock = threading.Lock()  # presidio's recognizers are built once, on first use

    def warm_up(self) -> None:
        """Import and build the recognizers now (~1 s) rather than in the first request."""
        with self._lock:
            try:
                _presidio_recognizers()
                _secret_patterns()
                _base64_entropy()
            except ImportError as exc:
                raise needs_safety_extra(exc) from None

    def find(self, text: str) -> list[Span]:
        """Every item of personal data or secret in ``text``, non-overlapping, in order."""
        self.warm_up()
        return resolve_overlaps(find_personal_data(text) + find_secrets(text))

    def check(self, text: str, role: Role) -> Verdict:
        spans = self.find(text)
        return Verdict({PII: 1.0 if spans else 0.0}, spans)


@dataclass
class Redactor:
    """Replaces personal data with typed placeholders (``<EMAIL_1>``) across the texts of one request: the same
    value gets the same placeholder each time, so the model can still refer to it, and :meth:`restore` puts the
    originals back into the answer."""

    originals: dict[str, str] = field(default_factory=dict)  # placeholder -> original text
    _placeholders: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, original) -> placeholder
    _counts: dict[str, int] = field(default_factory=dict)

    def placeholder(self, kind: str, original: str) -> str:
        key = (kind, original)
        if key not in self._placeholders:
            self._counts[kind] = self._counts.get(kind, 0) + 1
            name = f"<{kind}_{self._counts[kind]}>"
            self._placeholders[key] = name
            self.originals[name] = original
        return self._placeholders[key]

    def redact(self, text: str, spans: list[Span]) -> str:
        """``text`` with each (non-overlapping) span replaced by its placeholder."""
        out, at = [], 0
        for s in spans:
            out.append(text[at:s.start])
            out.append(self.placeholder(s.kind, text[s.start:s.end]))
            at = s.end
        out.append(text[at:])
        return "".join(out)

    def restore(self, text: str) -> str:
        """Placeholders of this request in ``text`` replaced by what they stand for (others left as they are)."""
        if not self.originals:
            return text
        return PLACEHOLDER.sub(lambda m: self.originals.get(m.group(0), m.group(0)), text)

    def streaming(self) -> "StreamRestorer":
        return StreamRestorer(self)


PLACEHOLDER = re.compile(r"<[A-Z_]+_\d+>")
PARTIAL_PLACEHOLDER = re.compile(r"<[A-Z_]*\d*$")


class StreamRestorer:
    """:meth:`Redactor.restore` for a streamed answer: a piece that ends inside what may be a placeholder
    (``... <EMA``) holds that tail back until the next piece shows whether it is one."""

    def __init__(self, redactor: Redactor) -> None:
        self.redactor = redactor
        self.pending = ""

    def feed(self, piece: str) -> str:
        """The text that can go out now."""
        text = self.pending + piece
        if not self.redactor.originals:
            self.pending = ""
            return text
        tail = PARTIAL_PLACEHOLDER.search(text)
        cut = tail.start() if tail else len(text)
        self.pending = text[cut:]
        return self.redactor.restore(text[:cut])

    def finish(self) -> str:
        """Whatever is still held back, at the end of the answer."""
        text, self.pending = self.pending, ""
        return self.redactor.restore(text)
