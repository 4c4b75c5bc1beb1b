"""Real headless Chromium (Debian's ``/usr/bin/chromium``) driven by Playwright.

No browser is downloaded: Playwright launches the Debian binary (``make test`` installs
the ``chromium`` package; a missing one fails loudly). Flags keep it off the network it
would otherwise call home to. Each page records every request it makes and every dialog
(``alert``/``confirm``/``prompt``) anything tried to open, so a test can assert that
hostile mail ran nothing and loaded nothing.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Dialog,
    FloatRect,
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
REPO = Path(__file__).resolve().parent.parent
SCREENSHOTS = REPO / "docs" / "screenshots"  # committed: README and docs/web.md show them
ARTEFACTS = Path(os.environ.get("SCREENSHOT_DIR", REPO / "build" / "screenshots"))
UPDATE = os.environ.get("UPDATE_SCREENSHOTS") == "1"  # rewrite the committed ones anyway
VOLATILE = "time"  # elements whose text is a time of this run: their pixels may differ
# Chromium itself compares two PNGs (no image library needed): the number of pixels that
# differ outside the given boxes, or -1 when the sizes differ.
_DIFF_JS = """async ([a, b, boxes]) => {
  const load = (src) => new Promise((ok, fail) => {
    const image = new Image();
    image.onload = () => ok(image);
    image.onerror = fail;
    image.src = src;
  });
  const [x, y] = await Promise.all([load(a), load(b)]);
  if (x.width !== y.width || x.height !== y.height) return -1;
  const pixels = (image) => {
    const canvas = document.createElement("canvas");
    canvas.width = image.width; canvas.height = image.height;
    const g = canvas.getContext("2d"); g.drawImage(image, 0, 0);
    return new Uint32Array(g.getImageData(0, 0, image.width, image.height).data.buffer);
  };
  const p = pixels(x), q = pixels(y);
  const skipped = (px, py) => boxes.some((r) =>
    px >= r.x - 2 && px <= r.x + r.width + 2 && py >= r.y - 2 && py <= r.y + r.height + 2);
  let differ = 0;
  for (let i = 0; i < p.length; i++)
    if (p[i] !== q[i] && !skipped(i % x.width, Math.floor(i / x.width))) differ++;
  return differ;
}"""


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
        """Save the page as an artefact (``build/screenshots/``, or ``$SCREENSHOT_DIR``)
        and copy it over the committed one in ``docs/screenshots/`` only when it visibly
        changed (a pixel outside the run's times differs) or ``UPDATE_SCREENSHOTS=1``:
        a test run leaves the tree clean. Returns the artefact."""
        ARTEFACTS.mkdir(parents=True, exist_ok=True)
        artefact = ARTEFACTS / name
        self.page.evaluate("window.scrollTo(0, 0)")  # box coordinates are the page's
        found = [time.bounding_box() for time in self.page.locator(VOLATILE).all()]
        boxes = [box for box in found if box is not None]
        png = self.page.screenshot(path=str(artefact), full_page=True)
        committed = SCREENSHOTS / name
        if UPDATE or not committed.exists() or self._differ(committed.read_bytes(), png, boxes):
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            committed.write_bytes(png)
        return artefact

    def _differ(self, old: bytes, new: bytes, boxes: list[FloatRect]) -> bool:
        blank = self.context.new_page()  # about:blank: no CSP against data: images
        try:
            urls = [f"data:image/png;base64,{base64.b64encode(png).decode()}" for png in (old, new)]
            return int(blank.evaluate(_DIFF_JS, [*urls, boxes])) != 0
        finally:
            blank.close()


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
