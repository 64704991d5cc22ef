"""The parts that need no server: frames, snapshots and deltas, events, the config file."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

import roster_client
from roster_client.config import ClientConfig
from roster_client.model import (
    FrameReader,
    Publisher,
    Publishers,
    Snapshot,
    canonical_service,
    crc32c,
    diff,
    encode_frame,
    reply_body,
)


def test_the_documented_frames() -> None:
    # docs/PROTOCOL.md §2, Example.
    assert encode_frame({"Ping": {}}).hex() == "00000007" + "81a450696e6780"
    reply = bytes.fromhex("0000000b81a24f6b81a4506f6e6780")
    (frame,) = FrameReader().feed(reply)
    assert reply_body(frame) == ("Pong", {})


def test_frames_split_anywhere_and_errors_are_typed() -> None:
    stream = encode_frame({"Ping": {}}) + encode_frame({"Pong": []})
    reader = FrameReader()
    got = [f for b in stream for f in reader.feed(bytes([b]))]
    assert got == [{"Ping": {}}, {"Pong": []}] and reader.pending == 0
    with pytest.raises(roster_client.FrameTooLarge):
        FrameReader(max_frame=10).feed(b"\x00\x00\x00\x0b")
    with pytest.raises(roster_client.NotLeader) as e:
        reply_body({"Err": {"code": 10, "message": "no", "leader": "10.0.0.2:7000"}})
    assert e.value.leader == "10.0.0.2:7000"
    with pytest.raises(roster_client.SlotMoving) as moving:
        reply_body({"Err": {"code": 11, "message": "later", "retry_after_ms": 250}})
    assert moving.value.retry_after_ms == 250 and moving.value.retryable


def test_service_ids_and_slots() -> None:
    assert canonical_service("demo") == "default/DEFAULT/demo"
    assert canonical_service("a/b/c/d") == "a/b/c/d"
    for bad in ("", "a//b", "a/b", "x\n"):
        with pytest.raises(roster_client.InvalidArgument):
            canonical_service(bad)
    # docs/PROTOCOL.md §5 test vectors.
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"default/DEFAULT/demo") % 256 == 106


def pub(reg: str, data: str, client: str = "c") -> dict[str, object]:
    return {"client_id": client, "register_id": reg, "data": [data.encode()], "client_version": 1}


def test_deltas_apply_on_their_base_and_leave_the_old_snapshot_intact() -> None:
    old = Snapshot.from_wire(
        {"service": "s", "version": 3, "publishers": [pub("b", "1"), pub("a", "1")]}
    )
    assert [p.register_id for p in old.publishers] == ["a", "b"], "ordered"
    new = old.apply_delta(
        {
            "base": 3,
            "version": 5,
            "put": [pub("b", "2"), pub("c", "1")],
            "removed": [{"client_id": "c", "register_id": "a"}],
        }
    )
    assert new.version == 5
    assert [(p.register_id, p.data) for p in new.publishers] == [("b", (b"2",)), ("c", (b"1",))]
    assert len(old.publishers) == 2 and old.publishers[0].register_id == "a"
    assert new.publishers.get("c", "b") == Publisher("c", "b", (b"2",), client_version=1)
    events = diff(old, new)
    assert [(e.kind, e.publisher.register_id) for e in events] == [
        ("removed", "a"),
        ("changed", "b"),
        ("added", "c"),
    ]
    assert events[1].previous is not None and events[1].previous.data == (b"1",)
    assert diff(new, new) == []
    assert [e.kind for e in diff(None, old)] == ["added", "added"]


def test_health_and_persistence_as_pushed() -> None:
    snap = Snapshot.from_wire(
        {
            "service": "s",
            "version": 1,
            "publishers": [
                {**pub("db", "10.0.0.9:5432", "~persistent"), "persistent": True,
                 "health": {"healthy": False, "checked_ms": 7, "failure": "refused"}},
                {**pub("a", "x"), "attributes": {"zone": "eu"}, "health": {"healthy": True}},
                pub("b", "y"),
            ],
        }
    )
    db = snap.publishers.get("~persistent", "db")
    assert db is not None and db.persistent and db.health is not None
    assert (db.health.healthy, db.health.checked_ms, db.health.failure) == (False, 7, "refused")
    assert [p.register_id for p in snap.publishers.healthy()] == ["a", "b"]
    assert Snapshot.from_wire(snap.to_wire()) == snap
    assert isinstance(snap.publishers, Publishers) and len(snap.publishers) == 3
    line = snap.to_json()["publishers"]
    assert line[2]["healthy"] is False and line[2]["failure"] == "refused"
    assert "healthy" not in line[1]


def test_the_config_file_as_the_rust_sdk_reads_it(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    token = "rst_" + "0123456789abcdef" + "_" + "f" * 64
    (tmp_path / "conf" / "token").write_text(f"  {token} \n")
    path = tmp_path / "conf" / "client.toml"
    path.write_text(
        'sessions = ["127.0.0.1:7000", "localhost:7001"]\nca = "ca.pem"\n'
        'token-file = "token"\ncache_dir = "cache"\nrefuse_empty = false\n'
    )
    config = ClientConfig.load(path)
    assert config.ca == tmp_path / "conf" / "ca.pem", "relative to the file, not the process"
    assert config.cache_dir == tmp_path / "conf" / "cache"
    assert config.token == token and config.refuse_empty is False
    assert config.keep_alive_ms == 500 and config.dead_after_ms == 1500
    path.write_text('sessions = ["127.0.0.1:7000"]\nca = "ca.pem"\nkeep_alive = 5\n')
    with pytest.raises(roster_client.ConfigError, match="keep_alive"):
        ClientConfig.load(path)
    path.write_text('sessions = ["127.0.0.1:7000"]\nca = "ca.pem"\ntoken = "a"\ntoken_file = "token"\n')
    with pytest.raises(roster_client.ConfigError, match="not both"):
        ClientConfig.load(path)


def test_a_client_secret_file_is_made_once_and_kept(tmp_path: Path) -> None:
    config = ClientConfig(sessions=["127.0.0.1:1"], ca=tmp_path / "ca.pem",
                          client_secret_file=tmp_path / "secret")
    first = config.client_secret()
    assert 16 <= len(first) <= 64 and config.client_secret() == first
    assert (tmp_path / "secret").stat().st_mode & 0o777 == 0o600


def test_the_cache_file_is_the_rust_sdks(tmp_path: Path) -> None:
    from roster_client.cache import Cache

    cache = Cache(tmp_path)
    snap = Snapshot.from_wire({"service": "default/DEFAULT/x", "version": 9, "publishers": [pub("a", "1")]})
    cache.store(snap, healthy_only=False)
    (path,) = tmp_path.iterdir()
    assert path.suffix == ".snapshot" and len(path.stem) == 16
    assert msgpack.unpackb(path.read_bytes())["version"] == 9
    assert cache.load("default/DEFAULT/x", healthy_only=False) == snap
    assert cache.load("default/DEFAULT/x", healthy_only=True) is None, "kept apart"
    path.write_bytes(b"torn")
    assert cache.load("default/DEFAULT/x", healthy_only=False) is None


def test_liveness_tells_a_silent_server_from_a_busy_process() -> None:
    from roster_client.client import Liveness

    def run(liveness: Liveness, ticks: list[tuple[int, int]]) -> list[bool]:
        return [liveness.observe(ms / 1000, count) for ms, count in ticks]

    silent = Liveness(0.3, 0.1)
    assert run(silent, [(0, 5), (100, 6), (200, 6), (300, 6), (400, 6), (500, 6)]) == [
        False, False, False, False, True, True,
    ]
    heard = Liveness(0.3, 0.1)
    assert run(heard, [(0, 1), (100, 1), (200, 1), (300, 2), (400, 2), (500, 2), (600, 2)]) == [
        False, False, False, False, False, False, True,
    ]
    # The process itself stalled for 5 s: not the server's fault; the clock starts again.
    busy = Liveness(0.3, 0.1)
    assert run(busy, [(0, 1), (100, 1), (5100, 1), (5200, 1), (5300, 1), (5400, 1)]) == [
        False, False, False, False, False, True,
    ]


def test_what_the_rust_sdk_refuses_in_a_config_is_refused(tmp_path: Path) -> None:
    def config(**settings: object) -> ClientConfig:
        made = ClientConfig(sessions=["127.0.0.1:7000"], ca=tmp_path / "ca.pem")
        for key, value in settings.items():
            setattr(made, key, value)
        return made

    config(token="rst_" + "0" * 16 + "_" + "a" * 64).validate()
    cases: list[dict[str, object]] = [
        {"token": "garbage"},
        {"max_in_flight": 0},
        {"keep_alive_ms": 4000},
        {"sessions": []},
        {"sessions": ["no-port"]},
    ]
    for bad in cases:
        with pytest.raises(roster_client.ConfigError):
            config(**bad).validate()


async def test_a_delta_that_does_not_follow_asks_for_the_snapshot_again(tmp_path: Path) -> None:
    import asyncio
    from typing import Any

    from roster_client.client import Client, _Subscription

    sent: list[Any] = []

    class FakeConnection:
        addr = "127.0.0.1:1"

        async def request(self, message: Any, timeout: float) -> tuple[str, dict[str, Any]]:
            sent.append(message)
            return "Done", {}

    client = Client(ClientConfig(sessions=["127.0.0.1:1"], ca=tmp_path / "ca.pem"))
    state = _Subscription("default/DEFAULT/s", "s1", healthy_only=False, handles=1)
    client._subscriptions[state.service] = state
    conn: Any = FakeConnection()
    snapshot = {"service": state.service, "version": 5, "publishers": [pub("a", "1")]}
    client._on_push(conn, {"Snapshot": snapshot})
    client._on_push(conn, {"Delta": {"service": state.service, "base": 5, "version": 6,
                                      "put": [pub("b", "1")]}})
    assert state.visible is not None and state.visible.version == 6
    assert len(state.visible.publishers) == 2
    # Stale pushes are ignored: an older snapshot, a delta already covered.
    client._on_push(conn, {"Snapshot": {**snapshot, "version": 4}})
    client._on_push(conn, {"Delta": {"service": state.service, "base": 5, "version": 6}})
    assert state.visible.version == 6 and not sent
    # A gap: base 7 while the copy is at 6.
    client._on_push(conn, {"Delta": {"service": state.service, "base": 7, "version": 8,
                                      "removed": [{"client_id": "c", "register_id": "a"}]}})
    for _ in range(10):
        if sent:
            break
        await asyncio.sleep(0)
    assert sent == [{"Subscribe": {"register_id": "s1", "service": state.service}}]
    assert state.visible.version == 6 and client.stats.resyncs == 1
    # Unknown push kinds are skipped.
    client._on_push(conn, {"Frob": {}})
    # refuse_empty: an emptying snapshot is withheld.
    client._on_push(conn, {"Snapshot": {"service": state.service, "version": 9, "publishers": []}})
    assert state.visible.version == 6 and client.stats.refused_empty == 1
    await client.close()
