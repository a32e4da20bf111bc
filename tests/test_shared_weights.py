"""Training on tensors that already exist (a web UI's loaded model), and checkpoints built from their .yaml."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from ti_core.config import DataConfig, TrainConfig
from ti_core.ldm_keys import pipeline_to_ldm
from ti_core.models import ModelLoadError, from_pipeline, load_model
from ti_core.shared_weights import model_from_tensors, strip_wrappers
from ti_core.testing import ARCHITECTURES, build_tiny_pipeline, save_ldm_checkpoint, tiny_ldm_state_dict
from ti_core.train import train


def as_a1111_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Key names as A1111's hijacked model reports them: its text encoders and token embeddings are wrapped."""
    renamed = {}
    for key, value in state_dict.items():
        for encoder in ("cond_stage_model.", "conditioner.embedders.0.", "conditioner.embedders.1."):
            if key.startswith(encoder):
                key = encoder + "wrapped." + key[len(encoder) :]
        renamed[key.replace("token_embedding.weight", "token_embedding.wrapped.weight")] = value
    return renamed


def digest(tensors: dict[str, torch.Tensor]) -> str:
    hashed = hashlib.sha256()
    for key in sorted(tensors):
        hashed.update(key.encode())
        hashed.update(tensors[key].detach().contiguous().view(torch.uint8).numpy().tobytes())
    return hashed.hexdigest()


@pytest.fixture(scope="module")
def host_models(tmp_path_factory):
    """Per architecture: (a diffusers pipeline, its config folder, its weights as a web UI holds them)."""
    root = tmp_path_factory.mktemp("shared")
    models = {}
    for arch in ARCHITECTURES:
        pipeline = build_tiny_pipeline(arch, "epsilon")
        folder = root / arch
        pipeline.save_pretrained(folder, safe_serialization=True)
        models[arch] = (pipeline, folder, as_a1111_names(tiny_ldm_state_dict(pipeline, arch)))
    return models


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_model_uses_the_web_uis_tensors_and_computes_the_same(host_models, arch):
    pipeline, folder, host_weights = host_models[arch]
    model = model_from_tensors(strip_wrappers(host_weights), source=f"{arch}.safetensors", config=folder)
    assert model.shares_weights and model.architecture == arch

    storages = {tensor.untyped_storage().data_ptr() for tensor in host_weights.values()}
    modules = [model.unet, model.vae, *(encoder.model for encoder in model.encoders)]
    for module in modules:
        for name, parameter in module.named_parameters():
            if name != "text_projection.weight":  # a transposed copy of one small matrix (see shared_weights)
                assert parameter.untyped_storage().data_ptr() in storages, f"{name} is a copy"

    reference = from_pipeline(pipeline, "reference")
    ids = torch.randint(0, 49406, (1, 77), generator=torch.Generator().manual_seed(0))
    for ours, theirs in zip(model.encoders, reference.encoders, strict=True):
        assert torch.equal(ours.token_table, theirs.token_table)
        assert torch.equal(
            ours.model(ids, output_hidden_states=True).hidden_states[-2],
            theirs.model(ids, output_hidden_states=True).hidden_states[-2],
        )
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, reference.unet.config.cross_attention_dim, generator=generator)
    extra = {}
    if arch == "sdxl":
        pooled = reference.unet.config.projection_class_embeddings_input_dim - 6 * 8
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, pooled), "time_ids": torch.zeros(1, 6)}}
    with torch.no_grad():
        assert torch.equal(
            model.unet(latents, 10, context, **extra).sample, reference.unet(latents, 10, context, **extra).sample
        )
        pixels = torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1
        assert torch.equal(model.vae.encode(pixels).latent_dist.mean, reference.vae.encode(pixels).latent_dist.mean)


def test_training_on_shared_tensors_leaves_them_bitwise_unchanged(host_models, tmp_path, one_thread):
    _pipeline, folder, host_weights = host_models["sd1"]
    before = digest(host_weights)
    images = tmp_path / "images"
    images.mkdir()
    for index in range(2):
        Image.new("RGB", (64, 64), (40 * index, 120, 200)).save(images / f"{index}.png")
    model = model_from_tensors(strip_wrappers(host_weights), source="sd1.safetensors", config=folder)
    config = TrainConfig(
        name="shared_run",
        embeddings_dir=tmp_path / "embeddings",
        log_dir=tmp_path / "log",
        init_text="tree",
        steps=3,
        learning_rate="0.05",
        preview_every=2,
        preview_steps=2,
        data=DataConfig(images=images, resolution=64),
    )
    result = train(model, config)
    assert result.embedding_path.is_file()
    assert digest(host_weights) == before


# ---- a checkpoint that fits no shipped config, with its original config beside it --------------------------

TINY_LDM_YAML = """\
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    timesteps: 1000
    image_size: 64
    channels: 4
    scale_factor: 0.18215
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32
        in_channels: 4
        out_channels: 4
        model_channels: 32
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 1
        channel_mult: [ 1, 2, 4, 4 ]
        num_heads: 8
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 768
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [ 1, 2, 4, 4 ]
          num_res_blocks: 1
          attn_resolutions: []
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
"""


def _checkpoint_of_yaml(original_yaml: str, path: Path):
    """An SD1 checkpoint (real CLIP-L text encoder, UNet and VAE as the yaml describes them) saved at `path`."""
    import yaml
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from ti_core.checkpoints import skeleton_for
    from ti_core.vocab import clip_tokenizer

    original = yaml.safe_load(original_yaml)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**create_unet_diffusers_config_from_ldm(original, {}))
    vae = AutoencoderKL(**create_vae_diffusers_config_from_ldm(original, {}))
    text = CLIPTextModel(CLIPTextConfig.from_pretrained(skeleton_for("sd1") / "text_encoder"))
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=build_tiny_pipeline().scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return save_ldm_checkpoint(pipeline_to_ldm(pipeline, "sd1"), path), pipeline


@pytest.fixture(scope="module")
def checkpoint_with_yaml(tmp_path_factory):
    """A small SD1 checkpoint (real CLIP-L text encoder, small UNet and VAE), as A1111 users keep such models."""
    return _checkpoint_of_yaml(TINY_LDM_YAML, tmp_path_factory.mktemp("yaml") / "small.safetensors")


def test_a_checkpoint_loads_through_the_yaml_beside_it(checkpoint_with_yaml):
    path, pipeline = checkpoint_with_yaml
    yaml_path = path.with_suffix(".yaml")
    yaml_path.unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match="does not fit the model config") as caught:
        load_model(path)
    assert ".yaml" in str(caught.value)  # the error says what would fix it

    yaml_path.write_text(TINY_LDM_YAML, encoding="utf-8")
    model = load_model(path)
    assert model.architecture == "sd1" and not model.shares_weights
    assert model.unet.config.block_out_channels == pipeline.unet.config.block_out_channels
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the same weights; the attention kernel may differ in the last bit
        torch.testing.assert_close(model.unet(latents, 5, context).sample, pipeline.unet(latents, 5, context).sample)
    ids = torch.tensor([[49406, 2677, 49407] + [49407] * 74])
    with torch.no_grad():
        assert torch.equal(model.encoders[0].model(ids)[0], pipeline.text_encoder(ids)[0])


# ---- inside a (fake) web UI whose model is a torch module shaped like A1111's ------------------------------


def ldm_module(state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A torch module with exactly these parameters under these names, as A1111's LatentDiffusion has them."""
    root = torch.nn.Module()
    for key, value in state_dict.items():
        *path, leaf = key.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        if value.is_floating_point():  # A1111 leaves requires_grad on: it generates under no_grad
            module.register_parameter(leaf, torch.nn.Parameter(value.clone(), requires_grad=True))
        else:
            module.register_buffer(leaf, value.clone())
    return root


@pytest.fixture
def a1111_with_sd_model(monkeypatch, tmp_path, host_models):
    """A fake A1111 (tests/fake_hosts.py) whose loaded model is an A1111-shaped module of the tiny SD1."""
    import fake_hosts

    _pipeline, folder, host_weights = host_models["sd1"]
    host = fake_hosts.install(monkeypatch, "a1111", folder, tmp_path)
    model = ldm_module(host_weights)
    model.sd_checkpoint_info = host.model.sd_checkpoint_info
    model.parameterization = "eps"
    model.used_config = None
    host.modules["modules.sd_models"].model_data.sd_model = model
    host.shared.sd_model = model
    # The tiny UNet fits no shipped config: the web UI would have built it from its .yaml; here the
    # diffusers folder stands in for that config.
    import ti_core.shared_weights as shared_weights

    real = shared_weights.model_from_tensors
    monkeypatch.setattr(
        shared_weights, "model_from_tensors", lambda tensors, **kw: real(tensors, **{**kw, "config": folder})
    )
    return host, model


def test_a_run_in_the_web_ui_trains_on_its_model_and_leaves_it_as_it_was(a1111_with_sd_model, tmp_path, one_thread):
    import ti_core.models
    from ti_host.backend import HostBackend

    host, sd_model = a1111_with_sd_model
    before = digest(sd_model.state_dict())
    requires_grad = {name: p.requires_grad for name, p in sd_model.named_parameters()}
    loads = []
    monkeypatch_load = ti_core.models.load_model
    ti_core.models.load_model = lambda *a, **k: loads.append(a) or monkeypatch_load(*a, **k)
    try:
        backend = HostBackend()
        model = backend.current_model()
        assert model.shares_weights and backend.loaded_model() is model  # Create, cards and Inspect use it too
        token_table = (
            sd_model.cond_stage_model.wrapped.transformer.text_model.embeddings.token_embedding.wrapped.weight
        )
        assert model.encoders[0].token_table.data_ptr() == token_table.data_ptr()

        images = tmp_path / "images"
        images.mkdir()
        Image.new("RGB", (64, 64), (10, 200, 90)).save(images / "a.png")
        config = TrainConfig(
            name="in_host",
            embeddings_dir=backend.embeddings_dir,
            log_dir=tmp_path / "log",
            steps=2,
            data=DataConfig(images=images, resolution=64),
        )
        job = backend.start_training(config)
        assert job.wait(300)
        assert job.snapshot()["stopped"] == "done", job.snapshot()["message"]
    finally:
        ti_core.models.load_model = monkeypatch_load
    assert loads == []  # the checkpoint file was never read
    assert digest(sd_model.state_dict()) == before
    assert {name: p.requires_grad for name, p in sd_model.named_parameters()} == requires_grad
    # The web UI's model stayed where it was: nothing was sent to the CPU and back.
    assert not {"send_model_to_cpu", "unload_model_weights", "unload_all_models"} & set(host.record.names())


# SD1's base width, cross-attention and text widths, but two levels that do not widen and one res block per
# level: the sizes that are compared first all match the standard config, the blocks do not.
SD_WIDTH_OTHER_BLOCKS_YAML = (
    TINY_LDM_YAML.replace("model_channels: 32", "model_channels: 320")
    .replace("channel_mult: [ 1, 2, 4, 4 ]", "channel_mult: [ 1, 1 ]")
    .replace("attention_resolutions: [ 4, 2, 1 ]", "attention_resolutions: [ 2 ]")
)


def test_a_checkpoint_with_sd_widths_but_other_blocks_is_built_from_its_yaml(tmp_path):
    path, pipeline = _checkpoint_of_yaml(SD_WIDTH_OTHER_BLOCKS_YAML, tmp_path / "same-width.safetensors")
    assert pipeline.unet.config.block_out_channels[0] == 320  # as wide as SD1 where the old check looked

    with pytest.raises(ModelLoadError, match="does not fit the model config") as caught:
        load_model(path)
    message = str(caught.value)
    assert "\n" not in message and ".yaml" in message
    # it names the first weight whose shape differs, with both shapes
    assert re.search(
        r"model\.diffusion_model\.\S+ is \([\d, ]+\) in the checkpoint, \([\d, ]+\) in the config", message
    )

    path.with_suffix(".yaml").write_text(SD_WIDTH_OTHER_BLOCKS_YAML, encoding="utf-8")
    model = load_model(path)
    assert model.unet.config.block_out_channels == pipeline.unet.config.block_out_channels
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.unet(latents, 5, context).sample, pipeline.unet(latents, 5, context).sample)


def test_a_zero_terminal_snr_model_in_the_web_ui_is_trained_on_its_schedule(a1111_with_sd_model, tmp_path, one_thread):
    """The web UI's loaded model is zero-terminal-SNR when its checkpoint says so (the `ztsnr` marker key of
    NoobAI-XL v-pred, read from the header only) or when the web UI is set to sample it that way; the run
    trains on the rescaled schedule and records it."""
    from safetensors.torch import save_file

    from ti_host.backend import HostBackend

    host, sd_model = a1111_with_sd_model
    backend = HostBackend()
    assert not backend.current_model().zero_terminal_snr  # nothing says so

    host.shared.opts.data["sd_noise_schedule"] = "Zero Terminal SNR"  # Settings > Sampler parameters
    model = backend.current_model()
    assert model.zero_terminal_snr and model.scheduler.alphas_cumprod[-1] < 1e-6
    host.shared.opts.data["sd_noise_schedule"] = "Default"
    assert not backend.current_model().zero_terminal_snr

    marked = tmp_path / "noob-vpred.safetensors"  # stands for the checkpoint file the web UI loaded
    save_file({"ztsnr": torch.zeros(0), "v_pred": torch.zeros(0)}, str(marked))
    sd_model.sd_checkpoint_info.filename = str(marked)
    assert backend.current_model().zero_terminal_snr

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 64), (10, 200, 90)).save(images / "a.png")
    config = TrainConfig(
        name="ztsnr", embeddings_dir=backend.embeddings_dir, log_dir=tmp_path / "log", steps=1,
        data=DataConfig(images=images, resolution=64), preview_every=0,
    )  # fmt: skip
    job = backend.start_training(config)
    assert job.wait(300) and job.snapshot()["stopped"] == "done", job.snapshot()["message"]
    recorded = json.loads((tmp_path / "log" / "ztsnr" / "settings.json").read_text())
    assert recorded["model"]["zero_terminal_snr"] is True
