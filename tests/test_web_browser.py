"""The phone's mail application end to end in real headless Chromium (issue 10).

The whole product on loopback: Dovecot as the corporate inbox, aiosmtpd as the corporate
SMTP server and as the hosted server's relay, ``server run`` with its web listener, the
agent (``agent sync``, or ``agent run`` for the push link). A phone user works in a
360-pixel-wide page and the tests look at the desktop the way its user would.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from bridge import Bridge
from browser import Phone, open_phone
from dovecot import Dovecot
from playwright.sync_api import Browser, expect
from smtp_servers import MailServer
from test_agent_run import start_agent, stop_agent, wait_for
from web_hosted import PASSWORDS, set_password

PASSWORD = PASSWORDS["alice"]


class Product:
    def __init__(self, bridge: Bridge, corp: MailServer, relay: MailServer) -> None:
        self.bridge, self.corp, self.relay = bridge, corp, relay

    @property
    def base(self) -> str:
        assert self.bridge.server is not None
        return f"https://127.0.0.1:{self.bridge.server.ports['web']}"

    def desktop(self, message_id: str) -> object:
        return next(m for m in self.bridge.mails() if m.message_id == message_id)


@pytest.fixture
def product(dovecot: Dovecot, tmp_path: Path) -> Iterator[Product]:
    corp, relay = MailServer(dovecot).start(), MailServer().start()
    bridge = Bridge(dovecot, tmp_path, window=6)
    bridge.smtp_port = corp.port
    bridge.start(relay_port=relay.port)
    set_password(bridge.server_ini, "alice", PASSWORD)
    try:
        yield Product(bridge, corp, relay)
    finally:
        bridge.stop()
        corp.stop()
        relay.stop()


@pytest.fixture
def phone(product: Product, chromium: Browser) -> Iterator[Phone]:
    tab = open_phone(chromium, product.base)
    try:
        yield tab
    finally:
        tab.context.close()


def test_log_in_read_delete_restore_and_the_desktop_follows(product: Product, phone: Phone) -> None:
    bridge = product.bridge
    ids = [bridge.deliver(n) for n in (1, 2, 3)]
    bridge.pair()
    bridge.sync_ok()
    page = phone.page
    phone.go("/")
    expect(page).to_have_url(f"{phone.base}/login")
    phone.login("alice", PASSWORD)
    rows = page.locator("ul.messages li")
    expect(rows).to_have_count(3)
    # newest first, unread in bold, the window and the last sync shown
    expect(rows.first).to_contain_text("Message 3")
    assert rows.first.locator(".from").evaluate("e => getComputedStyle(e).fontWeight") == "700"
    expect(page.locator("#status")).to_contain_text("Window 6")
    expect(page.locator("#status")).not_to_contain_text("synced never")
    assert page.evaluate("document.documentElement.scrollWidth") <= 360  # no sideways scroll
    phone.screenshot("inbox-360.png")

    page.click("text=Message 2")
    expect(page.locator("article h1")).to_have_text("Message 2")
    phone.screenshot("message-360.png")
    bridge.sync_ok()
    assert product.desktop(ids[1]).seen  # type: ignore[attr-defined]
    assert not product.desktop(ids[0]).seen  # type: ignore[attr-defined]

    page.click("button:has-text('Delete')")
    expect(page).to_have_url(f"{phone.base}/inbox")
    expect(rows).to_have_count(2)
    bridge.sync_ok()
    assert ids[1] in bridge.desktop_ids(bridge.trash) and ids[1] not in bridge.desktop_ids()
    phone.go("/trash")
    page.click("button:has-text('Restore')")
    expect(rows).to_have_count(3)
    bridge.sync_ok()
    assert ids[1] in bridge.desktop_ids()
    bridge.assert_in_sync()

    page.click("button:has-text('Log out')")
    expect(page).to_have_url(f"{phone.base}/login")
    phone.go("/inbox")
    expect(page).to_have_url(f"{phone.base}/login")


def test_sync_now_compose_both_ways_and_new_mail_appears_live(
    product: Product, phone: Phone
) -> None:
    bridge = product.bridge
    first = bridge.deliver(1)
    agent = start_agent(bridge, idle="false", sync_interval="3600")
    try:
        wait_for(lambda: bridge.phone_inbox_ids() == [first], 15, "the first sync")
        wait_for(lambda: bridge.agent_status()["connections"], 10, "the push link")
        page = phone.page
        phone.login("alice", PASSWORD)
        expect(page.locator("#status")).to_contain_text("agent connected")
        page.evaluate("window.stillTheSamePage = true")

        # Sync now: no IDLE, an hour's timer: only the button brings the desktop's new mail
        bridge.deliver(2)
        page.click("button:has-text('Sync now')")
        expect(page.locator("ul.messages")).to_contain_text("Message 2", timeout=20_000)

        # new inbound mail shows in the open page by itself, without a reload
        page.evaluate("window.stillTheSamePage = true")
        smtp_in = bridge.server.ports["smtp"]  # type: ignore[union-attr]
        import smtplib

        with smtplib.SMTP("127.0.0.1", smtp_in, timeout=10) as client:
            client.sendmail(
                "carol@example.net", ["alice@phone.example"],
                b"From: carol@example.net\r\nTo: alice@phone.example\r\n"
                b"Subject: Straight to the phone\r\nMessage-ID: <live.1@example.net>\r\n\r\nhi\r\n",
            )  # fmt: skip
        expect(page.locator("ul.messages")).to_contain_text("Straight to the phone", timeout=20_000)
        assert page.evaluate("window.stillTheSamePage") is True

        # compose: send now goes out through the hosted server's relay
        phone.go("/compose")
        page.fill("input[name=to]", "dave@example.net")
        page.fill("input[name=subject]", "Sent from the phone")
        page.fill("textarea[name=body]", "Right away")
        page.click("button:has-text('Send now')")
        expect(page).to_have_url(f"{phone.base}/outbox")
        expect(page.locator("body")).to_contain_text("Sent from the phone")
        wait_for(lambda: product.relay.received, 10, "the relay")
        (now,) = product.relay.received
        assert now.rcpt_tos == ["dave@example.net"] and b"Right away" in now.raw

        # reply via the desktop: through the corporate SMTP server, from the desktop address
        phone.go("/inbox")
        page.click("text=Message 1")
        page.click("text=Reply")
        expect(page.locator("input[name=subject]")).to_have_value("Re: Message 1")
        page.fill("input[name=to]", "erin@example.net")
        page.click("button:has-text('Send via my desktop')")
        expect(page).to_have_url(f"{phone.base}/outbox")
        wait_for(lambda: product.corp.received, 15, "the corporate SMTP server")
        (via,) = product.corp.received
        assert via.rcpt_tos == ["erin@example.net"]
        assert via.mail_from == bridge.from_address
        assert b"In-Reply-To: " + first.encode() in via.raw
        assert len(product.relay.received) == 1  # not through the relay as well
    finally:
        stop_agent(bridge, agent)
