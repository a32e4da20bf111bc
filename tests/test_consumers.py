"""A real consumer reads our files: diffusers' load_textual_inversion gives our conditioning."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from ti_core.create import create_embedding
from ti_core.formats import save_embedding
from ti_core.models import load_model
from ti_core.prompt import encode_prompts


@pytest.mark.parametrize("arch_name", ["sd1", "sd2"])
@pytest.mark.parametrize("vectors", [1, 3])
def test_diffusers_loads_our_single_encoder_file(tiny_model_dirs, tmp_path, arch_name, vectors):
    model = load_model(tiny_model_dirs[arch_name])
    embedding = create_embedding(model, "zzzz1234", "a red car", vectors)
    torch.manual_seed(1)
    for tensor in embedding.vectors.values():
        tensor += 0.1 * torch.randn_like(tensor)  # as if trained: not equal to any vocabulary row
    path = save_embedding(embedding, tmp_path)

    pipeline = load_model(tiny_model_dirs[arch_name]).pipeline()  # a fresh copy: diffusers edits its tokenizer
    pipeline.load_textual_inversion(str(path), token="zzzz1234")
    prompt = "a zzzz1234 by monet"
    theirs = pipeline.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[
        0
    ]
    ours = encode_prompts(model, [prompt], [embedding]).hidden_states
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_diffusers_loads_our_sdxl_file_into_both_encoders(tiny_model_dirs, tmp_path):
    model = load_model(tiny_model_dirs["sdxl"])
    embedding = create_embedding(model, "zzzz1234", "a red car", 2)
    path = save_embedding(embedding, tmp_path)
    tensors = load_file(path)
    assert set(tensors) == {"clip_l", "clip_g"}

    pipeline = load_model(tiny_model_dirs["sdxl"]).pipeline()
    pipeline.load_textual_inversion(
        tensors["clip_l"], token="zzzz1234", text_encoder=pipeline.text_encoder, tokenizer=pipeline.tokenizer
    )
    pipeline.load_textual_inversion(
        tensors["clip_g"], token="zzzz1234", text_encoder=pipeline.text_encoder_2, tokenizer=pipeline.tokenizer_2
    )
    prompt = "a zzzz1234 by monet"
    theirs = pipeline.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    ours = encode_prompts(model, [prompt], [embedding])
    assert (ours.hidden_states - theirs[0]).abs().max().item() <= 1e-5
    # The pooled output is not compared: diffusers adds new token ids above EOS, and CLIP's legacy
    # pooling (argmax of the ids) then pools at the embedding instead of at EOS. We keep EOS pooling.
