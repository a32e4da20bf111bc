"""Fake web UIs for tests: `modules.*` packages shaped like A1111 (and reForge), Forge and SD.Next.

Each fake has only what the extension touches, with the host's real signatures (read from the web UIs'
sources): A1111's `state.begin(job=...)` and `load_textual_inversion_embeddings(force_reload=False)`,
SD.Next's `state.begin(title=...)` and model-held database, Forge's argument-less per-engine reload and
no-op `send_model_to_cpu`. Calls are recorded so tests can assert what the extension did.

`install(monkeypatch, kind, checkpoint, tmp_path)` puts a fake in `sys.modules`; monkeypatch takes it out
again after the test.

Checked against the real AUTOMATIC1111 1.10.1 (tests/real_hosts runs the extension in it), and corrected
where the fake said otherwise: its queue lock is a FIFO lock whose acquire takes only `blocking` (no
timeout, no `locked()`); `shared.sd_model` loads the checkpoint when none is loaded (read
`sd_models.model_data.sd_model` to look without loading); `state.begin` resets the job's fields (textinfo,
interrupted, job_count -1, sampling_step, current_image); `devices.cpu` is a torch.device; the default
`--textual-inversion-templates-dir` exists and holds the built-in templates; the extra-networks page module
is loaded but has no database of its own. What no fake models, the real-host tests check: install.py's
output is captured (stdout printed after the run, stderr dropped on exit 0), and the extra-networks card
HTML is built once and rebuilt only by its Refresh button.
"""

from __future__ import annotations

import copy
import sys
import threading
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KINDS = ("a1111", "reforge", "forge", "sdnext")


class Recorder:
    """A list of (what, details) shared by every fake object of one host."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def __call__(self, what: str, details: Any = None) -> None:
        self.calls.append((what, details))

    def names(self) -> list[str]:
        return [what for what, _ in self.calls]


class A1111Database:
    """`modules.textual_inversion.textual_inversion.EmbeddingDatabase` (A1111, reForge, SD.Next)."""

    def __init__(self, record: Recorder, name: str) -> None:
        self.record, self.name = record, name

    def load_textual_inversion_embeddings(self, force_reload=False):
        self.record("reload", (self.name, {"force_reload": force_reload}))


class ForgePageDatabase(A1111Database):
    """Forge's extra-networks page database (`sync_with_sd_model=False` there)."""

    def load_textual_inversion_embeddings(self, force_reload=False, sync_with_sd_model=True):
        self.record("reload", (self.name, {"force_reload": force_reload, "sync_with_sd_model": sync_with_sd_model}))


class ForgeEngineDatabase:
    """`backend.text_processing.textual_inversion.EmbeddingDatabase`: always reloads, takes no arguments."""

    def __init__(self, record: Recorder, name: str) -> None:
        self.record, self.name = record, name

    def load_textual_inversion_embeddings(self):
        self.record("reload", (self.name, {}))


class FIFOLock:
    """`modules.fifo_lock.FIFOLock`, A1111's `call_queue.queue_lock`: `acquire(blocking=True)` only (a timeout
    is a TypeError there), no `locked()`. Waiters get the lock in arrival order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def acquire(self, blocking=True):
        return self._lock.acquire(blocking)

    def release(self):
        self._lock.release()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    def held(self) -> bool:
        """For tests only: whether someone holds it (the real lock cannot say)."""
        return self._lock.locked()


class State:
    """`modules.shared_state.State` with A1111's `begin(job=...)` (SD.Next's variant below)."""

    def __init__(self, record: Recorder) -> None:
        self.record = record
        self.interrupted = False
        self.job = ""
        self.job_count = 0
        self.job_no = 0
        self.sampling_step = 0
        self.sampling_steps = 0
        self.textinfo = None
        self.current_image = None

    def begin(self, job: str = "(unknown)"):
        # A1111 resets the job's fields here: what a previous job left in them does not survive.
        self.record("state.begin", job)
        self.sampling_step = 0
        self.job_count = -1
        self.job_no = 0
        self.current_image = None
        self.interrupted = False
        self.textinfo = None
        self.job = job

    def end(self):
        self.record("state.end", None)
        self.job = ""
        self.job_count = 0

    def interrupt(self):
        self.interrupted = True

    def assign_current_image(self, image):
        self.current_image = image

    def __deepcopy__(self, memo):
        # A copy records into the same Recorder, so calls on a copy SD.Next swapped in are seen too.
        return copy.copy(self)


class SDNextState(State):
    def begin(self, title="", api=None):  # SD.Next names the parameter `title`
        super().begin(title)


class OptionInfo:
    """A1111 1.10's OptionInfo signature (SD.Next's accepts the same arguments and more)."""

    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before="", comment_after="", infotext=None, restrict_api=False,
                 category_id=None):  # fmt: skip
        self.default, self.label, self.component = default, label, component
        self.component_args, self.section, self.category_id = component_args, section, category_id


class Options:
    """`modules.options.Options`: saved values in `data`, defaults from registered options, else AttributeError."""

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        object.__setattr__(self, "data", dict(data or {}))
        object.__setattr__(self, "data_labels", {})

    def add_option(self, key, info):
        self.data_labels[key] = info

    def __getattr__(self, item):
        if item in self.data:
            return self.data[item]
        if item in self.data_labels:
            return self.data_labels[item].default
        raise AttributeError(item)


@dataclass
class CheckpointInfo:
    filename: str
    title: str
    name: str = ""


@dataclass
class FakeModel:
    """Stands for `shared.sd_model`; `device` shows where the fake's weights are."""

    sd_checkpoint_info: CheckpointInfo
    device: str = "cuda"
    lowvram: bool = False


class ModelData:
    """`sd_models.model_data`: `sd_model` is what is loaded (None: nothing); `get_sd_model()` loads the
    checkpoint when nothing is loaded yet, which is what A1111's `shared.sd_model` calls."""

    def __init__(self, record: Recorder, model: Any, loads: Any = None) -> None:
        self.record, self.sd_model, self._loads = record, model, loads
        self.loaded_sd_models = [model] if model is not None else []

    def get_sd_model(self):
        if self.sd_model is None and self._loads is not None:
            self.record("load_model", None)  # slow and gigabytes in the real web UI
            self.sd_model = self._loads
        return self.sd_model


class A1111Shared(types.ModuleType):
    """A1111's `modules.shared`, whose `sd_model` is a property that loads the model on first access."""

    model_data: ModelData

    @property
    def sd_model(self):
        return self.model_data.get_sd_model()

    @sd_model.setter
    def sd_model(self, value):
        self.model_data.sd_model = value


@dataclass
class FakeHost:
    kind: str
    record: Recorder
    modules: dict[str, types.ModuleType]
    callbacks: dict[str, list] = field(default_factory=dict)

    @property
    def shared(self) -> types.ModuleType:
        return self.modules["modules.shared"]

    @property
    def model(self) -> Any:
        return self.modules["modules.sd_models"].model_data.sd_model

    def reloads(self) -> list[tuple[str, dict]]:
        return [details for what, details in self.record.calls if what == "reload"]


def _module(name: str, **attributes: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    if "." not in name or name in ("modules", "backend", "ldm_patched", "ldm_patched.modules"):
        module.__path__ = []  # a package, so `import modules.shared` finds the submodule in sys.modules
    return module


def _script_callbacks(callbacks: dict[str, list], sdnext: bool) -> types.ModuleType:
    for key in ("ui_tabs", "ui_settings", "app_started", "after_component"):
        callbacks[key] = []

    if sdnext:  # SD.Next: no name= keyword

        def on_ui_tabs(callback):
            callbacks["ui_tabs"].append(callback)

        def on_after_component(callback):
            callbacks["after_component"].append(callback)
    else:

        def on_ui_tabs(callback, *, name=None):
            callbacks["ui_tabs"].append(callback)

        def on_after_component(callback, *, name=None):
            callbacks["after_component"].append(callback)

    def on_ui_settings(callback, *, name=None):
        callbacks["ui_settings"].append(callback)

    def on_app_started(callback, *, name=None):
        callbacks["app_started"].append(callback)

    return _module("modules.script_callbacks", on_ui_tabs=on_ui_tabs, on_ui_settings=on_ui_settings,
                   on_app_started=on_app_started, on_after_component=on_after_component)  # fmt: skip


def build(kind: str, checkpoint: Path | str | None, root: Path, *, loaded: bool = True) -> FakeHost:
    """The fake `modules.*` (and Forge's `backend.*`, reForge's `ldm_patched.*`) of one web UI; with
    `loaded=False` the checkpoint is selected but not loaded yet (as while the web UI starts)."""
    if kind not in KINDS:
        raise ValueError(kind)
    record = Recorder()
    callbacks: dict[str, list] = {}
    embeddings = root / "embeddings"
    embeddings.mkdir(parents=True, exist_ok=True)
    info = CheckpointInfo(str(checkpoint), f"{Path(str(checkpoint)).name} [0123456789]", Path(str(checkpoint)).stem) if checkpoint else None  # fmt: skip
    modules: dict[str, types.ModuleType] = {"modules": _module("modules")}
    sdnext = kind == "sdnext"

    cmd_opts = types.SimpleNamespace(embeddings_dir=str(embeddings), data_dir=str(root), api_auth=None,
                                     textual_inversion_templates_dir=None, lowvram=False, medvram=False)  # fmt: skip
    if kind in ("a1111", "reforge"):  # the default --textual-inversion-templates-dir, with its built-in files
        templates = root / "textual_inversion_templates"
        templates.mkdir(exist_ok=True)
        for name in ("hypernetwork", "none", "style", "style_filewords", "subject", "subject_filewords"):
            (templates / f"{name}.txt").write_text("a picture of [name]\n", encoding="utf-8")
        cmd_opts.textual_inversion_templates_dir = str(templates)
    opts = Options({"embeddings_dir": str(embeddings)} if sdnext else {})
    if sdnext:
        cmd_opts.embeddings_dir = str(root / "stale-compat-dir")  # SD.Next's real folder is the setting
    state = (SDNextState if sdnext else State)(record)
    model = FakeModel(info) if info else None

    modules["modules.script_callbacks"] = _script_callbacks(callbacks, sdnext)
    torch = __import__("torch")
    modules["modules.devices"] = _module("modules.devices", device=torch.device("cpu"), cpu=torch.device("cpu"))
    modules["modules.call_queue"] = _module("modules.call_queue", queue_lock=FIFOLock())
    # With a checkpoint selected but none loaded, A1111 loads it on the first `shared.sd_model`.
    model_data = ModelData(record, model if loaded else None, loads=model)

    def select_checkpoint():
        return info

    if kind in ("a1111", "reforge"):  # their page reads the hijack's database; it has none of its own
        modules["modules.ui_extra_networks_textual_inversion"] = _module("modules.ui_extra_networks_textual_inversion")
    if kind in ("a1111", "reforge", "sdnext"):
        modules["modules.sd_hijack"] = _module(
            "modules.sd_hijack",
            model_hijack=types.SimpleNamespace(
                embedding_db=A1111Database(record, "sd_hijack.model_hijack.embedding_db")
            ),
        )
    else:  # Forge's hijack is a stub without a database
        modules["modules.sd_hijack"] = _module("modules.sd_hijack", model_hijack=types.SimpleNamespace())

    if kind == "a1111":

        def send_model_to_cpu(m):
            record("send_model_to_cpu", m)
            m.device = "cpu"

        def send_model_to_device(m):
            record("send_model_to_device", m)
            m.device = "cuda"

        def unload_model_weights(sd_model=None, info=None):
            record("unload_model_weights", None)

        def reload_model_weights(sd_model=None, info=None, forced_reload=False):
            record("reload_model_weights", None)

        sd_models = dict(send_model_to_cpu=send_model_to_cpu, send_model_to_device=send_model_to_device,
                         unload_model_weights=unload_model_weights, reload_model_weights=reload_model_weights)  # fmt: skip
    elif kind in ("forge", "reforge"):
        # Both stub these out ("pass"): their memory manager owns the GPU.
        sd_models = dict(send_model_to_cpu=lambda m: None, send_model_to_device=lambda m: None,
                         reload_model_weights=lambda *a, **k: None, unload_model_weights=lambda *a, **k: None)  # fmt: skip

        def unload_all_models():
            record("unload_all_models", None)
            if model_data.sd_model is not None:
                model_data.sd_model.device = "cpu"

        manager = dict(
            unload_all_models=unload_all_models, soft_empty_cache=lambda force=False: record("soft_empty_cache")
        )
        if kind == "forge":
            modules["backend"] = _module("backend")
            modules["backend.memory_management"] = _module("backend.memory_management", **manager)
            if model is not None:
                model.text_processing_engine_l = types.SimpleNamespace(
                    embeddings=ForgeEngineDatabase(record, "engine_l")
                )
                model.text_processing_engine_g = types.SimpleNamespace(
                    embeddings=ForgeEngineDatabase(record, "engine_g")
                )
                model.text_processing_engine_t5 = types.SimpleNamespace()  # T5 has no embeddings
                model.forge_objects = types.SimpleNamespace()
            modules["modules.ui_extra_networks_textual_inversion"] = _module(
                "modules.ui_extra_networks_textual_inversion",
                embedding_db=ForgePageDatabase(record, "extra_networks_page"),
            )
        else:
            modules["ldm_patched"] = _module("ldm_patched")
            modules["ldm_patched.modules"] = _module("ldm_patched.modules")
            modules["ldm_patched.modules.model_management"] = _module(
                "ldm_patched.modules.model_management", **manager
            )
            if model is not None:
                model.forge_objects = types.SimpleNamespace()  # reForge's A1111 shell carries them too
    else:  # SD.Next: unload to 'meta' and reload from the checkpoint; no send_model_to_*

        def unload_model_weights(op="model"):
            record("unload_model_weights", op)
            if model_data.sd_model is not None:
                model_data.sd_model.device = "meta"
                model_data.sd_model = None

        def reload_model_weights(sd_model=None, info=None, reuse_dict=False, op="model", force=False, revision=None):
            # SD.Next runs the load under a fresh State and then puts back a deep copy of the old one.
            record("reload_model_weights", op)
            original = copy.deepcopy(shared.state)
            shared.state = SDNextState(record)
            model_data.sd_model = model
            model.device = "cuda"
            shared.state = original

        sd_models = dict(unload_model_weights=unload_model_weights, reload_model_weights=reload_model_weights,
                         move_model=lambda m, device=None, force=False: None)  # fmt: skip
        if model is not None:
            model.embedding_db = A1111Database(record, "sd_model.embedding_db")

    modules["modules.sd_models"] = _module(
        "modules.sd_models", model_data=model_data, select_checkpoint=select_checkpoint, **sd_models
    )
    if kind in ("a1111", "reforge"):
        shared = A1111Shared("modules.shared")
        shared.__dict__.update(state=state, opts=opts, cmd_opts=cmd_opts, OptionInfo=OptionInfo, model_data=model_data)
    else:
        shared = _module(
            "modules.shared", state=state, opts=opts, cmd_opts=cmd_opts, OptionInfo=OptionInfo, sd_model=model
        )
    if sdnext:
        shared.native = True
    modules["modules.shared"] = shared
    return FakeHost(kind, record, modules, callbacks)


def install(monkeypatch, kind: str, checkpoint: Path | str | None, root: Path, *, loaded: bool = True) -> FakeHost:
    """Build a fake web UI and put its modules in sys.modules (undone by monkeypatch after the test)."""
    host = build(kind, checkpoint, root, loaded=loaded)
    for prefix in ("modules", "backend", "ldm_patched"):
        for name in [n for n in sys.modules if n == prefix or n.startswith(prefix + ".")]:
            monkeypatch.delitem(sys.modules, name)
    for name, module in host.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
        parent, _, child = name.rpartition(".")
        if parent:
            monkeypatch.setattr(host.modules[parent], child, module, raising=False)
    return host


def gradio_stub() -> types.ModuleType:
    """Just enough of gradio for `extension` to import and the settings to name a Radio."""

    class Radio:
        def __init__(self, *args, **kwargs):
            self.args, self.kwargs = args, kwargs

    return _module("gradio", __version__="3.41.2", Radio=Radio)
