"""Batch jobs: OpenAI batch files answered offline (``gemmakit batch``), resumable after any interruption."""

from .files import BadLine, BatchRequest, done_ids, read_input
from .runner import BatchSummary, run_batch

__all__ = ["BadLine", "BatchRequest", "BatchSummary", "done_ids", "read_input", "run_batch"]
