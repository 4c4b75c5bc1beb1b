"""Every basic action of the phone's page works with JavaScript off (issue 10).

Headless Chromium with scripts disabled: forms and links only. The results are checked
through the JSON API (HTTP Basic), the other door to the same phone service.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from browser import open_phone
from playwright.sync_api import Browser, expect
from web_hosted import PASSWORDS, WebHosted, running_server

ALICE = ("alice", PASSWORDS["alice"])


@pytest.fixture
def hosted(tmp_path: Path) -> Iterator[WebHosted]:
    with running_server(tmp_path, users=("alice",)) as server:
        yield server


def test_every_basic_action_without_javascript(hosted: WebHosted, chromium: Browser) -> None:
    hosted.deliver(1, subject="First")
    hosted.deliver(2, subject="Second")
    phone = open_phone(chromium, hosted.url, javascript=False)
    api = hosted.client()

    def inbox() -> list[tuple[str, bool, bool]]:
        mailbox = api.request("GET", "/api/mailbox", basic=ALICE).json()
        return sorted((m["subject"], m["seen"], m["flagged"]) for m in mailbox["inbox"])

    try:
        page = phone.page
        phone.login("alice", PASSWORDS["alice"])
        expect(page.locator("ul.messages li")).to_have_count(2)
        page.click("text=Second")
        expect(page.locator("article h1")).to_have_text("Second")
        page.click("button:has-text('Flag')")
        expect(page.locator("button:has-text('Unflag')")).to_be_visible()
        page.click("button:has-text('Mark unread')")  # back to the list, bold again
        expect(page).to_have_url(f"{hosted.url}/inbox")
        expect(page.locator("li.unread.flagged")).to_contain_text("Second")
        assert inbox() == [("First", False, False), ("Second", False, True)]

        phone.go("/inbox")
        page.click("text=First")
        page.click("button:has-text('Delete')")
        assert [s for s, _, _ in inbox()] == ["Second"]
        phone.go("/trash")
        page.click("text=First")
        page.click("button:has-text('Destroy for good')")
        expect(page).to_have_url(f"{hosted.url}/inbox")
        mailbox = api.request("GET", "/api/mailbox", basic=ALICE).json()
        assert mailbox["trash"] == [] and [m["subject"] for m in mailbox["inbox"]] == ["Second"]

        page.click("text=Second")
        page.click("text=Forward")
        expect(page.locator("input[name=subject]")).to_have_value("Fwd: Second")
        page.fill("input[name=to]", "frank@example.net")
        page.click("button:has-text('Send via my desktop')")
        expect(page.locator("main")).to_contain_text("queued")
        (queued,) = api.request("GET", "/api/mailbox", basic=ALICE).json()["outbox"]
        assert (queued["subject"], queued["to"], queued["state"]) == (
            "Fwd: Second",
            ["frank@example.net"],
            "queued",
        )

        phone.go("/inbox")
        page.click("button:has-text('Sync now')")
        expect(page).to_have_url(f"{hosted.url}/inbox")
        page.click("button:has-text('Log out')")
        expect(page).to_have_url(f"{hosted.url}/login")
        assert phone.dialogs == []
    finally:
        phone.context.close()
