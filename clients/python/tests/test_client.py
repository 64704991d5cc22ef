"""The Python client against a real `roster dev`: publish and subscribe both ways with the Rust
CLI, updates and removals, events, failover after kill -9 of a session server, abrupt loss of a
client process, persistent instances, and typed errors."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import roster_client
from roster_client import Client, Snapshot

from .conftest import PYTHON, ROSTER, Dev, Servers, eventually, read_line

WAIT = 20.0


def addresses(snapshot: Snapshot) -> list[bytes]:
    return sorted(d for p in snapshot.ordered() for d in p.data)


async def test_python_and_the_rust_cli_see_each_other(dev: Dev) -> None:
    async with await Client.connect(dev.config) as client:
        await client.publish("web", [b"10.0.0.1:80"], attributes={"zone": "eu-1"}, register_id="py-1")
        rust_sub = await asyncio.create_subprocess_exec(
            str(ROSTER), "subscribe", "web", "--config", str(dev.config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            line = await read_line(rust_sub, lambda l: "10.0.0.1:80" in l)
            shown = json.loads(line)["publishers"][0]
            assert shown["register_id"] == "py-1"
            assert shown["attributes"] == {"zone": "eu-1"}
            assert shown["client_id"] == client.client_id
        finally:
            rust_sub.kill()
            await rust_sub.wait()

        rust_pub = await asyncio.create_subprocess_exec(
            str(ROSTER), "publish", "api", "10.0.0.9:90", "--config", str(dev.config),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            sub = await client.subscribe("api")
            got = await sub.wait_for(lambda s: addresses(s) == [b"10.0.0.9:90"], WAIT)
            assert got.service == "default/DEFAULT/api"
        finally:
            rust_pub.kill()
            await rust_pub.wait()


async def test_update_unpublish_and_events(dev: Dev) -> None:
    async with await Client.connect(dev.config) as publisher, await Client.connect(
        dev.config, refuse_empty=False
    ) as watcher:
        sub = await watcher.subscribe("svc")
        events: list[tuple[str, str]] = []

        async def collect() -> None:
            async for event in sub.events():
                events.append((event.kind, event.publisher.data[0].decode()))

        collector = asyncio.create_task(collect())
        pub = await publisher.publish("svc", [b"10.0.0.1:1"])
        await sub.wait_for(lambda s: addresses(s) == [b"10.0.0.1:1"], WAIT)
        await pub.update([b"10.0.0.2:2"])
        await sub.wait_for(lambda s: addresses(s) == [b"10.0.0.2:2"], WAIT)
        await pub.unpublish()
        await sub.wait_for(lambda s: not s.publishers, WAIT)
        await eventually("the removal event", lambda: _some(("removed", "10.0.0.2:2") in events))
        collector.cancel()
        assert ("added", "10.0.0.1:1") in events
        assert ("changed", "10.0.0.2:2") in events
        # After the first snapshot the session sent only what changed.
        assert watcher.stats.deltas >= 1 and watcher.stats.snapshots >= 1
        assert watcher.stats.resyncs == 0


async def _some(condition: bool) -> bool | None:
    return True if condition else None


async def test_empty_push_protection_withholds_an_emptying_snapshot(dev: Dev) -> None:
    async with await Client.connect(dev.config) as publisher, await Client.connect(dev.config) as watcher:
        sub = await watcher.subscribe("guarded")
        pub = await publisher.publish("guarded", [b"10.0.0.1:1"])
        await sub.wait_for(lambda s: len(s.publishers) == 1, WAIT)
        await pub.unpublish()
        await eventually("the empty snapshot refused", lambda: _some(watcher.refused_empty > 0))
        current = sub.current()
        assert current is not None and len(current.publishers) == 1


@pytest.mark.parametrize("how", ["kill", "terminate"])
async def test_a_publisher_survives_the_end_of_its_session_server(servers: Servers, how: str) -> None:
    """SIGKILL: the client finds the server silent. SIGTERM: the server drains, sending GoAway."""
    sessions = {name: servers.quic[name] for name in ("session-1", "session-2")}
    async with await Client.connect(sessions=list(sessions.values()), ca=servers.ca) as publisher:
        pub = await publisher.publish("moving", [b"10.0.0.5:5"], register_id="m1")
        doomed = next(n for n, a in sessions.items() if a == publisher.session_addr)
        survivor = next(a for n, a in sessions.items() if n != doomed)
        async with await Client.connect(
            sessions=[survivor], ca=servers.ca, refuse_empty=False
        ) as watcher:
            seen: list[Snapshot] = []
            sub = await watcher.subscribe("moving", on_snapshot=seen.append)
            await sub.wait_for(lambda s: addresses(s) == [b"10.0.0.5:5"], WAIT)
            states: list[str] = []
            publisher.on_state(states.append)
            getattr(servers.procs[doomed], how)()
            killed = time.monotonic()
            await eventually(
                "the publisher on the surviving session",
                lambda: _some(publisher.session_addr == survivor and publisher.state == "connected"),
            )
            moved = time.monotonic() - killed
            # Still the same publisher, reachable through the new connection.
            await pub.update([b"10.0.0.6:6"])
            await sub.wait_for(lambda s: addresses(s) == [b"10.0.0.6:6"], WAIT)
            print(f"the publisher moved {moved:.2f} s after its session server was sent {how}")
            missing = [s.version for s in seen if not s.publishers]
            assert not missing, f"the instance was missing at versions {missing}"
            assert "reconnecting" in states and states[-1] == "connected"


async def test_a_killed_client_process_is_removed_within_the_idle_timeout(dev: Dev) -> None:
    async with await Client.connect(dev.config, refuse_empty=False) as watcher:
        sub = await watcher.subscribe("doomed")
        proc = await asyncio.create_subprocess_exec(
            PYTHON, "-m", "roster_client", "--config", str(dev.config),
            "publish", "doomed", "10.0.0.7:7",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        await sub.wait_for(lambda s: addresses(s) == [b"10.0.0.7:7"], WAIT)
        proc.kill()
        await proc.wait()
        killed = time.monotonic()
        await sub.wait_for(lambda s: not s.publishers, WAIT)
        gone = time.monotonic() - killed
        print(f"a killed Python client's instance went {gone:.2f} s after SIGKILL")
        # The session's idle timeout (2.5 s) plus a keep-alive (1 s) plus the client grace (1 s).
        assert gone < 6.0, gone


async def test_persistent_instances(dev: Dev) -> None:
    async with await Client.connect(dev.config) as client:
        await client.register_persistent("db", "primary", [b"10.0.0.8:5432"], attributes={"role": "rw"})
        sub = await client.subscribe("db")
        got = await sub.wait_for(lambda s: len(s.publishers) == 1, WAIT)
        (p,) = got.ordered()
        assert p.persistent and p.client_id == roster_client.PERSISTENT_CLIENT_ID
        assert p.register_id == "primary" and p.attributes == {"role": "rw"}
        await client.deregister_persistent("db", "primary")
        with pytest.raises(roster_client.NotFound):
            await client.deregister_persistent("db", "primary")


async def test_errors_are_typed(dev_auth: Dev) -> None:
    dev = dev_auth
    with pytest.raises(roster_client.Unauthenticated):
        await Client.connect(dev.config, token="rst_0000000000000000_" + "0" * 64)
    made = dev.roster(
        "acl", "token", "create", "--config", str(dev.dir / "cluster.toml"),
        "--namespace", "*", "--allow", "subscribe",
    )
    assert made.returncode == 0, made.stderr
    reader = made.stdout.strip().split()[-1]
    async with await Client.connect(dev.config, token=reader) as client:
        with pytest.raises(roster_client.PermissionDenied):
            await client.publish("web", [b"10.0.0.1:80"])
    async with await Client.connect(dev.config) as client:
        with pytest.raises(roster_client.InvalidArgument):
            await client.publish("web", [b"10.0.0.1:80"], register_id="")
        with pytest.raises(roster_client.LimitExceeded):
            await client.publish("web", [b"x" * 70_000])
        with pytest.raises(roster_client.FrameTooLarge):
            await client.publish("web", [b"x" * (1 << 20)])
        with pytest.raises(roster_client.InvalidArgument):
            await client.subscribe("a//b")
        # After all that the connection still works.
        assert await client.ping() < 5


async def test_the_snapshot_cache_is_a_new_subscriptions_first_value(dev: Dev, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    async with await Client.connect(dev.config) as publisher:
        async with await Client.connect(dev.config, cache_dir=cache) as first:
            sub = await first.subscribe("cached")
            pub = await publisher.publish("cached", [b"10.0.0.3:3"])
            await sub.wait_for(lambda s: addresses(s) == [b"10.0.0.3:3"], WAIT)
        await pub.unpublish()
    # The service is empty now; a new client starts from the cache, and the empty push that
    # follows is withheld.
    async with await Client.connect(dev.config, cache_dir=cache) as second:
        sub = await second.subscribe("cached")
        current = sub.current()
        assert current is not None and addresses(current) == [b"10.0.0.3:3"]
        await eventually("the empty push refused", lambda: _some(second.refused_empty > 0))
        still = sub.current()
        assert still is not None and addresses(still) == [b"10.0.0.3:3"]


async def test_the_python_cli_prints_what_roster_subscribe_prints(dev: Dev) -> None:
    async with await Client.connect(dev.config) as client:
        await client.publish("cli", [b"10.0.0.4:4", b"\xff\x00"], attributes={"a": "1"})
        lines = []
        for argv in (
            [str(ROSTER), "subscribe", "cli", "--config", str(dev.config)],
            [PYTHON, "-m", "roster_client", "--config", str(dev.config), "subscribe", "cli"],
        ):
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
            )
            try:
                lines.append(await read_line(proc, lambda l: "10.0.0.4:4" in l))
            finally:
                proc.kill()
                await proc.wait()
        rust, python = (json.loads(line) for line in lines)
        assert python == rust
        assert rust["publishers"][0]["data"][1] == {"base64": "/wA="}
        assert lines[1] == lines[0], "byte for byte"


async def test_with_a_cache_a_client_starts_while_no_session_answers(dev: Dev, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    async with await Client.connect(dev.config) as publisher:
        await publisher.publish("offline", [b"10.0.0.2:2"])
        async with await Client.connect(dev.config, cache_dir=cache) as first:
            sub = await first.subscribe("offline")
            await sub.wait_for(lambda s: addresses(s) == [b"10.0.0.2:2"], WAIT)
    nobody = f"127.0.0.1:{_unused_udp_port()}"
    with pytest.raises(roster_client.ConnectionLost):
        await Client.connect(sessions=[nobody], ca=dev.ca, connect_timeout_ms=300)
    async with await Client.connect(
        sessions=[nobody], ca=dev.ca, cache_dir=cache, connect_timeout_ms=300
    ) as offline:
        assert offline.state == "reconnecting"
        sub = await offline.subscribe("offline")
        current = sub.current()
        assert current is not None and addresses(current) == [b"10.0.0.2:2"]


def _unused_udp_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_the_python_cli_prints_what_roster_subscribe_events_prints(dev: Dev) -> None:
    async with await Client.connect(dev.config) as client:
        pub = await client.publish("cli-events", [b"10.0.0.1:1"], register_id="a")
        await client.publish("cli-events", [b"10.0.0.2:2"], register_id="b")
        procs = [
            await asyncio.create_subprocess_exec(
                *argv, "subscribe", "cli-events", "--events", "--config", str(dev.config),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            )
            for argv in ([str(ROSTER)], [PYTHON, "-m", "roster_client"])
        ]
        try:
            firsts = [await read_line(p, lambda l: '"event":"added"' in l and '"b"' in l) for p in procs]
            assert firsts[0] == firsts[1]
            await pub.update([b"10.0.0.3:3"])
            changed = [await read_line(p, lambda l: '"event":"changed"' in l) for p in procs]
            assert changed[0] == changed[1]
            assert json.loads(changed[1])["old"]["data"] == ["10.0.0.1:1"]
            await pub.unpublish()
            removed = [await read_line(p, lambda l: '"event":"removed"' in l) for p in procs]
            assert removed[0] == removed[1]
        finally:
            for p in procs:
                p.kill()
                await p.wait()


async def test_a_revoked_token_ends_the_connection_and_its_publishers(dev_auth: Dev) -> None:
    dev = dev_auth
    made = dev.roster(
        "acl", "token", "create", "--config", str(dev.dir / "cluster.toml"),
        "--namespace", "team", "--allow", "publish,subscribe", "--json",
    )
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    token, token_id = created["token"], created["info"]["id"]
    # The cluster's own token (client.toml) watches; the new one publishes.
    async with await Client.connect(dev.config, refuse_empty=False) as watcher, \
            await Client.connect(dev.config, token=token) as client:
        sub = await watcher.subscribe("team/web/api")
        await client.publish("team/web/api", [b"10.0.0.1:80"])
        await sub.wait_for(lambda s: len(s.publishers) == 1, WAIT)
        with pytest.raises(roster_client.PermissionDenied, match="other"):
            await client.publish("other/web/api", [b"10.0.0.1:80"])
        revoked = dev.roster("acl", "token", "revoke", token_id, "--config", str(dev.dir / "cluster.toml"))
        assert revoked.returncode == 0, revoked.stderr
        # Removed at once (no client grace); the client keeps trying, refused.
        await sub.wait_for(lambda s: not s.publishers, WAIT)
        await eventually("the lost connection noticed", lambda: _some(client.stats.lost >= 1))
        assert client.state == "reconnecting"


async def test_a_cache_written_by_the_rust_sdk_is_read(dev: Dev, tmp_path: Path) -> None:
    """Both SDKs keep the snapshot cache in one format: a Python client starts from what
    `roster subscribe` (the Rust SDK) cached."""
    config = tmp_path / "with-cache.toml"
    config.write_text(
        dev.config.read_text().replace("ca = \"ca.pem\"", f"ca = \"{dev.ca}\"")
        + f"cache_dir = \"{tmp_path / 'cache'}\"\n"
    )
    async with await Client.connect(dev.config) as client:
        await client.publish("shared-cache", [b"10.0.0.4:4"], attributes={"k": "v"})
        rust = await asyncio.create_subprocess_exec(
            str(ROSTER), "subscribe", "shared-cache", "--config", str(config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            await read_line(rust, lambda l: "10.0.0.4:4" in l)
        finally:
            rust.send_signal(signal.SIGTERM)  # closing flushes the cache
            await asyncio.wait_for(rust.wait(), WAIT)
    nobody = f"127.0.0.1:{_unused_udp_port()}"
    async with await Client.connect(
        sessions=[nobody], ca=dev.ca, cache_dir=tmp_path / "cache", connect_timeout_ms=300
    ) as offline:
        sub = await offline.subscribe("shared-cache")
        current = sub.current()
        assert current is not None and addresses(current) == [b"10.0.0.4:4"]
        assert current.publishers[0].attributes == {"k": "v"}


async def test_healthy_only_subscriptions_and_health(dev: Dev) -> None:
    dead = f"127.0.0.1:{_unused_tcp_port()}"
    async with await Client.connect(dev.config) as client, \
            await Client.connect(dev.config) as healthy_client:
        await client.publish("checked", [b"10.0.0.1:1"], register_id="fine")
        await client.publish(
            "checked", [dead.encode()], register_id="failing",
            check={"target": "tcp", "interval_ms": 100, "timeout_ms": 50, "fall": 1},
        )
        every = await client.subscribe("checked")
        got = await every.wait_for(
            lambda s: (p := s.publishers.get(client.client_id, "failing")) is not None
            and p.health is not None and not p.health.healthy,
            WAIT,
        )
        failing = got.publishers.get(client.client_id, "failing")
        assert failing is not None and failing.health is not None and failing.health.failure
        assert [p.register_id for p in got.healthy()] == ["fine"]
        only = await healthy_client.subscribe("checked", healthy_only=True)
        shown = await only.wait_for(lambda s: len(s.publishers) >= 1, WAIT)
        assert [p.register_id for p in shown.publishers] == ["fine"]
        with pytest.raises(roster_client.InvalidArgument):
            await healthy_client.subscribe("checked")  # the other kind, on the same client


async def test_subscriptions_end_when_the_client_closes(dev: Dev) -> None:
    client = await Client.connect(dev.config)
    sub = await client.subscribe("ending")
    seen: list[Snapshot] = []

    async def read() -> None:
        async for snapshot in sub:
            seen.append(snapshot)

    reader = asyncio.create_task(read())
    await sub.wait_for(lambda s: True, WAIT)
    await client.close()
    await asyncio.wait_for(reader, WAIT)
    assert seen and client.state == "closed"
    with pytest.raises(roster_client.ConnectionLost):
        await sub.wait_for(lambda s: False, WAIT)


def _unused_tcp_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_what_is_published_while_no_session_answers_is_registered_on_reconnecting(
    servers: Servers,
) -> None:
    addr = servers.quic["session-1"]
    other = servers.quic["session-2"]
    async with await Client.connect(
        sessions=[addr], ca=servers.ca, request_timeout_ms=500
    ) as client, await Client.connect(sessions=[other], ca=servers.ca) as watcher:
        sub = await watcher.subscribe("held")
        servers.procs["session-1"].kill()
        servers.procs["session-1"].wait()
        await eventually("the loss noticed", lambda: _some(client.state == "reconnecting"))
        pub = await client.publish("held", [b"10.0.0.9:9"], register_id="held-1")
        assert not pub.durable, "held by the client until a session server answers"
        # The same session server comes back on the same address.
        common = ["--http", "127.0.0.1:0", "--tls-dir", "tls", "--meta", servers.quic["meta"]]
        servers.spawn("session-1", "session", "--id", "1", "--listen", addr, *common)
        got = await sub.wait_for(lambda s: addresses(s) == [b"10.0.0.9:9"], WAIT)
        assert got.publishers[0].register_id == "held-1"
        await eventually("the client connected again", lambda: _some(client.state == "connected"))
        assert client.stats.reconnects >= 1


async def test_many_concurrent_requests_and_a_large_snapshot(dev: Dev) -> None:
    """More publishes at once than max_in_flight (they wait their turn, none is refused), and
    a snapshot far larger than one QUIC packet."""
    count = 300
    async with await Client.connect(dev.config) as publisher, \
            await Client.connect(dev.config) as watcher:
        await asyncio.gather(*(
            publisher.publish("bulk", [f"10.0.{i // 256}.{i % 256}:80".encode() + b" " * 1000])
            for i in range(count)
        ))
        sub = await watcher.subscribe("bulk")
        got = await sub.wait_for(lambda s: len(s.publishers) == count, WAIT)
        assert len({p.register_id for p in got.publishers}) == count
        assert watcher.stats.push_bytes > count * 1000


async def test_a_restarted_process_with_its_secret_takes_its_publishers_over(
    dev: Dev, tmp_path: Path
) -> None:
    """client_id and client_secret_file make a restarted process the same client: its new
    connection takes over what the killed one published, which no subscriber sees go."""
    config = tmp_path / "same-client.toml"
    config.write_text(
        dev.config.read_text().replace('ca = "ca.pem"', f'ca = "{dev.ca}"')
        + f'client_id = "billing-7"\nclient_secret_file = "{tmp_path / "secret"}"\n'
    )
    argv = [PYTHON, "-m", "roster_client", "--config", str(config),
            "publish", "kept", "10.0.0.7:7", "--register-id", "main"]
    async with await Client.connect(dev.config, refuse_empty=False) as watcher:
        seen: list[Snapshot] = []
        sub = await watcher.subscribe("kept", on_snapshot=seen.append)
        first = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        second = None
        try:
            await sub.wait_for(lambda s: addresses(s) == [b"10.0.0.7:7"], WAIT)
            first.kill()
            await first.wait()
            second = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
            )
            await read_stderr_line(second, lambda l: l.startswith("published"))
            # The session declares the killed connection lost (idle timeout) ...
            await eventually(
                "the killed connection declared lost",
                lambda: _some(dev.metric(1, "roster_session_connections") == 2),
            )
            # ... and its client grace (1 s) ends without taking the instance away.
            with pytest.raises(roster_client.Timeout):
                await sub.wait_for(lambda s: not s.publishers, 3.0)
            current = sub.current()
            assert current is not None and addresses(current) == [b"10.0.0.7:7"]
            (p,) = current.publishers
            assert (p.client_id, p.register_id) == ("billing-7", "main")
            since = next(i for i, s in enumerate(seen) if s.publishers)
            missing = [s.version for s in seen[since:] if not s.publishers]
            assert not missing, f"the instance was missing at versions {missing}"
        finally:
            for proc in (first, second):
                if proc is not None and proc.returncode is None:
                    proc.kill()
                    await proc.wait()


async def read_stderr_line(
    proc: asyncio.subprocess.Process, matching: Callable[[str], bool], within: float = 20
) -> str:
    assert proc.stderr is not None
    stderr = proc.stderr

    async def find() -> str:
        while True:
            raw = await stderr.readline()
            if not raw:
                pytest.fail("the process ended before printing the line")
            if matching(raw.decode()):
                return raw.decode()

    return await asyncio.wait_for(find(), within)


async def test_a_subscriber_moves_with_its_subscription_when_its_session_server_dies(
    servers: Servers,
) -> None:
    sessions = [servers.quic["session-1"], servers.quic["session-2"]]
    async with await Client.connect(
        sessions=sessions, ca=servers.ca, refuse_empty=False
    ) as watcher:
        doomed = next(n for n in ("session-1", "session-2") if servers.quic[n] == watcher.session_addr)
        survivor = next(a for a in sessions if a != watcher.session_addr)
        async with await Client.connect(sessions=[survivor], ca=servers.ca) as publisher:
            seen: list[Snapshot] = []
            sub = await watcher.subscribe("followed", on_snapshot=seen.append)
            pub = await publisher.publish("followed", [b"10.0.0.1:1"])
            await sub.wait_for(lambda s: addresses(s) == [b"10.0.0.1:1"], WAIT)
            servers.procs[doomed].kill()
            await eventually(
                "the subscriber on the surviving session",
                lambda: _some(watcher.session_addr == survivor and watcher.state == "connected"),
            )
            await pub.update([b"10.0.0.2:2"])
            await sub.wait_for(lambda s: addresses(s) == [b"10.0.0.2:2"], WAIT)
            since = next(i for i, s in enumerate(seen) if s.publishers)
            assert all(s.publishers for s in seen[since:]), "never shown an empty service"
            versions = [s.version for s in seen]
            assert versions == sorted(set(versions)), "versions only increase"
            assert watcher.stats.silent + watcher.stats.lost >= 1
