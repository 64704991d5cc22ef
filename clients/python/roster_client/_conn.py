"""One QUIC connection to a session server (docs/PROTOCOL.md §1–§4): a request per
bidirectional stream, pushes on the one unidirectional stream the server opens, keep-alive pings,
and when anything was last heard from the server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Callable

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import (
    ConnectionTerminated,
    QuicEvent,
    StreamDataReceived,
    StreamReset,
)

from .errors import ConnectionLost, RosterError, Timeout
from .model import ALPN, FrameReader, encode_frame, reply_body


class _Protocol(QuicConnectionProtocol):
    """Routes a connection's stream events: replies to their request, push frames to `on_push`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.requests: dict[int, tuple[bytearray, asyncio.Future[bytes]]] = {}
        self.push_reader: FrameReader | None = None
        self.on_push: Callable[[Any], None] = lambda _: None
        self.last_heard = time.monotonic()
        # UDP datagrams received from the server: anything at all proves it alive.
        self.received = 0
        self.push_bytes = 0
        self.terminated = asyncio.Event()
        self.reason = ""
        # The application close code, when the server closed the connection with one.
        self.close_code: int | None = None

    async def wait_connected(self) -> None:
        # As aioquic's, except that a handshake given up on (our connect timeout) leaves no
        # "exception never retrieved" behind when the connection later fails.
        if self._connected_waiter is not None:
            raise RuntimeError("Already awaiting connected")
        if not self._connected:
            waiter: asyncio.Future[None] = self._loop.create_future()
            waiter.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._connected_waiter = waiter
            await asyncio.shield(waiter)

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        self.received += 1
        self.last_heard = time.monotonic()
        super().datagram_received(data, addr)

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived):
            sid = event.stream_id
            pending = self.requests.get(sid)
            if pending is not None:
                pending[0].extend(event.data)
                if event.end_stream:
                    del self.requests[sid]
                    if not pending[1].done():
                        pending[1].set_result(bytes(pending[0]))
            elif sid % 4 == 3 and self.push_reader is not None:
                # The server's unidirectional push stream.
                self.push_bytes += len(event.data)
                try:
                    frames = self.push_reader.feed(event.data)
                except RosterError as e:
                    # A push stream that cannot be read makes the connection useless: leave it.
                    self.push_reader = None
                    self.reason = f"bad push stream: {e}"
                    self.close(error_code=0, reason_phrase="bad push stream")
                    return
                for frame in frames:
                    self.on_push(frame)
        elif isinstance(event, StreamReset):
            # (A STOP_SENDING after our request was sent in full asks nothing of us: the
            # reply still comes.)
            pending = self.requests.pop(event.stream_id, None)
            if pending is not None and not pending[1].done():
                pending[1].set_exception(
                    ConnectionLost(f"the server reset the request stream ({event.error_code})")
                )
        elif isinstance(event, ConnectionTerminated):
            if event.frame_type is None:
                self.close_code = event.error_code
            self.reason = self.reason or event.reason_phrase or f"closed with code {event.error_code}"
            self._fail_all(ConnectionLost(f"connection closed: {self.reason}"))
            self.terminated.set()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._fail_all(ConnectionLost("connection lost"))
        self.terminated.set()

    def _fail_all(self, error: Exception) -> None:
        for _, fut in self.requests.values():
            if not fut.done():
                fut.set_exception(error)
        self.requests.clear()


class Connection:
    """A connection to the session server at `addr`, said `Hello` to."""

    def __init__(self, addr: str, protocol: _Protocol, stack: contextlib.AsyncExitStack) -> None:
        self.addr = addr
        self._protocol = protocol
        self._stack = stack
        self.session_id = 0
        self.deltas = False
        self.max_frame = 1 << 20
        # The reason of a GoAway the server sent, if it did.
        self.goaway: str | None = None
        # Publications this server answered `durable: false` when they were registered on
        # connecting: held by it on their way to the data tier.
        self.held: list[str] = []
        self._pings = 0
        self._closing = False

    @staticmethod
    async def open(
        addr: str,
        *,
        ca: str,
        server_name: str | None,
        idle_timeout_s: float,
        connect_timeout_s: float,
        max_frame: int,
    ) -> Connection:
        """Dials `addr` (`IP:PORT`, `[IPv6]:PORT`, or `HOST:PORT`), checking the server's
        certificate against `ca` for `server_name` (default: the host)."""
        host, _, port = addr.rpartition(":")
        host = host.strip("[]")
        config = QuicConfiguration(
            is_client=True,
            alpn_protocols=[ALPN],
            idle_timeout=idle_timeout_s,
            server_name=server_name or host,
        )
        config.load_verify_locations(cafile=ca)
        stack = contextlib.AsyncExitStack()
        try:
            protocol = await asyncio.wait_for(
                stack.enter_async_context(
                    connect(host, int(port), configuration=config, create_protocol=_Protocol)
                ),
                connect_timeout_s,
            )
        except asyncio.TimeoutError as e:
            await stack.aclose()
            raise ConnectionLost(f"{addr}: no QUIC handshake within {connect_timeout_s} s") from e
        except Exception as e:
            await stack.aclose()
            raise ConnectionLost(f"{addr}: {e!r}") from e
        except BaseException:
            await stack.aclose()
            raise
        assert isinstance(protocol, _Protocol)
        protocol.push_reader = FrameReader(max_frame)
        return Connection(addr, protocol, stack)

    @property
    def alive(self) -> bool:
        return not self._protocol.terminated.is_set()

    @property
    def reason(self) -> str:
        return self._protocol.reason

    @property
    def last_heard(self) -> float:
        return self._protocol.last_heard

    def set_push_handler(self, handler: Callable[[Any], None]) -> None:
        self._protocol.on_push = handler

    async def wait_terminated(self) -> None:
        await self._protocol.terminated.wait()

    async def request(self, message: Any, timeout_s: float) -> tuple[str, dict[str, Any]]:
        """Sends one request on a new stream; returns the reply's (name, fields) or raises its
        error."""
        if not self.alive:
            raise ConnectionLost(f"connection to {self.addr} is closed")
        frame = encode_frame(message, self.max_frame)
        protocol = self._protocol
        quic = protocol._quic
        sid = quic.get_next_available_stream_id()
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        protocol.requests[sid] = (bytearray(), fut)
        quic.send_stream_data(sid, frame, end_stream=True)
        protocol.transmit()
        try:
            raw = await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError as e:
            protocol.requests.pop(sid, None)
            raise Timeout(f"no answer from {self.addr} within {timeout_s} s") from e
        frames = FrameReader(self.max_frame).feed(raw)
        if len(frames) != 1:
            raise ConnectionLost(f"{self.addr} answered {len(frames)} frames to one request")
        return reply_body(frames[0])

    @property
    def received(self) -> int:
        """UDP datagrams received from the server so far."""
        return self._protocol.received

    @property
    def close_code(self) -> int | None:
        return self._protocol.close_code

    @property
    def push_bytes(self) -> int:
        return self._protocol.push_bytes

    def ping(self) -> None:
        """Sends a QUIC PING (a keep-alive; its acknowledgement counts as heard)."""
        if self.alive:
            self._pings += 1
            self._protocol._quic.send_ping(self._pings)
            self._protocol.transmit()

    def begin_close(self, reason: str = "client closed", code: int = 0) -> None:
        """Sends the close now (code 0: the client leaves, its publishers go at once;
        CLOSE_MOVED: it goes on from another connection, they stay for the client grace);
        `close()` then waits for the connection to end."""
        if self.alive and not self._closing:
            self._closing = True
            self._protocol.close(error_code=code, reason_phrase=reason)

    async def close(self, reason: str = "client closed", code: int = 0) -> None:
        self.begin_close(reason, code)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._stack.aclose(), 2.0)
