"""Inside SD.Next the trainer uses the web UI's loaded diffusers pipeline, module for module: no second copy,
nothing unloaded, and every module as it was afterwards. Here SD.Next is the fake of tests/fake_hosts.py
with a real tiny pipeline as its `sd_model`, set up as SD.Next leaves it: a loaded embedding's token added to
its tokenizer (and the token table resized to match), attention processors of its choice, weights that
require grad (diffusers' default)."""

from __future__ import annotations

import hashlib
import logging

import pytest
import torch
from PIL import Image

from ti_core.config import DataConfig, TrainConfig


def digest(pipeline) -> str:
    """Every tensor of the pipeline's modules: name, dtype and bytes."""
    hashed = hashlib.sha256()
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipeline, part, None)
        if module is None:
            continue
        for name, tensor in sorted(module.state_dict().items()):
            hashed.update(f"{part}.{name}|{tensor.dtype}".encode())
            hashed.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return hashed.hexdigest()


def module_state(pipeline) -> dict:
    """What a run may change on a module besides its weights."""
    state = {}
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipeline, part, None)
        if module is None:
            continue
        state[part] = {
            "requires_grad": [p.requires_grad for p in module.parameters()],
            "training": [m.training for m in module.modules()],
            "forwards": sum("forward" in vars(m) for m in module.modules()),
            "data": [t.data_ptr() for t in module.parameters()],
            "dtype": {t.dtype for t in module.parameters()},
        }
        if hasattr(module, "attn_processors"):
            state[part]["processors"] = {k: type(v) for k, v in module.attn_processors.items()}
    return state


@pytest.fixture
def sdnext_with_pipeline(monkeypatch, tmp_path, tiny_model_dirs, request):
    """A fake SD.Next whose `shared.sd_model` is a real tiny pipeline (`request.param`: the architecture)."""
    import fake_hosts
    from diffusers import DiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor

    arch = getattr(request, "param", "sd1")
    folder = tiny_model_dirs[arch]
    host = fake_hosts.install(monkeypatch, "sdnext", folder, tmp_path)
    pipeline = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipeline.sd_checkpoint_info = host.model.sd_checkpoint_info
    pipeline.embedding_db = host.model.embedding_db
    pipeline.tokenizer.add_tokens(["sdnext-loaded"])  # SD.Next adds a token per loaded embedding
    pipeline.text_encoder.resize_token_embeddings(len(pipeline.tokenizer))
    pipeline.unet.set_attn_processor(AttnProcessor())  # SD.Next's choice, not the trainer's
    host.modules["modules.sd_models"].model_data.sd_model = pipeline
    host.shared.sd_model = pipeline
    return host, pipeline


def _run(backend, tmp_path, steps: int = 2):
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    Image.new("RGB", (64, 64), (10, 200, 90)).save(images / "a.png")
    config = TrainConfig(
        name="in_sdnext",
        embeddings_dir=backend.embeddings_dir,
        log_dir=tmp_path / "log",
        steps=steps,
        data=DataConfig(images=images, resolution=64),
        gradient_checkpointing=True,
    )
    job = backend.start_training(config)
    assert job.wait(300)
    snapshot = job.snapshot()
    assert snapshot["stopped"] == "done", snapshot["message"]
    return snapshot


@pytest.mark.parametrize("sdnext_with_pipeline", ["sd1", "sdxl"], indirect=True)
def test_a_run_in_sdnext_trains_on_its_pipeline_and_leaves_it_as_it_was(
    sdnext_with_pipeline, tmp_path, monkeypatch, one_thread
):
    import ti_core.models
    from ti_core.formats import load_embedding
    from ti_host.backend import HostBackend

    host, pipeline = sdnext_with_pipeline
    before, state = digest(pipeline), module_state(pipeline)
    loads = []
    monkeypatch.setattr(ti_core.models, "load_model", lambda *a, **k: loads.append(a))
    backend = HostBackend()
    model = backend.loaded_model()  # what cards, Create and Inspect use: no "no model loaded"
    assert model is not None and model.shares_weights and model.unet is pipeline.unet
    assert "sdnext-loaded" not in model.tokenizer.get_vocab()  # our own clean tokenizer
    assert model.encoders[0].token_table.shape[0] == len(model.tokenizer)  # SD.Next's added row is not ours

    snapshot = _run(backend, tmp_path)

    assert loads == []  # the checkpoint was never read from disk
    assert digest(pipeline) == before
    assert module_state(pipeline) == state
    names = host.record.names()
    assert "unload_model_weights" not in names and "reload_model_weights" not in names
    assert load_embedding(snapshot["final_path"]).step == 2
    assert host.shared.state.job == ""  # the web UI's job state ended


def test_an_offloaded_pipeline_is_not_shared_and_the_log_says_why(sdnext_with_pipeline, caplog):
    from ti_host.backend import HostBackend

    _host, pipeline = sdnext_with_pipeline
    pipeline.unet.conv_in._hf_hook = object()  # accelerate's offload hooks hang on the modules they move
    with caplog.at_level(logging.INFO, logger="ti_host"):
        backend = HostBackend()
        assert backend.loaded_model() is None  # not shared; a copy is loaded only for a run
        assert backend.loaded_model() is None
    lines = [r.getMessage() for r in caplog.records if "cannot be shared" in r.getMessage()]
    assert len(lines) == 1 and "unet is under model offload" in lines[0]


def test_quantized_weights_are_not_shared(sdnext_with_pipeline):
    from ti_host import sdnext

    _host, pipeline = sdnext_with_pipeline
    assert sdnext.unshareable_reason(pipeline) is None
    pipeline.vae.register_buffer("quantized_scale", torch.zeros(2, dtype=torch.int8))
    assert "vae is quantized" in sdnext.unshareable_reason(pipeline)


def test_sdnexts_rescaled_betas_make_the_run_zero_terminal_snr(sdnext_with_pipeline):
    """SD.Next's sampler option "rescale betas" (zero terminal SNR) is in its pipeline's scheduler config: the
    model trained on follows it, as the option is now."""
    from ti_host.backend import HostBackend

    _host, pipeline = sdnext_with_pipeline
    backend = HostBackend()
    assert not backend.current_model().zero_terminal_snr
    pipeline.scheduler.register_to_config(rescale_betas_zero_snr=True)  # SD.Next sets it at its next generation
    model = backend.current_model()
    assert model.zero_terminal_snr and model.scheduler.alphas_cumprod[-1] < 1e-6
    pipeline.scheduler.register_to_config(rescale_betas_zero_snr=False)
    assert not backend.current_model().zero_terminal_snr
