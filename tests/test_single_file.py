"""Single-file checkpoints (.safetensors / .ckpt in the original LDM/SGM layout), loaded offline and safely."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ti_core import single_file
from ti_core.checkpoints import CONFIG_ROOT, SKELETONS, check_fits, detect_architecture, normalize_keys, skeleton_for
from ti_core.ldm_keys import UNET_PREFIX, openclip_to_ldm, pipeline_to_ldm, unet_to_ldm, vae_to_ldm
from ti_core.models import ModelLoadError, load_model
from ti_core.single_file import predicts_v, sidecar_prediction_type
from ti_core.testing import (
    FakeModelCheckpoint,
    build_tiny_pipeline,
    save_ldm_checkpoint,
    save_tiny_single_file,
    tiny_ldm_state_dict,
)

ARCHITECTURES = ("sd1", "sd2", "sdxl")
FORMATS = ("safetensors", "ckpt")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, SimpleNamespace]:
    """Per architecture: a tiny epsilon pipeline, its diffusers folder, its LDM state dict and both single files."""
    root = tmp_path_factory.mktemp("single-file")
    made = {}
    for arch in ARCHITECTURES:
        pipeline = build_tiny_pipeline(arch)
        folder = root / arch / "model-diffusers"
        pipeline.save_pretrained(folder, safe_serialization=True)
        state = tiny_ldm_state_dict(pipeline, arch)
        files = {fmt: save_ldm_checkpoint(state, root / arch / f"model.{fmt}", fmt) for fmt in FORMATS}
        made[arch] = SimpleNamespace(pipeline=pipeline, folder=folder, state=state, files=files)
    return made


@pytest.fixture(scope="module")
def single_files(tiny) -> dict[tuple[str, str], tuple[Path, Path]]:
    """(arch, fmt) -> (checkpoint file, its diffusers folder)."""
    return {(arch, fmt): (tiny[arch].files[fmt], tiny[arch].folder) for arch in ARCHITECTURES for fmt in FORMATS}


@pytest.fixture(scope="module")
def references(tiny):
    """The diffusers-folder models the single files were written from."""
    return {arch: load_model(tiny[arch].folder) for arch in ARCHITECTURES}


@pytest.fixture(scope="module")
def ldm_states(tiny):
    return {arch: tiny[arch].state for arch in ARCHITECTURES}


def assert_same_weights(model, reference):
    assert model.architecture == reference.architecture
    pairs = [(model.unet, reference.unet), (model.vae, reference.vae)]
    pairs += [(a.model, b.model) for a, b in zip(model.encoders, reference.encoders, strict=True)]
    assert [e.key for e in model.encoders] == [e.key for e in reference.encoders]
    for loaded, expected in pairs:
        loaded_state, expected_state = loaded.state_dict(), expected.state_dict()
        assert loaded_state.keys() == expected_state.keys()
        for key, value in expected_state.items():
            assert torch.equal(loaded_state[key], value), key


def copy_beside(file: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(file, folder / file.name))


# --- loading real-layout files ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_single_file_loads_bit_identical(single_files, references, architecture, fmt):
    file, folder = single_files[(architecture, fmt)]
    model = load_model(file, config=folder)
    assert model.architecture == architecture
    assert model.prediction_type == "epsilon"
    assert model.file_path == file and model.name == "model"
    assert model.widths == references[architecture].widths
    assert_same_weights(model, references[architecture])


def test_save_tiny_single_file(tmp_path):
    file, folder = save_tiny_single_file(tmp_path / "v.ckpt", "sd2", "v_prediction", fmt="ckpt")
    assert file == tmp_path / "v.ckpt" and folder == tmp_path / "v-diffusers"
    assert (folder / "model_index.json").is_file()
    model, reference = load_model(file, config=folder), load_model(folder)
    assert model.prediction_type == reference.prediction_type == "v_prediction"
    assert_same_weights(model, reference)


def test_ckpt_carries_lightning_and_numpy_objects(single_files):
    import pickletools
    import zipfile

    file, _ = single_files[("sd1", "ckpt")]
    with zipfile.ZipFile(file) as archive:
        pickle_bytes = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    ops = " ".join(str(arg) for _, arg, _ in pickletools.genops(pickle_bytes))
    assert "pytorch_lightning.callbacks.model_checkpoint ModelCheckpoint" in ops
    assert "multiarray scalar" in ops  # numpy.core or numpy._core
    left = getattr(sys.modules.get("pytorch_lightning.callbacks.model_checkpoint"), "ModelCheckpoint", object)
    assert not issubclass(left, FakeModelCheckpoint)  # the synthetic module is gone again


def test_legacy_torch_format_and_renamed_safetensors_load(single_files, references, ldm_states, tmp_path):
    legacy = save_ldm_checkpoint(ldm_states["sd1"], tmp_path / "legacy.ckpt", "ckpt", legacy=True)
    _, folder = single_files[("sd1", "ckpt")]
    assert_same_weights(load_model(legacy, config=folder), references["sd1"])
    state, metadata = single_file.read_state_dict(legacy)
    assert state.keys() == ldm_states["sd1"].keys() and metadata == {}
    renamed = tmp_path / "renamed.ckpt"  # a safetensors file with the wrong extension
    shutil.copy(single_files[("sd1", "safetensors")][0], renamed)
    assert_same_weights(load_model(renamed, config=folder), references["sd1"])


def test_old_sd1_clip_layout_and_sgm_sd2_layout(single_files, references, ldm_states, tmp_path):
    old = {
        key.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): value
        for key, value in ldm_states["sd1"].items()
    }
    file = save_ldm_checkpoint(old, tmp_path / "old.safetensors")
    assert_same_weights(load_model(file, config=single_files[("sd1", "ckpt")][1]), references["sd1"])
    sgm = {
        key.replace("cond_stage_model.model.", "conditioner.embedders.0.model."): v
        for key, v in ldm_states["sd2"].items()
    }
    shapes = {key: tuple(v.shape) for key, v in sgm.items()}
    shapes["conditioner.embedders.0.model.ln_final.weight"] = (1024,)  # SD2.1-turbo: real OpenCLIP-H width
    assert detect_architecture(shapes) == "sd2"
    assert normalize_keys(sgm, "sd2").keys() == ldm_states["sd2"].keys()


# --- prediction type ----------------------------------------------------------------------------


def test_sd2_v_prediction_from_sidecar_yaml(single_files, tmp_path):
    file, folder = single_files[("sd2", "safetensors")]
    local = copy_beside(file, tmp_path)
    local.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n', encoding="utf-8")
    model = load_model(local, config=folder)  # the folder's scheduler says epsilon
    assert model.prediction_type == "v_prediction"
    assert load_model(local, config=folder, prediction_type="epsilon").prediction_type == "epsilon"


@pytest.mark.parametrize("fmt", FORMATS)
def test_sd2_v_prediction_from_argument(single_files, fmt):
    file, folder = single_files[("sd2", fmt)]
    model = load_model(file, config=folder, prediction_type="v_prediction")
    assert model.prediction_type == "v_prediction"
    assert model.scheduler.config.prediction_type == "v_prediction"


def test_sd2_unet_probe_picks_the_skeleton(single_files, tmp_path, monkeypatch):
    """Real-size SD2 without any hint (no config): A1111's UNet probe picks 512-eps or 768-v.

    Tiny stand-ins replace the real skeletons; the eps UNet loaded for the probe is reused.
    """
    file, eps_folder = single_files[("sd2", "safetensors")]
    v_folder = tmp_path / "v-skeleton"
    shutil.copytree(eps_folder, v_folder)
    unet_config = json.loads((v_folder / "unet" / "config.json").read_text(encoding="utf-8"))
    (v_folder / "unet" / "config.json").write_text(json.dumps({**unet_config, "sample_size": 12}), encoding="utf-8")
    folders = {"epsilon": eps_folder, "v_prediction": v_folder}
    monkeypatch.setattr(single_file, "skeleton_for", lambda arch, pred=None: folders[pred or "epsilon"])
    monkeypatch.setattr(single_file, "is_real_size_sd2", lambda shapes: True)
    probed = []

    def probe(unet):
        probed.append(unet)
        return probe.says_v

    monkeypatch.setattr(single_file, "predicts_v", probe)
    for says_v, expected, sample_size in [(True, "v_prediction", 12), (False, "epsilon", 8)]:
        probed.clear()
        probe.says_v = says_v
        model = load_model(file)
        assert len(probed) == 1 and model.prediction_type == expected
        assert model.unet.config.sample_size == sample_size
        assert (model.unet is probed[0]) == (not says_v)  # the eps skeleton's UNet is not loaded twice
    probed.clear()
    assert load_model(file, prediction_type="epsilon").prediction_type == "epsilon" and not probed


def test_dtype_is_applied(single_files):
    file, folder = single_files[("sd1", "ckpt")]
    model = load_model(file, config=folder, dtype=torch.float16)
    assert {p.dtype for p in model.unet.parameters()} == {torch.float16}
    assert model.encoders[0].token_table.dtype == torch.float16


def test_v_pred_key_and_no_heuristic_with_config(single_files, ldm_states, tmp_path, monkeypatch):
    _, folder = single_files[("sd2", "safetensors")]

    def never(unet):
        raise AssertionError("the UNet test must not run when a config folder is given")

    monkeypatch.setattr(single_file, "predicts_v", never)
    marked = save_ldm_checkpoint({**ldm_states["sd2"], "v_pred": torch.tensor([])}, tmp_path / "vpred.safetensors")
    assert load_model(marked, config=folder).prediction_type == "v_prediction"
    plain = single_files[("sd2", "safetensors")][0]
    assert load_model(plain, config=folder).prediction_type == "epsilon"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('model:\n  params:\n    parameterization: "v"\n', "v_prediction"),
        ("model:\n  params:\n    parameterization: v  # v-pred\n", "v_prediction"),
        ("model:\n  params:\n    parameterization: eps\n", "epsilon"),
        ("model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n", "epsilon"),
        ("scaling_config:\n  target: sgm.modules.diffusionmodules.denoiser_scaling.VScaling\n", "v_prediction"),
        ("something: else\n", None),
    ],
)
def test_sidecar_yaml_reading(tmp_path, text, expected):
    (tmp_path / "m.yaml").write_text(text, encoding="utf-8")
    assert sidecar_prediction_type(tmp_path / "m.safetensors") == expected
    assert sidecar_prediction_type(tmp_path / "other.ckpt") is None


def test_a1111_v_parameterization_rule():
    class FakeUNet(torch.nn.Module):
        def __init__(self, shift):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1, dtype=torch.float16))
            self.shift = shift
            self.seen = None

        def forward(self, sample, timestep, encoder_hidden_states):
            self.seen = (sample.dtype, sample.shape, timestep.tolist(), encoder_hidden_states.shape)
            return SimpleNamespace(sample=sample + self.shift)

    v_like, eps_like = FakeUNet(-1.5), FakeUNet(-0.2)
    assert predicts_v(v_like) is True
    assert predicts_v(eps_like) is False
    assert v_like.seen == (torch.float32, (1, 4, 8, 8), [999], (1, 2, 1024))  # A1111's probe, computed in fp32 on CPU
    assert v_like.weight.dtype == torch.float16  # restored


# --- recognising files --------------------------------------------------------------------------


def test_architecture_detection_from_keys(ldm_states):
    for arch, state in ldm_states.items():
        assert detect_architecture({key: tuple(v.shape) for key, v in state.items()}) == arch


def shapes_of(state):
    return {key: tuple(value.shape) for key, value in state.items()}


def refiner_like(state_sdxl):
    return {
        **{k: v for k, v in state_sdxl.items() if not k.startswith("conditioner.")},
        **{
            k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v
            for k, v in state_sdxl.items()
            if k.startswith("conditioner.embedders.1.")
        },
    }


def inpainting_like(state_sd1):
    conv_in = state_sd1[UNET_PREFIX + "input_blocks.0.0.weight"]
    return {**state_sd1, UNET_PREFIX + "input_blocks.0.0.weight": torch.zeros(conv_in.shape[0], 9, 3, 3)}


NOT_SD_CASES = {
    "lora": (
        lambda s: {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
        },
        "LoRA",
    ),
    "refiner": (lambda s: refiner_like(s["sdxl"]), "SDXL refiner"),
    "inpainting": (lambda s: inpainting_like(s["sd1"]), "inpainting"),
    "vae": (
        lambda s: {
            k.removeprefix("first_stage_model."): v for k, v in s["sd1"].items() if k.startswith("first_stage_model.")
        },
        "a VAE",
    ),
    "sd3": (lambda s: {UNET_PREFIX + "joint_blocks.0.context_block.adaLN_modulation.1.bias": torch.zeros(8)}, "SD3"),
    "flux": (lambda s: {"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)}, "Flux"),
    "embedding": (lambda s: {"emb_params": torch.zeros(2, 32)}, "textual-inversion embedding"),
    "unet-only": (
        lambda s: {k: v for k, v in s["sd1"].items() if k.startswith(UNET_PREFIX)},
        "without a text encoder",
    ),
    "diffusers-unet": (
        lambda s: {
            "conv_in.weight": torch.zeros(8, 4, 3, 3),
            "down_blocks.0.resnets.0.conv1.weight": torch.zeros(8, 8, 3, 3),
        },
        "diffusers-format",
    ),
}


@pytest.mark.parametrize("case", list(NOT_SD_CASES))
def test_not_sd_checkpoints_are_refused(ldm_states, tmp_path, case):
    make, phrase = NOT_SD_CASES[case]
    file = save_ldm_checkpoint(make(ldm_states), tmp_path / f"{case}.safetensors")
    with pytest.raises(ModelLoadError) as caught:
        load_model(file)
    message = str(caught.value)
    assert str(file) in message and "is not an SD1/SD2/SDXL checkpoint" in message and phrase in message
    assert "\n" not in message


def test_refiner_and_inpainting_refused_in_ckpt_too(ldm_states, tmp_path):
    for name, state in [
        ("refiner", refiner_like(ldm_states["sdxl"])),
        ("inpaint", inpainting_like(ldm_states["sd1"])),
    ]:
        file = save_ldm_checkpoint(state, tmp_path / f"{name}.ckpt", "ckpt")
        with pytest.raises(ModelLoadError, match="is not an SD1/SD2/SDXL checkpoint") as caught:
            load_model(file)
        assert str(file) in str(caught.value)


def test_corrupt_files_are_refused(single_files, tmp_path):
    good_st, folder = single_files[("sd1", "safetensors")]
    good_ckpt = single_files[("sd1", "ckpt")][0]
    data, ckpt_data = good_st.read_bytes(), good_ckpt.read_bytes()
    header = int.from_bytes(data[:8], "little")
    cases = {
        "truncated.safetensors": data[: len(data) // 2],
        "header-cut.safetensors": data[: 8 + header // 2],
        "huge-header.safetensors": (10**12).to_bytes(8, "little") + b"{" + data[9:200],
        "random.safetensors": os.urandom(4096),
        "random.ckpt": os.urandom(4096),
        "truncated.ckpt": ckpt_data[: len(ckpt_data) // 2],
        "empty.ckpt": b"",
        "text.ckpt": b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n",
    }
    for name, content in cases.items():
        file = tmp_path / name
        file.write_bytes(content)
        with pytest.raises(ModelLoadError) as caught:
            load_model(file, config=folder)
        assert str(file) in str(caught.value), name
        assert "\n" not in str(caught.value).split(": ", 1)[0]
    with pytest.raises(ModelLoadError, match="Git LFS pointer"):
        load_model(tmp_path / "text.ckpt")
    with pytest.raises(ModelLoadError, match="empty"):
        load_model(tmp_path / "empty.ckpt")


# --- safety -------------------------------------------------------------------------------------


class SystemPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class ExecPayload(SystemPayload):
    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("payload", [SystemPayload, ExecPayload])
def test_malicious_ckpt_never_runs(ldm_states, tmp_path, payload, legacy):
    marker = tmp_path / "pwned"
    state = {key: value for key, value in list(ldm_states["sd1"].items())[:4]}
    file = tmp_path / "evil.ckpt"
    torch.save(
        {"state_dict": state, "callbacks": {"evil": payload(marker)}}, file, _use_new_zipfile_serialization=not legacy
    )
    with pytest.raises(ModelLoadError) as caught:
        load_model(file)
    assert not marker.exists()
    assert str(file) in str(caught.value) and "not allowed" in str(caught.value)


def test_malicious_payload_is_real(tmp_path):
    """Control: plain unpickling of the same file does run the payload, so the test above means something."""
    marker = tmp_path / "ran"
    file = tmp_path / "evil.ckpt"
    torch.save({"x": ExecPayload(marker)}, file)
    torch.load(file, weights_only=False)
    assert marker.exists()


def test_torchscript_archive_is_refused(tmp_path):
    file = tmp_path / "scripted.ckpt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(file))
    with pytest.raises(ModelLoadError, match="TorchScript"):
        load_model(file)


# --- shipped config skeletons -------------------------------------------------------------------

REAL = {
    "sd1": {"text": [768], "cross": 768, "sample": 64, "pred": None, "class": "StableDiffusionPipeline"},
    "sd2-512": {"text": [1024], "cross": 1024, "sample": 64, "pred": "epsilon", "class": "StableDiffusionPipeline"},
    "sd2-768-v": {
        "text": [1024],
        "cross": 1024,
        "sample": 96,
        "pred": "v_prediction",
        "class": "StableDiffusionPipeline",
    },
    "sdxl": {
        "text": [768, 1280],
        "cross": 2048,
        "sample": 128,
        "pred": "epsilon",
        "class": "StableDiffusionXLPipeline",
    },
}


def test_skeleton_for():
    assert skeleton_for("sd1") == CONFIG_ROOT / "sd1"
    assert skeleton_for("sd1", "v_prediction") == CONFIG_ROOT / "sd1"
    assert skeleton_for("sd2") == skeleton_for("sd2", "epsilon") == CONFIG_ROOT / "sd2-512"
    assert skeleton_for("sd2", "v_prediction") == CONFIG_ROOT / "sd2-768-v"
    assert skeleton_for("sdxl") == CONFIG_ROOT / "sdxl"
    assert sorted(SKELETONS) == sorted(REAL)
    with pytest.raises(ValueError):
        skeleton_for("sd3")


@pytest.mark.parametrize("name", list(REAL))
def test_skeletons_are_the_real_configs(name):
    """Each skeleton parses and builds (on the meta device) real-size models; LDM names round-trip through diffusers."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder, expected = CONFIG_ROOT / name, REAL[name]
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    assert index["_class_name"] == expected["class"]
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    assert scheduler.get("prediction_type") == expected["pred"]
    assert not any((folder / sub).exists() for sub in ("tokenizer", "tokenizer_2", "safety_checker"))
    assert not [p for p in folder.rglob("*") if p.is_file() and p.suffix != ".json"]  # configs only

    encoder_names = ["text_encoder", "text_encoder_2"] if name == "sdxl" else ["text_encoder"]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        encoders = [
            (CLIPTextModelWithProjection if sub == "text_encoder_2" else CLIPTextModel)(
                CLIPTextConfig.from_pretrained(folder / sub)
            )
            for sub in encoder_names
        ]
    assert next(unet.parameters()).is_meta
    assert unet.conv_in.out_channels == 320 and unet.config.cross_attention_dim == expected["cross"]
    assert unet.config.sample_size == expected["sample"]
    assert [encoder.get_input_embeddings().weight.shape[1] for encoder in encoders] == expected["text"]

    # real-size LDM key layout: ours -> diffusers' reader gives back every UNet/VAE tensor, shapes included
    unet_state, vae_state = unet.state_dict(), vae.state_dict()
    ldm = {UNET_PREFIX + k: v for k, v in unet_to_ldm(unet_state, unet.config).items()}
    ldm.update({"first_stage_model." + k: v for k, v in vae_to_ldm(vae_state, vae.config).items()})
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in unet_state.items()}
    back = convert_ldm_vae_checkpoint(ldm, dict(vae.config))
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in vae_state.items()}
    if name != "sd1":  # OpenCLIP layout of the real SD2 / SDXL-G encoders (fused in_proj, text_projection)
        prefix = "conditioner.embedders.1.model." if name == "sdxl" else "cond_stage_model.model."
        openclip = {prefix + k: v for k, v in openclip_to_ldm(encoders[-1].state_dict()).items()}
        # SD2 files carry OpenCLIP's (unused) projection too; older diffusers size the q/k/v split from it
        openclip.setdefault(prefix + "text_projection", torch.empty(1024, 1024, device="meta"))
        back = convert_open_clip_checkpoint(encoders[-1], openclip, prefix=prefix)
        wanted = {
            k.removeprefix("text_model."): tuple(v.shape)
            for k, v in encoders[-1].state_dict().items()
            if "position_ids" not in k
        }
        assert {k.removeprefix("text_model."): tuple(v.shape) for k, v in back.items()} == wanted
    # ...and a real-size checkpoint of that layout is recognised and fits its skeleton
    architecture = "sdxl" if name == "sdxl" else name[:3]
    text_keys = {
        "sd1": {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768)},
        "sd2": {"cond_stage_model.model.token_embedding.weight": (49408, 1024)},
        "sdxl": {
            "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
            "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
        },
    }[architecture]
    shapes = {**{k: tuple(v.shape) for k, v in ldm.items()}, **text_keys}
    assert detect_architecture(shapes) == architecture
    check_fits(shapes, architecture, folder, "real.safetensors")
    assert single_file.is_real_size_sd2(shapes) == (architecture == "sd2")


def test_offline_without_config_uses_the_skeleton(single_files, monkeypatch):
    """No config: the shipped skeleton is used, nothing touches the network (tiny weights then do not fit it)."""
    assert os.environ.get("HF_HUB_OFFLINE") == "1"

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    for arch in ARCHITECTURES:
        file, _ = single_files[(arch, "safetensors")]
        with pytest.raises(ModelLoadError, match="does not fit the model config") as caught:
            load_model(file)
        assert str(skeleton_for(arch)) in str(caught.value) and str(file) in str(caught.value)


def test_wrong_config_folder_is_explained(single_files):
    file, _ = single_files[("sd1", "safetensors")]
    with pytest.raises(ModelLoadError, match="does not fit the model config"):
        load_model(file, config=single_files[("sdxl", "safetensors")][1])
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_model(file, config=file.parent / "missing")


def test_pipeline_to_ldm_keeps_every_tensor(tiny):
    pipeline = tiny["sdxl"].pipeline
    state = pipeline_to_ldm(pipeline, "sdxl")
    assert len(state) == len(set(state))
    count = sum(
        len(m.state_dict()) for m in (pipeline.unet, pipeline.vae, pipeline.text_encoder, pipeline.text_encoder_2)
    )
    # transformers 4.x keeps a position_ids buffer in the state dict; OpenCLIP's layout has none.
    count -= sum(key.endswith("position_ids") for key in pipeline.text_encoder_2.state_dict())
    fused = 2 * 2 * len(pipeline.text_encoder_2.text_model.encoder.layers)  # q,k,v weight+bias -> in_proj weight+bias
    assert len(state) == count - fused + 1  # + logit_scale
