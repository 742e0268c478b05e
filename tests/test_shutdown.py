"""Graceful shutdown of `gemmakit serve` (a real process, real signals, streams on loopback)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx

from serving import free_port


class ServeProcess:
    def __init__(self, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "gemmakit", "serve", "--port", str(self.port), *flags],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert self.proc.poll() is None and time.time() < deadline, self.proc.stderr.read()
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class Stream(threading.Thread):
    """A streamed completion; keeps every SSE data line."""

    def __init__(self, url: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url, self.max_tokens, self.lines = url, max_tokens, []
        self.start()

    def run(self) -> None:
        body = {"prompt": "Once upon a time", "max_tokens": self.max_tokens, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.lines.append(line)
        except httpx.HTTPError as exc:  # a stream cut without its end
            self.lines.append(f"cut: {exc!r}")

    def events(self) -> list[dict]:
        return [json.loads(line[6:]) for line in self.lines if line.startswith("data: {")]


def _wait_streaming(streams: list[Stream], chunks: int = 3) -> None:
    deadline = time.time() + 60
    while any(len(s.lines) < chunks for s in streams):
        assert time.time() < deadline, "streams did not start"
        time.sleep(0.05)


def test_sigterm_drains_then_ends_streams_and_exits_0() -> None:
    server = ServeProcess("--shutdown-timeout", "3")
    try:
        short, *long = [Stream(server.url, 40), Stream(server.url, 3000), Stream(server.url, 3000)]
        _wait_streaming([short, *long])
        start = time.time()
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        refused = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        assert refused.json()["error"]["code"] == "shutting_down"
        assert httpx.get(server.url + "/health").status_code == 200  # still answering while it drains
        assert server.proc.wait(timeout=30) == 0
        assert time.time() - start < 3 + 5
        for s in (short, *long):
            s.join(timeout=10)
        # the short one finished on its own; the long ones were ended with an error event, then [DONE]
        assert short.lines[-1] == "data: [DONE]" and short.events()[-1]["choices"][0]["finish_reason"] == "length"
        for s in long:
            assert s.lines[-1] == "data: [DONE]", s.lines[-3:]
            assert "error" in s.events()[-1] and "shut down" in s.events()[-1]["error"]["message"]
    finally:
        server.stop()


def test_idle_sigterm_exits_0_quickly() -> None:
    server = ServeProcess()
    try:
        start = time.time()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=20) == 0 and time.time() - start < 5
    finally:
        server.stop()


def test_a_second_signal_exits_at_once() -> None:
    server = ServeProcess("--shutdown-timeout", "60")
    try:
        stream = Stream(server.url, 3000)
        _wait_streaming([stream])
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        start = time.time()
        server.proc.send_signal(signal.SIGINT)
        server.proc.wait(timeout=15)
        assert time.time() - start < 5
    finally:
        server.stop()
