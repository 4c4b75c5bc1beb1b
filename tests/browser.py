"""Real headless Chromium (Debian's ``/usr/bin/chromium``) driven by Playwright.

No browser is downloaded: Playwright launches the Debian binary (``make test`` installs
the ``chromium`` package; a missing one fails loudly). Flags keep it off the network it
would otherwise call home to. Each page records every request it makes and every dialog
(``alert``/``confirm``/``prompt``) anything tried to open, so a test can assert that
hostile mail ran nothing and loaded nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Dialog,
    Page,
    Playwright,
    expect,
    sync_playwright,
)

CHROMIUM = "/usr/bin/chromium"
QUIET_FLAGS = [
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
    "--metrics-recording-only",
]
PHONE = {"width": 360, "height": 740}
TIMEOUT_MS = 15_000  # generous: CI runs these beside the whole suite on 2 cores
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"


@pytest.fixture(scope="session")
def playwright() -> Iterator[Playwright]:
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="session")
def chromium(playwright: Playwright) -> Iterator[Browser]:
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=QUIET_FLAGS)
    try:
        yield browser
    finally:
        browser.close()


@dataclass
class Phone:
    """One phone's browser tab, with what it requested and what tried to pop up."""

    context: BrowserContext
    page: Page
    base: str
    requests: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def go(self, path: str) -> None:
        self.page.goto(self.base + path)

    def login(self, user: str, password: str) -> None:
        self.go("/")
        self.page.fill("input[name=user]", user)
        self.page.fill("input[name=password]", password)
        self.page.click("button[type=submit]")
        self.page.wait_for_url("**/inbox")

    def screenshot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / name
        self.page.screenshot(path=str(path), full_page=True)
        return path


def open_phone(
    chromium: Browser, base: str, color_scheme: str = "light", javascript: bool = True
) -> Phone:
    context = chromium.new_context(
        viewport=PHONE, ignore_https_errors=True, color_scheme=color_scheme,  # type: ignore[arg-type]
        device_scale_factor=1, java_script_enabled=javascript,
    )  # fmt: skip
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    phone = Phone(context, page, base)
    page.on("request", lambda request: phone.requests.append(request.url))

    def dismiss(dialog: Dialog) -> None:
        phone.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    page.on("dialog", dismiss)
    return phone
