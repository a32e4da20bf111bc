"""The extension inside fake A1111, reForge, Forge and SD.Next web UIs (tests/fake_hosts.py).

Covers: telling the hosts apart, the entry script's registrations, reloading each host's embeddings
after a file is written, the training context restoring the host's model and job state (success,
error, interrupt), and the HTTP handlers (through FastAPI's TestClient where fastapi and httpx exist).
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
import types
from pathlib import Path

import fake_hosts  # tests/ is on sys.path (pytest puts a conftest folder there)
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "textual_inversion_trainer.py"
EXPECTED_KIND = {"a1111": "a1111", "reforge": "a1111", "forge": "forge", "sdnext": "sdnext"}
EXPECTED_RELOADS = {
    "a1111": [("sd_hijack.model_hijack.embedding_db", {"force_reload": True})],
    "reforge": [("sd_hijack.model_hijack.embedding_db", {"force_reload": True})],
    "forge": [
        ("engine_g", {}),
        ("engine_l", {}),
        ("extra_networks_page", {"force_reload": True, "sync_with_sd_model": False}),
    ],
    "sdnext": [("sd_model.embedding_db", {"force_reload": True})],
}
HAS_GRADIO = importlib.util.find_spec("gradio") is not None
UI_MODULES = ("extension", "ti_extension", "ti_host.backend", "ti_trainer_entry_script")


@pytest.fixture
def ui_modules(monkeypatch):
    """`extension` (and what imports it) importable: the real gradio if installed, else a stub, after
    which the modules imported against the stub are dropped again."""
    if not HAS_GRADIO:
        monkeypatch.setitem(sys.modules, "gradio", fake_hosts.gradio_stub())
    before = {name: sys.modules.get(name) for name in UI_MODULES}
    yield
    if not HAS_GRADIO:
        for name, module in before.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


@pytest.fixture(params=fake_hosts.KINDS)
def kind(request) -> str:
    return request.param


@pytest.fixture
def host(monkeypatch, tmp_path, kind, tiny_model_dirs):
    """A fake web UI whose checkpoint is the tiny SD1 model (a diffusers folder)."""
    return fake_hosts.install(monkeypatch, kind, tiny_model_dirs["sd1"], tmp_path)


@pytest.fixture
def backend(host, ui_modules, monkeypatch, tiny_models, tiny_model_dirs):
    """The host backend, loading the host's checkpoint from the session's already-loaded tiny model (the
    real loading path is tested once, in test_current_model_loads_the_host_checkpoint)."""
    import ti_core.models
    from ti_host.backend import HostBackend

    real = ti_core.models.load_model

    def cached(source, **kwargs):
        return tiny_models["sd1"] if Path(source) == tiny_model_dirs["sd1"] and not kwargs else real(source, **kwargs)

    monkeypatch.setattr(ti_core.models, "load_model", cached)
    return HostBackend()


def _no_running_job():
    from ti_core import jobs

    job = jobs.current_job()
    if job is not None:
        job.cancel()
        assert job.wait(30)


# ---- detection and folders ---------------------------------------------------------------------------


def test_detects_each_host(host, kind):
    from ti_host.host import Host

    assert Host().kind() == EXPECTED_KIND[kind]
    assert (
        Host().label() == {"a1111": "AUTOMATIC1111", "reforge": "reForge", "forge": "Forge", "sdnext": "SD.Next"}[kind]
    )


def test_detects_each_host_with_no_model_loaded(monkeypatch, tmp_path, kind):
    fake_hosts.install(monkeypatch, kind, None, tmp_path)
    from ti_host.host import Host

    assert Host().kind() == EXPECTED_KIND[kind]
    assert Host().checkpoint_path() is None


def test_nothing_the_tab_asks_loads_the_host_model(monkeypatch, tmp_path, tiny_model_dirs, ui_modules):
    """While A1111 starts, a checkpoint is selected but not loaded, and `shared.sd_model` would load it."""
    host = fake_hosts.install(monkeypatch, "a1111", tiny_model_dirs["sd1"], tmp_path, loaded=False)
    from ti_host.backend import HostBackend
    from ti_host.host import Host

    backend = HostBackend()
    assert Host().kind() == "a1111" and Host().checkpoint_path() == tiny_model_dirs["sd1"]
    assert backend.model_label().startswith("sd1 [0123456789]") and backend.loaded_model() is None
    backend.problem()
    backend.reload_embeddings()
    assert "load_model" not in host.record.names()
    assert host.shared.sd_model is not None and "load_model" in host.record.names()  # the fake does load


def test_a1111s_templates_folder_is_offered(host, kind):
    from ti_host.host import Host

    folder = Host().templates_dir()
    if kind in ("a1111", "reforge"):
        assert folder is not None and (folder / "subject_filewords.txt").is_file()
    else:
        assert folder is None


def test_embeddings_folder_follows_the_host(host, kind, tmp_path):
    from ti_host.host import Host

    # SD.Next's folder is a setting; its --embeddings-dir is a hidden leftover (the fake points it elsewhere).
    assert Host().embeddings_dir() == tmp_path / "embeddings"


def test_checkpoint_and_device_come_from_the_host(host, tiny_model_dirs):
    import torch

    from ti_host.host import Host

    assert Host().checkpoint_path() == tiny_model_dirs["sd1"]
    assert Host().device() == torch.device("cpu")  # the fake's devices.device


def test_device_without_host_devices_module(host, monkeypatch):
    import torch

    from ti_host.host import Host

    monkeypatch.delitem(sys.modules, "modules.devices")
    monkeypatch.setattr(host.modules["modules"], "devices", None, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert Host(
        module=lambda name: None if name == "modules.devices" else sys.modules.get(name)
    ).device() == torch.device("cpu")


def test_mixed_precision_default():
    import torch

    from ti_host.host import default_mixed_precision

    assert default_mixed_precision(torch.device("cpu")) == "no"
    assert default_mixed_precision(torch.device("mps")) == "no"


def test_mixed_precision_on_cuda(monkeypatch):
    import torch

    from ti_host.host import default_mixed_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert default_mixed_precision(torch.device("cuda")) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert default_mixed_precision(torch.device("cuda")) == "fp16"


# ---- the entry script --------------------------------------------------------------------------------


def _load_script():
    spec = importlib.util.spec_from_file_location("ti_trainer_entry_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_entry_script_registers_tab_settings_and_routes(host, ui_modules, monkeypatch):
    script = _load_script()
    keys = ("ui_tabs", "ui_settings", "app_started", "after_component")
    assert [len(host.callbacks[key]) for key in keys] == [1, 1, 1, 1]

    monkeypatch.setattr(script, "create_ui", lambda backend: ("blocks for", backend))
    ((blocks, title, elem_id),) = host.callbacks["ui_tabs"][0]()
    assert (title, elem_id) == ("Textual Inversion", "ti_tab")
    assert blocks == ("blocks for", script.backend)

    host.callbacks["ui_settings"][0]()
    labels = host.shared.opts.data_labels
    assert set(labels) == {"ti_trainer_log_dir", "ti_trainer_unload_model", "ti_trainer_mixed_precision"}
    assert all(info.section == ("training", "Training") for info in labels.values())
    assert labels["ti_trainer_mixed_precision"].component_args == {"choices": ["auto", "bf16", "fp16", "no"]}
    assert host.shared.opts.ti_trainer_unload_model is True

    registered = []
    monkeypatch.setattr(script.routes, "register", lambda app, backend, auth: registered.append((app, backend, auth)))
    host.callbacks["app_started"][0]("demo", "app")
    assert registered == [("app", script.backend, None)]


@pytest.mark.skipif(not HAS_GRADIO, reason="needs gradio (the UI test environments have it)")
def test_entry_script_builds_the_real_tab_without_loading_a_model(host, ui_modules, monkeypatch):
    import gradio as gr

    import ti_core.models

    monkeypatch.setattr(ti_core.models, "load_model", lambda *a, **k: pytest.fail("the tab must not load a model"))
    _load_script()
    ((blocks, title, elem_id),) = host.callbacks["ui_tabs"][0]()
    assert isinstance(blocks, gr.Blocks) and elem_id == "ti_tab"


def test_entry_script_leaves_sys_path_and_a_foreign_extension_module_alone(host, ui_modules, monkeypatch):
    foreign = types.ModuleType("extension")
    foreign.__file__ = "/elsewhere/extension.py"
    monkeypatch.setitem(sys.modules, "extension", foreign)
    path_before = list(sys.path)
    script = _load_script()
    assert sys.modules["extension"] is foreign
    assert sys.modules["ti_extension"].__file__ == str(ROOT / "extension.py")
    assert script.create_ui is sys.modules["ti_extension"].create_ui
    assert sys.path == path_before


# ---- reloading the host's embeddings -----------------------------------------------------------------


def test_create_writes_to_the_host_folder_and_reloads_with_force(host, backend, kind, tmp_path):
    from ti_core.formats import load_embedding
    from ti_host import routes

    status, body = routes.handle(routes.create, backend, {"name": "my-token", "init_text": "a cat", "vectors": 2})
    assert status == 200, body
    path = Path(body["path"])
    assert path == tmp_path / "embeddings" / "my-token.safetensors"
    assert load_embedding(path).num_vectors == 2
    assert sorted(host.reloads()) == EXPECTED_RELOADS[kind]


def test_sdnext_leaves_the_old_backend_database_alone(monkeypatch, tmp_path, tiny_model_dirs):
    host = fake_hosts.install(monkeypatch, "sdnext", tiny_model_dirs["sd1"], tmp_path)
    from ti_host.host import Host

    assert Host().reload_embeddings() == ["sd_model.embedding_db"]
    assert "sd_hijack.model_hijack.embedding_db" not in [name for name, _ in host.reloads()]


def test_a_failing_database_does_not_stop_the_others(monkeypatch, tmp_path, tiny_model_dirs):
    host = fake_hosts.install(monkeypatch, "forge", tiny_model_dirs["sd1"], tmp_path)
    from ti_host.host import Host

    def broken():
        raise RuntimeError("bad file")

    host.model.text_processing_engine_l.embeddings.load_textual_inversion_embeddings = broken
    assert Host().reload_embeddings() == [
        "sd_model.text_processing_engine_g.embeddings",
        "modules.ui_extra_networks_textual_inversion.embedding_db",
    ]


def test_a_diffusers_that_does_not_import_is_one_line_not_an_error_500(host, backend, monkeypatch):
    """As in A1111 1.10 with diffusers 0.37 (transformers 4.30): Create says why, and how to fix it."""
    from ti_host import dependencies, routes

    broken = types.ModuleType("diffusers")  # imports, but has none of the pipelines
    monkeypatch.setitem(sys.modules, "diffusers", broken)
    monkeypatch.setattr(dependencies, "_import_result", [])
    status, payload = routes.handle(routes.create, backend, {"name": "t"})
    assert status == 400, payload
    assert payload["error"].startswith("The Textual Inversion trainer cannot import diffusers")
    assert "cannot import name 'StableDiffusionPipeline'" in payload["error"] and "--skip-install" in payload["error"]
    assert backend.problem() == payload["error"]  # and the tab shows it from now on


def test_a_known_misfit_is_named_without_importing(host, backend, monkeypatch):
    from ti_host import dependencies

    monkeypatch.setattr(dependencies, "_import_result", [])
    versions = {"diffusers": "0.37.1", "transformers": "4.30.2"}
    monkeypatch.setattr(dependencies, "_version", versions.get)
    problem = backend.problem()
    assert "diffusers 0.37.1 needs transformers 4.48 or newer, and this Python has transformers 4.30.2" in problem
    assert 'install "diffusers>=0.28,<0.32"' in problem
    versions.pop("diffusers")
    assert "needs diffusers, which is not installed" in backend.problem()
    versions["diffusers"] = "0.31.0"
    assert backend.problem() is None


@pytest.mark.skipif(not HAS_GRADIO, reason="needs gradio (the UI test environments have it)")
def test_the_tab_shows_the_problem_above_its_tabs(host, backend, ui_modules, monkeypatch):
    import extension

    monkeypatch.setattr(type(backend), "problem", lambda self: "The Textual Inversion trainer needs diffusers")
    blocks = extension.create_ui(backend)
    banners = [block for block in blocks.blocks.values() if getattr(block, "elem_id", None) == "ti_problem"]
    assert len(banners) == 1 and "needs diffusers" in banners[0].value and "ti-status-error" in banners[0].value


# ---- the training context ----------------------------------------------------------------------------

FREED = {"a1111": "cpu", "reforge": "cpu", "forge": "cpu", "sdnext": None}  # SD.Next unloads the model entirely


def _host_model_state(host):
    lock = host.modules["modules.call_queue"].queue_lock
    return {"device": getattr(host.model, "device", None), "job": host.shared.state.job, "locked": lock.held()}


def _assert_restored(host, kind):
    names = host.record.names()
    assert names[0] == "state.begin" and "state.end" in names
    assert ("state.begin", "ti_train") in host.record.calls
    if kind == "a1111":
        assert names.index("send_model_to_cpu") < names.index("send_model_to_device") < names.index("state.end")
        assert host.model.device == "cuda"
    elif kind == "sdnext":
        assert names.index("unload_model_weights") < names.index("reload_model_weights") < names.index("state.end")
        assert host.model is not None and host.model.device == "cuda"
    else:  # the memory manager brings the model back on the next generation by itself
        assert "unload_all_models" in names
    assert host.shared.state.job == ""
    assert not host.modules["modules.call_queue"].queue_lock.held()
    # After the run (which writes the embedding) the host's embeddings are reloaded, after its model is back.
    assert names.index("reload") > names.index("state.begin")


def test_training_context_frees_and_restores_the_host_model(host, backend, kind):
    with backend.training_context():
        inside = _host_model_state(host)
    assert inside == {"device": FREED[kind], "job": "ti_train", "locked": True}
    _assert_restored(host, kind)


def test_training_context_restores_on_error(host, backend, kind):
    with pytest.raises(RuntimeError, match="boom"), backend.training_context():
        raise RuntimeError("boom")
    _assert_restored(host, kind)


def test_unload_setting_off_keeps_the_host_model(host, backend, kind):
    host.shared.opts.data["ti_trainer_unload_model"] = False
    with backend.training_context():
        assert host.model.device == "cuda"
        assert host.shared.state.job == "ti_train"
    assert not {"send_model_to_cpu", "unload_all_models", "unload_model_weights"} & set(host.record.names())


# ---- a run: interrupt from the host, progress into the host ------------------------------------------


def _fake_train(steps_seen: list[int]):
    """Stands in for ti_core.train.train: steps until cancelled, like the real loop."""
    from ti_core.train import TrainEvent, TrainResult

    def train(model, config, callback=None, *, cancel=None, accelerator=None):
        assert model.unet.device.type == "cpu"  # moved to the host's device (the fake's is the CPU)
        for step in range(1, 10_000):
            if cancel is not None and cancel.is_set():
                callback(TrainEvent("interrupted", step, config.steps, message="interrupted"))
                return TrainResult(None, step, "interrupted", f"Training interrupted at step {step}", config.log_dir)
            callback(TrainEvent("step", step, config.steps, loss=0.5, lr=0.005))
            steps_seen.append(step)
            time.sleep(0.01)
        raise AssertionError("never cancelled")

    return train


def _config(tmp_path, backend, **extra):
    from ti_host import routes

    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    return routes.train_config(
        backend, {"name": "tok", "data": {"images": str(images), "resolution": 64}, "steps": 5000, **extra}
    )


def test_host_interrupt_cancels_a_run_and_restores_the_host(host, backend, kind, tmp_path, monkeypatch):
    import ti_core.train

    _no_running_job()
    steps: list[int] = []
    monkeypatch.setattr(ti_core.train, "train", _fake_train(steps))
    job = backend.start_training(_config(tmp_path, backend))
    deadline = time.time() + 30
    while len(steps) < 3 and time.time() < deadline:
        time.sleep(0.01)
    assert steps, job.snapshot()
    time.sleep(0.6)  # a couple of watcher ticks
    state = host.shared.state
    assert state.job == "ti_train" and state.sampling_steps == 5000 and state.sampling_step > 0
    assert "Textual inversion tok" in state.textinfo
    state.interrupt()  # the web UI's Interrupt button
    assert job.wait(30)
    snapshot = job.snapshot()
    assert snapshot["stopped"] == "interrupted", snapshot
    assert snapshot["step"] < 5000
    _assert_restored(host, kind)


def test_a_second_run_is_refused_while_one_goes(host, backend, tmp_path, monkeypatch):
    import ti_core.train
    from ti_host import routes

    _no_running_job()
    monkeypatch.setattr(ti_core.train, "train", _fake_train([]))
    images = tmp_path / "images"
    images.mkdir()
    body = {"name": "tok", "data": {"images": str(images), "resolution": 64}, "steps": 5000}
    assert routes.handle(routes.train, backend, body) == (200, {"started": True, "name": "tok"})
    status, payload = routes.handle(routes.train, backend, body)
    assert status == 409 and "already in progress" in payload["error"]
    assert routes.handle(routes.progress, backend, None)[1]["running"] is True
    assert routes.handle(routes.interrupt, backend, None) == (200, {"interrupted": True})
    from ti_core.jobs import current_job

    assert current_job().wait(30)
    assert routes.handle(routes.progress, backend, None)[1]["stopped"] == "interrupted"
    assert routes.handle(routes.interrupt, backend, None)[1]["interrupted"] is False


def test_interrupt_while_waiting_for_the_queue_stops_before_loading(host, backend, tmp_path, monkeypatch):
    import ti_core.train

    _no_running_job()
    monkeypatch.setattr(ti_core.train, "train", _fake_train([]))
    lock = host.modules["modules.call_queue"].queue_lock
    lock.acquire()  # a generation is running
    try:
        job = backend.start_training(_config(tmp_path, backend))
        time.sleep(0.4)
        assert "Waiting" in (host.shared.state.textinfo or "")
        job.cancel()
        assert job.wait(10)
    finally:
        lock.release()
    assert job.snapshot()["stopped"] == "interrupted"
    assert "state.begin" not in host.record.names()


# ---- HTTP handlers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([1, 2], "must be a JSON object"),
        ({"init_text": "x"}, "name is required"),
        ({"name": "a/b"}, "path separator"),
        ({"name": "ok", "vectors": 0}, "between 1 and"),
        ({"name": "ok", "vectors": True}, "vectors must be int"),
        ({"name": "ok", "colour": "red"}, "unknown field(s): colour"),
    ],
)
def test_create_rejects_bad_input_with_400(host, backend, body, message):
    from ti_host import routes

    status, payload = routes.handle(routes.create, backend, body)
    assert status == 400 and message in payload["error"] and "\n" not in payload["error"]


def test_create_refuses_to_overwrite_unless_asked(host, backend):
    from ti_host import routes

    assert routes.handle(routes.create, backend, {"name": "t"})[0] == 200
    status, payload = routes.handle(routes.create, backend, {"name": "t"})
    assert status == 400 and "already exists" in payload["error"] and "--" not in payload["error"]
    assert routes.handle(routes.create, backend, {"name": "t", "overwrite": True})[0] == 200


def test_create_warns_about_a_name_that_fails_in_some_uis_but_creates_it(host, backend):
    from ti_core.formats import load_embedding
    from ti_host import routes

    status, payload = routes.handle(routes.create, backend, {"name": "My Cat"})
    assert status == 200 and load_embedding(Path(payload["path"])).name == "My Cat"
    assert (payload["name"], payload["vectors"]) == ("My Cat", 1)
    assert len(payload["warnings"]) == 2
    assert "ComfyUI" in payload["warnings"][0] and "`my_cat`" in payload["warnings"][0]
    assert "capital" in payload["warnings"][1]
    status, payload = routes.handle(routes.create, backend, {"name": "zzzz1234"})
    assert status == 200 and payload["warnings"] == []


def test_no_model_is_a_400_that_says_what_to_do(monkeypatch, tmp_path, ui_modules):
    fake_hosts.install(monkeypatch, "a1111", None, tmp_path)
    from ti_host import routes
    from ti_host.backend import HostBackend

    status, payload = routes.handle(routes.create, HostBackend(), {"name": "t"})
    assert status == 400 and "choose a Stable Diffusion checkpoint" in payload["error"]


def test_train_config_uses_the_host_folders_and_defaults(host, backend, tmp_path):
    from ti_host import routes

    config = _config(tmp_path, backend)
    assert config.embeddings_dir == tmp_path / "embeddings"
    assert config.log_dir == tmp_path / "textual_inversion"
    assert config.mixed_precision == "no"  # the fake host's device is the CPU
    assert _config(tmp_path, backend, mixed_precision="bf16").mixed_precision == "bf16"
    status, payload = routes.handle(
        routes.train, backend, {"name": "x", "embeddings_dir": "/elsewhere", "data": {"images": "i"}}
    )
    assert status == 400 and "web UI's folder" in payload["error"]
    status, payload = routes.handle(routes.train, backend, {"data": {"images": "i"}})
    assert status == 400 and "name" in payload["error"]
    status, payload = routes.handle(routes.train, backend, {"name": "x", "data": {"images": "i"}, "steps": "many"})
    assert status == 400
    assert _config(tmp_path, backend, method="plain", context_regularization=0.5).method == "plain"
    status, payload = routes.handle(routes.train, backend, {"name": "x", "data": {"images": "i"}, "method": "dti"})
    assert status == 400 and payload["error"].startswith("method must be one of auto, plain, directional")
    status, payload = routes.handle(routes.train, backend, {"name": "x", "data": {"images": str(tmp_path / "nope")}})
    assert status == 400 and "is not a folder" in payload["error"]
    assert routes.handle(routes.create, backend, {"name": "made"})[0] == 200
    status, payload = routes.handle(routes.train, backend, {"name": "made", "data": {"images": str(tmp_path)}})
    assert status == 400 and "set resume" in payload["error"]


def test_progress_before_any_run(ui_modules, monkeypatch):
    from ti_core import jobs
    from ti_host import routes

    monkeypatch.setattr(jobs, "_current", None)
    assert routes.handle(routes.progress, None, None) == (
        200,
        {"running": False, "step": 0, "total": 0, "message": "No training run yet"},
    )


def test_basic_auth_follows_api_auth():
    import base64

    from ti_host import routes

    allowed = routes.credentials("alice:s3cret:x, bob:pw")
    assert allowed == {"alice": "s3cret:x", "bob": "pw"}
    header = "Basic " + base64.b64encode(b"alice:s3cret:x").decode()
    assert routes.authorized(header, allowed)
    assert not routes.authorized("Basic " + base64.b64encode(b"alice:nope").decode(), allowed)
    assert not routes.authorized(None, allowed) and not routes.authorized("Basic !!!", allowed)
    assert routes.authorized(None, {})


def test_routes_over_http(host, backend, tmp_path):
    """The real FastAPI wiring; runs where fastapi and httpx are installed (the UI test environments)."""
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from ti_host import routes

    app = FastAPI()
    assert routes.register(app, backend) == ["/ti/v1/create", "/ti/v1/train", "/ti/v1/progress", "/ti/v1/interrupt"]
    client = TestClient(app)
    response = client.post("/ti/v1/create", json={"name": "web", "vectors": 3})
    assert response.status_code == 200 and response.json()["vectors"] == 3
    response = client.post("/ti/v1/create", content=b"{not json")
    assert response.status_code == 400 and "not JSON" in response.json()["error"]
    assert client.post("/ti/v1/create", json={"name": "web"}).status_code == 400
    assert client.get("/ti/v1/progress").status_code == 200
    assert client.post("/ti/v1/interrupt").json()["interrupted"] in (True, False)

    locked = FastAPI()
    routes.register(locked, backend, "u:p")
    assert TestClient(locked).get("/ti/v1/progress").status_code == 401
    assert TestClient(locked).get("/ti/v1/progress", auth=("u", "p")).status_code == 200


def test_report_mirrors_a_snapshot_into_the_host_state(host, backend, tmp_path):
    from PIL import Image

    preview = tmp_path / "p.png"
    Image.new("RGB", (8, 8), "red").save(preview)
    backend.report({"name": "tok", "step": 7, "total": 10, "loss": 0.25, "message": "", "previews": [str(preview)]})
    state = host.shared.state
    assert (state.job_count, state.job_no, state.sampling_step, state.sampling_steps) == (1, 0, 7, 10)
    assert state.textinfo == "Textual inversion tok: step 7/10, loss 0.2500."
    assert state.current_image.size == (8, 8)


def test_model_label_names_the_host_checkpoint(host, backend, kind):
    assert backend.model_label().startswith("sd1 [0123456789] (the ")


def test_current_model_loads_the_host_checkpoint(monkeypatch, tmp_path, tiny_model_dirs, ui_modules):
    fake_hosts.install(monkeypatch, "a1111", tiny_model_dirs["sd1"], tmp_path)
    from ti_host.backend import HostBackend

    backend = HostBackend()
    first = backend.current_model()
    assert first.architecture == "sd1" and first.source == str(tiny_model_dirs["sd1"])
    others = []
    thread = threading.Thread(target=lambda: others.append(backend.current_model()))
    thread.start()
    thread.join()
    assert others == [first] and others[0] is first  # shared while someone holds it, not loaded twice
    assert backend.loaded_model() is first
    others.clear()
    del first
    import gc

    gc.collect()
    assert backend.loaded_model() is None  # nothing holds it: freed, not cached for good


@pytest.mark.parametrize("kind", ["a1111", "forge"])
def test_a_real_run_through_the_route_lands_in_the_host(host, backend, kind, tmp_path):
    """ti_core's real trainer on the tiny model, started over the API: the file is written to the web UI's
    folder, the web UI reloads it after its model is back, and the state shows the job until the end."""
    from PIL import Image

    from ti_core.formats import load_embedding
    from ti_core.jobs import current_job
    from ti_host import routes

    _no_running_job()
    images = tmp_path / "images"
    images.mkdir()
    for index, colour in enumerate(("red", "blue")):
        Image.new("RGB", (64, 64), colour).save(images / f"{index}-a {colour} square.png")
    body = {
        "name": "e2e",
        "data": {"images": str(images), "resolution": 64},
        "steps": 2,
        "save_every": 0,
        "preview_every": 0,
        "preview_steps": 1,  # the final <name>.preview.png; 20 steps of the tiny UNet take seconds on a CPU
    }
    status, payload = routes.handle(routes.train, backend, body)
    assert status == 200, payload
    job = current_job()
    assert job.wait(120)
    snapshot = job.snapshot()
    assert snapshot["stopped"] == "done", snapshot
    path = tmp_path / "embeddings" / "e2e.safetensors"
    assert snapshot["final_path"] == str(path)
    assert load_embedding(path).step == 2
    _assert_restored(host, kind)
    names = host.record.names()
    assert names.index("reload") > names.index("unload_all_models" if kind == "forge" else "send_model_to_device")


# ---- against a real web UI's source (opt-in) ---------------------------------------------------------
# WEBUI_DIR=/path/to/stable-diffusion-webui[-forge|-reForge]|automatic python -m pytest tests/test_hosts.py -k real_host
# Reads the web UI's Python source (ast only: none of its code runs, none of its requirements are needed)
# and checks that every host API the extension relies on is there with the shape the fakes have.


def _real_tree() -> Path:
    import os

    folder = os.environ.get("WEBUI_DIR")
    if not folder:
        pytest.skip("set WEBUI_DIR to a web UI checkout to check its APIs")
    return Path(folder)


def _parse(tree: Path, relative: str):
    import ast

    path = tree / relative
    assert path.is_file(), f"{relative} is missing from {tree}"
    return ast.parse(path.read_text(encoding="utf-8", errors="replace"))


def _functions(module) -> dict:
    import ast

    found = {}
    for node in ast.walk(module):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    found[f"{node.name}.{item.name}"] = item
    for node in module.body:
        if isinstance(node, ast.FunctionDef):
            found[node.name] = node
    return found


def _params(function) -> list[str]:
    arguments = function.args
    return [a.arg for a in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]]


def _is_stub(function) -> bool:
    import ast

    body = [n for n in function.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    return all(isinstance(n, ast.Pass) for n in body)


def _assigns(module, name: str) -> bool:
    import ast

    return any(
        isinstance(node, ast.Assign | ast.AnnAssign)
        and any(
            isinstance(t, ast.Name) and t.id == name
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
        )
        for node in module.body
    )


def _defines(module, name: str) -> bool:
    """A module-level function, assignment or `from x import name` (SD.Next re-exports a lot)."""
    import ast

    imported = any(
        isinstance(node, ast.ImportFrom) and any((alias.asname or alias.name) == name for alias in node.names)
        for node in module.body
    )
    return imported or name in _functions(module) or _assigns(module, name)


def _real_kind(tree: Path) -> str:
    if (tree / "installer.py").is_file() and "native" in (tree / "modules" / "shared.py").read_text(errors="replace"):
        return "sdnext"
    if (tree / "backend" / "memory_management.py").is_file():
        return "forge"
    if (tree / "ldm_patched" / "modules" / "model_management.py").is_file():
        return "reforge"
    return "a1111"


def test_real_host_apis_match_the_fakes():
    tree = _real_tree()
    kind = _real_kind(tree)
    fake = fake_hosts.build(kind, "model.safetensors", Path(__import__("tempfile").mkdtemp()))

    callbacks = _functions(_parse(tree, "modules/script_callbacks.py"))
    assert {"on_ui_tabs", "on_ui_settings", "on_app_started", "on_after_component"} <= set(callbacks)

    state = _functions(_parse(tree, "modules/shared_state.py"))
    real_begin = _params(state["State.begin"])[1]
    assert real_begin == ("title" if kind == "sdnext" else "job")  # we pass it positionally either way
    assert "State.end" in state and "State.interrupt" in state

    assert _assigns(_parse(tree, "modules/call_queue.py"), "queue_lock")

    sd_models_tree = _parse(tree, "modules/sd_models.py")
    sd_models = _functions(sd_models_tree)
    assert _defines(sd_models_tree, "model_data") and _defines(sd_models_tree, "select_checkpoint")
    fake_sd_models = fake.modules["modules.sd_models"]
    for name in ("send_model_to_cpu", "send_model_to_device", "unload_model_weights", "reload_model_weights"):
        assert _defines(sd_models_tree, name) == hasattr(fake_sd_models, name), name
    if kind in ("forge", "reforge"):
        # Stubs there: the memory manager is what frees the GPU.
        assert _is_stub(sd_models["send_model_to_cpu"]) and _is_stub(sd_models["send_model_to_device"])
        manager = "backend/memory_management.py" if kind == "forge" else "ldm_patched/modules/model_management.py"
        assert {"unload_all_models", "soft_empty_cache"} <= set(_functions(_parse(tree, manager)))
    elif kind == "a1111":
        assert not _is_stub(sd_models["send_model_to_cpu"]) and not _is_stub(sd_models["send_model_to_device"])
    if "reload_model_weights" in sd_models:
        assert _params(sd_models["reload_model_weights"])[0] == "sd_model"  # called with no arguments

    database = _functions(_parse(tree, "modules/textual_inversion/textual_inversion.py"))
    real_reload = _params(database["EmbeddingDatabase.load_textual_inversion_embeddings"])
    assert "force_reload" in real_reload
    if kind == "forge":
        engine = _functions(_parse(tree, "backend/text_processing/textual_inversion.py"))
        assert _params(engine["EmbeddingDatabase.load_textual_inversion_embeddings"]) == ["self"]
        assert _assigns(_parse(tree, "modules/ui_extra_networks_textual_inversion.py"), "embedding_db")
        engines = "\n".join(p.read_text() for p in (tree / "backend" / "diffusion_engine").glob("*.py"))
        assert "self.text_processing_engine_l = " in engines and "self.text_processing_engine = " in engines
        hijack = (tree / "modules" / "sd_hijack.py").read_text()
        assert "embedding_db" not in hijack.split("# import torch")[0]  # Forge's hijack is a stub without one
    else:
        assert "embedding_db" in (tree / "modules" / "sd_hijack.py").read_text()
    if kind == "sdnext":
        assert "sd_model.embedding_db = " in (tree / "modules" / "sd_models.py").read_text()
        assert '"embeddings_dir": OptionInfo(' in (tree / "modules" / "shared.py").read_text()
    else:
        assert "--embeddings-dir" in (tree / "modules" / "cmd_args.py").read_text()

    options = _functions(_parse(tree, "modules/options.py"))
    option_params = _params(options["OptionInfo.__init__"])
    assert option_params[1:5] == ["default", "label", "component", "component_args"] and "section" in option_params

    launch_sources = [tree / "launch.py", tree / "modules" / "launch_utils.py"]
    launch = "\n".join(p.read_text() for p in launch_sources if p.is_file())
    assert "def run_pip(" in launch and "def is_installed(" in launch
    assert "skip_install" in launch
