"""The event loop's short scheduler slice (gemmakit.server.latency): asked for the calling thread only, inherited
by the threads it starts, niceness kept, undone by asking for 0; and the server's loop asks for it when it starts
serving."""

from __future__ import annotations

import os
import platform
import sys
import threading

import httpx
import pytest
from serving import Server

from gemmakit.server import create_app
from gemmakit.server.latency import LOOP_SLICE_NS, prefer_short_slice, slices_take_effect, thread_slice_ns

LINUX_SLICES = sys.platform.startswith("linux") and platform.machine() in ("x86_64", "aarch64")


def _in_thread(work):
    result = []
    thread = threading.Thread(target=lambda: result.append(work()))
    thread.start()
    thread.join()
    return result[0]


def test_the_slice_is_the_asking_threads_and_its_children():
    if not LINUX_SLICES:
        assert prefer_short_slice() is False and thread_slice_ns() is None  # elsewhere: nothing is asked
        return
    main_slice = thread_slice_ns()

    def ask():
        os.nice(1)  # a thread's own niceness (Linux: per thread) must survive the request
        taken = prefer_short_slice()
        asked = thread_slice_ns(), os.nice(0), _in_thread(thread_slice_ns)
        return taken, *asked, prefer_short_slice(0), thread_slice_ns()

    taken, own, nice, child, reset, after_reset = _in_thread(ask)
    assert taken is True and nice == os.nice(0) + 1
    assert thread_slice_ns() == main_slice  # the thread that did not ask keeps its slice
    if slices_take_effect():
        assert own == child == LOOP_SLICE_NS
        assert main_slice != LOOP_SLICE_NS
        assert reset is True and after_reset == main_slice  # 0: the default slice again


def test_the_servers_loop_has_the_short_slice_and_its_engine_thread_does_not(llm):
    """The app's lifespan runs on the loop's thread: it asks once the engine's thread is running, so the engine
    keeps the default slice (a short one would only make it yield to its own OpenMP workers)."""
    if not slices_take_effect():
        pytest.skip(f"kernel {platform.release()} on {sys.platform}: no per-thread slices before Linux 6.12")
    default = thread_slice_ns()
    app = create_app(llm)
    with Server(app) as server:
        httpx.get(server.url + "/health").raise_for_status()
        assert thread_slice_ns(server.thread.native_id) == LOOP_SLICE_NS
        assert thread_slice_ns(app.state.engine._thread.native_id) == default != LOOP_SLICE_NS
