"""Draws docs/parts.svg, the picture of the parts in README.md: `python3 docs/parts.py`.

Plain Python, no drawing library: the layout is a handful of boxes and arrows whose
coordinates are written below, so a change is a one-line edit and a re-run (the test
suite checks that the committed SVG is what this script draws).
"""

from __future__ import annotations

import sys
from html import escape
from pathlib import Path

WIDTH, HEIGHT = 1000, 470
FONT = "font-family='DejaVu Sans, Helvetica, Arial, sans-serif'"


def zone(x: int, y: int, w: int, h: int, title: str, fill: str) -> str:
    return (
        f"<rect x='{x}' y='{y}' width='{w}' height='{h}' rx='14' fill='{fill}' "
        f"stroke='#8a8f98' stroke-dasharray='6 4'/>\n"
        f"<text x='{x + 14}' y='{y + 24}' {FONT} font-size='15' font-weight='bold' "
        f"fill='#4a4f58'>{escape(title)}</text>"
    )


def box(x: int, y: int, w: int, h: int, lines: list[str], fill: str = "#ffffff") -> str:
    parts = [
        f"<rect x='{x}' y='{y}' width='{w}' height='{h}' rx='8' fill='{fill}' "
        f"stroke='#30353d' stroke-width='1.5'/>"
    ]
    top = y + h / 2 - (len(lines) - 1) * 8.5 + 5
    for n, line in enumerate(lines):
        weight = "bold" if n == 0 else "normal"
        size = 14 if n == 0 else 12
        parts.append(
            f"<text x='{x + w / 2:.0f}' y='{top + n * 17:.0f}' {FONT} font-size='{size}' "
            f"font-weight='{weight}' text-anchor='middle' fill='#1d2128'>{escape(line)}</text>"
        )
    return "\n".join(parts)


def arrow(
    points: list[tuple[int, int]],
    text: str = "",
    at: tuple[int, int] = (0, 0),
    anchor: str = "middle",
    color: str = "#30353d",
) -> str:
    """A line through ``points`` ending in an arrow head, with ``text`` at ``at``."""
    path = " ".join(f"{x},{y}" for x, y in points)
    line = (
        f"<polyline points='{path}' fill='none' stroke='{color}' stroke-width='1.8' "
        "marker-end='url(#head)'/>"
    )
    if not text:
        return line
    return (
        f"{line}\n<text x='{at[0]}' y='{at[1]}' {FONT} font-size='12' text-anchor='{anchor}' "
        f"fill='{color}'>{escape(text)}</text>"
    )


def label(x: int, y: int, text: str, color: str = "#30353d") -> str:
    """Centred text on a white ground, for labels that cross the firewall."""
    width = len(text) * 6.7 + 10
    return (
        f"<rect x='{x - width / 2:.0f}' y='{y - 13}' width='{width:.0f}' height='18' rx='4' "
        f"fill='#ffffff' stroke='{color}' stroke-width='0.6'/>\n"
        f"<text x='{x}' y='{y}' {FONT} font-size='12' text-anchor='middle' "
        f"fill='{color}'>{escape(text)}</text>"
    )


def draw() -> str:
    items = [
        zone(20, 20, 460, 380, "corporate network", "#eef3fb"),
        zone(540, 20, 440, 380, "internet", "#f4f6ee"),
        # the firewall: nothing connects in, except mail
        "<rect x='496' y='12' width='28' height='446' fill='#c8553d' opacity='0.85'/>",
        f"<text x='510' y='100' {FONT} font-size='13' font-weight='bold' fill='#ffffff' "
        "text-anchor='middle' transform='rotate(-90 510 100)'>firewall: outbound only</text>",
        box(40, 60, 230, 72, ["Corporate IMAP server", "INBOX · Trash · Sent · Outbox"]),
        box(40, 300, 230, 72, ["Corporate SMTP server", "MX of corp.example"]),
        box(
            300,
            170,
            160,
            110,
            ["Agent", "imapsync-bridge", "agent run (systemd)", "state: SQLite"],
            fill="#dde8f8",
        ),  # fmt: skip
        box(
            580,
            130,
            210,
            176,
            [
                "Hosted server",
                "server run (systemd)",
                "sync :4465",
                "SMTP in :25",
                "submission :587",
                "web page + API :8443",
                "phone mailbox: SQLite",
            ],
            fill="#e6efd8",
        ),  # fmt: skip
        box(830, 50, 135, 70, ["Phone", "browser · mail app"]),
        box(830, 185, 135, 60, ["Anyone", "mail to the phone"]),
        box(830, 320, 135, 60, ["SMTP relay", "[relay]"]),
        # the agent dials out to everything it talks to
        arrow([(300, 195), (270, 112)], "IMAP over TLS: sync, IDLE", (292, 142), anchor="start"),
        arrow([(300, 258), (270, 328)], "SMTP: via-desktop mail", (292, 306), anchor="start"),
        arrow([(460, 222), (580, 222)]),
        label(520, 207, "TLS 1.3, mutual"),
        label(520, 248, "sync + push link"),
        arrow([(830, 95), (790, 150)], "HTTPS, SMTP submission", (805, 100), anchor="end"),
        arrow([(830, 215), (790, 215)], "SMTP", (810, 205)),
        arrow([(790, 290), (830, 340)], "send now,", (760, 335), anchor="middle"),
        f"<text x='760' y='350' {FONT} font-size='12' text-anchor='middle' fill='#30353d'>"
        "trigger mail</text>",
        arrow([(897, 380), (897, 430), (155, 430), (155, 372)], color="#8a3a28"),
        label(
            520,
            452,
            "mail to corp.example: the trigger mail with the sync phrase (mail is the only way in)",
            color="#8a3a28",
        ),  # fmt: skip
        arrow([(155, 300), (155, 132)], "delivers", (165, 220), anchor="start"),
    ]
    defs = (
        "<defs><marker id='head' viewBox='0 0 10 10' refX='9' refY='5' markerWidth='7' "
        "markerHeight='7' orient='auto-start-reverse'><path d='M0,0 L10,5 L0,10 z' "
        "fill='context-stroke'/></marker></defs>"
    )
    body = "\n".join(items)
    return (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{WIDTH}' height='{HEIGHT}' "
        f"viewBox='0 0 {WIDTH} {HEIGHT}'>\n<title>imapsync-bridge: the parts</title>\n"
        f"{defs}\n<rect width='100%' height='100%' fill='#ffffff'/>\n{body}\n</svg>\n"
    )


def main() -> int:
    target = Path(__file__).with_name("parts.svg")
    target.write_text(draw(), encoding="utf-8")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
