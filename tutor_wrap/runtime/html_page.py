"""The shell every HTML report shares (the plan's data page, the eval report, compare): self-contained (images
inline), escaped by the caller, and readable on a phone-width window: wide tables scroll inside themselves
instead of widening the page, long words and answers wrap, images shrink to the width.
tests/test_html_pages.py loads each page in headless Chromium and holds this."""

from __future__ import annotations

import base64
import html
from pathlib import Path

CSS = ("body{font-family:sans-serif;max-width:%dpx;margin:2em auto;padding:0 1em}"
       "table{border-collapse:collapse;display:block;overflow-x:auto;max-width:100%%}"
       "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;overflow-wrap:break-word}"
       "pre{white-space:pre-wrap;overflow-wrap:anywhere;margin:0}"
       "img{max-width:100%%;height:auto}")


def page(title: str, body: str, *, width: int = 1400, css: str = "") -> str:
    """A whole document; `title` is plain text (escaped here), `body` and `css` are HTML the caller escaped."""
    return (f'<!doctype html><html><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{CSS % width}{css}</style></head><body>\n"
            f"{body}\n</body></html>\n")


def png_img(png: bytes | Path | None, alt: str) -> str:
    """An inline <img> of a PNG (bytes or a file); empty when there is none."""
    if isinstance(png, Path):
        png = png.read_bytes() if png.is_file() else None
    if not png:
        return ""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
