"""The client: publications and subscriptions that outlive any one connection.

Every publication and subscription lives in the client's registry, not in a connection. The
driver keeps one connection in use: it dials every configured session server at once and takes
the first that answers `Hello`, registers everything there under the same client id, register ids
and client versions, and only then closes the connection it replaces — so a failover (a lost
connection, a silent server, a `GoAway`) never shows subscribers an instance missing. Pushes are
applied to one copy per service (snapshots replace it, deltas on its version apply, a delta that
does not follow asks for a resync), and consumers see the latest copy.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import errors
from ._conn import Connection
from .config import DEFAULT_PATH, ClientConfig
from .errors import ConnectionLost, RosterError, Timeout
from .model import PROTOCOL_VERSION, Event, Publisher, Snapshot, canonical_service, diff, variant

log = logging.getLogger("roster_client")

#: Connection states reported to `on_state` callbacks.
CONNECTING, CONNECTED, RECONNECTING, CLOSED = "connecting", "connected", "reconnecting", "closed"


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
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    handles: int = 0
    listeners: list[Callable[[Snapshot], None]] = field(default_factory=list)


class Publication:
    """A published instance; `update` replaces its data, `unpublish` removes it."""

    def __init__(self, client: Client, register_id: str) -> None:
        self._client = client
        self.register_id = register_id

    @property
    def service(self) -> str:
        return self._client._publications[self.register_id].service

    async def update(
        self, data: Sequence[bytes], attributes: Mapping[str, str] | None = None
    ) -> None:
        """Replaces the instance's data (and attributes, when given)."""
        pub = self._client._publications.get(self.register_id)
        if pub is None:
            raise errors.NotFound(f"publication {self.register_id} was unpublished")
        pub.data = [bytes(d) for d in data]
        if attributes is not None:
            pub.attributes = dict(attributes)
        pub.client_version += 1
        await self._client._call(self._client._publish_request(self.register_id, pub))

    async def unpublish(self) -> None:
        """Removes the instance; subscribers see it go at once."""
        pub = self._client._publications.pop(self.register_id, None)
        if pub is None:
            return
        await self._client._call(
            {"Unpublish": {"register_id": self.register_id, "service": pub.service}}
        )


class Subscription:
    """The publishers of one service. `async for snapshot in sub` yields the latest snapshot
    whenever it changes (a slow reader skips to the newest, never sees an older one)."""

    def __init__(self, client: Client, state: _Subscription) -> None:
        self._client = client
        self._state = state
        self._closed = False

    @property
    def service(self) -> str:
        return self._state.service

    def current(self) -> Snapshot | None:
        """The latest snapshot received (or loaded from the cache), if any yet."""
        return self._state.visible

    async def wait_for(
        self, predicate: Callable[[Snapshot], bool], timeout: float
    ) -> Snapshot:
        """Waits until the current snapshot satisfies `predicate`, at most `timeout` seconds."""
        state = self._state

        async def matching() -> Snapshot:
            async with state.changed:
                while True:
                    if state.visible is not None and predicate(state.visible):
                        return state.visible
                    await state.changed.wait()

        try:
            return await asyncio.wait_for(matching(), timeout)
        except asyncio.TimeoutError as e:
            raise Timeout(f"{state.service}: no matching snapshot within {timeout} s") from e

    def __aiter__(self) -> AsyncIterator[Snapshot]:
        return self._snapshots()

    async def _snapshots(self) -> AsyncIterator[Snapshot]:
        state = self._state
        last: Snapshot | None = None
        while not self._closed:
            async with state.changed:
                while state.visible is None or state.visible is last:
                    await state.changed.wait()
                    if self._closed:
                        return
                last = state.visible
            yield last

    async def events(self) -> AsyncIterator[Event]:
        """What changed between consecutive snapshots: every publisher of the first snapshot as
        added, then added, removed and changed publishers."""
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


class Client:
    """A Roster client. Create one with `await Client.connect(...)`; `async with` closes it."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.client_id = config.client_id or secrets.token_hex(16)
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
        self._move = asyncio.Event()
        self.reconnects = 0
        self.refused_empty = 0

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
        and `ca` say; keyword arguments override any config key. Returns once a session server
        answered, or raises `ConnectionLost` when none did within `connect_timeout_ms`."""
        if sessions is not None:
            if ca is None:
                raise errors.ConfigError("give `ca` with `sessions`")
            config = ClientConfig(sessions=list(sessions), ca=Path(ca))
        else:
            config = ClientConfig.load(config_path or DEFAULT_PATH)
            if ca is not None:
                config.ca = Path(ca)
        if token is not None:
            config.token = token
        for key, value in overrides.items():
            if not hasattr(config, key) or key.startswith("_"):
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
        except (asyncio.TimeoutError, ConnectionLost) as e:
            why = f"no session server of {', '.join(self.config.sessions)} answered within {deadline} s"
            if self.config.cache_dir is None:
                raise ConnectionLost(why) from e
            # With a cache, subscriptions start from it and the client keeps trying.
            log.warning("%s; serving cached snapshots and reconnecting", why)
            self._set_state(RECONNECTING)
        else:
            self._install(conn)
        self._driver = asyncio.create_task(self._drive())

    async def close(self) -> None:
        """Closes the connection: the session removes this client's publishers at once."""
        if self._closing:
            return
        self._closing = True
        if self._driver is not None:
            self._driver.cancel()
            try:
                await self._driver
            except (asyncio.CancelledError, Exception):
                pass
        if self._conn is not None:
            await self._conn.close()
        self._set_state(CLOSED)
        for state in self._subscriptions.values():
            async with state.changed:
                state.changed.notify_all()

    @property
    def state(self) -> str:
        return self._state

    @property
    def session_addr(self) -> str | None:
        return self._conn.addr if self._conn is not None else None

    def on_state(self, callback: Callable[[str], None]) -> None:
        """Calls `callback(state)` on every change of the connection state: "connecting",
        "connected", "reconnecting", "closed"."""
        self._callbacks.append(callback)

    def _set_state(self, state: str) -> None:
        if state != self._state:
            self._state = state
            for callback in list(self._callbacks):
                try:
                    callback(state)
                except Exception:
                    log.exception("a connection-state callback failed")

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
        it. `check` opts into a health check run by the registry (docs/PROTOCOL.md §3)."""
        service = canonical_service(service)
        if register_id is None:
            register_id = self._new_register_id("p")
        elif register_id in self._publications:
            pass  # publishing an id again replaces it
        pub = _Publication(
            service=service,
            data=[bytes(d) for d in data],
            attributes=dict(attributes or {}),
            client_version=self._publications[register_id].client_version + 1
            if register_id in self._publications
            else 1,
            check=dict(check) if check is not None else None,
        )
        self._publications[register_id] = pub
        try:
            await self._call(self._publish_request(register_id, pub))
        except RosterError as e:
            if not e.retryable:
                self._publications.pop(register_id, None)
            raise
        return Publication(self, register_id)

    async def subscribe(
        self,
        service: str,
        *,
        healthy_only: bool = False,
        on_snapshot: Callable[[Snapshot], None] | None = None,
    ) -> Subscription:
        """Subscribes to `service`. One client holds one kind of subscription per service.
        With `healthy_only`, the session shows only healthy publishers (all of them, marked,
        when more than its protection threshold are unhealthy). `on_snapshot`, if given, is
        called with every snapshot as it arrives, none skipped (iterating skips to the latest)."""
        service = canonical_service(service)
        state = self._subscriptions.get(service)
        if state is not None:
            if state.healthy_only != healthy_only:
                raise errors.InvalidArgument(
                    f"this client already subscribes to {service} "
                    f"{'healthy-only' if state.healthy_only else 'to every publisher'}"
                )
            state.handles += 1
            if on_snapshot is not None:
                state.listeners.append(on_snapshot)
            return Subscription(self, state)
        state = _Subscription(service, self._new_register_id("s"), healthy_only, handles=1)
        if on_snapshot is not None:
            state.listeners.append(on_snapshot)
        cached = self._cache_load(service)
        if cached is not None:
            state.visible = cached
        self._subscriptions[service] = state
        if self._conn is None or not self._conn.alive:
            # Not connected: the next connection registers it; asking from here too closes the
            # gap where that connection listed what to register just before it existed.
            asyncio.ensure_future(self._resync(state))
            return Subscription(self, state)
        try:
            await self._call(self._subscribe_request(state))
        except RosterError as e:
            if not e.retryable:
                self._subscriptions.pop(service, None)
            raise
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
        `deregister_persistent`, whatever happens to this client."""
        service = canonical_service(service)
        fields: dict[str, Any] = {
            "service": service,
            "id": id,
            "data": [bytes(d) for d in data],
            "attributes": dict(attributes or {}),
        }
        if check is not None:
            fields["check"] = dict(check)
        await self._call({"RegisterPersistent": fields})

    async def deregister_persistent(self, service: str, id: str) -> None:
        """Removes the persistent instance `id` of `service`."""
        service = canonical_service(service)
        await self._call({"DeregisterPersistent": {"service": service, "id": id}})

    async def list_services(self) -> list[dict[str, Any]]:
        """Every service with a publisher: `service`, `publishers`, `version`, `healthy`."""
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
        return {
            "Subscribe": {
                "register_id": state.register_id,
                "service": state.service,
                "healthy_only": state.healthy_only,
            }
        }

    async def _call(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Sends `request` on the connection in use; if there is none or it breaks, waits for
        the next one (within `request_timeout_ms`) and sends it there. `Unavailable` answers are
        asked again after a pause."""
        if self._closing:
            raise ConnectionLost("the client is closed")
        timeout = self.config.request_timeout_ms / 1000
        deadline = time.monotonic() + timeout
        pause = 0.2
        async with self._requests:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Timeout(f"{variant(request)[0]}: no answer within {timeout} s")
                conn = self._conn
                if conn is None or not conn.alive:
                    await self._wait_connection(conn, left)
                    continue
                try:
                    return await conn.request(request, left)
                except ConnectionLost:
                    await self._wait_connection(conn, deadline - time.monotonic())
                except (errors.Unavailable, errors.ShuttingDown):
                    await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
                    pause = min(pause * 2, 2.0)

    async def _wait_connection(self, failed: Connection | None, left: float) -> None:
        """Waits up to `left` for a live connection other than `failed`."""
        end = time.monotonic() + max(0.0, left)
        while not self._closing:
            conn = self._conn
            if conn is not None and conn is not failed and conn.alive:
                return
            self._move.set()
            rest = end - time.monotonic()
            if rest <= 0:
                raise ConnectionLost("no session server reachable")
            self._conn_changed.clear()
            try:
                await asyncio.wait_for(self._conn_changed.wait(), min(rest, 0.1))
            except asyncio.TimeoutError:
                pass
        raise ConnectionLost("the client is closed")

    # ---------------------------------------------------------------- connections

    async def _dial(self, addr: str) -> Connection:
        config = self.config
        conn = await Connection.open(
            addr,
            ca=str(config.ca),
            server_name=config.server_name,
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
        except BaseException:
            await conn.close()
            raise
        if name != "Welcome":
            await conn.close()
            raise errors.UnexpectedMessage(f"expected Welcome, got {name}")
        conn.session_id = int(body.get("session_id", 0))
        conn.deltas = "delta" in (body.get("capabilities") or [])
        conn.max_frame = min(config.max_frame, int(body.get("max_frame", config.max_frame)))
        return conn

    async def _establish(self, avoid: str | None) -> Connection:
        """Dials every session server at once (those other than `avoid` first, in random order),
        takes the first that says Welcome, and registers everything there."""
        addrs = list(self.config.sessions)
        random.shuffle(addrs)
        others = [a for a in addrs if a != avoid] or addrs
        tasks = [asyncio.create_task(self._dial(a)) for a in others]
        conn: Connection | None = None
        failures: list[str] = []
        try:
            for next_done in asyncio.as_completed(tasks):
                try:
                    conn = await next_done
                    break
                except errors.Unauthenticated:
                    raise
                except errors.PermissionDenied:
                    raise
                except RosterError as e:
                    failures.append(str(e))
        finally:
            for task in tasks:
                if not task.done():
                    task.cancel()
            for task in tasks:
                if task.done() and not task.cancelled() and task.exception() is None:
                    other = task.result()
                    if other is not conn:
                        await other.close()
        if conn is None:
            raise ConnectionLost("; ".join(failures) or "no session server answered")
        await self._register_all(conn)
        return conn

    async def _register_all(self, conn: Connection) -> None:
        """Registers every publication and subscription on `conn`, under the same ids."""
        timeout = self.config.request_timeout_ms / 1000
        requests = [self._publish_request(rid, p) for rid, p in list(self._publications.items())]
        requests += [self._subscribe_request(s) for s in list(self._subscriptions.values())]
        limit = asyncio.Semaphore(16)

        async def one(request: dict[str, Any]) -> None:
            async with limit:
                try:
                    await conn.request(request, timeout)
                except (errors.PermissionDenied, errors.InvalidArgument, errors.LimitExceeded) as e:
                    log.warning("could not register %s again: %s", variant(request)[0], e)

        await asyncio.gather(*(one(r) for r in requests))

    def _install(self, conn: Connection) -> None:
        self._conn = conn
        self._conn_changed.set()
        self._set_state(CONNECTED)

    async def _drive(self) -> None:
        """Keeps a connection in use: keep-alives, the liveness watchdog, failover."""
        backoff = self.config.reconnect_min_ms / 1000
        while not self._closing:
            conn = self._conn
            if conn is not None:
                why = await self._watch(conn)
                if self._closing:
                    return
                log.info("leaving session %s: %s", conn.addr, why)
            self._set_state(RECONNECTING)
            while not self._closing:
                try:
                    new = await self._establish(avoid=conn.addr if conn is not None else None)
                except Exception as e:
                    log.info("reconnecting: %s", e)
                    await asyncio.sleep(backoff * (0.5 + random.random()))
                    backoff = min(backoff * 2, self.config.reconnect_max_ms / 1000)
                    continue
                backoff = self.config.reconnect_min_ms / 1000
                self.reconnects += 1
                self._install(new)
                # Only now is the old connection closed: everything is registered elsewhere.
                if conn is not None:
                    await conn.close()
                break

    async def _watch(self, conn: Connection) -> str:
        """Returns why `conn` should be left: it ended, the server went silent, or GoAway."""
        keep_alive = self.config.keep_alive_ms / 1000
        dead_after = self.config.dead_after_ms / 1000
        self._move.clear()
        ended = asyncio.create_task(conn.wait_terminated())
        moving = asyncio.create_task(self._move.wait())
        try:
            while True:
                if ended.done():
                    return f"connection ended ({conn.reason})"
                if self._move.is_set():
                    self._move.clear()
                    if conn.goaway is not None:
                        return f"asked to move: {conn.goaway}"
                    return "a request found the connection broken"
                if time.monotonic() - conn.last_heard > dead_after:
                    return f"nothing heard for {dead_after} s"
                conn.ping()
                await asyncio.wait([ended, moving], timeout=keep_alive, return_when=asyncio.FIRST_COMPLETED)
                if moving.done() and not self._move.is_set():
                    moving = asyncio.create_task(self._move.wait())
        finally:
            ended.cancel()
            moving.cancel()

    # ---------------------------------------------------------------- pushes

    def _on_push(self, conn: Connection, frame: Any) -> None:
        try:
            kind, body = variant(frame)
        except RosterError as e:
            log.warning("a malformed push from %s: %s", conn.addr, e)
            return
        if kind == "GoAway":
            conn.goaway = str((body or {}).get("reason", "GoAway"))
            if conn is self._conn:
                self._move.set()
            return
        if kind not in ("Snapshot", "Delta") or not isinstance(body, dict):
            return
        state = self._subscriptions.get(str(body.get("service")))
        if state is None:
            return
        version = int(body.get("version", 0))
        current = state.internal
        if kind == "Snapshot":
            if current is not None and version <= current.version:
                return
            new = Snapshot.from_wire(body)
        else:
            if current is not None and version <= current.version:
                return
            if current is None or int(body.get("base", -1)) != current.version:
                # A gap: ask for the snapshot again.
                asyncio.ensure_future(self._resync(state))
                return
            new = current.apply_delta(body)
        state.internal = new
        if (
            self.config.refuse_empty
            and not new.publishers
            and state.visible is not None
            and state.visible.publishers
        ):
            self.refused_empty += 1
            return
        state.visible = new
        for listener in list(state.listeners):
            try:
                listener(new)
            except Exception:
                log.exception("an on_snapshot callback failed")
        asyncio.ensure_future(self._notify(state))
        self._cache_store(new)

    async def _notify(self, state: _Subscription) -> None:
        async with state.changed:
            state.changed.notify_all()

    async def _resync(self, state: _Subscription) -> None:
        try:
            await self._call(self._subscribe_request(state))
        except RosterError as e:
            log.info("resync of %s: %s", state.service, e)

    async def _release(self, state: _Subscription) -> None:
        state.handles -= 1
        if state.handles > 0 or self._subscriptions.get(state.service) is not state:
            return
        del self._subscriptions[state.service]
        if not self._closing:
            try:
                await self._call({"Unsubscribe": {"register_id": state.register_id}})
            except RosterError as e:
                log.info("unsubscribe %s: %s", state.service, e)

    # ---------------------------------------------------------------- cache

    def _cache_path(self, service: str) -> Path | None:
        if self.config.cache_dir is None:
            return None
        name = re.sub(r"[^A-Za-z0-9._-]", "_", service)
        return Path(self.config.cache_dir) / f"{name}.json"

    def _cache_load(self, service: str) -> Snapshot | None:
        path = self._cache_path(service)
        if path is None or not path.exists():
            return None
        try:
            raw = json.loads(path.read_text())
            pubs = [
                Publisher(
                    client_id=p["client_id"],
                    register_id=p["register_id"],
                    data=tuple(base64.b64decode(d) for d in p["data"]),
                    attributes=p.get("attributes", {}),
                    client_version=p.get("client_version", 0),
                    persistent=p.get("persistent", False),
                )
                for p in raw["publishers"]
            ]
            return Snapshot(service, int(raw["version"]), {p.key: p for p in pubs})
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.info("ignoring the cached snapshot %s: %s", path, e)
            return None

    def _cache_store(self, snapshot: Snapshot) -> None:
        path = self._cache_path(snapshot.service)
        if path is None:
            return
        raw = {
            "version": snapshot.version,
            "publishers": [
                {
                    "client_id": p.client_id,
                    "register_id": p.register_id,
                    "data": [base64.b64encode(d).decode("ascii") for d in p.data],
                    "attributes": dict(p.attributes),
                    "client_version": p.client_version,
                    "persistent": p.persistent,
                }
                for p in snapshot.ordered()
            ],
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(raw))
            tmp.replace(path)
        except OSError as e:
            log.info("cannot cache %s: %s", snapshot.service, e)
