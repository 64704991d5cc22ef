"""Clusters of separate `roster` processes for the console's browser tests, and a headless
chromium (Debian's, driven by Playwright) that fails a test on any console error.

A cluster here is one meta node that checks tokens, three data servers and one session server,
each a process of its own, so a test can SIGKILL one data server (`roster dev` stops everything
when one of its servers dies). Every process is killed when the test's cluster goes. Screenshots
go to ROSTER_CONSOLE_OUT (default target/console-tests)."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Playwright, sync_playwright

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
ROSTER = Path(os.environ.get("ROSTER_BIN", ROOT / "target" / "debug" / "roster"))
CHROMIUM = os.environ.get("ROSTER_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
OUT = Path(os.environ.get("ROSTER_CONSOLE_OUT", ROOT / "target" / "console-tests"))
START = 60.0

T = TypeVar("T")


def eventually(what: str, check: Callable[[], T | None], within: float = 20.0) -> T:
    """Polls `check` until it returns something other than None or False, or fails the test
    after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        got = check()
        if got is not None and got is not False:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within}s waiting for {what}")
        time.sleep(0.05)


class Lines:
    """A process's output read on a thread, so waiting for a line has a deadline."""

    def __init__(self, stream: object) -> None:
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.queue.put(line)
        self.queue.put(None)

    def wait_for(self, needle: str, within: float = START) -> str:
        deadline = time.monotonic() + within
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no line with {needle!r} within {within}s; saw {self.seen}")
            try:
                line = self.queue.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                pytest.fail(f"the process ended before printing {needle!r}; saw {self.seen}")
            self.seen.append(line)
            if needle in line:
                return line


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirects)


def http_get(url: str, token: str | None = None) -> tuple[int, str, str]:
    """GET `url` (with `Authorization: Bearer token`), not following redirects: the status,
    the body and the Location header."""
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with _opener.open(request, timeout=10) as response:
            return response.status, response.read().decode(), ""
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), e.headers.get("Location", "")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    """One meta node (tokens checked), data servers 1..n and session server 1."""

    dir: Path
    procs: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    http: dict[str, str] = field(default_factory=dict)
    quic: dict[str, str] = field(default_factory=dict)
    admin_token: str = ""
    client_token: str = ""
    meta: str = ""
    publishers: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def console(self) -> str:
        return f"http://{self.http['session-1']}/ui/"

    def run(self, *args: str) -> str:
        done = subprocess.run(
            [str(ROSTER), *args], cwd=self.dir, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, f"roster {' '.join(args)}: {done.stderr}"
        return done.stdout

    def spawn(self, name: str, *args: str) -> None:
        proc = subprocess.Popen(
            [str(ROSTER), *args],
            cwd=self.dir,
            stdout=subprocess.PIPE,
            stderr=open(self.dir / f"{name}.log", "w"),
            text=True,
            env={**os.environ, "RUST_LOG": "info,openraft=warn"},
        )
        self.procs[name] = proc
        line = Lines(proc.stdout).wait_for("quic=")
        words = dict(w.split("=", 1) for w in line.split() if "=" in w)
        self.quic[name], self.http[name] = words["quic"], words["http"]

    def ready(self, name: str) -> bool:
        try:
            return http_get(f"http://{self.http[name]}/readyz")[0] == 200
        except OSError:
            return False

    def publish(self, service: str, *args: str) -> subprocess.Popen[str]:
        """`roster publish SERVICE ARGS...`, returned once it says it published."""
        proc = subprocess.Popen(
            [str(ROSTER), "publish", service, *args, "--config", "client.toml"],
            cwd=self.dir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.publishers.append(proc)
        Lines(proc.stderr).wait_for("published")
        return proc

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait()

    def stop(self) -> None:
        for proc in [*self.publishers, *self.procs.values()]:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def start_cluster(dir: Path, datas: int = 3) -> Cluster:
    if not ROSTER.exists():
        pytest.fail(f"no roster binary at {ROSTER}: build it (cargo build -p roster-cli) or set ROSTER_BIN")
    cluster = Cluster(dir=dir)
    try:
        cluster.run("certs", "--dir", "tls")
        cluster.admin_token = cluster.run("acl", "token", "generate").strip()
        (dir / "admin.token").write_text(cluster.admin_token + "\n")
        cluster.meta = f"127.0.0.1:{free_udp_port()}"
        common = ["--http", "127.0.0.1:0", "--tls-dir", "tls"]
        cluster.spawn(
            "meta-1", "meta", "--id", "1", "--listen", cluster.meta, *common,
            "--data-dir", "meta-1", "--bootstrap", f"1={cluster.meta}",
            "--admin-token-file", "admin.token",
        )
        for i in range(1, datas + 1):
            cluster.spawn(
                f"data-{i}", "data", "--id", str(i), "--listen", "127.0.0.1:0", *common,
                "--meta", cluster.meta,
            )
        cluster.spawn(
            "session-1", "session", "--id", "1", "--listen", "127.0.0.1:0", *common,
            "--meta", cluster.meta,
        )
        for name in cluster.procs:
            if name != "meta-1":
                eventually(f"{name} ready", lambda name=name: cluster.ready(name), within=START)
        cluster.client_token = cluster.run(
            "acl", "token", "create", "--meta", cluster.meta, "--tls-dir", "tls",
            "--namespace", "*", "--allow", "publish,subscribe", "--description", "console tests",
        ).strip()
        (dir / "client.toml").write_text(
            f'sessions = ["{cluster.quic["session-1"]}"]\n'
            f'ca = "tls/ca.pem"\n'
            f'token = "{cluster.client_token}"\n'
        )
        return cluster
    except BaseException:
        cluster.stop()
        raise


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = start_cluster(tmp_path_factory.mktemp("cluster"))
    yield c
    c.stop()


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no chromium at {CHROMIUM}: install Debian's chromium or set ROSTER_CHROMIUM")
    OUT.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = launch(p)
        yield b
        b.close()


def launch(p: Playwright) -> Browser:
    # --no-sandbox: CI runs as root, where chromium's sandbox cannot start.
    return p.chromium.launch(
        executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"]
    )


@dataclass
class Tab:
    """A page with every console error, page error and request URL it saw."""

    page: Page
    errors: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)

    def shot(self, name: str, full_page: bool = True) -> Path:
        path = OUT / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        return path

    def no_errors(self) -> None:
        assert self.errors == [], f"console errors: {self.errors}"


def open_tab(browser: Browser, width: int = 1280, height: int = 900) -> Tab:
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    tab = Tab(page=page)

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            tab.errors.append(message.text)

    page.on("console", on_console)
    page.on("pageerror", lambda e: tab.errors.append(f"page error: {e}"))
    page.on("request", lambda r: tab.urls.append(r.url))
    return tab


def sign_in(tab: Tab, cluster: Cluster, path: str = "") -> None:
    tab.page.goto(cluster.console + path)
    tab.page.fill("#token", cluster.admin_token)
    tab.page.click("form.login button")
    tab.page.wait_for_selector("header nav a[aria-current=page]")


def wait_live(tab: Tab) -> None:
    """Until the page's live stream is connected."""
    tab.page.wait_for_function(
        "() => document.getElementById('live-state')?.textContent === 'live'", timeout=10_000
    )
