"""The web console in a real browser: sign-in, every page, live updates, a data server's death.

Each test writes screenshots to the output directory (see conftest.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from playwright.sync_api import Browser

from .conftest import (
    Cluster,
    Tab,
    eventually,
    http_get,
    open_tab,
    sign_in,
    start_cluster,
    wait_live,
)

PAGES = {
    "overview": "",
    "services": "services",
    "service": "services/default/DEFAULT/checkout",
    "slots": "slots",
    "events": "events",
}


def no_token_anywhere(tab: Tab, token: str) -> None:
    """The token is in no URL the page requested, in no storage a script can read, and not the
    cookie's value."""
    assert all(token not in url for url in tab.urls), tab.urls
    stored = tab.page.evaluate(
        "() => JSON.stringify([Object.entries(sessionStorage), Object.entries(localStorage), document.cookie])"
    )
    assert token not in stored
    for cookie in tab.page.context.cookies():
        assert token not in cookie["value"]


def test_the_console_wants_an_admin_token_and_never_puts_it_in_a_url(
    cluster: Cluster, browser: Browser
) -> None:
    cluster.publish("secret-service", "10.9.9.9:443")
    services = cluster.console + "services"

    # Without a token: off to the sign-in form, and no data, for pages and streams alike.
    status, body, location = http_get(services)
    assert (status, location) == (303, "/ui/login?next=%2Fui%2Fservices")
    assert "secret-service" not in body
    status, body, _ = http_get(cluster.console + "login?next=%2Fui%2Fservices")
    assert status == 200 and 'action="/ui/login"' in body and "secret-service" not in body
    assert http_get(cluster.console + "live/overview")[0] == 401
    assert http_get(cluster.console + "services/default/DEFAULT/secret-service")[0] == 303
    # A wrong token is refused; a token without `admin` is forbidden; the admin token works.
    status, body, _ = http_get(services, "rst_0000000000000000_" + "0" * 64)
    assert status == 401 and "secret-service" not in body
    assert http_get(services, cluster.client_token)[0] == 403
    assert http_get(cluster.console + "live/overview", cluster.client_token)[0] == 403
    status, body, _ = http_get(services, cluster.admin_token)
    assert status == 200 and "secret-service" in body

    tab = open_tab(browser)
    page = tab.page
    page.goto(cluster.console)
    assert page.locator("h1").inner_text() == "Sign in"
    assert page.locator("header nav a").count() == 0, "no navigation before signing in"
    tab.shot("sign-in")
    tab.no_errors()
    assert "secret-service" not in page.content()

    page.fill("#token", "rst_0000000000000000_" + "1" * 64)
    page.click("form.login button")
    page.wait_for_selector(".problem.bad")
    assert "Refused" in page.locator(".problem.bad").inner_text()
    assert page.locator("h1").inner_text() == "Sign in"
    tab.shot("sign-in-refused")

    page.fill("#token", cluster.client_token)
    page.click("form.login button")
    page.wait_for_selector(".problem.bad")
    assert "lacks the admin permission" in page.locator(".problem.bad").inner_text()

    page.fill("#token", cluster.admin_token)
    page.click("form.login button")
    page.wait_for_selector("header nav a[aria-current=page]")
    assert page.url == cluster.console
    wait_live(tab)
    cookies = page.context.cookies()
    assert [c["name"] for c in cookies] == ["roster_console"]
    assert cookies[0]["httpOnly"] and cookies[0]["sameSite"] == "Strict"
    assert cookies[0]["path"] == "/ui"
    no_token_anywhere(tab, cluster.admin_token)
    no_token_anywhere(tab, cluster.client_token)

    # The sign-in page comes back to the page that asked for it.
    page.goto(services)
    assert "secret-service" in page.locator("#live").inner_text()

    page.click("header form button")
    page.wait_for_selector("#token")
    page.goto(services)
    assert page.locator("h1").inner_text() == "Sign in"
    assert "secret-service" not in page.content()
    # Only the refused sign-ins (401/403) and the streams cut by signing out logged errors.
    tab.page.context.close()


def test_every_page_renders_without_errors_wide_and_narrow(
    cluster: Cluster, browser: Browser
) -> None:
    session_http = cluster.http["session-1"]
    cluster.publish(
        "checkout", "127.0.0.1:8443", "--attr", "zone=eu-1", "--attr", "version=2.4.1",
        "--register-id", "checkout-7f9c", "--check", f"tcp://{session_http}",
        "--interval", "500ms",
    )
    cluster.run(
        "register", "checkout", "10.0.0.5:8443", "--id", "legacy-1", "--attr", "zone=eu-2",
        "--check", "tcp://127.0.0.1:1", "--interval", "500ms", "--timeout", "200ms",
        "--fall", "1", "--config", "client.toml",
    )
    for name in ("payments", "search", "inventory"):
        cluster.publish(name, "10.1.0.1:9000")

    for width, height, suffix in ((1280, 900, ""), (390, 844, "-narrow")):
        tab = open_tab(browser, width, height)
        sign_in(tab, cluster)
        for name, path in PAGES.items():
            tab.page.goto(cluster.console + path)
            wait_live(tab)
            if name == "service":
                # The persistent instance's check has failed by now.
                tab.page.wait_for_selector("tr[data-instance=legacy-1] td.bad", timeout=10_000)
            if name == "slots":
                tab.page.wait_for_function(
                    "() => document.querySelectorAll('.slot.st-led').length === 256"
                )
            overflow = tab.page.evaluate(
                "() => document.documentElement.scrollWidth - window.innerWidth"
            )
            assert overflow <= 1, f"{name}{suffix} is wider than the screen by {overflow}px"
            tab.shot(f"{name}{suffix}")
        tab.no_errors()
        tab.page.context.close()

    # What the pages say, read in the browser.
    tab = open_tab(browser)
    sign_in(tab, cluster, "services")
    page = tab.page
    assert page.locator("tr[data-name]").count() >= 4
    page.fill("#filter", "pay")
    assert page.locator("tr[data-name]:visible").count() == 1
    assert "q=pay" in page.url
    page.fill("#filter", "")
    page.click("a:text-is('checkout')")
    page.wait_for_selector("tr[data-instance=checkout-7f9c]")
    row = page.locator("tr[data-instance=checkout-7f9c]").inner_text()
    assert "127.0.0.1:8443" in row and "zone=eu-1" in row and "session 1" in row
    assert "ephemeral" in row and "healthy" in row
    legacy = page.locator("tr[data-instance=legacy-1]").inner_text()
    assert "persistent" in legacy and "unhealthy" in legacy
    page.goto(cluster.console + "slots")
    page.hover(".slot[data-slot='0']")
    tip = page.locator(".slot[data-slot='0'] .tip")
    assert tip.is_visible() and "followers: data" in tip.inner_text()
    tab.shot("slots-hover", full_page=False)
    page.goto(cluster.console + "events")
    assert "Watching cluster" in page.locator("#live").inner_text()
    tab.no_errors()
    tab.page.context.close()


def test_a_published_instance_appears_on_its_page_within_two_seconds(
    cluster: Cluster, browser: Browser
) -> None:
    tab = open_tab(browser)
    sign_in(tab, cluster, "services/default/DEFAULT/live-demo")
    page = tab.page
    wait_live(tab)
    assert "No instance is published" in page.locator("#live").inner_text()
    page.evaluate("() => { window.__loaded_once = true; }")

    proc = cluster.publish("live-demo", "10.2.3.4:8080", "--attr", "zone=eu-3")
    published = time.monotonic()
    page.wait_for_selector("tr[data-instance=p1]", timeout=2_000)
    seen = time.monotonic() - published
    assert page.evaluate("() => window.__loaded_once === true"), "the page was reloaded"
    assert "10.2.3.4:8080" in page.locator("tr[data-instance=p1]").inner_text()
    tab.shot("service-live")

    # And goes when it is unpublished.
    proc.send_signal(2)  # SIGINT, as Ctrl-C: unpublish
    page.wait_for_selector("tr[data-instance=p1]", state="detached", timeout=5_000)
    assert page.evaluate("() => window.__loaded_once === true")
    tab.no_errors()
    tab.page.context.close()
    print(f"instance shown {seen * 1000:.0f} ms after roster publish said it published")


def test_a_killed_data_server_s_slots_move_and_are_led_elsewhere(
    browser: Browser, tmp_path: Path
) -> None:
    cluster = start_cluster(tmp_path)
    try:
        tab = open_tab(browser)
        sign_in(tab, cluster, "slots")
        page = tab.page
        wait_live(tab)
        # Settled: every slot led, and the last data server to join handed its share of
        # leaderships (the meta group rebalances once the table has stood for 5 s), so no
        # planned move mixes with the one the kill causes.
        page.wait_for_function(
            """() => document.querySelectorAll('.slot.st-led').length === 256
                && new Set([...document.querySelectorAll('.slot')]
                    .map(c => c.dataset.leader)).size === 3""",
            timeout=30_000,
        )
        victims = page.eval_on_selector_all(
            ".slot[data-leader='2']", "cells => cells.map(c => c.dataset.slot)"
        )
        assert victims, "data 2 leads some slots"
        # Every state each slot shows, as the page's updates arrive.
        page.evaluate(
            """() => {
                window.__states = {};
                const note = () => document.querySelectorAll('.slot').forEach(c => {
                    const seen = window.__states[c.dataset.slot] ||= [];
                    const state = c.dataset.state + '@' + c.dataset.leader;
                    if (seen[seen.length - 1] !== state) seen.push(state);
                });
                note();
                new MutationObserver(note).observe(document.getElementById('live'), {childList: true});
            }"""
        )
        overview = open_tab(browser)
        sign_in(overview, cluster)
        wait_live(overview)
        cluster.kill("data-2")

        def troubled() -> bool:
            return bool(page.evaluate(
                "() => document.querySelectorAll('.slot.st-down, .slot.st-moving').length > 0"
            ))

        eventually("the dead server's slots shown in trouble", troubled, within=15)
        tab.shot("slots-data-server-killed", full_page=False)
        # The overview, open all along, shows it as a problem without a reload.
        overview.page.wait_for_selector("ul.problems .problem.bad", timeout=15_000)
        overview.shot("overview-data-server-killed")
        overview.no_errors()
        overview.page.context.close()

        def moved() -> bool:
            return bool(page.evaluate(
                """() => [...document.querySelectorAll('.slot')].every(
                    c => c.dataset.state === 'led' && c.dataset.leader !== '2')"""
            ))

        eventually("every slot led by a live data server", moved, within=30)
        states = page.evaluate("() => window.__states")
        for slot in victims:
            seen = states[slot]
            assert seen[0] == "led@2" and seen[-1] in ("led@1", "led@3"), (slot, seen)
            assert any(s.startswith(("leader down@", "moving@")) for s in seen), (slot, seen)
        tab.shot("slots-after-move", full_page=False)

        page.goto(cluster.console + "events")
        text = page.locator("#live").inner_text()
        assert "data 2 left the cluster." in text
        assert "slots changed leader" in text and "from data 2" in text
        tab.shot("events-after-move")
        tab.no_errors()
        tab.page.context.close()
    finally:
        cluster.stop()
