"""The moderation categories: OpenAI's (``omni-moderation``'s names, sub-categories after a slash) plus ``pii``.

A guard scores any subset of them; a sub-category's score also counts for its parent (a threat is harassment).
"""

from __future__ import annotations

OPENAI_CATEGORIES: tuple[str, ...] = (
    "harassment", "harassment/threatening",
    "hate", "hate/threatening",
    "illicit", "illicit/violent",
    "self-harm", "self-harm/intent", "self-harm/instructions",
    "sexual", "sexual/minors",
    "violence", "violence/graphic",
)
PII = "pii"
CATEGORIES: tuple[str, ...] = OPENAI_CATEGORIES + (PII,)


def parent(category: str) -> str:
    """``harassment/threatening`` -> ``harassment``; a top-level category is its own parent."""
    return category.split("/", 1)[0]


def check_category(name: str, where: str) -> str:
    """``name`` if it is a category (or ``default``), else a ValueError naming ``where`` it came from."""
    if name != "default" and name not in CATEGORIES:
        raise ValueError(f"{where}: unknown category {name!r}; the categories are {', '.join(CATEGORIES)}")
    return name
