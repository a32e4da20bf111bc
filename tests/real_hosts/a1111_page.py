"""The web UI's page in a browser: its top tabs, its txt2img prompt and extra-networks cards, and our tab in it."""

from __future__ import annotations

import re

from ui_helpers import UiPage


class A1111Page(UiPage):
    """AUTOMATIC1111 1.10's page (gradio 3.41) with the extension's tab in it, driven by elem_id."""

    def open(self) -> A1111Page:
        self.page.goto(self.url, timeout=180_000)
        # The web UI builds its page in the browser; the txt2img prompt is there once it has.
        self.page.wait_for_selector("#txt2img_prompt textarea", timeout=180_000)
        return self

    def top_tab(self, label: str) -> None:
        self.page.locator("#tabs > .tab-nav > button").filter(
            has_text=re.compile(rf"^\s*{re.escape(label)}\s*$")
        ).first.click()

    def open_ours(self) -> None:
        self.top_tab("Textual Inversion")
        self.page.wait_for_selector("#ti_root", state="visible", timeout=30_000)

    def prompt(self) -> str:
        return self.page.locator("#txt2img_prompt textarea").input_value()

    def type_prompt(self, text: str) -> None:
        """Type into txt2img's prompt as a user does (which also makes it the last-focused prompt)."""
        self.top_tab("txt2img")
        box = self.page.locator("#txt2img_prompt textarea")
        box.click()
        box.fill(text)

    def txt2img_settings(self) -> None:
        """Show txt2img's Generation settings (its sampler, steps, size...), not an extra-networks list."""
        self.top_tab("txt2img")
        self.page.locator("#txt2img_extra_tabs > .tab-nav > button").filter(
            has_text=re.compile(r"^\s*Generation\s*$")
        ).first.click()

    def host_card(self, name: str, tabname: str = "txt2img"):
        """The web UI's own Textual Inversion card (extra networks) for `name`, with that list shown."""
        self.top_tab(tabname)
        self.page.locator(f"#{tabname}_extra_tabs > .tab-nav > button").filter(
            has_text=re.compile(r"^\s*Textual Inversion\s*$")
        ).first.click()
        return self.page.locator(f'#{tabname}_textual_inversion_cards_html .card[data-name="{name}"]')

    def wait_outcome(self, elem_id: str, pattern: str, timeout: float = 60) -> str:
        """Like wait_text, but an error status line, or gradio's bare "Error" where a handler raised, ends the
        wait at once; returns the text either way (the caller asserts on it)."""
        import time

        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.text(elem_id) if self.page.locator(f"#{elem_id}").count() else ""
            if re.search(pattern, text) or self.status_kind(elem_id) == "error":
                return text
            if self.page.locator(f"#{elem_id} .error").count():  # gradio 3's status tracker on an exception
                return f"gradio shows: {self.page.locator(f'#{elem_id} .error').first.inner_text()!r}; {text}"
            self.page.wait_for_timeout(500)
        raise AssertionError(f"#{elem_id} never matched {pattern!r} within {timeout:.0f} s; last text: {text!r}")

    def status_kind(self, elem_id: str) -> str | None:
        """ "ok", "error", "info"... of the status line in `elem_id`, or None when there is none."""
        found = self.page.locator(f"#{elem_id} .ti-status").first
        if not found.count():
            return None
        classes = found.get_attribute("class") or ""
        kind = re.search(r"ti-status-(\w+)", classes)
        return kind.group(1) if kind else None
