"""HTTP limits at the parser, against a real `llmos serve`: head deadline, head size cap, per-client connection cap.

The server runs with a 2 s head deadline; slow connections come from other loopback addresses (127.0.0.x) so the
per-client cap (100) is exercised too while the test client on 127.0.0.1 keeps being answered.
"""

from __future__ import annotations

import asyncio
import os
import resource
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmos.api.http_server import ConnectionCounter, HttpLimits, fit_descriptor_limit, protocol_class
from tests.helpers import ServerProcess, free_port

HEAD_SECONDS = 2.0
PER_CLIENT = 100
SLOW_ADDRESSES = [f"127.0.0.{i}" for i in range(2, 12)]  # 10 addresses x 100 connections


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    home = tmp_path_factory.mktemp("http-limits") / "home"
    process = ServerProcess(
        home,
        env={
            "LLMOS_REQUEST_HEAD_SECONDS": str(HEAD_SECONDS),
            "LLMOS_MAX_CONNECTIONS": "1100",
            "LLMOS_MAX_CONNECTIONS_PER_CLIENT": str(PER_CLIENT),
        },
    )
    yield process
    process.stop()


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _settle_fds(pid: int, at_most: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    count = _open_fds(pid)
    while count > at_most and time.monotonic() < deadline:
        time.sleep(0.1)
        count = _open_fds(pid)
    return count


async def _trickle(port: int, source: str) -> tuple[float, bytes]:
    """Send a never-ending request head one byte a second; the seconds until the server ended it, and its reply."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    opened = time.monotonic()
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 60
    reply = b""
    try:
        for byte in head:
            if time.monotonic() - opened > HEAD_SECONDS + 4:
                break  # never ended: the assertions report it
            writer.write(bytes([byte]))
            try:
                reply = await asyncio.wait_for(reader.read(4096), 1.0)
            except TimeoutError:
                continue
            break  # the server answered or closed (b"")
    except ConnectionError:
        pass  # reset by the server after it closed
    finally:
        writer.close()
    return time.monotonic() - opened, reply


async def _normal_client(base: str, stop: asyncio.Event) -> list[tuple[int, float]]:
    results: list[tuple[int, float]] = []
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        while not stop.is_set():
            started = time.monotonic()
            response = await client.get("/v1/models")
            results.append((response.status_code, time.monotonic() - started))
            await asyncio.sleep(0.1)
    return results


def test_a_thousand_trickling_heads_are_cut_at_the_deadline_while_others_are_served(server: ServerProcess) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1500:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    pid = server.process.pid
    baseline = _open_fds(pid)

    async def scenario() -> tuple[list[tuple[float, bytes]], list[tuple[int, float]], int]:
        stop = asyncio.Event()
        normal = asyncio.create_task(_normal_client(server.base, stop))
        slow = [asyncio.create_task(_trickle(server.port, SLOW_ADDRESSES[i % 10])) for i in range(1000)]
        await asyncio.sleep(1.0)
        peak = _open_fds(pid)  # all 1,000 are held now, well before the deadline
        outcomes = await asyncio.gather(*slow)
        stop.set()
        return outcomes, await normal, peak

    started = time.monotonic()
    outcomes, normal, peak = asyncio.run(scenario())
    elapsed = time.monotonic() - started

    assert peak >= baseline + 900, (baseline, peak)  # the connections really were open on the server
    held = sorted(seconds for seconds, _ in outcomes)
    assert held[-1] < HEAD_SECONDS + 2.5, held[-10:]  # every one ended by the deadline (plus scheduling slack)
    # ... and not before it. The server's clock starts at accept, the client's only once its connect has returned,
    # which 1,000 connects at once on a loaded machine delay by up to about a second.
    assert held[0] >= HEAD_SECONDS - 1.0, held[:10]
    replies = [reply for _, reply in outcomes]
    assert sum(reply.startswith(b"HTTP/1.1 408") for reply in replies) >= 990, {r[:40] for r in replies}
    assert elapsed < 12
    assert normal and all(status == 200 for status, _ in normal), normal
    assert len(normal) >= 10 and max(seconds for _, seconds in normal) < 2.0, normal
    assert _settle_fds(pid, baseline + 5) <= baseline + 5  # every descriptor is back


def test_a_64_mb_header_gets_431_without_being_buffered(server: ServerProcess) -> None:
    before = server.rss_bytes()
    chunk = b"a" * (1024 * 1024)
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: ")
        try:
            while sent < 64 * len(chunk):
                if select.select([sock], [], [], 0)[0]:
                    break  # the server answered (or closed): stop sending
                sock.sendall(chunk)
                sent += len(chunk)
        except ConnectionError:
            pass
        try:
            reply = sock.recv(4096)
        except ConnectionResetError:  # pragma: no cover - the 431 normally arrives before the reset
            reply = b""
    growth = server.rss_bytes() - before
    assert reply.startswith(b"HTTP/1.1 431"), reply[:80]
    assert sent < 32 * len(chunk), sent  # refused long before the 64 MB were sent
    assert growth < 4 * 1024 * 1024, growth
    assert httpx.get(f"{server.base}/health", timeout=10).status_code == 200


def _request(sock: socket.socket) -> bytes:
    """GET /health on ``sock``; the whole response (head and content-length body), or what came before EOF."""
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = b""
    while True:
        head, _, body = reply.partition(b"\r\n\r\n")
        if _:
            length = [int(line.split(b":")[1]) for line in head.lower().split(b"\r\n") if b"content-length" in line]
            if length and len(body) >= length[0]:
                return reply
        piece = sock.recv(4096)
        if not piece:
            return reply
        reply += piece


def test_connections_beyond_the_per_client_cap_are_refused_while_others_work(server: ServerProcess) -> None:
    address = "127.0.0.20"
    held = [socket.create_connection(("127.0.0.1", server.port), timeout=10, source_address=(address, 0))]
    try:
        held += [
            socket.create_connection(("127.0.0.1", server.port), timeout=10, source_address=(address, 0))
            for _ in range(PER_CLIENT - 1)
        ]
        assert all(_request(sock).startswith(b"HTTP/1.1 200") for sock in held)  # all 100 admitted, kept alive
        extra = [
            socket.create_connection(("127.0.0.1", server.port), timeout=10, source_address=(address, 0))
            for _ in range(20)
        ]
        refused = [_request(sock) for sock in extra]  # each sent its request: a clean 503, not a reset
        assert all(reply.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in reply for reply in refused), refused
        assert all(sock.recv(4096) == b"" for sock in extra)  # ... and closed
        for sock in extra:
            sock.close()
        assert _request(held[0]).startswith(b"HTTP/1.1 200")  # the admitted ones still work
        other = httpx.get(f"{server.base}/v1/models", timeout=10)  # and so does everyone else
        assert other.status_code == 200
        held.pop().close()
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10, source_address=(address, 0)) as again:
            assert _request(again).startswith(b"HTTP/1.1 200")  # a freed slot is reusable
    finally:
        for sock in held:
            sock.close()


async def _in_process_server(app: Any, limits: HttpLimits) -> tuple[Any, asyncio.Task[None], int]:
    import uvicorn

    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, http=protocol_class(limits), ws="none", lifespan="off", log_config=None
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    return server, task, port


async def _read_response(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    return head + await reader.readexactly(length)


def test_deadlines_time_the_client_never_the_server() -> None:
    """A response slower than the head deadline keeps its kept-alive connection; a trickled body gets 408."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/slow":
            await asyncio.sleep(0.6)  # the server is slow: longer than the head deadline
        body = b"ok"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": body})

    limits = HttpLimits(
        head_seconds=0.3, body_seconds=0.5, max_head_bytes=4096, max_connections=10, max_connections_per_client=10
    )

    async def scenario() -> None:
        server, task, port = await _in_process_server(app, limits)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(2):  # twice on one connection: the head timer must not run while the app works
                writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
                assert (await _read_response(reader)).startswith(b"HTTP/1.1 200")
            writer.write(b"GET /fast HTTP/1.1\r\nHost: x\r\n")  # ... but it times an incomplete head
            assert (await asyncio.wait_for(reader.read(4096), 2)).startswith(b"HTTP/1.1 408")
            writer.close()

            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            started = time.monotonic()
            writer.write(b"POST /fast HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab")
            assert (await _read_response(reader)).startswith(b"HTTP/1.1 200")  # the app answers without the body
            closed_after = None
            for _ in range(20):  # a body trickled to a handler that never reads it is still cut at the deadline
                try:
                    writer.write(b"c")
                    data = await asyncio.wait_for(reader.read(4096), 0.1)
                except TimeoutError:
                    continue
                except ConnectionError:
                    data = b""
                assert data == b""  # closed, with no second response after the app's
                closed_after = time.monotonic() - started
                break
            assert closed_after is not None and closed_after < 1.5, closed_after
            writer.close()
        finally:
            server.should_exit = True
            await task

    asyncio.run(scenario())


def test_connection_counter_and_descriptor_fit() -> None:
    limits = HttpLimits(
        head_seconds=1, body_seconds=1, max_head_bytes=1024, max_connections=3, max_connections_per_client=2
    )
    counter = ConnectionCounter(limits)
    assert counter.admit("a") and counter.admit("a")
    assert not counter.admit("a")  # per client
    assert counter.admit("b")
    assert not counter.admit("c")  # in total
    counter.release("a")
    assert counter.admit("c")
    assert counter.refused == 2
    for client in ("a", "b", "c"):
        counter.release(client)
    assert counter.total == 0 and counter.by_client == {}

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
        wanted = 10**9 if hard == resource.RLIM_INFINITY else hard * 2
        fitted = fit_descriptor_limit(wanted)  # raises the soft limit as far as it may, then fits below it
        now, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        assert fitted < wanted and fitted <= now - 256
        assert fit_descriptor_limit(100) == 100
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_settings_have_safe_defaults() -> None:
    from llmos.config import Settings

    settings = Settings(home=Path("/nonexistent"))
    assert settings.request_head_seconds <= 30
    assert settings.max_header_bytes <= 64 * 1024
    assert 16 < settings.max_connections_per_client <= settings.max_connections
