"""Training inside Forge on its own loaded model: its parts as Forge builds them (LDM-named UNet and VAE,
transformers CLIP text encoders, all made under inference_mode), no second copy, nothing written."""

from __future__ import annotations

import copy
import hashlib
import logging
import types

import fake_hosts
import pytest
import torch
from PIL import Image

from ti_core.config import DataConfig, TrainConfig
from ti_core.ldm_keys import UNET_PREFIX, VAE_PREFIX, pipeline_to_ldm
from ti_core.testing import build_tiny_pipeline
from ti_core.train import train


def _module_of(tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A torch module with exactly these parameters under these names (Forge's own modules have them so)."""
    root = torch.nn.Module()
    for name, tensor in tensors.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if part not in module._modules:
                module.add_module(part, torch.nn.Module())
            module = module._modules[part]
        module.register_parameter(leaf, torch.nn.Parameter(tensor, requires_grad=tensor.is_floating_point()))
    return root


class Patcher:
    """Forge's ModelPatcher as the memory manager sees it: devices and the model it moves."""

    def __init__(self, model, device: str = "cpu") -> None:
        self.model, self.load_device, self.offload_device = model, torch.device(device), torch.device(device)


class ForgeEngine(types.SimpleNamespace):
    """Stands for ForgeDiffusionEngine (a plain class: weak references work)."""


def forge_engine(pipeline, architecture: str, info) -> ForgeEngine:
    """A ForgeDiffusionEngine of a tiny model, built the way Forge builds one (under inference_mode)."""
    with torch.inference_mode():
        ldm = pipeline_to_ldm(pipeline, architecture)
        unet = _module_of(
            {k.removeprefix(UNET_PREFIX): v.clone() for k, v in ldm.items() if k.startswith(UNET_PREFIX)}
        )
        vae = _module_of({k.removeprefix(VAE_PREFIX): v.clone() for k, v in ldm.items() if k.startswith(VAE_PREFIX)})
        keys = {"sd1": ["clip_l"], "sd2": ["clip_h"], "sdxl": ["clip_l", "clip_g"]}[architecture]
        sources = [pipeline.text_encoder, getattr(pipeline, "text_encoder_2", None)]
        encoders = torch.nn.ModuleDict()
        for key, source in zip(keys, sources, strict=False):
            wrapper = torch.nn.Module()
            wrapper.transformer = copy.deepcopy(source).to(torch.float16)  # Forge stores them so on the CPU
            encoders[key] = wrapper
    unet_model = torch.nn.Module()
    unet_model.diffusion_model = unet
    unet_model.predictor = types.SimpleNamespace(prediction_type=pipeline.scheduler.config.prediction_type)
    clip = types.SimpleNamespace(cond_stage_model=encoders, patcher=Patcher(encoders))
    vae_object = types.SimpleNamespace(first_stage_model=vae, patcher=Patcher(vae))
    return ForgeEngine(
        forge_objects=types.SimpleNamespace(unet=Patcher(unet_model), clip=clip, vae=vae_object),
        is_sd1=architecture == "sd1",
        is_sd2=architecture == "sd2",
        is_sdxl=architecture == "sdxl",
        sd_checkpoint_info=info,
    )


def forge_tensors(engine) -> list[torch.Tensor]:
    objects = engine.forge_objects
    modules = [objects.unet.model.diffusion_model, objects.vae.first_stage_model, objects.clip.cond_stage_model]
    return [tensor for module in modules for tensor in module.state_dict().values()]


def digest(tensors: list[torch.Tensor]) -> str:
    hasher = hashlib.sha256()
    for tensor in tensors:
        hasher.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


@pytest.fixture
def forge(monkeypatch, tmp_path, tiny_model_dirs, arch, ui_modules):
    """The fake Forge with a tiny model of `arch` loaded as Forge holds one; its memory manager records loads."""
    import ti_core.shared_weights

    host = fake_hosts.install(monkeypatch, "forge", tiny_model_dirs[arch], tmp_path)
    # The tiny models stand for the standard SD1/SD2/SDXL: their configs are the ones to build from.
    monkeypatch.setattr(
        ti_core.shared_weights, "skeleton_for", lambda architecture, prediction=None: tiny_model_dirs[architecture]
    )
    model = host.modules["modules.sd_models"].model_data.sd_model
    pipeline = build_tiny_pipeline(arch, "v_prediction" if arch == "sd2" else "epsilon")
    engine = forge_engine(pipeline, arch, model.sd_checkpoint_info)
    engine.text_processing_engine = model.text_processing_engine_l
    host.modules["modules.sd_models"].model_data.sd_model = engine
    host.modules["modules.shared"].sd_model = engine
    loads = []
    host.modules["backend.memory_management"].load_models_gpu = lambda patchers, **kw: loads.append(patchers)
    return types.SimpleNamespace(host=host, engine=engine, loads=loads)


@pytest.fixture
def ui_modules(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gradio", sys.modules.get("gradio") or fake_hosts.gradio_stub())


def test_a_run_trains_on_forges_own_parts_and_writes_none_of_them(forge, arch, tmp_path, one_thread):
    from ti_host.backend import HostBackend

    backend = HostBackend()
    tensors = forge_tensors(forge.engine)
    before = digest(tensors)
    flags = [(tensor.requires_grad, torch.is_inference(tensor)) for tensor in tensors]
    images = tmp_path / "images"
    images.mkdir()
    for index in range(2):
        Image.new("RGB", (64, 64), (40 * index, 90, 160)).save(images / f"{index}.png")
    config = TrainConfig(
        name=f"forge-{arch}",
        init_text="cat",
        embeddings_dir=tmp_path / "embeddings",
        log_dir=tmp_path / "log",
        preview_every=0,
        steps=2,
        learning_rate="0.05",
        data=DataConfig(images=images, resolution=64),
    )

    with backend.training_context():
        model = backend.current_model()
        result = train(model, config)

    assert model.shares_weights and model.architecture == arch
    # the same memory as Forge's parts: its first UNet weight and every text encoder's token embedding
    forge_unet = next(forge.engine.forge_objects.unet.model.diffusion_model.parameters())
    assert model.unet.conv_in.weight.data_ptr() == forge_unet.data_ptr()
    for encoder, (_key, wrapper) in zip(
        model.encoders, forge.engine.forge_objects.clip.cond_stage_model.items(), strict=True
    ):
        ours = encoder.model.get_input_embeddings().weight
        theirs = wrapper.transformer.get_input_embeddings().weight
        assert ours.untyped_storage().data_ptr() == theirs.untyped_storage().data_ptr()
    assert result.embedding_path.is_file()
    assert digest(tensors) == before
    assert [(tensor.requires_grad, torch.is_inference(tensor)) for tensor in tensors] == flags
    # Forge's memory manager put the three parts where it computes, as a generation does
    objects = forge.engine.forge_objects
    assert forge.loads == [[objects.unet, objects.clip.patcher, objects.vae.patcher]]


@pytest.mark.parametrize("arch", ["sd1"])
def test_quantized_weights_fall_back_to_the_file_with_one_line(forge, caplog):
    from ti_host.backend import HostBackend

    unet = forge.engine.forge_objects.unet.model.diffusion_model
    first = next(unet.parameters())
    first.data = first.data.to(torch.float8_e4m3fn)
    backend = HostBackend()
    with caplog.at_level(logging.INFO, logger="ti_host"):
        model = backend.current_model()
    assert not model.shares_weights
    lines = [record.getMessage() for record in caplog.records if "cannot be shared" in record.getMessage()]
    assert len(lines) == 1 and "float8_e4m3fn" in lines[0] and "\n" not in lines[0]


@pytest.mark.parametrize("arch", ["sd1"])
def test_forges_api_database_is_reloaded_through_its_refresh_route(forge, tmp_path):
    from ti_host.host import Host

    api_database = fake_hosts.ForgePageDatabase(forge.host.record, "api")

    class Api:
        embedding_db = api_database

        def refresh_embeddings(self):
            pass

    app = types.SimpleNamespace(
        routes=[types.SimpleNamespace(path="/sdapi/v1/refresh-embeddings", endpoint=Api().refresh_embeddings)]
    )
    host = Host()
    host.app = app
    assert "api.embedding_db" in host.reload_embeddings()
    assert ("reload", ("api", {"force_reload": True, "sync_with_sd_model": False})) in forge.host.record.calls


@pytest.mark.parametrize("arch", ["sd1"])
def test_where_forge_moves_its_parts_our_aliases_are_not_kept_between_uses(forge):
    """On a GPU Forge loads the parts to it and offloads them to the CPU later: aliases kept after a move
    would hold the old memory alive (a second copy), so they are held only while in use."""
    import gc

    from ti_host.backend import HostBackend

    backend = HostBackend()
    assert backend.loaded_model() is not None
    assert backend._shared_model is not None  # --always-cpu: nothing moves, the model over them is kept
    for patcher in (forge.engine.forge_objects.unet, forge.engine.forge_objects.clip.patcher):
        patcher.load_device = torch.device("cuda")  # loads to the GPU, offloads to the CPU
    backend = HostBackend()
    model = backend.loaded_model()
    assert model is not None and model.shares_weights and backend._shared_model is None
    del model
    gc.collect()
    assert backend._model_ref() is None  # nothing of ours holds Forge's memory between uses


def test_reforges_model_stays_on_the_a1111_path():
    """reForge's LatentDiffusion carries forge_objects too; its own state dict is what is shared there."""
    from ti_host import forge

    class LatentDiffusion(torch.nn.Module):
        forge_objects = types.SimpleNamespace()

    assert not forge.is_forge_model(LatentDiffusion())
    assert forge.is_forge_model(ForgeEngine(forge_objects=types.SimpleNamespace()))
