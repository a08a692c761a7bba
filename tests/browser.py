"""Headless Chromium for tests, driven by Playwright's sync API.

The browser is Debian's Chromium (`apt-get install chromium`), which `.ci/run` installs; Playwright's own browser
downloads are never used. A missing Chromium fails the test with instructions rather than skipping it.

Playwright's sync API refuses to run inside a running asyncio event loop, so tests that use `chromium_page` must be
plain `def test_...()` functions, not `async def` ones (pytest-asyncio's auto mode runs those inside the loop). A server
under test that is itself asyncio-based has to run in another thread or process (see `tests.helpers.Proc`).

    def test_login_form(tmp_path: Path) -> None:
        with chromium_page(tmp_path) as page:
            page.goto(url)
            page.fill("#email", "ada@example.com")
            page.click("button[type=submit]")
            assert page.text_content("#status") == "ok"
            screenshot(page, tmp_path, "after-login")
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from playwright.sync_api import ConsoleMessage, Page, ViewportSize, sync_playwright

CHROMIUM = os.environ.get("KONSTRUCT_CHROMIUM", "/usr/bin/chromium")
"""The Chromium binary to drive: Debian's by default, or the path in `KONSTRUCT_CHROMIUM`."""

CHROMIUM_ARGS = (
    "--no-sandbox",  # the tests run as root, where Chromium's sandbox will not start
    "--disable-dev-shm-usage",  # a container's /dev/shm can be too small; use /tmp instead
    "--disable-gpu",  # no GPU here; software rendering only
)
"""Command-line flags for every launch."""

VIEWPORT: ViewportSize = {"width": 1280, "height": 900}
"""The size of every page, so that screenshots are comparable between runs."""


def chromium_executable() -> str:
    """The Chromium binary to launch; a clear error, with the fix, if it is not installed."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        raise RuntimeError(
            f"Chromium not found at {CHROMIUM}: install it with `apt-get install chromium` (what .ci/run does), "
            "or point KONSTRUCT_CHROMIUM at a Chromium binary"
        )
    return CHROMIUM


@contextmanager
def chromium_page(artifacts: Path) -> Iterator[Page]:
    """A fresh page in a fresh headless Chromium, closed (with the browser) on exit.

    `artifacts` is a directory (created if missing) for what a failed test should leave behind: the page's console
    messages and uncaught errors go to `console.log` there, downloads land there, and `screenshot` writes there.
    """
    executable = chromium_executable()
    artifacts.mkdir(parents=True, exist_ok=True)
    with (
        (artifacts / "console.log").open("a", encoding="utf-8") as console,
        sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(
            executable_path=executable, headless=True, args=list(CHROMIUM_ARGS), downloads_path=artifacts, timeout=30_000
        )
        try:
            context = browser.new_context(viewport=VIEWPORT, ignore_https_errors=False, accept_downloads=True)
            try:
                page = context.new_page()

                def on_console(message: ConsoleMessage) -> None:
                    console.write(f"[{message.type}] {message.text}\n")
                    console.flush()

                def on_page_error(error: Exception) -> None:
                    console.write(f"[pageerror] {error}\n")
                    console.flush()

                page.on("console", on_console)
                page.on("pageerror", on_page_error)
                yield page
            finally:
                context.close()
        finally:
            browser.close()


def screenshot(page: Page, artifacts: Path, name: str) -> Path:
    """Save a full-page PNG of `page` as `<artifacts>/<name>.png` and return its path."""
    artifacts.mkdir(parents=True, exist_ok=True)
    path = artifacts / f"{name}.png"
    page.screenshot(path=path, full_page=True)
    return path
