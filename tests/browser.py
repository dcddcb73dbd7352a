"""A real browser for the HTML reports: Debian's Chromium (`make test` installs it) driven by Playwright, which
talks to the system's Chromium here (its own browser downloads come from a CDN these machines cannot reach)."""

from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Screenshots stay with the test run's artifacts (CI keeps the checkout's folder), one wide and one narrow per page.
SHOTS = REPO / ".test-artifacts" / "html"
WIDE, NARROW = (1280, 900), (375, 740)   # a laptop, a phone


def chromium() -> str:
    found = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    assert found, "no Chromium on PATH: `make test` installs Debian's chromium (apt-get install chromium)"
    return found


def load(page_path: Path, name: str) -> dict:
    """Open `page_path` as a browser does and report what a reader would meet: console errors and uncaught
    exceptions, images that did not decode, and how much wider than the window the page is at each size."""
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    seen: dict = {"errors": [], "broken_images": [], "overflow_px": {}, "shots": []}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium())
        try:
            page = browser.new_page(viewport=dict(zip(("width", "height"), WIDE)))
            page.on("console", lambda m: m.type in ("error", "warning") and seen["errors"].append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: seen["errors"].append(f"exception: {e}"))
            page.on("requestfailed", lambda r: seen["errors"].append(f"request failed: {r.url[:80]}"))
            page.goto(page_path.resolve().as_uri(), wait_until="load")
            seen["images"] = page.evaluate("document.images.length")
            seen["broken_images"] = page.evaluate(
                "Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt)")
            for label, (w, h) in (("wide", WIDE), ("narrow", NARROW)):
                page.set_viewport_size({"width": w, "height": h})
                seen["overflow_px"][label] = page.evaluate(
                    "document.documentElement.scrollWidth - document.documentElement.clientWidth")
                shot = SHOTS / f"{name}-{label}.png"
                page.screenshot(path=str(shot), full_page=True)
                seen["shots"].append(shot)
        finally:
            browser.close()
    return seen
