"""Measures the Python client against a running cluster (`roster dev`):

- publish → push latency over N sequential changes, Python publisher to Python subscriber, and
  Python publisher to the Rust SDK (`roster subscribe`, read line by line);
- the memory of a Python subscriber holding S services × I instances.

    python clients/python/bench.py --config .roster/client.toml [--changes 1000] \
        [--services 100] [--instances 100] [--roster target/release/roster]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

from roster_client import Client, Snapshot


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def quantiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": round(statistics.median(ordered), 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3),
        "max_ms": round(ordered[-1], 3),
    }


def stamp_of(snapshot: Snapshot) -> tuple[int, int] | None:
    """(sequence, monotonic ns) carried in the bench publisher's data `SEQ:NS`."""
    for p in snapshot.publishers:
        if p.register_id == "bench":
            seq, ns = p.data[0].decode().split(":")
            return int(seq), int(ns)
    return None


async def python_to_python(config: str, changes: int) -> dict[str, float]:
    async with await Client.connect(config) as publisher, await Client.connect(config) as watcher:
        got: dict[int, float] = {}
        seen = asyncio.Event()

        def on_snapshot(snapshot: Snapshot) -> None:
            stamp = stamp_of(snapshot)
            if stamp is not None and stamp[0] not in got:
                got[stamp[0]] = (time.monotonic_ns() - stamp[1]) / 1e6
                seen.set()

        await watcher.subscribe("bench/py/latency", on_snapshot=on_snapshot)
        pub = await publisher.publish("bench/py/latency", [b"0:0"], register_id="bench")
        for seq in range(1, changes + 1):
            seen.clear()
            await pub.update([f"{seq}:{time.monotonic_ns()}".encode()])
            while seq not in got:
                await asyncio.wait_for(seen.wait(), 10)
                seen.clear()
        return quantiles([got[s] for s in range(1, changes + 1)])


async def python_to_rust(config: str, changes: int, roster: str) -> dict[str, float]:
    proc = await asyncio.create_subprocess_exec(
        roster, "subscribe", "bench/py/rust", "--config", config,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    samples: list[float] = []
    try:
        async with await Client.connect(config) as publisher:
            pub = await publisher.publish("bench/py/rust", [b"0:0"], register_id="bench")

            async def until(seq: int, record: bool = True) -> None:
                assert proc.stdout is not None
                while True:
                    line = await proc.stdout.readline()
                    now = time.monotonic_ns()
                    for p in json.loads(line)["publishers"]:
                        if p["register_id"] == "bench":
                            s, ns = p["data"][0].split(":")
                            if int(s) == seq:
                                if record:
                                    samples.append((now - int(ns)) / 1e6)
                                return

            await asyncio.wait_for(until(0, record=False), 10)
            for seq in range(1, changes + 1):
                await pub.update([f"{seq}:{time.monotonic_ns()}".encode()])
                await asyncio.wait_for(until(seq), 10)
    finally:
        proc.kill()
        await proc.wait()
    return quantiles(samples)


async def memory_subscriber(config: str, services: int, instances: int) -> dict[str, int]:
    """Run in its own process: subscribes to every bench service and reports its RSS."""
    before = rss_kib()
    async with await Client.connect(config) as client:
        subs = [await client.subscribe(f"bench/py/mem-{s}") for s in range(services)]
        for sub in subs:
            await sub.wait_for(lambda snap: len(snap.publishers) == instances, 60)
        after = rss_kib()
    return {"rss_kib_before": before, "rss_kib_holding": after, "instances": services * instances}


async def memory(config: str, services: int, instances: int) -> dict[str, int]:
    async with await Client.connect(config, max_in_flight=46) as publisher:
        sem = asyncio.Semaphore(64)

        async def one(s: int, i: int) -> None:
            async with sem:
                await publisher.publish(
                    f"bench/py/mem-{s}", [f"10.{s // 250}.{s % 250}.{i}:8080".encode()],
                    attributes={"zone": f"z{i % 3}"}, register_id=f"s{s}-i{i}",
                )

        await asyncio.gather(*(one(s, i) for s in range(services) for i in range(instances)))
        out = subprocess.run(
            [sys.executable, __file__, "--config", config, "--memory-subscriber",
             "--services", str(services), "--instances", str(instances)],
            capture_output=True, text=True,
        )
        if out.returncode != 0:
            raise RuntimeError(f"the subscriber process failed: {out.stderr[-2000:]}")
        return json.loads(out.stdout)  # type: ignore[no-any-return]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=".roster/client.toml")
    parser.add_argument("--changes", type=int, default=1000)
    parser.add_argument("--services", type=int, default=100)
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--roster", default=os.environ.get("ROSTER_BIN", "roster"))
    parser.add_argument("--memory-subscriber", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_subscriber:
        print(json.dumps(await memory_subscriber(args.config, args.services, args.instances)))
        return
    report = {
        "changes": args.changes,
        "python_to_python": await python_to_python(args.config, args.changes),
        "python_to_rust": await python_to_rust(args.config, args.changes, args.roster),
        "subscriber_memory": await memory(args.config, args.services, args.instances),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
