"""Graceful shutdown for ``gemmakit serve``.

On SIGTERM or SIGINT the server keeps listening but admits no new generation (503 with Retry-After), lets the
running requests finish for up to ``shutdown_timeout`` seconds, then ends the ones still running with an error
event and ``[DONE]`` (a plain request gets a 503), closes and exits 0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import uvicorn

from .state import ServerState

logger = logging.getLogger("gemmakit.server")

SIGNALS = (signal.SIGINT, signal.SIGTERM)
DEFAULT_SHUTDOWN_TIMEOUT = 30.0


class SignalServer(uvicorn.Server):
    """A uvicorn server whose signal handling ends in :meth:`handle_exit` and returns: uvicorn re-raises the
    signal after shutting down, which would kill the process before its own cleanup (a clean stop exits 0, not
    -15)."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


class GracefulServer(SignalServer):
    """A uvicorn server that drains the engine before it stops (see the module's docstring)."""

    def __init__(self, config: uvicorn.Config, state: ServerState, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.state, self.shutdown_timeout = state, shutdown_timeout
        self.forced = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if self.state.draining:  # the second signal: no more waiting
            logger.warning("second signal: exiting now")
            self.forced = self.force_exit = self.should_exit = True
            return
        self.state.draining = True
        logger.info("signal %d: admitting no new requests; draining for up to %.0f s", sig, self.shutdown_timeout)
        if self._loop is None:
            self.should_exit = True
            return
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))

    async def _drain(self) -> None:
        engine = self.state.engine
        deadline = time.monotonic() + self.shutdown_timeout
        while (engine.running or engine.waiting) and time.monotonic() < deadline and not self.forced:
            await asyncio.sleep(0.05)
        if engine.running or engine.waiting:
            logger.warning("shutdown timeout: ending %d running and %d waiting requests", engine.running,
                           engine.waiting)
        # Stopping the engine hands every request left an EngineStoppedError: streams end with an error event and
        # [DONE], plain requests with a 503. The join runs off the loop, which must deliver those events.
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)
        await asyncio.sleep(0.2)
        self.should_exit = True
