"""A message body as the page shows it: plain text escaped, HTML mail sanitized.

HTML goes through ``nh3`` (ammonia) with a small allow-list: text structure, lists,
tables and links (absolute http, https, mailto: a relative one would point into the
bridge itself; ``rel="noopener noreferrer nofollow"``). No
``script``/``style`` (their content dropped), no ``img`` (no remote image is ever
fetched: the user is told how many were left out), no ``style``/``class``/event
attributes, no forms or frames. The page's Content-Security-Policy would block scripts,
inline styles and remote images anyway: two locks, not one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email import policy
from email.parser import BytesParser

import nh3
from markupsafe import Markup

TAGS = {
    "a", "abbr", "b", "blockquote", "br", "code", "dd", "del", "div", "dl", "dt", "em",
    "h1", "h2", "h3", "h4", "h5", "h6", "hr", "i", "ins", "li", "ol", "p", "pre", "q",
    "s", "small", "span", "strong", "sub", "sup", "table", "tbody", "td", "tfoot", "th",
    "thead", "tr", "u", "ul",
}  # fmt: skip
ATTRIBUTES = {"a": {"href", "title"}, "td": {"colspan", "rowspan"}, "th": {"colspan", "rowspan"}}
URL_SCHEMES = {"http", "https", "mailto"}
_IMG = re.compile(r"<img\b", re.IGNORECASE)


@dataclass(frozen=True)
class Body:
    html: Markup | None  # sanitized markup, when the message is HTML
    images_left_out: int  # <img> tags dropped from it


def sanitize(source: str) -> Markup:
    """Safe markup from hostile HTML (see the module docstring)."""
    cleaned = nh3.clean(
        source,
        tags=TAGS,
        attributes=ATTRIBUTES,
        url_schemes=URL_SCHEMES,
        link_rel="noopener noreferrer nofollow",
        url_relative="deny",  # a mail has no base: "/messages/1" would be the bridge's
        clean_content_tags={"script", "style"},
        strip_comments=True,
    )
    return Markup(cleaned)  # noqa: S704 - nh3 made it safe


def html_body(raw: bytes) -> Body:
    """The sanitized HTML part of a message that prefers HTML, else ``Body(None, 0)``
    (the page then shows the service's plain text)."""
    try:
        message = BytesParser(policy=policy.default).parsebytes(raw)
        part = message.get_body(preferencelist=("plain", "html"))
        if part is None or part.get_content_type() != "text/html":
            return Body(None, 0)
        source = part.get_content()
    except Exception:  # a broken message: the plain text the service made will do
        return Body(None, 0)
    return Body(sanitize(source), len(_IMG.findall(source)))
