"""`python -m roster_client subscribe SERVICE` / `publish SERVICE DATA...`: the same JSON lines
and flags as `roster subscribe` and `roster publish`, through the same `client.toml`."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from typing import Any

from .client import Client
from .errors import RosterError
from .model import Event, Snapshot, diff


def _line(value: Any) -> None:
    print(json.dumps(value, separators=(",", ":"), ensure_ascii=False), flush=True)


def event_json(snapshot: Snapshot, event: Event) -> dict[str, Any]:
    """As `roster subscribe --events` prints a change of one publisher."""
    value: dict[str, Any] = {
        "event": event.kind,
        "service": snapshot.service,
        "version": snapshot.version,
        "publisher": event.publisher.to_json(),
    }
    if event.previous is not None:
        value["old"] = event.previous.to_json()
    return value


async def _subscribe(client: Client, args: argparse.Namespace) -> None:
    sub = await client.subscribe(args.service, healthy_only=args.healthy_only)
    previous: Snapshot | None = None
    async for snapshot in sub:
        _line(snapshot.to_json())
        if args.events:
            for event in diff(previous, snapshot):
                _line(event_json(snapshot, event))
            previous = snapshot


async def _publish(client: Client, args: argparse.Namespace, stop: asyncio.Event) -> None:
    data = [d.encode() for d in args.data]
    pub = await client.publish(
        args.service,
        data,
        attributes=dict(args.attributes),
        register_id=args.register_id,
        check=_check(args),
    )
    session = (
        f"session {client.session_id} at {client.session_addr}"
        if client.session_addr is not None
        else "no session yet"
    )
    durable = "" if pub.durable else " (not yet durable: held until the registry is reachable)"
    print(
        f"published {pub.service} [{' '.join(args.data)}] through {session}{durable}; "
        "Ctrl-C unpublishes",
        file=sys.stderr,
        flush=True,
    )
    await stop.wait()
    await pub.unpublish()
    print("unpublished", file=sys.stderr, flush=True)


def _check(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.check is None:
        return None
    check: dict[str, Any] = {"target": args.check}
    for key, value in (
        ("interval_ms", args.interval),
        ("timeout_ms", args.timeout),
        ("rise", args.rise),
        ("fall", args.fall),
    ):
        if value is not None:
            check[key] = value
    if args.timeout is None:
        # A short interval alone should not be refused for the default timeout (1 s).
        check["timeout_ms"] = min(1000, check.get("interval_ms", 5000))
    return check


def _duration_ms(text: str) -> int:
    """`500ms`, `5s`, `2m`, `1h` or `1d`, as `roster publish --interval` reads it."""
    units = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
    number = text.strip().rstrip("smhd")
    unit = text.strip()[len(number) :]
    if not number.isdigit() or unit not in units:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 500ms, 5s, 2m or 1h")
    return int(number) * units[unit]


def _attribute(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


async def _connect(args: argparse.Namespace) -> Client:
    # `roster subscribe` shows a service emptied: no empty-push protection here.
    settings: dict[str, Any] = {"refuse_empty": False}
    token = args.token or None
    if args.session:
        if not args.ca:
            raise RosterError("--session needs --ca")
        sessions = [s for s in ",".join(args.session).split(",") if s]
        return await Client.connect(sessions=sessions, ca=args.ca, token=token, **settings)
    return await Client.connect(args.config, token=token, **settings)


async def _main(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    client = await _connect(args)
    try:
        if args.command == "subscribe":
            task = asyncio.create_task(_subscribe(client, args))
            stopped = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if task in done:
                task.result()
            task.cancel()
        else:
            await _publish(client, args, stop)
    finally:
        await client.close()
    return 0


def _connection_flags(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=default if default is argparse.SUPPRESS else os.environ.get("ROSTER_CLIENT_CONFIG"),
        help="client config file [default: ./.roster/client.toml, written by `roster dev`]",
    )
    parser.add_argument(
        "--session",
        metavar="ADDR[,ADDR...]",
        action="append",
        default=default if default is argparse.SUPPRESS else None,
        help="session server addresses instead of a config file (needs --ca)",
    )
    parser.add_argument(
        "--ca",
        metavar="FILE",
        default=default if default is argparse.SUPPRESS else None,
        help="the cluster CA certificate, with --session",
    )
    parser.add_argument(
        "--token",
        metavar="TOKEN",
        default=default if default is argparse.SUPPRESS else os.environ.get("ROSTER_TOKEN"),
        help="the token to present, overriding the config file's",
    )


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m roster_client")
    _connection_flags(parser, None)
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser(
        "subscribe", help="print every snapshot of SERVICE as one JSON object per line"
    )
    _connection_flags(sub, argparse.SUPPRESS)
    sub.add_argument(
        "--events",
        action="store_true",
        help="also print one JSON object per change of one publisher (added, removed, changed)",
    )
    sub.add_argument(
        "--healthy-only", action="store_true", help="show only healthy or unchecked publishers"
    )
    sub.add_argument("service", help="a bare name means default/DEFAULT/NAME")
    pub = commands.add_parser("publish", help="publish an instance until interrupted")
    _connection_flags(pub, argparse.SUPPRESS)
    pub.add_argument(
        "--attr",
        dest="attributes",
        metavar="KEY=VALUE",
        type=_attribute,
        action="append",
        default=[],
        help="attribute published with the instance (repeatable)",
    )
    pub.add_argument("--register-id", metavar="ID", help="the instance's register id")
    pub.add_argument(
        "--check", metavar="TARGET", help="tcp, tcp://HOST:PORT or http://HOST:PORT/PATH"
    )
    pub.add_argument("--interval", type=_duration_ms, metavar="DURATION")
    pub.add_argument("--timeout", type=_duration_ms, metavar="DURATION")
    pub.add_argument("--rise", type=int, metavar="N")
    pub.add_argument("--fall", type=int, metavar="N")
    pub.add_argument("service", help="a bare name means default/DEFAULT/NAME")
    pub.add_argument("data", nargs="+", help="what subscribers receive, typically HOST:PORT")
    args = parser.parse_args()
    try:
        return asyncio.run(_main(args))
    except RosterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
