"""OpenAI batch files: input lines checked before a job starts, output and error lines appended as requests finish,
and what a rerun skips.

Input lines are ``{"custom_id", "method": "POST", "url", "body"}`` with ``url`` ``/v1/chat/completions`` or
``/v1/completions``. Output lines are ``{"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error"}``; a request the server answered with an error goes to the error file in the same shape, and a line that
could not become a request goes there with ``response: null`` and ``error: {"code", "message"}``.

A job killed at any point (SIGKILL included) resumes: a rerun reads both result files, drops a last line cut off
mid-write, and skips every ``custom_id`` already there, so each is answered exactly once.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ..errors import InvalidParameterError

URLS = ("/v1/chat/completions", "/v1/completions")
MAX_LINE_BYTES = 8 << 20  # one request line, as the server's body limit
MAX_CUSTOM_ID = 512


@dataclass
class BatchRequest:
    custom_id: str
    url: str
    body: dict[str, Any]


@dataclass
class BadLine:
    """An input line that cannot become a request: where it is, its custom_id if it has one, and why."""

    line: int
    custom_id: str | None
    code: str
    message: str

    @property
    def key(self) -> str:
        """What marks it done in the error file: its custom_id, or its line number when it has none."""
        return self.custom_id if self.custom_id is not None else f"line:{self.line}"

    def error(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "line": self.line}


def parse_line(number: int, raw: str) -> BatchRequest | BadLine:
    """One input line (1-based ``number``) as a request, or what is wrong with it."""
    if len(raw.encode("utf-8", "surrogatepass")) > MAX_LINE_BYTES:
        return BadLine(number, None, "line_too_large", f"line {number} is over {MAX_LINE_BYTES} bytes")
    try:
        item = json.loads(raw)
    except ValueError as exc:
        return BadLine(number, None, "invalid_json", f"line {number} is not JSON: {exc}")
    if not isinstance(item, dict):
        return BadLine(number, None, "invalid_request", f"line {number} is not a JSON object")
    cid = item.get("custom_id")
    if not isinstance(cid, str) or not 0 < len(cid) <= MAX_CUSTOM_ID:
        return BadLine(number, None, "missing_custom_id", f"line {number}: custom_id must be a string of 1 to "
                       f"{MAX_CUSTOM_ID} characters")
    problem = _problem(item)
    if problem is not None:
        return BadLine(number, cid, "invalid_request", f"line {number} ({cid}): {problem}")
    return BatchRequest(cid, item["url"], item["body"])


def _problem(item: dict[str, Any]) -> str | None:
    if item.get("method", "POST") != "POST":
        return f"method {item.get('method')!r}: batch requests are POST"
    if item.get("url") not in URLS:
        return f"url {item.get('url')!r}: use one of {', '.join(URLS)}"
    if not isinstance(item.get("body"), dict):
        return "body must be a JSON object"
    if item["body"].get("stream"):
        return "stream: a batch request cannot stream"
    return None


def read_input(path: Path) -> tuple[list[BatchRequest], list[BadLine]]:
    """Every request and every bad line of an input file; InvalidParameterError, before anything runs, when
    custom_ids repeat (a result could not say which request it answers)."""
    requests: list[BatchRequest] = []
    bad: list[BadLine] = []
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            for number, raw in enumerate(f, 1):
                if raw.strip():
                    parsed = parse_line(number, raw)
                    (requests if isinstance(parsed, BatchRequest) else bad).append(parsed)
    except OSError as exc:
        raise InvalidParameterError(f"cannot read the batch input {path}: {exc.strerror}") from None
    seen: dict[str, int] = {}
    for cid in [r.custom_id for r in requests] + [b.custom_id for b in bad if b.custom_id is not None]:
        seen[cid] = seen.get(cid, 0) + 1
    repeated = sorted(c for c, n in seen.items() if n > 1)
    if repeated:
        shown = ", ".join(repr(c) for c in repeated[:5]) + (" ..." if len(repeated) > 5 else "")
        raise InvalidParameterError(f"{path}: {len(repeated)} custom_id(s) appear more than once ({shown}); each "
                                    "request needs its own")
    return requests, bad


def _key(line: dict[str, Any]) -> str:
    if line["custom_id"] is not None:
        return line["custom_id"]
    return f"line:{line['error']['line']}"


def done_ids(path: Path) -> set[str]:
    """The custom_ids a result file already holds (``line:N`` for a bad line without one), after cutting off a last
    line that a kill left half-written."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1  # everything after the last newline is a line cut off mid-write
    ids: set[str] = set()
    for raw in data[:keep].splitlines():
        try:
            ids.add(_key(json.loads(raw)))
        except (ValueError, KeyError, TypeError):
            keep = 0  # not a result file: refuse rather than append to it
            break
    if keep == 0 and data.strip():
        raise InvalidParameterError(f"{path} exists and is not a batch result file; choose another path")
    if keep < len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
    return ids


class ResultWriter:
    """Appends result lines to the output or error file, one write and flush each: a line is whole in the file
    or (if the process dies mid-write) cut off and dropped by the next run's :func:`done_ids`."""

    def __init__(self, output: Path, errors: Path) -> None:
        self.output: TextIO = open(output, "a", encoding="utf-8")
        self.errors: TextIO = open(errors, "a", encoding="utf-8")

    def write(self, custom_id: str, response: dict[str, Any] | None, error: dict[str, str] | None) -> None:
        ok = response is not None and response["status_code"] == 200
        line = {"id": "batch_req_" + uuid.uuid4().hex, "custom_id": custom_id, "response": response, "error": error}
        f = self.output if ok else self.errors
        f.write(json.dumps(line, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())  # the line survives a power cut too, not only a killed process

    def close(self) -> None:
        self.output.close()
        self.errors.close()
