"""Outputs programs can trust: grammars (JSON schema, regex, choice, Lark) built and checked with llguidance,
and the per-sequence constraint that holds decoding to them."""

from .constraint import ConstraintError, MaskBatch, OutputConstraint, OutputRules
from .grammars import Grammar

__all__ = ["ConstraintError", "Grammar", "MaskBatch", "OutputConstraint", "OutputRules"]
