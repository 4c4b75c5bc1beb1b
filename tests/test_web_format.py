"""How the page shows senders and times (pure functions, one row per case)."""

from __future__ import annotations

import pytest

from imapsync_bridge.server.web import display_name, when


@pytest.mark.parametrize(
    ("sender", "shown"),
    [
        ("Carol <carol@example.net>", "Carol"),
        ('"Doe, Jane" <jane@example.net>', "Doe, Jane"),
        ("plain@example.net", "plain@example.net"),
        ("<only@example.net>", "only@example.net"),
        ('"<img src=x>" <m@example.net>', "<img src=x>"),  # text: the template escapes it
        ("", ""),
    ],
)
def test_display_name(sender: str, shown: str) -> None:
    assert display_name(sender) == shown


@pytest.mark.parametrize(
    ("iso", "shown"),
    [
        ("2026-12-06T22:57:03.123456Z", "06 Dec 22:57"),
        ("2024-01-01T12:03:00Z", "01 Jan 12:03"),
        (None, "never"),
        ("", "never"),
    ],
)
def test_when(iso: str | None, shown: str) -> None:
    assert when(iso) == shown
