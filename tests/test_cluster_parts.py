"""Parts of gemmakit serve --ray that need no running Ray: a replica's lease book (a lease call ends when its
relayed request ends, whichever comes first) and the ingress's cutting of relayed event streams."""

from __future__ import annotations

import asyncio
import threading

import pytest

from gemmakit.cluster.replica import LEASE_HEADER, LeaseBook, tracking_leases


def test_a_lease_whose_request_already_ended_returns_at_once():
    book = LeaseBook()
    book.end("a")
    asyncio.run(asyncio.wait_for(book.wait("a"), 1.0))
    # Remembered once: a second call under the same id waits again.
    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(asyncio.wait_for(book.wait("a"), 0.1))


def test_a_waiting_lease_ends_when_another_thread_ends_its_request():
    book = LeaseBook()

    async def main() -> None:
        waiting = asyncio.create_task(book.wait("b"))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        threading.Thread(target=book.end, args=("b",)).start()  # the HTTP server's thread
        await asyncio.wait_for(waiting, 1.0)

    asyncio.run(main())


def test_the_http_app_ends_the_lease_named_in_the_request_even_when_the_app_fails():
    book = LeaseBook()

    async def failing_app(scope, receive, send) -> None:
        raise RuntimeError("the app broke")

    async def main() -> None:
        app = tracking_leases(failing_app, book)
        with pytest.raises(RuntimeError):
            await app({"type": "http", "headers": [(LEASE_HEADER, b"c")]}, None, None)
        await asyncio.wait_for(book.wait("c"), 1.0)

    asyncio.run(main())


def test_a_relayed_event_stream_is_cut_between_events_only():
    pytest.importorskip("ray.serve", reason="needs the ray extra: pip install 'gemmakit[ray]'")
    from gemmakit.cluster.relay import whole_events

    async def reads():
        for chunk in (b'data: {"a": ', b'1}\n\ndata: {"b": 2}\n\nda', b"ta: [DONE]\n\n"):
            yield chunk

    async def collect(first: list[bytes]) -> list[bytes]:
        return [chunk async for chunk in whole_events(reads(), first)]

    assert asyncio.run(collect([])) == [b'data: {"a": 1}\n\ndata: {"b": 2}\n\n', b"data: [DONE]\n\n"]
    # The first read (taken before the client is answered) goes through the same cutting.
    assert asyncio.run(collect([b": opening\n\n"])) == [b": opening\n\n", b'data: {"a": 1}\n\ndata: {"b": 2}\n\n',
                                                       b"data: [DONE]\n\n"]
