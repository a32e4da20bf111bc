"""The extension inside the real AUTOMATIC1111 1.10.1 (the host kit: offline, CPU, random full-size SD1.5),
driven as a user would: its install.py on a web UI without diffusers, then the tab in headless Chromium and
the web UI's own API, prompt box and card list.

The tests run in file order and share one web UI (starting it takes a minute, and every training run on the
full-size model loads a 4 GB copy of it), but each one makes what it needs when an earlier one did not run.
Slow: about ten minutes on two CPU cores. `python -m pytest tests/real_hosts` (see conftest.py for the env).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
from a1111_kit import BASELINE_PROMPT, HOST_PACKAGES
from PIL import Image

from bench.host_memory import GIB, measure_run, settled_rss
from ti_core.formats import load_embedding

TOKEN = "zzqq"
TRAIN_BODY = {"data": {"resolution": 64}, "save_every": 0, "preview_every": 0, "preview_steps": 1}
LONG = 1800  # seconds a step of the full-size model may take on a busy two-core machine, loads included


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _ti_hashes(info: dict) -> str:
    return (info.get("extra_generation_params") or {}).get("TI hashes") or ""


def _train_by_route(webui, workspace, facts, name: str, steps: int, **extra) -> dict:
    """A run through POST /ti/v1/train; returns its final snapshot (and records the web UI's RSS after it)."""
    body = {**TRAIN_BODY, "name": name, "steps": steps, **extra}
    body["data"] = {**TRAIN_BODY["data"], "images": str(workspace["data"])}
    figures, snapshot = measure_run(
        webui.url, webui.pid, lambda: webui.call("POST", "/ti/v1/train", body), timeout=LONG
    )
    facts.run_rss.append(figures.rss_after)
    facts.figures.append(f"route run {name} ({steps} steps): {figures.line()}")
    return snapshot


def _ensure_created(webui, workspace, facts) -> Path:
    path = workspace["embeddings"] / f"{TOKEN}.safetensors"
    if not path.exists():
        webui.call("POST", "/ti/v1/create", {"name": TOKEN, "init_text": "tree"}, timeout=LONG)
        facts.created_sha256 = _sha256(path)
    return path


# ---- 0. the fakes against the real source ----------------------------------------------------------------


def test_the_fakes_have_the_shapes_of_the_real_web_uis_apis(kit, monkeypatch):
    """tests/test_hosts.py's check of every host API the extension uses, on this web UI's source."""
    import test_hosts

    monkeypatch.setenv("WEBUI_DIR", str(kit.webui))
    test_hosts.test_real_host_apis_match_the_fakes()


# ---- 1. install.py ------------------------------------------------------------------------------------


def test_install_py_makes_the_extension_work_and_moves_nothing_the_web_ui_pinned(installed):
    first = installed.first
    output = f"stdout:\n{first.stdout}\nstderr:\n{first.stderr}"
    assert first.returncode == 0, output
    assert "diffusers" not in installed.before and "diffusers" in installed.after, output
    assert installed.pip_check_ok, f"pip check after install.py:\n{installed.pip_check}"
    moved = {
        name: (installed.before.get(name), installed.after.get(name))
        for name in HOST_PACKAGES
        if installed.before.get(name) != installed.after.get(name)
    }
    assert not moved, f"install.py changed the web UI's packages (before, after): {moved}"
    works, why = installed.imports
    assert works, f"diffusers {installed.after['diffusers']} was installed but its pipelines do not import: {why}"
    ours = [line for line in first.stdout.splitlines() if line.startswith("[textual-inversion-trainer]")]
    assert ours == [f"[textual-inversion-trainer] installed diffusers {installed.after['diffusers']}"], output


def test_install_py_that_cannot_install_says_so_in_one_line(installed):
    offline = installed.offline
    output = f"stdout:\n{offline.stdout}\nstderr:\n{offline.stderr}"
    assert offline.returncode == 0, output  # else the web UI wraps it in a multi-line error report
    ours = [line for line in offline.stdout.splitlines() if line.startswith("[textual-inversion-trainer]")]
    assert len(ours) == 1 and "Traceback" not in offline.stdout, output
    assert ours[0].startswith("[textual-inversion-trainer] could not install diffusers>=0.28,<0.32 (pip: "), output
    assert "Textual Inversion tab cannot work" in ours[0]


def test_a_second_launch_installs_nothing(installed):
    second = installed.second
    assert second.returncode == 0 and second.stdout == "", second.stdout + second.stderr
    assert installed.after_second == installed.after
    # Nothing ran: no pip, no import check (each takes seconds). A bound, not a speed goal.
    assert second.seconds < 2, f"the second launch's install.py took {second.seconds:.1f} s"


# ---- 2. the tab, Create, and the web UI's own list -------------------------------------------------------


def test_create_in_the_tab_is_loaded_without_a_restart_and_in_the_web_uis_card_list(page, webui, workspace, facts):
    page.open_ours()
    problem = page.page.locator("#ti_problem")
    assert not problem.count(), f"the tab reports a problem: {problem.first.inner_text()}"
    # The web UI's card list as the page loaded it: built before zzqq existed.
    assert not page.host_card(TOKEN).count()
    page.open_ours()
    page.tab("Create")
    page.fill("ti_create_name", TOKEN)
    page.fill("ti_create_init_text", "tree")
    page.click("ti_create_button")
    status = page.wait_outcome("ti_create_status", rf"Created {TOKEN}", timeout=LONG)
    assert f"Created {TOKEN}" in status, status
    path = workspace["embeddings"] / f"{TOKEN}.safetensors"
    facts.created_sha256 = _sha256(path)

    loaded = webui.embeddings()["loaded"]
    assert TOKEN in loaded, f"/sdapi/v1/embeddings does not list {TOKEN} as loaded: {webui.embeddings()}"
    assert loaded[TOKEN]["vectors"] == 1 and loaded[TOKEN]["shape"] == 768

    # Refreshed for the user, as its own Refresh button does: the card shows without a click or a reload.
    page.host_card(TOKEN).wait_for(state="visible", timeout=60_000)
    page.screenshot("a1111-extra-networks-card")


# ---- 3. Train with previews; txt2img names the new file ------------------------------------------------


def test_train_in_the_tab_writes_the_file_previews_and_loss_plot(page, webui, workspace, facts):
    path = _ensure_created(webui, workspace, facts)
    # The previews take txt2img's settings as typed there (nothing saved): a two-line prompt is one prompt.
    page.type_prompt(f"a photo of {TOKEN}\nin a park")
    page.txt2img_settings()
    page.fill("txt2img_steps", 2)
    before = len(page.errors)
    for side in ("txt2img_width", "txt2img_height"):
        page.fill(side, 64)
    # A1111's own hires-fix handler (its upscaled-resolution line) throws in the page on every width or height
    # change, with or without this extension: those two, and only those, are not ours.
    host_errors = page.errors[before:]
    assert set(host_errors) <= {"Cannot read properties of undefined (reading 'props')"}, host_errors
    del page.errors[before:]
    page.open_ours()
    page.tab("Train")
    page.click("ti_train_refresh")
    page.choose("ti_train_embedding", TOKEN)
    page.fill("ti_train_dataset", workspace["data"])
    page.fill("ti_train_steps", 4)
    page.fill("ti_train_resolution", 64)
    page.fill("ti_train_save_every", 0)
    page.fill("ti_train_preview_every", 2)
    page.fill("ti_train_preview_seed", 77)
    page.check("ti_train_preview_txt2img")
    assert page.dropdown_value("ti_train_embedding") == TOKEN

    figures, snapshot = measure_run(webui.url, webui.pid, lambda: page.click("ti_train_button"), timeout=LONG)
    facts.run_rss.append(figures.rss_after)
    facts.figures.append(f"tab run ({TOKEN}, 4 steps, 2 previews): {figures.line()}")
    assert snapshot["stopped"] == "done", snapshot.get("message")
    status = page.wait_outcome("ti_train_status", rf"Trained {TOKEN} to step 4", timeout=120)
    assert f"Trained {TOKEN} to step 4" in status, status

    assert load_embedding(path).step == 4
    previews = [Path(preview) for preview in snapshot["previews"]]
    assert len(previews) >= 2 and all(preview.is_file() for preview in previews), snapshot["previews"]
    page.page.wait_for_function(
        "() => document.querySelectorAll('#ti_train_previews img').length >= 2", timeout=60_000
    )
    assert len(snapshot["losses"]) == 4
    saved = json.loads((Path(snapshot["log_folder"]) / "settings.json").read_text(encoding="utf-8"))
    # txt2img's own defaults for the rest: DPM++ 2M with the Automatic schedule (Karras), CFG 7, seed -1
    # (random: the field's seed stays, so previews compare step to step).
    taken = {key: saved[key] for key in ("preview_prompt", "preview_sampler", "preview_steps", "preview_seed")}
    assert taken == {
        "preview_prompt": f"a photo of {TOKEN} in a park",
        "preview_sampler": "dpm++_2m_karras",
        "preview_steps": 2,
        "preview_seed": 77,
    }, saved
    assert (saved["preview_guidance"], saved["preview_width"], saved["preview_height"]) == (7.0, 64, 64), saved
    # gradio's LinePlot draws on a canvas (gradio 3.41, the web UI's) or as SVG (newer gradio).
    page.page.locator("#ti_train_loss_plot .marks").first.wait_for(timeout=60_000)  # Vega's drawing
    page.screenshot("a1111-train-finished")
    page.check("ti_train_preview_txt2img", False)  # the later runs use the tab's own preview fields

    trained = _sha256(path)
    assert trained != facts.created_sha256
    info, _ = webui.txt2img(f"a photo of {TOKEN} in a park")
    assert f"{TOKEN}: {trained[:12]}" in _ti_hashes(info), f"TI hashes: {_ti_hashes(info)!r}, file {trained[:12]}"


# ---- 4. a card click writes into txt2img's prompt --------------------------------------------------------


def test_card_click_puts_the_token_into_the_txt2img_prompt_and_a_second_removes_it(page, webui, workspace, facts):
    _ensure_created(webui, workspace, facts)
    page.type_prompt("a photo of")
    page.open_ours()
    page.tab("Embeddings")
    card = page.page.locator(f'#ti_embeddings_list .ti-card[data-ti-name="{TOKEN}"]')
    card.wait_for(timeout=60_000)
    card.click()
    page.wait_text("ti_embeddings_insert_status", rf"Added {TOKEN} to the txt2img prompt")
    assert page.prompt() == f"a photo of {TOKEN}"
    card.click()
    page.wait_text("ti_embeddings_insert_status", rf"Removed {TOKEN}")
    assert page.prompt() == "a photo of"


# ---- 5. interrupts, and the web UI's model afterwards ----------------------------------------------------


def _step_now(webui) -> int:
    return int(webui.progress().get("step") or 0)


def _wait_step(webui, at_least: int, timeout: float = LONG) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snapshot = webui.progress()
        if snapshot.get("running") and int(snapshot.get("step") or 0) >= at_least:
            return int(snapshot["step"])
        if not snapshot.get("running") and snapshot.get("stopped") in ("error", "nan"):
            pytest.fail(f"the run failed: {snapshot.get('message')}")
        time.sleep(0.2)
    pytest.fail(f"the run did not reach step {at_least} within {timeout:.0f} s: {webui.progress()}")


def test_interrupt_from_the_tab_stops_within_a_step_and_saves(page, webui, workspace, facts):
    path = _ensure_created(webui, workspace, facts)
    before = load_embedding(path).step
    page.open_ours()
    page.tab("Train")
    page.fill("ti_train_dataset", workspace["data"])
    page.fill("ti_train_resolution", 64)
    page.fill("ti_train_preview_every", 0)
    page.fill("ti_train_steps", before + 500)
    started = time.time()
    page.click("ti_train_resume" if before else "ti_train_button")
    _wait_step(webui, before + 1)
    seen = _step_now(webui)
    page.click("ti_train_interrupt")
    snapshot = webui.wait_run(started, timeout=LONG)
    facts.run_rss.append(settled_rss(webui.pid))
    assert snapshot["stopped"] == "interrupted", snapshot.get("message")
    assert seen <= snapshot["step"] <= seen + 1, f"asked to stop at step {seen}, stopped at {snapshot['step']}"
    assert load_embedding(path).step == snapshot["step"]
    page.wait_text("ti_train_status", rf"interrupted at step {snapshot['step']}", timeout=60)


def test_interrupt_from_the_web_ui_api_stops_within_a_step_and_saves(webui, workspace, facts):
    path = _ensure_created(webui, workspace, facts)
    before = load_embedding(path).step
    body = {**TRAIN_BODY, "name": TOKEN, "resume": True, "steps": before + 500}
    body["data"] = {**TRAIN_BODY["data"], "images": str(workspace["data"])}
    started = time.time()
    webui.call("POST", "/ti/v1/train", body)
    _wait_step(webui, before + 1)
    seen = _step_now(webui)
    webui.call("POST", "/sdapi/v1/interrupt")  # what the web UI's own Interrupt button calls
    snapshot = webui.wait_run(started, timeout=LONG)
    facts.run_rss.append(settled_rss(webui.pid))
    assert snapshot["stopped"] == "interrupted", snapshot.get("message")
    assert seen <= snapshot["step"] <= seen + 1, f"asked to stop at step {seen}, stopped at {snapshot['step']}"
    assert load_embedding(path).step == snapshot["step"]


def test_after_the_runs_the_web_uis_model_gives_the_same_image(webui, facts):
    assert facts.baseline is not None
    webui.txt2img("a different prompt, so the web UI's conditioning cache holds nothing of the baseline")
    info, pixels = webui.txt2img(BASELINE_PROMPT)
    baseline_info, baseline_pixels = facts.baseline
    assert info["sd_model_hash"] == baseline_info["sd_model_hash"]
    assert pixels == baseline_pixels, "txt2img with the same prompt and seed gives another image after training"


def test_a_training_run_leaves_the_web_uis_model_bitwise_unchanged(webui, workspace, facts):
    before = webui.call("GET", "/ti-test/v1/weights-digest", timeout=LONG)
    assert "sha256" in before, before
    snapshot = _train_by_route(webui, workspace, facts, "zzdigest", 2, init_text="stone", overwrite=True)
    assert snapshot["stopped"] == "done", snapshot.get("message")
    after = webui.call("GET", "/ti-test/v1/weights-digest", timeout=LONG)
    facts.figures.append(
        f"weights digest: {before['tensors']} tensors, {before['bytes'] / GIB:.2f} GiB, {before['seconds']} s"
    )
    assert (after["sha256"], after["tensors"]) == (before["sha256"], before["tensors"]), "the web UI's weights changed"


# ---- 6. memory across runs ------------------------------------------------------------------------------


def test_the_web_uis_memory_does_not_grow_from_run_to_run(webui, workspace, facts):
    while len(facts.run_rss) < 3:
        _train_by_route(webui, workspace, facts, "zzmemory", 2, init_text="stone", overwrite=True)
    first, third = facts.run_rss[0], facts.run_rss[2]
    facts.figures.append("RSS after each run: " + ", ".join(f"{rss / GIB:.2f}" for rss in facts.run_rss) + " GiB")
    assert third - first <= 0.5 * 10**9, (
        f"the web UI's RSS grew from {first / GIB:.2f} GiB after the first run to {third / GIB:.2f} GiB after the third"
    )


# ---- 7. the tiny checkpoint with its .yaml ---------------------------------------------------------------


def test_the_tiny_checkpoint_with_its_yaml_creates_and_trains(kit, webui, workspace, facts):
    models = webui.call("GET", "/sdapi/v1/sd-models")
    titles = {Path(model["filename"]).name: model["title"] for model in models}
    assert kit.tiny_checkpoint.name in titles, titles
    webui.call("POST", "/sdapi/v1/options", {"sd_model_checkpoint": titles[kit.tiny_checkpoint.name]}, timeout=LONG)
    try:
        state = webui.call("GET", "/ti-test/v1/state")
        assert Path(state["filename"]) == kit.tiny_checkpoint, state
        created = webui.call("POST", "/ti/v1/create", {"name": "zztiny", "init_text": "tree"}, timeout=LONG)
        path = Path(created["path"])
        assert path.is_file() and "zztiny" in webui.embeddings()["loaded"]
        # Set to sample with zero terminal SNR, the web UI's model trains on that schedule; the previews
        # take their full settings through the route (two prompts side by side, Euler a, a negative
        # embedding's rows without and with it).
        webui.call("POST", "/sdapi/v1/options", {"sd_noise_schedule": "Zero Terminal SNR"}, timeout=LONG)
        previews = {"preview_every": 2, "preview_prompt": "a tree\na house", "preview_sampler": "euler_a",
                    "negative_embedding": True, "preview_width": 64, "preview_height": 64}  # fmt: skip
        snapshot = _train_by_route(webui, workspace, facts, "zztiny", 2, resume=True, **previews)
        assert snapshot["stopped"] == "done", snapshot.get("message")
        assert load_embedding(path).step == 2
        settings = json.loads((Path(snapshot["log_folder"]) / "settings.json").read_text())
        assert settings["model"]["zero_terminal_snr"] is True and settings["preview_sampler"] == "euler_a"
        with Image.open(snapshot["previews"][-1]) as preview:
            assert preview.height == 2 * 64 and preview.width > 2 * 64  # two rows of two prompts, labelled
        info, _ = webui.txt2img("zztiny in the snow")
        assert f"zztiny: {_sha256(path)[:12]}" in _ti_hashes(info), _ti_hashes(info)
    finally:
        webui.call("POST", "/sdapi/v1/options", {"sd_noise_schedule": "Default"}, timeout=LONG)
        titles_full = titles[kit.full_checkpoint.name]
        webui.call("POST", "/sdapi/v1/options", {"sd_model_checkpoint": titles_full}, timeout=LONG)


def test_no_script_errors_in_the_page(page):
    assert not page.errors, f"errors in the web UI's page: {page.errors}"
