"""Fixtures for tests against the real AUTOMATIC1111 web UI: one build, one install, one server for the A1111 module (stopped when it ends, before
the next web UI starts: two full-size web UIs do not fit beside the suite).

Skipped, saying why, when the host kit is not there; under TI_REQUIRE_A1111=1 (CI) that is a failure.
Env: TI_A1111_KIT (the kit; default ../shared/hosts/a1111 beside the repository), TI_A1111_DEST (the built
web UI, kept between runs; default a folder in the temp dir named by the kit's hash), TI_A1111_PORT
(default: a free port).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from a1111_kit import BASELINE_PROMPT, DEST_ENV, PORT_ENV, InstallRun, Kit, Server, default_dest, kit_folder, required
from ui_helpers import chromium_browser, free_port, loopback_only, make_dataset


@dataclass
class Installed:
    """What install.py did to a web UI that had no diffusers, and what a second launch did."""

    before: dict[str, str]
    offline: InstallRun  # with no package index reachable
    first: InstallRun
    after: dict[str, str]
    pip_check: str
    pip_check_ok: bool
    imports: tuple[bool, str]
    second: InstallRun
    after_second: dict[str, str]


@dataclass
class Facts:
    """What one test leaves for a later one (each test can also make what it needs itself)."""

    baseline: tuple[dict, bytes] | None = None  # txt2img before any training
    created_sha256: str | None = None
    run_rss: list[int] = field(default_factory=list)  # the web UI's settled RSS after each training run
    figures: list[str] = field(default_factory=list)  # printed at the end, for bench/RESULTS.md


def _report(config, line: str) -> None:
    """A line on the terminal now, whatever pytest is capturing (the figures are worth seeing in CI's log)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        if reporter is not None:
            reporter.write_line(f"[a1111] {line}")
        else:
            print(f"[a1111] {line}", flush=True)


@pytest.fixture(scope="module")
def kit(request) -> Kit:
    folder = kit_folder()
    if not (folder / "setup.sh").is_file():
        why = f"the a1111 host kit is not at {folder} (put ../shared beside the checkout, or set TI_A1111_KIT)"
        if required():
            pytest.fail(f"TI_REQUIRE_A1111=1, but {why}")
        pytest.skip(why)
    built = Kit(folder, Path(os.environ.get(DEST_ENV) or default_dest(folder)))
    started = time.monotonic()
    done = built.build()
    _report(
        request.config, f"web UI in {built.dest}: {', '.join(done) or 'reused'} ({time.monotonic() - started:.0f} s)"
    )
    return built


@pytest.fixture(scope="module")
def installed(kit, request) -> Installed:
    """The extension from this working tree in the web UI's extensions/, and its install.py run there as the
    web UI runs it at launch, on the web UI as users get it (without diffusers), then once more."""
    kit.install_extension()
    if kit.has("diffusers"):  # the kit carries it for make_checkpoint.py; a user's A1111 1.10 has none
        kit.pip("uninstall", "-y", "diffusers")
    before = kit.versions()
    with tempfile.TemporaryDirectory() as nothing:
        offline = kit.run_installer(PIP_NO_INDEX="1", PIP_FIND_LINKS=nothing)
    first = kit.run_installer()
    after = kit.versions()
    check = kit.pip("check")
    imports = kit.python_ok("from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline")
    second = kit.run_installer()
    _report(request.config, f"install.py: first launch {first.seconds:.1f} s, second {second.seconds:.2f} s")
    return Installed(
        before,
        offline,
        first,
        after,
        check.stdout + check.stderr,
        check.returncode == 0,
        imports,
        second,
        kit.versions(),
    )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("a1111")
    return {"embeddings": root / "embeddings", "data": make_dataset(root / "data"), "root": root}


@pytest.fixture(scope="module")
def facts() -> Facts:
    return Facts()


@pytest.fixture(scope="module")
def webui(kit, installed, workspace, facts, request) -> Server:
    """The web UI on the full-size random SD1.5 checkpoint (the tiny one selectable), with the extension."""
    workspace["embeddings"].mkdir(parents=True, exist_ok=True)
    port = int(os.environ.get(PORT_ENV) or free_port())
    started = time.monotonic()
    for line in kit.make_full_checkpoint():
        _report(request.config, line)
    server = kit.start(port, workspace["embeddings"])
    try:
        state = server.wait_ready()
        assert state["pid"] == server.pid, (state, server.pid)  # server.pid is the web UI's Python itself
        _report(
            request.config,
            f"web UI up with its model in {time.monotonic() - started:.0f} s, RSS {state['VmRSS'] / 2**30:.2f} GiB",
        )
        facts.baseline = server.txt2img(BASELINE_PROMPT)  # before any training touched the process
        yield server
    finally:
        if not server.alive():
            _report(request.config, f"the web UI had exited; its log ends:\n{server.log_tail()}")
        kit.stop()
        for line in facts.figures:
            _report(request.config, line)


@pytest.fixture(scope="module")
def browser():
    """Chromium for one module, closed with it: playwright's sync API runs an event loop on this thread while a
    browser is open, and the browser tests of later modules start their own. Fixtures and tests ask for their
    web UI before the browser, so a missing kit skips before any browser exists."""
    with chromium_browser() as browser:
        yield browser


@pytest.fixture(scope="module")
def page(webui, browser):
    """One browser tab on the web UI for the module (its page takes a while to build)."""
    from a1111_page import A1111Page

    context = browser.new_context(viewport={"width": 1500, "height": 1100})
    tab = context.new_page()
    loopback_only(tab)
    yield A1111Page(tab, webui.url + "/").open()
    context.close()
