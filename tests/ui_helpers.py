"""Helpers for the browser tests: skip-or-fail rules, a tiny dataset, and gradio-version-neutral page actions.

The same tests drive gradio 3.41 and the newest, whose DOMs differ: tabs are plain buttons on 3 and
role=tab buttons on 4+, tab contents are rendered lazily on 6, dropdowns have different option lists. The
page actions below hide that, and use only elem_ids (the public contract) to find things.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def ui_required() -> bool:
    """In CI's UI venvs TI_REQUIRE_UI=1: a missing gradio, playwright or browser is a failure, not a skip."""
    return os.environ.get("TI_REQUIRE_UI") == "1"


def require_module(name: str):
    if ui_required():
        return importlib.import_module(name)
    return pytest.importorskip(name)


def require_chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if ui_required():
            pytest.fail("TI_REQUIRE_UI=1 but no chromium on PATH (apt-get install chromium)")
        pytest.skip("no chromium on PATH")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_app(demo, timeout: float = 5.0) -> None:
    """Close a launched app. gradio 3's close() waits for every open connection, and its `every=` poller
    keeps one open after the page is gone: give it a few seconds, then leave the daemon thread behind."""
    closer = threading.Thread(target=demo.close, daemon=True)
    closer.start()
    closer.join(timeout)


def make_dataset(folder: Path, count: int = 4) -> Path:
    """Small coloured images with caption files, plus one broken file the scan must report as skipped."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    colours = ["red", "green", "blue", "orange", "purple", "teal"]
    for index in range(count):
        colour = colours[index % len(colours)]
        image = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(image).ellipse((6 + index * 3, 8, 58, 58), fill=colour)
        image.save(folder / f"{index:02d}.png")
        (folder / f"{index:02d}.txt").write_text(f"a {colour} circle", encoding="utf-8")
    (folder / "broken.png").write_bytes(b"this is not a png")
    return folder


def launch_browser(playwright, executable: str):
    return playwright.chromium.launch(executable_path=executable, headless=True, args=BROWSER_ARGS)


@contextlib.contextmanager
def chromium_browser():
    """Headless Debian chromium through playwright, for a fixture's lifetime (skips or fails as required)."""
    executable = require_chromium()
    sync_api = require_module("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = launch_browser(playwright, executable)
        yield browser
        browser.close()


# Every URL that is not this machine's (nor an inline data: URL). A pattern, not a function: Playwright matches a
# pattern in the browser's driver, so requests to the app are never routed. A function, or "**/*", sends every
# request to this Python process and holds it until the test next calls into Playwright: a test that waits in
# time.sleep or urllib after a click (bench.host_memory.measure_run) would hold the click's own request.
OFF_MACHINE = re.compile(r"^(?!(https?|wss?)://(127\.\d+\.\d+\.\d+|localhost|\[::1\])(:\d+)?/)(?!data:)")


def loopback_only(page) -> None:
    """Abort any request that would leave this machine (gradio 3 themes ask Google for fonts)."""
    page.route(OFF_MACHINE, lambda route: route.abort())


def _option_text(text: str) -> str:
    """A dropdown choice's text without the tick gradio puts before the selected one."""
    return text.replace("✓", "").strip()


class UiPage:
    """A page of the app, driven by elem_id."""

    def __init__(self, page, url: str) -> None:
        self.page = page
        self.url = url
        self.errors: list[str] = []
        page.on("pageerror", lambda error: self.errors.append(str(error)))

    def open(self) -> UiPage:
        self.page.goto(self.url)
        self.page.wait_for_selector("#ti_root", timeout=30_000)
        return self

    def tab(self, label: str) -> None:
        self.page.wait_for_selector("#ti_tabs [role=tab], #ti_tabs .tab-nav button", timeout=30_000)
        tabs = self.page.locator("#ti_tabs [role=tab]")
        if tabs.count() == 0:  # gradio 3: plain buttons in .tab-nav
            tabs = self.page.locator("#ti_tabs .tab-nav button")
        tabs.filter(has_text=re.compile(rf"^\s*{re.escape(label)}\s*$")).first.click()

    def field(self, elem_id: str):
        """The text/number input of a Textbox, Number or Slider."""
        return self.page.locator(f"#{elem_id}").locator("textarea, input[type=number], input[type=text]").first

    def fill(self, elem_id: str, value) -> None:
        field = self.field(elem_id)
        field.fill(str(value))
        if field.evaluate("element => element.tagName") == "INPUT":
            field.press("Tab")  # numbers and sliders commit on change; text boxes already did on input

    def check(self, elem_id: str, on: bool = True) -> None:
        box = self.page.locator(f"#{elem_id} input[type=checkbox]")
        if box.is_checked() != on:
            box.click()

    def element(self, elem_id: str):
        # gradio 3 puts an HTML component's elem_id on both its wrapper and its content: take the outer one.
        return self.page.locator(f"#{elem_id}").first

    def click(self, elem_id: str) -> None:
        self.element(elem_id).click()

    def text(self, elem_id: str) -> str:
        return self.element(elem_id).inner_text()

    def value(self, elem_id: str) -> str:
        return self.field(elem_id).input_value()

    def wait_text(self, elem_id: str, pattern: str, timeout: float = 60) -> str:
        """Wait until the element's text matches `pattern` (a regex); returns the text."""
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.text(elem_id) if self.page.locator(f"#{elem_id}").count() else ""
            if re.search(pattern, text):
                return text
            self.page.wait_for_timeout(200)
        raise AssertionError(f"#{elem_id} never matched {pattern!r}; last text: {text!r}")

    def wait_value(self, elem_id: str, pattern: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        value = ""
        while time.monotonic() < deadline:
            value = self.value(elem_id)
            if re.search(pattern, value):
                return value
            self.page.wait_for_timeout(200)
        raise AssertionError(f"#{elem_id} value never matched {pattern!r}; last value: {value!r}")

    def dropdown_value(self, elem_id: str) -> str:
        return self.page.locator(f"#{elem_id} input").first.input_value()

    def dropdown_options(self, elem_id: str) -> list[str]:
        """The choices a person sees on opening the dropdown (it is closed again after)."""
        field = self.page.locator(f"#{elem_id} input").first
        field.click()
        options = self.page.locator(f"#{elem_id} li")
        options.first.wait_for(timeout=10_000)
        texts = [_option_text(text) for text in options.all_inner_texts()]
        self.page.keyboard.press("Escape")
        field.blur()  # a dropdown opens on focus: a later click on a still-focused one would not open it
        return texts

    def choose(self, elem_id: str, option: str, timeout: float = 30) -> None:
        """Pick `option` in a dropdown as a person does (open it, click the choice) and wait until the
        dropdown shows it: a typed filter plus Enter can land on another choice while the list re-renders."""
        deadline = time.monotonic() + timeout
        field = self.page.locator(f"#{elem_id} input").first
        while self.dropdown_value(elem_id) != option:
            assert time.monotonic() < deadline, f"#{elem_id} never took {option!r}"
            field.click()
            choice = self.page.locator(f"#{elem_id} li").filter(has_text=option)
            exact = [i for i, text in enumerate(choice.all_inner_texts()) if _option_text(text) == option]
            if exact:
                choice.nth(exact[0]).click()
            else:
                self.page.keyboard.press("Escape")
            field.blur()
            self.page.wait_for_timeout(300)

    def plot_tooltip(self, elem_id: str, timeout: float = 30) -> str:
        """Hover over a gradio plot (Vega draws it on a canvas on gradio 3, as SVG on 4+) until the tooltip
        shows a point's values; returns the tooltip's text."""
        plot = self.page.locator(f"#{elem_id}").first
        drawing = plot.locator(".marks").first  # Vega's drawing, whichever renderer
        drawing.wait_for(timeout=timeout * 1000)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            box = drawing.bounding_box()
            for x in (0.2, 0.4, 0.6, 0.8):
                for y in range(2, 40):
                    self.page.mouse.move(box["x"] + box["width"] * x, box["y"] + box["height"] * y / 40)
                    tooltip = self.page.locator("#vg-tooltip-element")
                    if tooltip.count() and tooltip.is_visible() and tooltip.inner_text().strip():
                        return tooltip.inner_text()
            self.page.wait_for_timeout(500)
        raise AssertionError(f"no tooltip over #{elem_id}")

    def screenshot(self, name: str, full_page: bool = True) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        return path


@contextlib.contextmanager
def served_page(browser, blocks) -> Iterator[UiPage]:
    """`blocks` (a page built as a web UI builds its own) served on a free local port, and a page of it in a
    browser context of its own that reaches nothing off this machine; the server stops after."""
    port = free_port()
    blocks.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        loopback_only(page)
        yield UiPage(page, f"http://127.0.0.1:{port}/")
        context.close()
    finally:
        stop_app(blocks)
