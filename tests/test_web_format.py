"""How the page shows senders, times and mail links (pure functions, one row per case)."""

from __future__ import annotations

import pytest

from imapsync_bridge.server.web import display_name, when
from imapsync_bridge.server.web.mailview import sanitize


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


@pytest.mark.parametrize(
    ("link", "kept"),
    [
        ("https://example.org/page", True),
        ("mailto:carol@example.net?subject=hi", True),
        ("/messages/1/destroy", False),  # the bridge's own routes: a mail has no base
        ("../logout", False),
        ("//evil.example/x", False),  # scheme-relative: not a link a mail can mean
        ("#top", False),
        ("jav&#x09;ascript:alert(1)", False),
        ("cid:part1@example.net", False),
        ("data:text/html;base64,PHNjcmlwdD4=", False),
    ],
)
def test_mail_links_keep_only_absolute_allowed_urls(link: str, kept: bool) -> None:
    markup = str(sanitize(f'<a href="{link}">here</a>'))
    assert ("href=" in markup) == kept, markup
    assert 'rel="noopener noreferrer nofollow"' in markup and ">here</a>" in markup
