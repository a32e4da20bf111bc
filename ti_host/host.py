"""What the running web UI offers, found by looking for it (capabilities), never by version number.

Facts used here (see the research notes on hosts):
- A1111 and reForge keep one embedding database at `modules.sd_hijack.model_hijack.embedding_db`; it
  reloads only when a folder's mtime changes, so after writing a file it needs `force_reload=True`.
- Forge gives every text-processing engine of the model (`text_processing_engine`, `_l`, `_g`) its own
  database, loaded once at model load; its extra-networks page keeps another one.
- SD.Next (diffusers backend) hangs the database on the pipeline: `shared.sd_model.embedding_db`. Its
  `modules.sd_hijack` database is for the old backend only and must be left alone there.
- The embeddings folder is `shared.cmd_opts.embeddings_dir`, except in SD.Next, where it is a setting
  (`shared.opts.embeddings_dir`).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from . import forge

log = logging.getLogger("ti_host")

KINDS = ("a1111", "forge", "sdnext", "unknown")
LABELS = {
    "a1111": "AUTOMATIC1111",
    "reforge": "reForge",
    "forge": "Forge",
    "sdnext": "SD.Next",
    "unknown": "an unrecognised web UI",
}
# Forge's and reForge's memory managers. Looked up only among modules the web UI already imported:
# importing a name as generic as `backend` could pick up some other package.
MEMORY_MANAGERS = ("backend.memory_management", "ldm_patched.modules.model_management")
EXTRA_NETWORKS_PAGE = "modules.ui_extra_networks_textual_inversion"


def import_host_module(name: str) -> ModuleType | None:
    """The web UI's module `name`, imported on demand; None when this web UI has no such module."""
    module = sys.modules.get(name)
    if module is not None:
        return module
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _accepts(function: Callable, parameter: str) -> bool:
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return False
    return parameter in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def force_reload(database: Any, **extra: Any) -> None:
    """Reload an embedding database now: `force_reload=True` where the method takes it (A1111, SD.Next).

    Forge's per-engine databases take no arguments and always reload.
    """
    method = database.load_textual_inversion_embeddings
    kwargs = {key: value for key, value in {"force_reload": True, **extra}.items() if _accepts(method, key)}
    method(**kwargs)


def default_mixed_precision(device) -> str:
    """bf16 where the GPU does it, else fp16 on CUDA, else none (CPU, MPS and others train in fp32)."""
    if getattr(device, "type", str(device)) != "cuda":
        return "no"
    import torch

    try:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    except Exception:  # old drivers raise instead of answering
        return "fp16"


class Host:
    """The web UI this process runs in. Every lookup is lazy: the model can change at any time."""

    def __init__(self, module: Callable[[str], ModuleType | None] = import_host_module) -> None:
        self._module = module
        self.app: Any = None  # the web UI's FastAPI app, once it has started (some databases hang on it)

    def module(self, name: str) -> ModuleType | None:
        return self._module(name)

    @staticmethod
    def loaded_module(name: str) -> ModuleType | None:
        """A module only if the web UI has imported it already (see MEMORY_MANAGERS)."""
        return sys.modules.get(name)

    @property
    def shared(self) -> ModuleType:
        shared = self.module("modules.shared")
        if shared is None:
            raise RuntimeError("not running inside a web UI (no modules.shared)")
        return shared

    @property
    def state(self) -> Any:
        return getattr(self.shared, "state", None)

    def option(self, key: str, default: Any = None) -> Any:
        opts = getattr(self.shared, "opts", None)
        data = getattr(opts, "data", None)
        if isinstance(data, dict) and key in data:
            return data[key]
        return getattr(opts, key, default) if opts is not None else default

    def samples_with_zero_terminal_snr(self, owner: Any) -> bool:
        """Whether the web UI is set to treat its model as zero-terminal-SNR: A1111's and Forge's "Noise schedule
        for sampling" setting, SD.Next's sampler option "rescale betas" (in its pipeline's scheduler config)."""
        scheduler_config = getattr(getattr(owner, "scheduler", None), "config", None)
        if owner is not None and hasattr(scheduler_config, "get") and not hasattr(owner, "first_stage_model"):
            return bool(scheduler_config.get("rescale_betas_zero_snr", False))
        return self.option("sd_noise_schedule", "Default") == "Zero Terminal SNR"

    def loaded_model(self) -> Any:
        """The web UI's current model, or None; never loads one.

        `shared.sd_model` is a property in A1111 that loads the checkpoint when none is loaded yet, so the
        model is read from `sd_models.model_data` where that exists.
        """
        data = getattr(self.module("modules.sd_models"), "model_data", None)
        if data is not None and hasattr(data, "sd_model"):
            return data.sd_model
        return getattr(self.shared, "sd_model", None)

    # ---- which web UI ----------------------------------------------------------------------------------

    def _hijack_database(self) -> Any:
        hijack = getattr(self.module("modules.sd_hijack"), "model_hijack", None)
        return getattr(hijack, "embedding_db", None)

    @staticmethod
    def _forge_engines(model: Any) -> list[tuple[str, Any]]:
        """Forge's text-processing engines that carry an embedding database, by attribute name."""
        try:
            attributes = vars(model)
        except TypeError:
            return []
        return [
            (name, engine)
            for name, engine in sorted(attributes.items())
            if name.startswith("text_processing_engine")
            and hasattr(getattr(engine, "embeddings", None), "load_textual_inversion_embeddings")
        ]

    def _is_sdnext(self, model: Any) -> bool:
        # The diffusers pipeline carries its own database; with no model loaded, only SD.Next has the
        # embeddings folder as a setting.
        return getattr(model, "embedding_db", None) is not None or bool(self.option("embeddings_dir"))

    def kind(self) -> str:
        """Which web UI: "sdnext", "a1111" (A1111 and reForge), "forge" or "unknown"."""
        model = self.loaded_model()
        if self._is_sdnext(model):
            return "sdnext"
        if self._hijack_database() is not None:
            return "a1111"
        if self._forge_engines(model) or hasattr(model, "forge_objects") or self.loaded_module(MEMORY_MANAGERS[0]):
            return "forge"
        return "unknown"

    def label(self) -> str:
        kind = self.kind()
        if kind == "a1111" and self.loaded_module(MEMORY_MANAGERS[1]) is not None:
            kind = "reforge"
        return LABELS[kind]

    # ---- files and devices -----------------------------------------------------------------------------

    def embeddings_dir(self) -> Path:
        """The folder the web UI loads embeddings from (relative paths are relative to its working folder)."""
        folder = self.option("embeddings_dir") or getattr(
            getattr(self.shared, "cmd_opts", None), "embeddings_dir", None
        )
        if not folder:
            raise ValueError("the web UI has no embeddings folder (neither opts.embeddings_dir nor --embeddings-dir)")
        return Path(folder).absolute()

    def data_dir(self) -> Path:
        """The web UI's data folder (`--data-dir`), where relative paths of ours are rooted."""
        folder = getattr(getattr(self.shared, "cmd_opts", None), "data_dir", None)
        return Path(folder).absolute() if folder else Path.cwd()

    def templates_dir(self) -> Path | None:
        """A1111's and reForge's folder of prompt templates (Forge and SD.Next have none)."""
        folder = getattr(getattr(self.shared, "cmd_opts", None), "textual_inversion_templates_dir", None)
        return Path(folder).absolute() if folder and Path(folder).is_dir() else None

    def checkpoint_info(self) -> Any:
        """The current checkpoint's CheckpointInfo: the loaded model's, else the selected one's."""
        info = getattr(self.loaded_model(), "sd_checkpoint_info", None)
        if info is None:
            select = getattr(self.module("modules.sd_models"), "select_checkpoint", None)
            if callable(select):
                try:
                    info = select()
                except Exception as error:  # A1111 raises (and may exit) when there is no checkpoint at all
                    log.debug("select_checkpoint failed: %s", error)
                    info = None
        return info

    def checkpoint_path(self) -> Path | None:
        filename = getattr(self.checkpoint_info(), "filename", None)
        return Path(filename) if filename else None

    def device(self):
        """The web UI's compute device; else CUDA when there is one; else the CPU."""
        import torch

        device = getattr(self.module("modules.devices"), "device", None)
        if device is not None:
            try:
                return torch.device(device)
            except (TypeError, RuntimeError):
                log.debug("unusable modules.devices.device %r", device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # ---- embeddings ------------------------------------------------------------------------------------

    def reload_embeddings(self) -> list[str]:
        """Make the web UI read its embeddings folder again, so a new file works in the next generation.

        Reloads every database this web UI has; returns their names (for logs and tests). A database that
        fails to reload is logged and skipped: the file is written either way.
        """
        model = self.loaded_model()
        databases: list[tuple[str, Any, dict[str, Any]]] = []
        if getattr(model, "embedding_db", None) is not None:
            databases.append(("sd_model.embedding_db", model.embedding_db, {}))
        elif self._hijack_database() is not None:
            databases.append(("sd_hijack.model_hijack.embedding_db", self._hijack_database(), {}))
        databases += [
            (f"sd_model.{name}.embeddings", engine.embeddings, {}) for name, engine in self._forge_engines(model)
        ]
        # Forge's extra-networks page has a database of its own (A1111's page has none); refresh it only if
        # the page module is loaded already: importing it would build and load a new database.
        page_database = getattr(sys.modules.get(EXTRA_NETWORKS_PAGE), "embedding_db", None)
        if page_database is not None and all(page_database is not db for _, db, _ in databases):
            databases.append((f"{EXTRA_NETWORKS_PAGE}.embedding_db", page_database, {"sync_with_sd_model": False}))
        # Forge's API lists its own database at /sdapi/v1/embeddings (A1111's API reads the hijack's).
        api_database = forge.api_embedding_database(self.app)
        if api_database is not None and all(api_database is not db for _, db, _ in databases):
            databases.append(("api.embedding_db", api_database, {"sync_with_sd_model": False}))
        reloaded = []
        for name, database, extra in databases:
            try:
                force_reload(database, **extra)
                reloaded.append(name)
            except Exception as error:  # the web UI's loader; a bad file elsewhere in the folder can raise
                log.warning("could not reload %s: %s", name, error)
        return reloaded

    # ---- the loaded model's weights ---------------------------------------------------------------------

    def model_weights(self) -> ModelWeights | None:
        """The loaded model's tensors under their checkpoint names, to train on without a second copy.

        None where they cannot be used as they are: no model loaded; a model that is not an LDM/SGM torch
        module (SD.Next's is built differently); --medvram/--lowvram, which move the parts between devices
        while generating; weights on more than one device or stored in fp8. Forge's parts are read from its
        `forge_objects`; forge.NotShareable says why where they cannot be used.
        """
        model = self.loaded_model()
        if forge.is_forge_model(model):
            return self._forge_weights(model)
        state_dict = getattr(model, "state_dict", None)
        if model is None or not callable(state_dict) or getattr(model, "lowvram", False):
            return None
        if not (hasattr(model, "first_stage_model") and hasattr(getattr(model, "model", None), "diffusion_model")):
            return None
        tensors = state_dict()  # detached aliases of the module's own tensors: no copy
        devices = {tensor.device for tensor in tensors.values()}
        if len(devices) != 1 or any("float8" in str(tensor.dtype) for tensor in tensors.values()):
            return None
        config = getattr(model, "used_config", None)
        parameterization = getattr(model, "parameterization", None)
        return ModelWeights(
            tensors=tensors,
            original_config=Path(config) if isinstance(config, str | Path) and Path(config).is_file() else None,
            prediction_type={"v": "v_prediction", "eps": "epsilon"}.get(str(parameterization)),
            owner=model,
        )

    def _forge_weights(self, model: Any) -> ModelWeights:
        """Forge's parts as they are (forge.NotShareable, one line, where they cannot be trained through)."""
        layout, text_encoders, _architecture = forge.tensors(model)
        info = getattr(model, "sd_checkpoint_info", None)
        sidecar = Path(info.filename).with_suffix(".yaml") if getattr(info, "filename", None) else None
        return ModelWeights(
            tensors=layout,
            original_config=sidecar if sidecar is not None and sidecar.is_file() else None,
            prediction_type=forge.prediction_type(model),
            owner=model,
            text_encoders=text_encoders,
        )

    def first_weight(self, owner: Any) -> Any:
        """One tensor of the web UI's model, whose memory tells whether it moved or was replaced since."""
        if forge.is_forge_model(owner):
            return forge.first_weight(owner)
        from . import sdnext  # imports torch: only once a model is at hand

        if sdnext.is_pipeline(owner):
            return sdnext.first_parameter(owner)
        parameters = getattr(owner, "parameters", None)
        return next(parameters(), None) if callable(parameters) else None

    @contextlib.contextmanager
    def model_for_training(self) -> Iterator[None]:
        """Forge: its selected model loaded (it loads lazily, at the first generation) and its parts on the
        compute device through its memory manager, so the run trains on them. Other web UIs: nothing."""
        model = self.loaded_model()
        if self.kind() == "forge" and model is None:
            model = forge.load_selected_model(self.module("modules.sd_models"))
        if not forge.is_forge_model(model):
            yield
            return
        try:
            forge.tensors(model)
        except forge.NotShareable:  # the file is loaded instead: Forge's model stays where it is
            yield
            return
        with forge.on_compute_device(model, self.loaded_module(MEMORY_MANAGERS[0])):
            yield

    def keeps_weights_in_place(self, owner: Any) -> bool:
        """Whether the web UI leaves its model's tensors where they are between runs (Forge may move them)."""
        return not forge.is_forge_model(owner) or forge.stays_put(owner)


@dataclass
class ModelWeights:
    """A web UI model's tensors (original key names, hijack wrappers included) and what describes them."""

    tensors: dict[str, Any]
    original_config: Path | None  # the LDM/SGM yaml the web UI built the model from
    prediction_type: str | None
    owner: Any  # the web UI's model object, to tell when it is replaced
    text_encoders: dict[str, dict[str, Any]] | None = None  # by key, in the transformers layout (Forge)
