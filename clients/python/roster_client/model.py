"""What subscribers are shown: publishers, their health, snapshots and the events between two
snapshots; and the MessagePack frames of docs/PROTOCOL.md §2 that carry them."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Mapping

import msgpack

from .errors import BadFrame, FrameTooLarge, UnexpectedMessage, from_wire

PROTOCOL_VERSION = 1
ALPN = "roster/1"
DEFAULT_MAX_FRAME = 1 << 20
PERSISTENT_CLIENT_ID = "~persistent"


def canonical_service(service: str) -> str:
    """A service id as the server names it: a bare name means `default/DEFAULT/NAME`
    (docs/PROTOCOL.md §5)."""
    from .errors import InvalidArgument

    if not service or any(ord(c) < 32 or ord(c) == 127 for c in service):
        raise InvalidArgument(f"service id {service!r}: empty or with control characters")
    if "/" not in service:
        service = f"default/DEFAULT/{service}"
    parts = service.split("/", 2)
    if len(parts) != 3 or not all(parts):
        raise InvalidArgument(
            f"service id {service!r}: expected namespace/group/data_id or a bare data_id"
        )
    if len(service.encode()) > 512:
        raise InvalidArgument(f"service id {service!r}: longer than 512 bytes")
    return service


def encode_frame(message: Any, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """One frame: a 4-byte big-endian length, then one MessagePack value."""
    body: bytes = msgpack.packb(message, use_bin_type=True)
    if len(body) > max_frame:
        raise FrameTooLarge(f"a frame of {len(body)} bytes exceeds the limit of {max_frame}")
    return struct.pack(">I", len(body)) + body


def decode_body(body: bytes) -> Any:
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several types for bad input
        raise BadFrame(f"not a MessagePack value: {e}") from e


class FrameReader:
    """Splits a byte stream into frames as bytes arrive."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> list[Any]:
        self._buf.extend(data)
        out = []
        while len(self._buf) >= 4:
            (length,) = struct.unpack(">I", self._buf[:4])
            if length > self._max:
                raise FrameTooLarge(f"a frame of {length} bytes exceeds the limit of {self._max}")
            if len(self._buf) < 4 + length:
                break
            body = bytes(self._buf[4 : 4 + length])
            del self._buf[: 4 + length]
            out.append(decode_body(body))
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)


def variant(value: Any) -> tuple[str, Any]:
    """The one entry of an enum value: `{"Name": fields}`."""
    if not isinstance(value, dict) or len(value) != 1:
        raise UnexpectedMessage(f"expected a one-entry map, got {value!r:.200}")
    ((name, fields),) = value.items()
    return str(name), fields


def reply_body(reply: Any) -> tuple[str, dict[str, Any]]:
    """The response of a reply frame; raises the error of an `Err` reply."""
    kind, body = variant(reply)
    if kind == "Err":
        if not isinstance(body, dict):
            raise UnexpectedMessage(f"a malformed error reply: {body!r:.200}")
        raise from_wire(int(body.get("code", 1)), str(body.get("message", "")))
    if kind != "Ok":
        raise UnexpectedMessage(f"expected Ok or Err, got {kind}")
    name, fields = variant(body)
    return name, fields if isinstance(fields, dict) else {}


@dataclass(frozen=True)
class Health:
    """What a publisher's health check found: `checked_ms` is when the probe that settled the
    verdict finished (0: not probed yet), `failure` why that probe failed."""

    healthy: bool
    checked_ms: int = 0
    failure: str | None = None

    @staticmethod
    def from_wire(value: Mapping[str, Any]) -> Health:
        failure = value.get("failure")
        return Health(
            healthy=bool(value.get("healthy", True)),
            checked_ms=int(value.get("checked_ms", 0)),
            failure=None if failure is None else str(failure),
        )


@dataclass(frozen=True)
class Publisher:
    """One instance of a service, as subscribers see it."""

    client_id: str
    register_id: str
    data: tuple[bytes, ...]
    attributes: Mapping[str, str] = field(default_factory=dict)
    client_version: int = 0
    persistent: bool = False
    health: Health | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.client_id, self.register_id)

    @staticmethod
    def from_wire(value: Mapping[str, Any]) -> Publisher:
        health = value.get("health")
        data = value.get("data") or []
        return Publisher(
            client_id=str(value["client_id"]),
            register_id=str(value["register_id"]),
            data=tuple(bytes(d) for d in data),
            attributes={str(k): str(v) for k, v in (value.get("attributes") or {}).items()},
            client_version=int(value.get("client_version", 0)),
            persistent=bool(value.get("persistent", False)),
            health=Health.from_wire(health) if isinstance(health, dict) else None,
        )

    def to_json(self) -> dict[str, Any]:
        """As `roster subscribe` prints a publisher: data as text, or {"base64": ...}."""
        import base64

        def item(d: bytes) -> Any:
            try:
                return d.decode("utf-8")
            except UnicodeDecodeError:
                return {"base64": base64.b64encode(d).decode("ascii")}

        out: dict[str, Any] = {
            "client_id": self.client_id,
            "register_id": self.register_id,
            "data": [item(d) for d in self.data],
            "attributes": dict(self.attributes),
            "client_version": self.client_version,
            "persistent": self.persistent,
        }
        if self.health is not None:
            out["healthy"] = self.health.healthy
            out["checked_ms"] = self.health.checked_ms
            if self.health.failure is not None:
                out["failure"] = self.health.failure
        return out


@dataclass(frozen=True)
class Snapshot:
    """Every publisher of `service` at `version`, keyed by (client_id, register_id)."""

    service: str
    version: int
    publishers: Mapping[tuple[str, str], Publisher]

    def ordered(self) -> list[Publisher]:
        return [self.publishers[k] for k in sorted(self.publishers)]

    def healthy(self) -> list[Publisher]:
        return [p for p in self.ordered() if p.health is None or p.health.healthy]

    def to_json(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "version": self.version,
            "publishers": [p.to_json() for p in self.ordered()],
        }

    @staticmethod
    def from_wire(value: Mapping[str, Any]) -> Snapshot:
        pubs = [Publisher.from_wire(p) for p in value.get("publishers") or []]
        return Snapshot(str(value["service"]), int(value["version"]), {p.key: p for p in pubs})

    def apply_delta(self, value: Mapping[str, Any]) -> Snapshot:
        """This snapshot with a delta applied (the caller checked that its base is our version)."""
        publishers = dict(self.publishers)
        for gone in value.get("removed") or []:
            publishers.pop((str(gone["client_id"]), str(gone["register_id"])), None)
        for put in value.get("put") or []:
            p = Publisher.from_wire(put)
            publishers[p.key] = p
        return Snapshot(self.service, int(value["version"]), publishers)


@dataclass(frozen=True)
class Event:
    """A difference between two consecutive snapshots: `kind` is "added", "removed" or
    "changed"; `publisher` is the new one (the old one for "removed")."""

    kind: str
    publisher: Publisher
    previous: Publisher | None = None


def diff(old: Snapshot | None, new: Snapshot) -> list[Event]:
    """What changed from `old` (None: nothing seen yet) to `new`."""
    before = old.publishers if old is not None else {}
    events: list[Event] = []
    for key, p in new.publishers.items():
        was = before.get(key)
        if was is None:
            events.append(Event("added", p))
        elif was != p:
            events.append(Event("changed", p, was))
    for key, p in before.items():
        if key not in new.publishers:
            events.append(Event("removed", p))
    return events
