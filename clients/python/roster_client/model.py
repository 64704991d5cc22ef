"""What subscribers are shown: publishers, their health, snapshots and the events between two
snapshots; and the MessagePack frames of docs/PROTOCOL.md §2 that carry them."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, overload

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


def check_id(what: str, value: str) -> None:
    """A client, register or instance id as the server accepts it: 1 to 256 bytes of UTF-8
    without control characters."""
    from .errors import InvalidArgument

    if not 1 <= len(value.encode()) <= 256:
        raise InvalidArgument(f"{what} must be 1 to 256 bytes")
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in value):
        raise InvalidArgument(f"{what} {value!r} must not contain control characters")


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC-32C (Castagnoli) of `data`, continuing from the CRC `crc` of earlier bytes
    (docs/PROTOCOL.md §5: `crc32c(b"123456789") == 0xE3069283`)."""
    c = crc ^ 0xFFFFFFFF
    for b in data:
        c = _CRC32C[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def entry_hash(client_id: str, register_id: str, client_version: int) -> int:
    """The 64-bit entry hash of docs/PROTOCOL.md §7 (`Digest`), which also names the files of
    the Rust SDK's snapshot cache."""
    raw = client_id.encode() + b"\0" + register_id.encode() + b"\0" + client_version.to_bytes(8, "big")
    return (crc32c(raw, 0x9E3779B9) << 32) | crc32c(raw)


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
        leader = body.get("leader")
        retry = body.get("retry_after_ms")
        raise from_wire(
            int(body.get("code", 1)),
            str(body.get("message", "")),
            leader=None if leader is None else str(leader),
            retry_after_ms=None if retry is None else int(retry),
        )
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

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"healthy": self.healthy, "checked_ms": self.checked_ms}
        if self.failure is not None:
            out["failure"] = self.failure
        return out


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

    def to_wire(self) -> dict[str, Any]:
        """As pushes carry it (docs/PROTOCOL.md §4): empty and false fields left out."""
        out: dict[str, Any] = {
            "client_id": self.client_id,
            "register_id": self.register_id,
            "data": list(self.data),
            "client_version": self.client_version,
        }
        if self.attributes:
            out["attributes"] = dict(self.attributes)
        if self.persistent:
            out["persistent"] = True
        if self.health is not None:
            out["health"] = self.health.to_wire()
        return out

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
            "attributes": dict(sorted(self.attributes.items())),
            "client_version": self.client_version,
            "persistent": self.persistent,
        }
        if self.health is not None:
            out["healthy"] = self.health.healthy
            out["checked_ms"] = self.health.checked_ms
            if self.health.failure is not None:
                out["failure"] = self.health.failure
        return out


class Publishers(Sequence[Publisher]):
    """The publishers of a snapshot, in `(client_id, register_id)` order: iterate, index, `len`,
    `get(client_id, register_id)`, `healthy()`. Immutable; a delta makes a new one."""

    __slots__ = ("_by_key", "_ordered")

    def __init__(self, publishers: Iterable[Publisher] = ()) -> None:
        self._by_key: dict[tuple[str, str], Publisher] = {p.key: p for p in publishers}
        self._ordered: list[Publisher] | None = None

    @staticmethod
    def _of(by_key: dict[tuple[str, str], Publisher]) -> Publishers:
        out = Publishers()
        out._by_key = by_key
        return out

    def _list(self) -> list[Publisher]:
        if self._ordered is None:
            self._ordered = [self._by_key[k] for k in sorted(self._by_key)]
        return self._ordered

    @overload
    def __getitem__(self, index: int) -> Publisher: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Publisher]: ...

    def __getitem__(self, index: int | slice) -> Publisher | Sequence[Publisher]:
        return self._list()[index]

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self) -> Iterator[Publisher]:
        return iter(self._list())

    def __contains__(self, value: object) -> bool:
        if isinstance(value, Publisher):
            return self._by_key.get(value.key) == value
        return False

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Publishers):
            return self._by_key == other._by_key
        return NotImplemented

    def __repr__(self) -> str:
        return f"Publishers({self._list()!r})"

    def get(self, client_id: str, register_id: str) -> Publisher | None:
        """The publisher `register_id` of client `client_id`, if there is one."""
        return self._by_key.get((client_id, register_id))

    def keys(self) -> list[tuple[str, str]]:
        """Every `(client_id, register_id)`, in order."""
        return [p.key for p in self._list()]

    def healthy(self) -> list[Publisher]:
        """The publishers not marked unhealthy (healthy, or not checked), in order."""
        return [p for p in self._list() if p.health is None or p.health.healthy]


@dataclass(frozen=True)
class Snapshot:
    """Every publisher of `service` at `version`: `publishers` iterates them in
    `(client_id, register_id)` order."""

    service: str
    version: int
    publishers: Publishers

    def ordered(self) -> list[Publisher]:
        """The publishers as a list, in `(client_id, register_id)` order."""
        return list(self.publishers)

    def healthy(self) -> list[Publisher]:
        return self.publishers.healthy()

    def to_json(self) -> dict[str, Any]:
        """As `roster subscribe` prints a snapshot."""
        return {
            "service": self.service,
            "version": self.version,
            "publishers": [p.to_json() for p in self.publishers],
        }

    def to_wire(self) -> dict[str, Any]:
        """As a `Snapshot` push carries it."""
        return {
            "service": self.service,
            "version": self.version,
            "publishers": [p.to_wire() for p in self.publishers],
        }

    @staticmethod
    def from_wire(value: Mapping[str, Any]) -> Snapshot:
        pubs = [Publisher.from_wire(p) for p in value.get("publishers") or []]
        return Snapshot(str(value["service"]), int(value["version"]), Publishers(pubs))

    def apply_delta(self, value: Mapping[str, Any]) -> Snapshot:
        """This snapshot with a delta applied (the caller checked that its base is our version):
        remove every publisher named in `removed`, then add or replace every one in `put`."""
        publishers = dict(self.publishers._by_key)
        for gone in value.get("removed") or []:
            publishers.pop((str(gone["client_id"]), str(gone["register_id"])), None)
        for put in value.get("put") or []:
            p = Publisher.from_wire(put)
            publishers[p.key] = p
        return Snapshot(self.service, int(value["version"]), Publishers._of(publishers))


@dataclass(frozen=True)
class Event:
    """A change of one publisher between two snapshots: `kind` is "added", "removed" or
    "changed"; `publisher` is the new one (the one that went, for "removed"), `previous` the one
    it replaced (for "changed")."""

    kind: str
    publisher: Publisher
    previous: Publisher | None = None


def diff(old: Snapshot | None, new: Snapshot) -> list[Event]:
    """The events that turn `old` (None: nothing seen yet) into `new`: removals, then changes,
    then additions, each in `(client_id, register_id)` order, as the Rust SDK orders them."""
    before = old.publishers._by_key if old is not None else {}
    after = new.publishers._by_key
    removed = [Event("removed", before[k]) for k in sorted(before) if k not in after]
    changed: list[Event] = []
    added: list[Event] = []
    for key in sorted(after):
        p = after[key]
        was = before.get(key)
        if was is None:
            added.append(Event("added", p))
        elif was != p:
            changed.append(Event("changed", p, was))
    return removed + changed + added
