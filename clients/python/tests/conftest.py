"""A real `roster dev` cluster per test, started from the `roster` binary (ROSTER_BIN, or the
workspace's debug build), and helpers to wait on conditions with deadlines."""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

HERE = Path(__file__).resolve().parent
ROSTER = Path(
    os.environ.get("ROSTER_BIN", HERE.parent.parent.parent / "target" / "debug" / "roster")
)
START = 60.0

T = TypeVar("T")


@dataclass
class Dev:
    """A running `roster dev`: its directory, client config, and each server's address."""

    dir: Path
    proc: subprocess.Popen[str]
    sessions: dict[int, str] = field(default_factory=dict)
    # Each session server's HTTP admin address (/metrics).
    http: dict[int, str] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)

    def metric(self, session: int, name: str) -> float:
        """A gauge or counter of session server `session`, read from its /metrics."""
        import urllib.request

        with urllib.request.urlopen(f"http://{self.http[session]}/metrics", timeout=5) as r:
            text = r.read().decode()
        for line in text.splitlines():
            if line.split(" ")[0] == name:
                return float(line.split()[-1])
        return 0.0

    @property
    def config(self) -> Path:
        return self.dir / "client.toml"

    @property
    def ca(self) -> Path:
        return self.dir / "ca.pem"

    def server_pid(self, role: str, server_id: int) -> int:
        """The pid of the child `roster ROLE --id ID` of this roster dev."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
            args = [a.decode() for a in cmdline]
            if ppid == self.proc.pid and role in args and args[args.index("--id") + 1] == str(server_id):
                return int(entry.name)
        raise LookupError(f"no {role} {server_id} under roster dev {self.proc.pid}")

    def roster(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(ROSTER), *args], cwd=self.dir.parent, capture_output=True, text=True, timeout=timeout
        )


class Lines:
    """The stdout lines of a process, read on a thread of their own (so the pipe never fills),
    to wait for one with a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def next(self, deadline: float) -> str | None:
        """The next line, or None when the process ended or the deadline passed."""
        try:
            return self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return None


def start_dev(tmp: Path, *extra: str) -> Dev:
    if not ROSTER.exists():
        pytest.fail(f"no roster binary at {ROSTER}: build it (cargo build -p roster-cli) or set ROSTER_BIN")
    proc = subprocess.Popen(
        [str(ROSTER), "dev", "--dir", str(tmp / ".roster"), *extra],
        cwd=tmp,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "RUST_LOG": "warn,openraft=off"},
    )
    dev = Dev(dir=tmp / ".roster", proc=proc)
    deadline = time.monotonic() + START
    lines = Lines(proc)
    while (line := lines.next(deadline)) is not None:
        dev.log.append(line)
        words = line.split()
        if line.startswith("roster dev: session"):
            quic = next(w for w in words if w.startswith("quic="))
            dev.sessions[int(words[3])] = quic.removeprefix("quic=")
            http = next(w for w in words if w.startswith("http="))
            dev.http[int(words[3])] = http.removeprefix("http=")
        if "roster dev ready" in line:
            return dev
    stop_dev(dev)
    pytest.fail(f"roster dev did not become ready: {''.join(dev.log)}")


def stop_dev(dev: Dev) -> None:
    if dev.proc.poll() is None:
        dev.proc.send_signal(signal.SIGTERM)
        try:
            dev.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            dev.proc.kill()
            dev.proc.wait()


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[Dev]:
    d = start_dev(tmp_path, "--insecure-no-auth")
    yield d
    stop_dev(d)


@dataclass
class Servers:
    """A cluster of separate `roster` processes (1 meta, 1 data, 2 sessions): unlike `roster
    dev`, which stops everything when one server dies, one can be killed alone."""

    dir: Path
    procs: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    quic: dict[str, str] = field(default_factory=dict)

    @property
    def ca(self) -> Path:
        return self.dir / "tls" / "ca.pem"

    def spawn(self, name: str, *args: str) -> None:
        proc = subprocess.Popen(
            [str(ROSTER), *args],
            cwd=self.dir,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "RUST_LOG": "warn,openraft=off"},
        )
        self.procs[name] = proc
        line = Lines(proc).next(time.monotonic() + START) or ""
        words = dict(w.split("=", 1) for w in line.split() if "=" in w)
        if "quic" not in words:
            pytest.fail(f"{name} printed {line!r}")
        self.quic[name] = words["quic"]
        http = words["http"]
        deadline = time.monotonic() + START
        while name != "meta" and not _ready(http):
            if time.monotonic() > deadline:
                pytest.fail(f"{name} not ready")
            time.sleep(0.05)


def _ready(http: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{http}/readyz", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _free_udp_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    made = subprocess.run([str(ROSTER), "certs", "--dir", "tls"], cwd=tmp_path, capture_output=True)
    assert made.returncode == 0, made.stderr
    cluster = Servers(dir=tmp_path)
    meta = f"127.0.0.1:{_free_udp_port()}"
    common = ["--http", "127.0.0.1:0", "--tls-dir", "tls"]
    try:
        cluster.spawn(
            "meta", "meta", "--id", "1", "--listen", meta, *common, "--data-dir", "meta-1",
            "--bootstrap", f"1={meta}", "--insecure-no-auth",
        )
        cluster.spawn("data", "data", "--id", "1", "--listen", "127.0.0.1:0", *common, "--meta", meta)
        for i in (1, 2):
            cluster.spawn(
                f"session-{i}", "session", "--id", str(i), "--listen", "127.0.0.1:0", *common,
                "--meta", meta,
            )
        yield cluster
    finally:
        for proc in cluster.procs.values():
            proc.kill()
            proc.wait()


@pytest.fixture
def dev_auth(tmp_path: Path) -> Iterator[Dev]:
    d = start_dev(tmp_path)
    yield d
    stop_dev(d)


async def eventually(what: str, check: Callable[[], Awaitable[T | None]], within: float = 20) -> T:
    """Polls `check` every 50 ms until it returns something, failing after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.05)


async def read_line(
    proc: asyncio.subprocess.Process, matching: Callable[[str], bool], within: float = 20
) -> str:
    """The next stdout line of `proc` satisfying `matching`, within `within` seconds."""
    assert proc.stdout is not None

    async def find() -> str:
        assert proc.stdout is not None
        while True:
            raw = await proc.stdout.readline()
            if not raw:
                pytest.fail("the process ended before printing the line")
            line = raw.decode()
            if matching(line):
                return line

    return await asyncio.wait_for(find(), within)


PYTHON = sys.executable
