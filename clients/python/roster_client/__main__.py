"""`python -m roster_client subscribe SERVICE` / `publish SERVICE DATA...`: the same JSON lines
as `roster subscribe`, through the same `client.toml`."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from .client import Client
from .errors import RosterError


async def _subscribe(client: Client, service: str, healthy_only: bool) -> None:
    sub = await client.subscribe(service, healthy_only=healthy_only)
    async for snapshot in sub:
        print(json.dumps(snapshot.to_json(), separators=(",", ":")), flush=True)


async def _publish(client: Client, service: str, data: list[str], register_id: str | None) -> None:
    pub = await client.publish(service, [d.encode() for d in data], register_id=register_id)
    print(
        f"published {service} {data} as {pub.register_id} through {client.session_addr}; "
        "Ctrl-C unpublishes",
        file=sys.stderr,
        flush=True,
    )
    await asyncio.Event().wait()


async def _main(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # `roster subscribe` shows a service emptied: no empty-push protection here.
    client = await Client.connect(args.config, refuse_empty=False)
    try:
        if args.command == "subscribe":
            work = _subscribe(client, args.service, args.healthy_only)
        else:
            work = _publish(client, args.service, args.data, args.register_id)
        task = asyncio.create_task(work)
        stopped = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
        task.cancel()
        stopped.cancel()
    finally:
        await client.close()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m roster_client")
    parser.add_argument("--config", help="client.toml [default: ./.roster/client.toml]")
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("subscribe", help="print every snapshot of SERVICE as a JSON line")
    sub.add_argument("service")
    sub.add_argument("--healthy-only", action="store_true")
    pub = commands.add_parser("publish", help="publish an instance until interrupted")
    pub.add_argument("service")
    pub.add_argument("data", nargs="+")
    pub.add_argument("--register-id")
    args = parser.parse_args()
    try:
        return asyncio.run(_main(args))
    except RosterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
