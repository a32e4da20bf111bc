"""Editable embeddings: the methods' maths, and training with each method on the tiny models (start, norm, resume)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from ti_core import editability
from ti_core.config import TrainConfig
from ti_core.data import DataConfig
from ti_core.formats import load_embedding, save_embedding
from ti_core.train import train

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # bit-reproducible CPU training (see tests/test_train.py)

NAME = "tok"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for index in range(4):
        Image.new("RGB", (64, 64), (30, 200 - 20 * index, 40)).save(folder / f"{index:03d}-a green square.png")
    return folder


def make_config(tmp_path, images, **overrides) -> TrainConfig:
    settings = dict(
        name=NAME,
        embeddings_dir=tmp_path / "embeddings",
        log_dir=tmp_path / "logs",
        data=DataConfig(images=images, resolution=64, flip=True, latent_sampling="random"),
        init_text="a dog",
        vectors=2,
        steps=4,
        gradient_accumulation=2,
        learning_rate="0.02",
        seed=5,
        save_every=0,
        preview_every=0,
    )
    return TrainConfig(**{**settings, **overrides})


def run(model, config):
    events = []
    result = train(model, config, events.append)
    assert result.stopped == "done", result.message
    return load_embedding(result.embedding_path, widths=model.widths), events


# ---------------------------------------------------------------------------------------------------- the maths


def test_a_tangent_gradient_turns_the_vector_without_changing_its_norm():
    vectors = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    gradient = torch.tensor([[1.0, 1.0], [5.0, -7.0]])
    tangent = editability.project_to_tangent(vectors, gradient)
    assert torch.allclose((tangent * vectors).sum(dim=1), torch.zeros(2), atol=1e-6)
    assert torch.allclose(tangent[1], torch.tensor([5.0, 0.0]))  # the radial part (-7 along y) is gone


def test_retraction_puts_every_row_on_the_sphere_zero_rows_included():
    rows = editability.retract_to_sphere(torch.tensor([[3.0, 4.0], [0.0, 0.0], [-1.0, 0.0]]), 0.5)
    assert torch.allclose(rows.norm(dim=1), torch.full((3,), 0.5))
    assert torch.allclose(rows[0], torch.tensor([0.3, 0.4])) and torch.allclose(rows[2], torch.tensor([-0.5, 0.0]))


def test_auto_is_the_measured_default_for_new_runs_and_the_recorded_method_for_resumed_ones():
    assert editability.resolve_method("auto", 0, None) == editability.DEFAULT_METHOD
    assert editability.resolve_method("auto", 10, None) == "plain"  # a file from before the methods existed
    assert editability.resolve_method("auto", 10, json.dumps({"steps": 10})) == "plain"
    assert editability.resolve_method("auto", 10, json.dumps({"method": "cross_init"})) == "cross_init"
    assert editability.resolve_method("plain", 0, None) == "plain"  # asked for: always that
    assert editability.resolve_method("directional", 10, json.dumps({"method": "plain"})) == "directional"


def test_vocabulary_mean_norms_are_per_text_encoder(tiny_models):
    model = tiny_models["sdxl"]
    norms = editability.vocabulary_mean_norms(model)
    assert set(norms) == {"clip_l", "clip_g"} and norms["clip_l"] != norms["clip_g"]
    for encoder in model.encoders:
        assert norms[encoder.key] == pytest.approx(encoder.token_table.float().norm(dim=1).mean().item(), rel=1e-5)


def test_cross_init_starts_from_each_encoders_output_at_the_init_tokens(tiny_models):
    model = tiny_models["sdxl"]
    rows = editability.encoder_output_rows(model, "a dog", 2)
    for encoder in model.encoders:
        ids = encoder.tokenizer("a dog", padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            expected = encoder.model(ids).last_hidden_state[0, 1:3]
        assert rows[encoder.key].shape == (2, encoder.width)
        torch.testing.assert_close(rows[encoder.key], expected.float())


def test_context_distance_counts_only_the_other_words():
    states = torch.randn(2, 5, 3)
    changed = states.clone()
    changed[0, 2] = -changed[0, 2]  # the embedding's own slot: not context
    mask = editability.context_mask(states, [(0, 2), (1, 1)])
    assert editability.context_distance(changed, states, mask).item() == pytest.approx(0.0, abs=1e-6)
    changed[1, 4] = -changed[1, 4]  # a word after it
    assert editability.context_distance(changed, states, mask).item() == pytest.approx(2 / 8, abs=1e-5)


def test_the_warning_is_one_line_past_the_threshold_only():
    assert editability.norm_warning(editability.NORM_WARNING_RATIO) == ""
    assert editability.norm_warning(None) == ""
    line = editability.norm_warning(12.34)
    assert "12.3x the vocabulary" in line and "\n" not in line


def test_a_method_that_does_not_exist_is_refused_in_one_line(tmp_path, images):
    with pytest.raises(ValueError, match=r"^method must be one of auto, plain, directional, cross_init, not 'dti'$"):
        make_config(tmp_path, images, method="dti")
    with pytest.raises(ValueError, match="context_regularization must be 0"):
        make_config(tmp_path, images, context_regularization=-1)


# ------------------------------------------------------------------------------------------------- training

METHOD_SETTINGS = {
    "plain": {"method": "plain"},
    "directional": {"method": "directional", "direction_prior": 0.1},
    "cross_init": {"method": "cross_init", "cross_init_weight": 1e-3},
    "context": {"method": "plain", "context_regularization": 1.0},
    "directional+context": {"method": "directional", "context_regularization": 1.0},
}


@pytest.mark.parametrize("settings", METHOD_SETTINGS.values(), ids=METHOD_SETTINGS.keys())
def test_each_method_trains_and_resumes_exactly(tmp_path, images, tiny_models, settings):
    model = tiny_models["sd1"]
    whole, _ = run(model, make_config(tmp_path / "whole", images, **settings))
    run(model, make_config(tmp_path / "parts", images, steps=1, **settings))
    resumed, events = run(model, make_config(tmp_path / "parts", images, resume=True, **settings))
    assert "optimizer state restored" in events[0].message
    assert resumed.step == whole.step == 4
    assert torch.equal(resumed.vectors["clip_l"], whole.vectors["clip_l"])
    assert json.loads(whole.metadata["training_settings"])["method"] == settings["method"]


@pytest.mark.parametrize("arch", ["sd2", "sdxl"])
def test_directional_keeps_each_encoders_vectors_at_its_vocabulary_mean_norm(tmp_path, images, tiny_models, arch):
    """SDXL: the norm is fixed per text encoder (their vocabularies have different scales); SD2's one too."""
    model = tiny_models[arch]
    trained, events = run(model, make_config(tmp_path, images, method="directional", learning_rate="0.5"))
    means = editability.vocabulary_mean_norms(model)
    for encoder in model.encoders:
        key = encoder.key
        assert torch.allclose(trained.vectors[key].norm(dim=1), torch.full((2,), means[key]), rtol=1e-5)
        rows = [encoder.token_table[token] for token in encoder.tokenizer("a dog", add_special_tokens=False).input_ids]
        start = editability.retract_to_sphere(torch.stack(rows).detach().float(), means[key])
        assert not torch.allclose(trained.vectors[key], start, atol=1e-3)  # the direction did move
    ratios = [event.norm_ratio for event in events if event.kind == "step"]
    assert ratios == pytest.approx([1.0] * 4, rel=1e-5)
    assert json.loads(trained.metadata["vocabulary_norms"]) == pytest.approx(means, rel=1e-5)


def test_plain_ti_inflates_and_the_run_warns_once(tmp_path, images, tiny_models):
    model = tiny_models["sd1"]
    trained, events = run(model, make_config(tmp_path, images, method="plain", learning_rate="0.5", init_text=""))
    warnings = [event for event in events if event.kind == "warning"]
    assert len(warnings) == 1 and "the vocabulary's mean" in warnings[0].message
    ratios = [event.norm_ratio for event in events if event.kind == "step"]
    assert max(ratios) > editability.NORM_WARNING_RATIO and warnings[0].norm_ratio > editability.NORM_WARNING_RATIO


def test_cross_init_starts_at_the_encoder_output_for_the_init_text(tmp_path, images, tiny_models):
    model = tiny_models["sdxl"]
    trained, _ = run(model, make_config(tmp_path, images, method="cross_init", steps=1, learning_rate="1e-6"))
    expected = editability.encoder_output_rows(model, "a dog", 2)
    for key in ("clip_l", "clip_g"):
        torch.testing.assert_close(trained.vectors[key], expected[key], atol=1e-5, rtol=0)


def test_a_resumed_plain_run_from_before_the_methods_stays_plain(tmp_path, images, tiny_models):
    model = tiny_models["sd1"]
    old, _ = run(model, make_config(tmp_path, images, method="plain", steps=1))
    settings = json.loads(old.metadata["training_settings"])
    del settings["method"], settings["direction_prior"], settings["cross_init_weight"]
    del settings["context_regularization"]
    old.metadata["training_settings"] = json.dumps(settings)  # as the file of an earlier version reads
    save_embedding(old, tmp_path / "embeddings", overwrite=True)
    resumed, events = run(model, make_config(tmp_path, images, resume=True))  # method: auto
    assert json.loads(resumed.metadata["training_settings"])["method"] == "plain"
    saved = json.loads((tmp_path / "logs" / NAME / "settings.json").read_text())
    assert saved["method"] == "plain" and "method:" not in events[0].message
    assert TrainConfig.from_dict(settings).method == "auto"  # an old settings.json still loads


def test_a_new_run_uses_the_measured_default(tmp_path, images, tiny_models):
    model = tiny_models["sd1"]
    trained, events = run(model, make_config(tmp_path, images, steps=1))
    assert json.loads(trained.metadata["training_settings"])["method"] == editability.DEFAULT_METHOD
    assert events[0].message.endswith(f"; method: {editability.DEFAULT_METHOD}")


# ------------------------------------------------------------------------------------------------ showing it


def test_inspect_prints_each_norm_as_a_multiple_of_the_vocabulary(tmp_path, images, tiny_models, tiny_model_dirs):
    model = tiny_models["sd1"]
    trained, _ = run(model, make_config(tmp_path, images, method="directional", steps=1))
    path = tmp_path / "embeddings" / f"{NAME}.safetensors"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    shown = subprocess.run(
        [sys.executable, "-m", "ti_core", "inspect", str(path)], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert "norm/vocabulary clip_l: 1.00x, 1.00x" in shown  # from the file alone
    with_model = subprocess.run(
        [sys.executable, "-m", "ti_core", "inspect", str(path), "--model", str(tiny_model_dirs["sd1"]), "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    assert json.loads(with_model)["norm_ratios"] == {"clip_l": [1.0, 1.0]}


def test_cards_show_the_norm_ratio_and_flag_an_inflated_one(tmp_path, images, tiny_models):
    from ti_ui.render import _card_html, card_info

    model = tiny_models["sd1"]
    run(model, make_config(tmp_path / "a", images, method="plain", learning_rate="0.5", init_text="", name="big"))
    run(model, make_config(tmp_path / "b", images, method="directional", steps=1, name="word"))
    big = card_info(tmp_path / "a" / "embeddings" / "big.safetensors", None)
    word = card_info(tmp_path / "b" / "embeddings" / "word.safetensors", model.widths)
    assert big.norm_ratio > editability.NORM_WARNING_RATIO and "ti-norm-high" in _card_html(big)
    assert word.norm_ratio == pytest.approx(1.0, rel=1e-4)
    assert "norm 1.0× the vocabulary" in _card_html(word) and "ti-norm-high" not in _card_html(word)
