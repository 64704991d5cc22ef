"""The client: publications and subscriptions that outlive any one connection.

Every publication and subscription lives in the client's registry, not in a connection. The
driver keeps one connection in use: it dials every address of every configured session server at
once and takes the first that answers `Hello`, registers everything there under the same client
id, register ids and client versions, and only then closes the connection it replaces — so a
failover (a silent server, a `GoAway`) never shows subscribers an instance missing. Pushes are
applied to one copy per service (snapshots replace it, deltas on its version apply, a delta that
does not follow asks for a resync), and consumers see the latest copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import errors
from ._conn import Connection
from .cache import FLUSH_EVERY, Cache
from .config import DEFAULT_PATH, ClientConfig
from .errors import ConnectionLost, RosterError, Timeout
from .model import (
    PROTOCOL_VERSION,
    Event,
    Snapshot,
    canonical_service,
    check_id,
    diff,
    variant,
)

log = logging.getLogger("roster_client")

#: Connection states reported to `on_state` callbacks and by `Client.state`.
CONNECTING, CONNECTED, RECONNECTING, CLOSED = "connecting", "connected", "reconnecting", "closed"

#: Registrations sent at once on a new connection, besides the application's `max_in_flight`.
REGISTER_CONCURRENCY = 16
#: How often the connection's liveness is checked.
LIVENESS_CHECK = 0.1
#: Application close codes of docs/PROTOCOL.md §6.
CLOSE_SLOW_CONSUMER = 0x10
CLOSE_UNAUTHENTICATED = 0x13
# This client goes on from another connection: the session keeps its publishers for the grace.
CLOSE_MOVED = 0x20
#: How long a client that moved keeps its old connection while the new session server holds some
#: of its publications on their way to the data tier, in seconds; and the pause between asking
#: again whether they have landed.
HANDOVER_LIMIT = 10.0
HANDOVER_RETRY = 0.2
#: A request that failed for want of a connection is sent on at most this many connections.
MAX_CONNECTION_ATTEMPTS = 3
#: Seconds before the server a client just left is dialed too (see `Client._establish`).
AVOIDED_AFTER = 1.0


@dataclass
class ClientStats:
    """What a client has been through since it was created (as the Rust SDK's `stats()`)."""

    #: Connections established and fully registered, the first included.
    connects: int = 0
    #: Connections that ended without the client closing them.
    lost: int = 0
    #: Connections left because the server sent nothing for `dead_after_ms`.
    silent: int = 0
    #: Connections the server closed because this client did not read its pushes (code 0x10).
    cut_off_slow: int = 0
    #: `GoAway`s received.
    go_aways: int = 0
    snapshots: int = 0
    deltas: int = 0
    #: Bytes of the push stream received.
    push_bytes: int = 0
    #: Deltas that did not follow the version held, each answered by asking for a snapshot.
    resyncs: int = 0
    #: Empty snapshots withheld by `refuse_empty`.
    refused_empty: int = 0

    @property
    def reconnects(self) -> int:
        """Connections after the first: the client moved or reconnected."""
        return max(0, self.connects - 1)


@dataclass
class _Publication:
    service: str
    data: list[bytes]
    attributes: dict[str, str]
    client_version: int
    check: dict[str, Any] | None = None


@dataclass
class _Subscription:
    service: str
    register_id: str
    healthy_only: bool
    # What pushes built (deltas apply to it), and what consumers are shown.
    internal: Snapshot | None = None
    visible: Snapshot | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    handles: int = 0
    listeners: list[Callable[[Snapshot], None]] = field(default_factory=list)
    ended: bool = False

    def show(self, snapshot: Snapshot | None) -> None:
        self.visible = snapshot
        # Wake every waiter, then arm a new event for the next change.
        self.changed.set()
        self.changed = asyncio.Event()


class Publication:
    """A published instance: `update` replaces its data, `unpublish` removes it. `async with`
    unpublishes at the end of the block."""

    def __init__(self, client: Client, register_id: str, service: str, durable: bool) -> None:
        self._client = client
        self.register_id = register_id
        self.service = service
        #: True once the registry stored the last change; False while the client holds it and
        #: registers it as soon as a session server is reachable.
        self.durable = durable

    async def update(
        self, data: Sequence[bytes], attributes: Mapping[str, str] | None = None
    ) -> None:
        """Replaces the instance's data (and attributes, when given), bumping its
        client_version. While no session server is reachable it succeeds as not durable and
        the change is registered on reconnecting."""
        pub = self._client._publications.get(self.register_id)
        if pub is None:
            raise errors.NotFound(f"publication {self.register_id} was unpublished")
        pub.data = [bytes(d) for d in data]
        if attributes is not None:
            pub.attributes = dict(attributes)
        pub.client_version += 1
        self.durable = await self._client._send_publish(self.register_id, pub)

    async def unpublish(self) -> None:
        """Removes the instance; subscribers see it go at once."""
        pub = self._client._publications.pop(self.register_id, None)
        if pub is None:
            return
        try:
            await self._client._call(
                {"Unpublish": {"register_id": self.register_id, "service": pub.service}}
            )
        except errors.NotFound:
            pass

    async def __aenter__(self) -> Publication:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if not self._client._closing:
            await self.unpublish()


class Subscription:
    """The publishers of one service. `async for snapshot in sub` yields the latest snapshot
    whenever it changes (a slow reader skips to the newest, never sees an older one) and ends
    when the subscription or the client is closed."""

    def __init__(self, client: Client, state: _Subscription) -> None:
        self._client = client
        self._state = state
        self._closed = False

    @property
    def service(self) -> str:
        return self._state.service

    @property
    def healthy_only(self) -> bool:
        return self._state.healthy_only

    def current(self) -> Snapshot | None:
        """The latest snapshot received (or loaded from the cache), if any yet."""
        return self._state.visible

    def _over(self) -> bool:
        return self._closed or self._state.ended

    async def wait_for(self, predicate: Callable[[Snapshot], bool], timeout: float) -> Snapshot:
        """Waits until the current snapshot satisfies `predicate`, at most `timeout` seconds
        (`Timeout`); `ConnectionLost` if the client is closed meanwhile."""
        state = self._state

        async def matching() -> Snapshot:
            while True:
                changed = state.changed
                if state.visible is not None and predicate(state.visible):
                    return state.visible
                if self._over():
                    raise ConnectionLost(f"{state.service}: the subscription was closed")
                await changed.wait()

        try:
            return await asyncio.wait_for(matching(), timeout)
        except asyncio.TimeoutError as e:
            raise Timeout(f"{state.service}: no matching snapshot within {timeout} s") from e

    def __aiter__(self) -> AsyncIterator[Snapshot]:
        return self._snapshots()

    async def _snapshots(self) -> AsyncIterator[Snapshot]:
        state = self._state
        last: Snapshot | None = None
        while True:
            changed = state.changed
            current = state.visible
            if current is not None and current is not last:
                last = current
                yield current
                continue
            if self._over():
                return
            await changed.wait()

    async def events(self) -> AsyncIterator[Event]:
        """What changed between consecutive snapshots read: every publisher of the first
        snapshot as "added", then removals, changes and additions. A reader that falls behind
        gets the net change since what it last read."""
        previous: Snapshot | None = None
        async for snapshot in self:
            for event in diff(previous, snapshot):
                yield event
            previous = snapshot

    async def close(self) -> None:
        """Ends this handle; the last handle of a service unsubscribes."""
        if not self._closed:
            self._closed = True
            await self._client._release(self._state)
            self._state.show(self._state.visible)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Liveness:
    """Tells a dead server from a busy process, as the Rust SDK's watchdog: the server is dead
    once no datagram arrived for `dead_after` seconds of ticks that came on time; a tick more
    than three ticks late (this process did not look) restarts the clock."""

    def __init__(self, dead_after: float, tick: float) -> None:
        self.dead_after = dead_after
        self.tick = tick
        self._heard: tuple[int, float] | None = None
        self._last_tick: float | None = None

    def observe(self, now: float, received: int) -> bool:
        """Called every tick with the datagrams received so far: whether the server is dead."""
        late = self._last_tick is not None and now - self._last_tick > 3 * self.tick
        self._last_tick = now
        if self._heard is not None and self._heard[0] == received and not late:
            return now - self._heard[1] >= self.dead_after
        self._heard = (received, now)
        return False


@dataclass
class _Candidate:
    """One address to dial: a configured session address, or one its DNS name resolves to."""

    addr: str
    name: str


class Client:
    """A Roster client. Create one with `await Client.connect(...)`; `async with` closes it."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.client_id = config.client_id or secrets.token_hex(16)
        check_id("client_id", self.client_id)
        self._secret = config.client_secret()
        self._publications: dict[str, _Publication] = {}
        self._subscriptions: dict[str, _Subscription] = {}
        self._next_id = 1
        self._conn: Connection | None = None
        self._conn_changed = asyncio.Event()
        self._state = CONNECTING
        self._callbacks: list[Callable[[str], None]] = []
        self._requests = asyncio.Semaphore(config.max_in_flight)
        self._closing = False
        self._driver: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._cache = Cache(Path(config.cache_dir)) if config.cache_dir is not None else None
        self._dirty: set[str] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._stats = ClientStats()
        self._push_bytes_before = 0

    # ---------------------------------------------------------------- life

    @classmethod
    async def connect(
        cls,
        config_path: str | Path | None = None,
        *,
        sessions: Sequence[str] | None = None,
        ca: str | Path | None = None,
        token: str | None = None,
        **overrides: Any,
    ) -> Client:
        """Connects as `client.toml` says (default `./.roster/client.toml`), or as `sessions`
        and `ca` say; keyword arguments override any config key (`refuse_empty=False`,
        `cache_dir=...`). Returns once a session server answered and everything is registered;
        raises `ConnectionLost` when none did within `connect_timeout_ms`, `Unauthenticated`
        when the cluster refuses the token — unless `cache_dir` is set, when the client starts
        disconnected, serves cached snapshots and keeps trying."""
        if sessions is not None:
            if ca is None:
                raise errors.ConfigError("give `ca` with `sessions`")
            config = ClientConfig(sessions=list(sessions), ca=Path(ca))
        else:
            config = ClientConfig.load(config_path or DEFAULT_PATH)
            if ca is not None:
                config.ca = Path(ca)
        if token is not None:
            config.token = token.strip()
        for key, value in overrides.items():
            if key.startswith("_") or not hasattr(config, key):
                raise errors.ConfigError(f"unknown setting {key!r}")
            setattr(config, key, value)
        config.validate()
        client = cls(config)
        await client._start()
        return client

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _start(self) -> None:
        deadline = self.config.connect_timeout_ms / 1000
        try:
            conn = await asyncio.wait_for(self._establish(avoid=None), deadline)
        except (asyncio.TimeoutError, RosterError) as e:
            if self._cache is None:
                if isinstance(e, RosterError) and not isinstance(e, ConnectionLost):
                    raise
                sessions = ", ".join(self.config.sessions)
                raise ConnectionLost(
                    f"no session server of {sessions} answered within {deadline} s: {e}"
                ) from e
            # With a cache, subscriptions start from it and the client keeps trying.
            log.warning("no session server reachable (%s); serving cached snapshots", e)
            self._set_state(RECONNECTING)
        else:
            self._install(conn)
        self._driver = asyncio.create_task(self._drive())
        if self._cache is not None:
            self._flusher = asyncio.create_task(self._keep_cache())

    async def close(self) -> None:
        """Closes the client: the session removes its publishers at once, subscriptions end."""
        if self._closing:
            return
        self._closing = True
        for task in (self._driver, self._flusher, *self._background):
            if task is not None:
                task.cancel()
        for task in (self._driver, self._flusher, *self._background):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._flush_cache()
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
        self._set_state(CLOSED)
        for state in self._subscriptions.values():
            state.ended = True
            state.show(state.visible)

    @property
    def state(self) -> str:
        """"connecting", "connected", "reconnecting" or "closed"."""
        return self._state

    @property
    def session_addr(self) -> str | None:
        """The address of the session server in use, if connected."""
        conn = self._conn
        return conn.addr if conn is not None and conn.alive else None

    @property
    def session_id(self) -> int | None:
        """The id of the session server in use, if connected."""
        conn = self._conn
        return conn.session_id if conn is not None and conn.alive else None

    @property
    def stats(self) -> ClientStats:
        """What the client has been through so far: connections, moves, pushes."""
        conn = self._conn
        current = conn.push_bytes if conn is not None else 0
        return dataclasses.replace(self._stats, push_bytes=self._push_bytes_before + current)

    @property
    def reconnects(self) -> int:
        return self._stats.reconnects

    @property
    def refused_empty(self) -> int:
        return self._stats.refused_empty

    def on_state(self, callback: Callable[[str], None]) -> None:
        """Calls `callback(state)` on every change of the connection state: "connected",
        "reconnecting", "closed"."""
        self._callbacks.append(callback)

    def _set_state(self, state: str) -> None:
        if state != self._state:
            self._state = state
            for callback in list(self._callbacks):
                try:
                    callback(state)
                except Exception:
                    log.exception("a connection-state callback failed")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---------------------------------------------------------------- API

    async def publish(
        self,
        service: str,
        data: Sequence[bytes],
        attributes: Mapping[str, str] | None = None,
        register_id: str | None = None,
        check: Mapping[str, Any] | None = None,
    ) -> Publication:
        """Publishes an instance of `service` (typically one `host:port`). It lives as long as
        this client: a lost connection moves it to another session server, `close()` removes
        it. `register_id` names it (default: one the client picks); one already published by
        this client is refused (update that publication instead). `check` opts into a health
        check run by the registry (docs/PROTOCOL.md §3). While no session server is reachable
        it succeeds as not durable (`publication.durable`) and is registered on reconnecting."""
        service = canonical_service(service)
        if register_id is None:
            register_id = self._new_register_id("p")
        else:
            check_id("register_id", register_id)
            if register_id in self._publications:
                raise errors.InvalidArgument(
                    f"register id {register_id!r} is already published by this client; "
                    "update that publication instead"
                )
        pub = _Publication(
            service=service,
            data=[bytes(d) for d in data],
            attributes=dict(attributes or {}),
            client_version=1,
            check=dict(check) if check is not None else None,
        )
        self._publications[register_id] = pub
        try:
            durable = await self._send_publish(register_id, pub)
        except RosterError:
            self._publications.pop(register_id, None)
            raise
        return Publication(self, register_id, service, durable)

    async def _send_publish(self, register_id: str, pub: _Publication) -> bool:
        """Sends a publication's current state; whether the registry has it durably."""
        try:
            _, body = await self._call(self._publish_request(register_id, pub))
        except RosterError as e:
            if not e.retryable:
                raise
            log.debug("publication %s will be registered on reconnect: %s", register_id, e)
            return False
        return bool(body.get("durable", False))

    async def subscribe(
        self,
        service: str,
        *,
        healthy_only: bool = False,
        on_snapshot: Callable[[Snapshot], None] | None = None,
    ) -> Subscription:
        """Subscribes to `service`; subscribing twice to one service shares one registration.
        One client holds one kind of subscription per service (`InvalidArgument` otherwise).
        With `healthy_only`, the session shows only healthy publishers (all of them, marked,
        when more than its protection threshold are unhealthy). `on_snapshot`, if given, is
        called with every snapshot shown, none skipped (iterating skips to the latest). While
        not connected it returns at once, from the cached snapshot if `cache_dir` has one."""
        service = canonical_service(service)
        state = self._subscriptions.get(service)
        if state is not None:
            if state.healthy_only != healthy_only:
                raise errors.InvalidArgument(
                    f"this client already subscribes to {service} "
                    f"{'healthy-only' if state.healthy_only else 'to every publisher'}; one "
                    "client holds one kind of subscription per service"
                )
            state.handles += 1
            if on_snapshot is not None:
                state.listeners.append(on_snapshot)
            return Subscription(self, state)
        if self._closing:
            raise ConnectionLost("the client is closed")
        state = _Subscription(service, self._new_register_id("s"), healthy_only, handles=1)
        if on_snapshot is not None:
            state.listeners.append(on_snapshot)
        if self._cache is not None:
            cached = self._cache.load(service, healthy_only)
            if cached is not None:
                state.internal = cached
                state.visible = cached
        self._subscriptions[service] = state
        if self._conn is None or not self._conn.alive:
            # Not connected: the next connection registers it; asking from here too closes the
            # gap where that connection listed what to register just before it existed.
            self._spawn(self._resync(state))
            return Subscription(self, state)
        try:
            await self._call(self._subscribe_request(state))
        except RosterError as e:
            if not e.retryable:
                self._subscriptions.pop(service, None)
                raise
            log.debug("subscription to %s will be registered on reconnect: %s", service, e)
        return Subscription(self, state)

    async def register_persistent(
        self,
        service: str,
        id: str,
        data: Sequence[bytes],
        attributes: Mapping[str, str] | None = None,
        check: Mapping[str, Any] | None = None,
    ) -> None:
        """Registers (or replaces) a persistent instance: stored by the meta group until
        `deregister_persistent`, whatever happens to this client. Returns once a quorum has it
        on disk."""
        service = canonical_service(service)
        fields: dict[str, Any] = {
            "service": service,
            "id": id,
            "data": [bytes(d) for d in data],
            "attributes": dict(attributes or {}),
        }
        if check is not None:
            fields["check"] = dict(check)
        _, body = await self._call({"RegisterPersistent": fields})
        if not body.get("durable", True):
            raise errors.Unavailable(f"{service} {id}: not stored yet; register it again")

    async def deregister_persistent(self, service: str, id: str) -> None:
        """Removes the persistent instance `id` of `service`; `NotFound` if there is none."""
        service = canonical_service(service)
        resent: list[bool] = []
        try:
            await self._call({"DeregisterPersistent": {"service": service, "id": id}}, resent)
        except errors.NotFound:
            # A resend after a lost connection finds it gone: the first try removed it.
            if not resent:
                raise

    async def list_services(self) -> list[dict[str, Any]]:
        """Every service with a publisher: `service`, `publishers`, `version`, and `healthy`
        where a publisher of it is checked."""
        _, body = await self._call({"ListServices": {}})
        return list(body.get("services") or [])

    async def ping(self) -> float:
        """A round trip to the session server, in seconds."""
        start = time.monotonic()
        await self._call({"Ping": {}})
        return time.monotonic() - start

    # ---------------------------------------------------------------- requests

    def _new_register_id(self, kind: str) -> str:
        while True:
            rid = f"{kind}{self._next_id}"
            self._next_id += 1
            taken = rid in self._publications or any(
                s.register_id == rid for s in self._subscriptions.values()
            )
            if not taken:
                return rid

    @staticmethod
    def _publish_request(register_id: str, pub: _Publication) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "register_id": register_id,
            "service": pub.service,
            "data": pub.data,
            "attributes": pub.attributes,
            "client_version": pub.client_version,
        }
        if pub.check is not None:
            fields["check"] = pub.check
        return {"Publish": fields}

    @staticmethod
    def _subscribe_request(state: _Subscription) -> dict[str, Any]:
        fields: dict[str, Any] = {"register_id": state.register_id, "service": state.service}
        if state.healthy_only:
            fields["healthy_only"] = True
        return {"Subscribe": fields}

    async def _call(
        self, request: dict[str, Any], resent: list[bool] | None = None
    ) -> tuple[str, dict[str, Any]]:
        """Sends `request` on the connection in use, as the Rust SDK does: `Unavailable` is
        asked again after a pause (200 ms, doubling to 2 s); a request that found no
        connection, or lost it, is sent again on the next one (at most 3 connections); all
        within `request_timeout_ms`. `resent` gets an entry when a try that may have been
        applied was followed by another."""
        if self._closing:
            raise ConnectionLost("the client is closed")
        timeout = self.config.request_timeout_ms / 1000
        deadline = time.monotonic() + timeout
        try:
            await asyncio.wait_for(self._requests.acquire(), timeout)
        except asyncio.TimeoutError as e:
            raise Timeout(
                f"{self.config.max_in_flight} requests stayed in flight for {timeout} s "
                "(max_in_flight)"
            ) from e
        try:
            attempt = 0
            pause = 0.2
            maybe_applied = False
            while True:
                attempt += 1
                if maybe_applied and resent is not None and not resent:
                    resent.append(True)
                conn = self._conn
                live = conn is not None and conn.alive
                left = deadline - time.monotonic()
                try:
                    if left <= 0:
                        raise Timeout(f"{variant(request)[0]}: no answer within {timeout} s")
                    if conn is None or not live:
                        raise errors.Unavailable("not connected to a session server")
                    return await conn.request(request, left)
                except (errors.Unavailable, errors.ShuttingDown, ConnectionLost) as e:
                    if self._closing:
                        raise ConnectionLost("the client is closed") from e
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise
                    if live and isinstance(e, errors.Unavailable):
                        await asyncio.sleep(min(pause, left))
                        pause = min(pause * 2, 2.0)
                        continue
                    if attempt >= MAX_CONNECTION_ATTEMPTS:
                        raise
                    maybe_applied |= live and isinstance(e, ConnectionLost)
                    if not await self._wait_connection(conn if live else None, left):
                        raise ConnectionLost(
                            f"no session server reachable within {timeout} s ({e})"
                        ) from e
        finally:
            self._requests.release()

    async def _wait_connection(self, failed: Connection | None, left: float) -> bool:
        """Waits up to `left` seconds for a live connection other than `failed`."""
        end = time.monotonic() + max(0.0, left)
        while not self._closing:
            conn = self._conn
            if conn is not None and conn is not failed and conn.alive:
                return True
            if failed is not None and conn is failed:
                self._wake.set()  # tell the driver: the connection looks broken
            rest = end - time.monotonic()
            if rest <= 0:
                return False
            self._conn_changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._conn_changed.wait(), min(rest, 0.1))
        return False

    # ---------------------------------------------------------------- connections

    async def _candidates(self) -> list[_Candidate]:
        """Every address of every configured session server, each once: a DNS name stands for
        each address it resolves to, checked against that name (or `server_name`)."""
        loop = asyncio.get_running_loop()
        out: list[_Candidate] = []
        seen: set[str] = set()
        for configured in self.config.sessions:
            host, _, port = configured.rpartition(":")
            host = host.strip("[]")
            name = self.config.server_name or host
            try:
                infos = await loop.getaddrinfo(host, int(port), type=socket.SOCK_DGRAM)
            except OSError as e:
                log.debug("could not resolve %s: %s", configured, e)
                continue
            for info in infos:
                ip = str(info[4][0])
                addr = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
                if addr not in seen:
                    seen.add(addr)
                    out.append(_Candidate(addr, name))
        return out

    async def _dial(self, candidate: _Candidate) -> Connection:
        """A QUIC connection to `candidate` that said Welcome to this client's Hello."""
        config = self.config
        conn = await Connection.open(
            candidate.addr,
            ca=str(config.ca),
            server_name=candidate.name,
            idle_timeout_s=config.idle_timeout_ms / 1000,
            connect_timeout_s=config.connect_timeout_ms / 1000,
            max_frame=config.max_frame,
        )
        conn.set_push_handler(lambda frame: self._on_push(conn, frame))
        hello: dict[str, Any] = {
            "protocol_version": PROTOCOL_VERSION,
            "client_id": self.client_id,
            "client_secret": self._secret,
            "client_name": config.client_name,
            "capabilities": ["delta"],
        }
        if config.token is not None:
            hello["token"] = config.token
        try:
            name, body = await conn.request({"Hello": hello}, config.request_timeout_ms / 1000)
            if name != "Welcome":
                raise errors.UnexpectedMessage(f"expected Welcome, got {name}")
        except BaseException:
            await conn.close()
            raise
        conn.session_id = int(body.get("session_id", 0))
        conn.deltas = "delta" in (body.get("capabilities") or [])
        conn.max_frame = min(config.max_frame, int(body.get("max_frame", config.max_frame)))
        limit = body.get("max_requests")
        needed = config.max_in_flight + REGISTER_CONCURRENCY + 2
        if isinstance(limit, int) and limit < needed:
            log.warning(
                "session %s allows %d requests in flight, fewer than this client may send; "
                "lower max_in_flight to avoid LimitExceeded",
                conn.session_id,
                limit,
            )
        return conn

    async def _establish(self, avoid: str | None) -> Connection:
        """Dials every session address at once, takes the first that says Welcome, and
        registers everything there. `avoid`, the server just left, is dialed only once every
        other address has failed or `AVOIDED_AFTER` seconds have passed: when both servers of a
        pair die one after the other, the one left first may be the one back first."""
        order = await self._candidates()
        if not order:
            raise ConnectionLost(f"no address for {', '.join(self.config.sessions)}")
        random.shuffle(order)
        only_choice = len(order) == 1
        preferred = [c for c in order if c.addr != avoid or only_choice]
        avoided = [c for c in order if c.addr == avoid and not only_choice]
        last: RosterError | None = None
        loop = asyncio.get_running_loop()
        avoided_at = loop.time() + AVOIDED_AFTER
        tasks = [asyncio.create_task(self._dial(c)) for c in preferred]
        pending = set(tasks)
        conn: Connection | None = None
        try:
            while conn is None:
                if avoided and (not pending or loop.time() >= avoided_at):
                    late = [asyncio.create_task(self._dial(c)) for c in avoided]
                    tasks += late
                    pending |= set(late)
                    avoided = []
                if not pending:
                    break
                wait = max(0.0, avoided_at - loop.time()) if avoided else None
                done, pending = await asyncio.wait(
                    pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    try:
                        conn = task.result()
                        break
                    except RosterError as e:
                        # A refusal of who the client is says more than another's silence.
                        refusal = (errors.Unauthenticated, errors.PermissionDenied)
                        if isinstance(e, refusal) or not isinstance(last, refusal):
                            last = e
                    except Exception as e:  # noqa: BLE001 - any dial failure: try another
                        last = ConnectionLost(str(e))
        finally:
            for task in tasks:
                if not task.done():
                    task.cancel()
            for result in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(result, Connection) and result is not conn:
                    await result.close()
        if conn is None:
            raise last or ConnectionLost("no session server answered")
        try:
            await self._register_all(conn)
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _register_all(self, conn: Connection) -> None:
        """Registers every publication and subscription on `conn` under the same ids and
        client versions. A transport failure fails the whole (another server is tried); a
        refusal of one registration is logged and the rest go on. The publications the server
        answers `durable: false` are left in `conn.held`."""
        timeout = self.config.request_timeout_ms / 1000
        requests: list[tuple[str | None, dict[str, Any]]] = [
            (rid, self._publish_request(rid, p)) for rid, p in list(self._publications.items())
        ]
        requests += [(None, self._subscribe_request(s)) for s in list(self._subscriptions.values())]
        limit = asyncio.Semaphore(REGISTER_CONCURRENCY)
        held: list[str] = []

        async def one(publication: str | None, request: dict[str, Any]) -> None:
            async with limit:
                try:
                    _, body = await conn.request(request, timeout)
                except (ConnectionLost, Timeout):
                    raise
                except RosterError as e:
                    log.warning("the session server refused a registration (%s): %s",
                                variant(request)[0], e)
                    return
                if publication is not None and not body.get("durable", True):
                    held.append(publication)

        await asyncio.gather(*(one(p, r) for p, r in requests))
        conn.held = held

    async def _hand_over(self, old: Connection, new: Connection) -> None:
        """Closes `old` (with CLOSE_MOVED) once every publication `new` held has landed.

        The old session server removes what the connection held when it ends (after the client
        grace, for a client that moved). A publication the new server answered `durable: false`
        is not yet at its slot leader: removed there by the old server first, subscribers would
        see it gone until it lands. So the old connection stays until it has landed: each round
        publishes it again, unchanged, on `new`, which answers once the server's own retry lands
        it. For HANDOVER_LIMIT at most; over as soon as either connection ends or the client
        closes."""
        held = new.held
        new.held = []
        deadline = time.monotonic() + HANDOVER_LIMIT
        timeout = self.config.request_timeout_ms / 1000
        limit = asyncio.Semaphore(REGISTER_CONCURRENCY)
        if held:
            log.info("keeping the old connection until %d publications held by %s have landed",
                     len(held), new.addr)
        while held and not self._closing and old.alive and new.alive:
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("%d publications held by %s have not landed; closing the old "
                            "connection anyway", len(held), new.addr)
                break
            still: list[str] = []

            async def ask(rid: str) -> None:
                pub = self._publications.get(rid)
                if pub is None:  # unpublished since
                    return
                async with limit:
                    try:
                        _, body = await new.request(self._publish_request(rid, pub), timeout)
                    except (Timeout, errors.Unavailable):
                        still.append(rid)
                        return
                    except RosterError:
                        return
                if not body.get("durable", True):
                    still.append(rid)

            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(ask(r) for r in held)), left)
            held = still
            if held:
                await asyncio.sleep(HANDOVER_RETRY)
        if self._closing:  # leaving: its publishers go at once, as from any connection
            await old.close()
        else:
            await old.close("moved to another session server", CLOSE_MOVED)

    def _install(self, conn: Connection) -> None:
        if self._conn is not None:
            self._push_bytes_before += self._conn.push_bytes
        self._conn = conn
        self._stats.connects += 1
        log.info("connected to session %s at %s", conn.session_id, conn.addr)
        self._conn_changed.set()
        self._set_state(CONNECTED)

    def _backoff(self, attempt: int) -> float:
        """The pause before reconnect attempt `attempt`: doubling from the minimum, capped,
        with jitter (between half and all of it)."""
        low = max(1, self.config.reconnect_min_ms)
        high = max(low, self.config.reconnect_max_ms)
        base = min(low * (1 << min(max(attempt - 1, 0), 16)), high)
        return random.uniform(base / 2, base) / 1000

    async def _drive(self) -> None:
        """Keeps a connection in use: the liveness watchdog, GoAway, failover, reconnection."""
        attempt = 0
        avoid: str | None = None
        while not self._closing:
            conn = self._conn
            if conn is not None and not conn.alive:
                self._note_loss(conn)
                log.warning("lost session %s at %s: %s", conn.session_id, conn.addr, conn.reason)
                avoid = conn.addr
                self._push_bytes_before += conn.push_bytes
                self._conn = conn = None
            if conn is None:
                attempt += 1
                self._set_state(RECONNECTING)
                await asyncio.sleep(self._backoff(attempt))
                try:
                    new = await self._establish(avoid)
                except (errors.Unauthenticated, errors.PermissionDenied) as e:
                    log.warning("a session server refused this client (%s); retrying", e)
                    continue
                except Exception as e:
                    log.debug("still no session server: %s", e)
                    continue
                attempt = 0
                self._install(new)
                continue
            try:
                why = await self._watch(conn)
                if self._closing or why == "ended":
                    continue
                moved = await self._move_on(conn, why)
                if not moved and why == "silent":
                    await conn.close("server silent", CLOSE_MOVED)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the driver die: the client would stop reconnecting
                log.exception("the connection driver failed; going on")
                await asyncio.sleep(self._backoff(1))

    def _note_loss(self, conn: Connection) -> None:
        self._stats.lost += 1
        if conn.close_code == CLOSE_SLOW_CONSUMER:
            self._stats.cut_off_slow += 1
        elif conn.close_code == CLOSE_UNAUTHENTICATED:
            log.warning("the session server closed the connection: %s", conn.reason)

    async def _move_on(self, conn: Connection, why: str) -> bool:
        """Connects to another session server (the same one again if no other answers),
        registers everything there, makes it the connection in use, and only then closes `conn`
        (see `_hand_over`)."""
        self._set_state(RECONNECTING)
        try:
            new = await self._establish(avoid=conn.addr)
        except Exception as e:
            log.warning("no other session server answered (%s)", e)
            if conn.alive:
                self._set_state(CONNECTED)
            return False
        # A new connection to the same server is kept too, and the old one let go: registering
        # there gave the new connection every publisher the old one held, so closing the new one
        # instead would remove them while the old one still counts on them.
        self._install(new)
        # Only now is the old connection closed: everything is registered elsewhere (and has
        # landed, see `_hand_over`).
        conn.goaway = None
        self._spawn(self._hand_over(conn, new))
        log.info("moved from %s to %s (%s)", conn.addr, new.addr, why)
        return True

    async def _watch(self, conn: Connection) -> str:
        """Returns why `conn` should be left: "ended", "goaway" or "silent". Pings every
        `keep_alive_ms`; a server from which no datagram at all arrived for `dead_after_ms` is
        silent — unless this process itself was too busy to look (a late tick restarts the
        clock, as in the Rust SDK)."""
        keep_alive = self.config.keep_alive_ms / 1000
        dead_after = self.config.dead_after_ms / 1000
        liveness = Liveness(dead_after, LIVENESS_CHECK)
        last_ping = 0.0
        while True:
            self._wake.clear()
            if not conn.alive:
                return "ended"
            if conn.goaway is not None:
                self._stats.go_aways += 1
                log.info("session %s asks us to move: %s", conn.addr, conn.goaway)
                conn.goaway = None
                return "goaway"
            now = time.monotonic()
            if liveness.observe(now, conn.received):
                self._stats.silent += 1
                log.warning("session %s sent nothing for %.1f s; moving", conn.addr, dead_after)
                return "silent"
            if now - last_ping >= keep_alive:
                conn.ping()
                last_ping = now
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), LIVENESS_CHECK)

    # ---------------------------------------------------------------- pushes

    def _on_push(self, conn: Connection, frame: Any) -> None:
        try:
            kind, body = variant(frame)
        except RosterError as e:
            log.debug("skipped a push of an unknown shape from %s: %s", conn.addr, e)
            return
        if kind == "GoAway":
            conn.goaway = str((body or {}).get("reason", "GoAway"))
            self._wake.set()
            return
        if kind not in ("Snapshot", "Delta") or not isinstance(body, dict):
            # A push this version does not know: newer servers may add kinds.
            return
        state = self._subscriptions.get(str(body.get("service")))
        version = int(body.get("version", 0))
        current = state.internal if state is not None else None
        if kind == "Snapshot":
            self._stats.snapshots += 1
            if state is None or (current is not None and version <= current.version):
                return
            new = Snapshot.from_wire(body)
        else:
            self._stats.deltas += 1
            if state is None or (current is not None and version <= current.version):
                return
            if current is None or int(body.get("base", -1)) != current.version:
                # A gap: ask for the snapshot again, on the connection that pushed it.
                self._stats.resyncs += 1
                log.warning("a delta of %s does not follow the version held; resyncing",
                            state.service)
                self._spawn(self._resync(state, conn))
                return
            new = current.apply_delta(body)
        state.internal = new
        if (
            self.config.refuse_empty
            and not new.publishers
            and state.visible is not None
            and state.visible.publishers
        ):
            self._stats.refused_empty += 1
            log.warning("withheld an empty snapshot of %s at version %d (refuse_empty)",
                        new.service, new.version)
            return
        state.show(new)
        if self._cache is not None:
            self._dirty.add(new.service)
        for listener in list(state.listeners):
            try:
                listener(new)
            except Exception:
                log.exception("an on_snapshot callback failed")

    async def _resync(self, state: _Subscription, conn: Connection | None = None) -> None:
        request = self._subscribe_request(state)
        try:
            if conn is not None:
                await conn.request(request, self.config.request_timeout_ms / 1000)
            else:
                await self._call(request)
        except RosterError as e:
            log.info("resync of %s: %s (the next connection registers it afresh)",
                     state.service, e)

    async def _release(self, state: _Subscription) -> None:
        state.handles -= 1
        if state.handles > 0 or self._subscriptions.get(state.service) is not state:
            return
        del self._subscriptions[state.service]
        state.ended = True
        if self._cache is not None and state.service in self._dirty and state.visible:
            self._dirty.discard(state.service)
            self._cache.store(state.visible, state.healthy_only)
        if not self._closing:
            try:
                await self._call({"Unsubscribe": {"register_id": state.register_id}})
            except RosterError as e:
                log.info("unsubscribe %s: %s", state.service, e)

    # ---------------------------------------------------------------- cache

    def _flush_cache(self) -> None:
        if self._cache is None:
            return
        dirty, self._dirty = self._dirty, set()
        for service in dirty:
            state = self._subscriptions.get(service)
            if state is not None and state.visible is not None:
                self._cache.store(state.visible, state.healthy_only)

    async def _keep_cache(self) -> None:
        """Writes the snapshots that changed every `FLUSH_EVERY` (a write costs the size of the
        service, so not on every push)."""
        while not self._closing:
            await asyncio.sleep(FLUSH_EVERY)
            if self._dirty:
                self._flush_cache()
