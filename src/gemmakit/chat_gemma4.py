"""Gemma 4 chat format: native system role, thinking, tool declarations, calls and results (placeholder)."""

from __future__ import annotations

from .chat import Gemma3ChatFormat


class Gemma4ChatFormat(Gemma3ChatFormat):
    stop_pieces = ("<eos>", "<turn|>")
