"""Create: init-text vectors, the seed identity, the saved-prompt identity, the token budget."""

from __future__ import annotations

import pytest
import torch

from ti_core.create import create_embedding, init_token_ids
from ti_core.embedding import spread_vectors
from ti_core.prompt import CHUNK_TOKENS, PromptTokenCache, encode_prompts, encode_tokenized, token_count


def max_difference(a, b) -> float:
    diff = (a.hidden_states - b.hidden_states).abs().max().item()
    if a.pooled is not None:
        diff = max(diff, (a.pooled - b.pooled).abs().max().item())
    return diff


def test_untrained_one_vector_embedding_conditions_exactly_like_its_init_word(tiny_model):
    embedding = create_embedding(tiny_model, "zzzz1234", "tree", 1)
    with_embedding = encode_prompts(tiny_model, ["a zzzz1234 by monet"], [embedding])
    plain = encode_prompts(tiny_model, ["a tree by monet"])
    assert max_difference(with_embedding, plain) <= 1e-6
    # The embedding's token really is several BPE tokens, so this is not a trivial comparison.
    assert len(init_token_ids(tiny_model.tokenizer, "zzzz1234")) > 1


def test_our_encoder_matches_diffusers_for_plain_prompts(tiny_model):
    pipeline = tiny_model.pipeline()
    ours = encode_prompts(tiny_model, ["a tree by monet"])
    theirs = pipeline.encode_prompt(
        "a tree by monet", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    assert torch.equal(ours.hidden_states, theirs[0])
    if tiny_model.architecture == "sdxl":
        assert torch.equal(ours.pooled, theirs[2])


@pytest.mark.parametrize("init_text", ["a red sports car parked by the sea", "sks", "watercolor, ink wash"])
def test_embedding_with_one_vector_per_init_token_is_a_saved_prompt(tiny_model, init_text):
    count = len(init_token_ids(tiny_model.tokenizer, init_text))
    embedding = create_embedding(tiny_model, "savedprompt", init_text, count)
    saved = encode_prompts(tiny_model, ["photo of savedprompt, detailed"], [embedding])
    written_out = encode_prompts(tiny_model, [f"photo of {init_text}, detailed"])
    assert max_difference(saved, written_out) <= 1e-6


def test_vectors_are_rows_of_the_token_table(tiny_model):
    embedding = create_embedding(tiny_model, "rows", "tree", 3)
    assert embedding.num_vectors == 3
    for encoder in tiny_model.encoders:
        tree = init_token_ids(encoder.tokenizer, "tree")
        expected = encoder.token_table[tree[0]].detach()
        vectors = embedding.vectors[encoder.key]
        assert vectors.shape == (3, encoder.width) and vectors.dtype == torch.float32
        assert all(torch.equal(vector, expected) for vector in vectors)


def test_sdxl_embedding_has_both_encoders_and_sd2_its_own_width(tiny_models):
    sdxl = create_embedding(tiny_models["sdxl"], "x", "tree", 2)
    assert sdxl.widths == tiny_models["sdxl"].widths and set(sdxl.widths) == {"clip_l", "clip_g"}
    sd2 = create_embedding(tiny_models["sd2"], "x", "tree", 2)
    assert set(sd2.widths) == {"clip_h"} and sd2.widths["clip_h"] == tiny_models["sd2"].encoders[0].width


def test_empty_init_text_gives_zeros(tiny_model):
    embedding = create_embedding(tiny_model, "blank", "   ", 4)
    assert all(torch.count_nonzero(v) == 0 for v in embedding.vectors.values())


def test_spread_rule_repeats_blockwise_and_subsamples():
    rows = torch.arange(3, dtype=torch.float32)[:, None].repeat(1, 2)  # rows 0, 1, 2
    assert spread_vectors(rows, 6)[:, 0].tolist() == [0, 0, 1, 1, 2, 2]
    assert spread_vectors(rows, 4)[:, 0].tolist() == [0, 0, 1, 2]
    many = torch.arange(10, dtype=torch.float32)[:, None]
    assert spread_vectors(many, 4)[:, 0].tolist() == [0, 2, 5, 7]
    assert spread_vectors(rows, 1)[:, 0].tolist() == [0]


@pytest.mark.parametrize("vectors", [0, 76, -1])
def test_vector_count_outside_1_to_75_is_rejected(tiny_models, vectors):
    with pytest.raises(ValueError, match="between 1 and 75"):
        create_embedding(tiny_models["sd1"], "bad", "tree", vectors)


def test_token_budget_counts_each_embedding_as_its_vectors(tiny_models):
    model = tiny_models["sd1"]
    embedding = create_embedding(model, "zzzz1234", "tree", 16)
    counts = {embedding.name: embedding.num_vectors}
    plain = token_count(model.tokenizer, "a tree by monet")
    assert plain == 4
    assert token_count(model.tokenizer, "a zzzz1234 by monet", counts) == 3 + 16
    assert token_count(model.tokenizer, "zzzz1234, zzzz1234", counts) == 16 * 2 + 1
    # Case-insensitive, as the web UIs match tokens after lower-casing.
    assert token_count(model.tokenizer, "ZZZZ1234", counts) == 16
    assert CHUNK_TOKENS - embedding.num_vectors == 59


def test_sixteen_vectors_take_sixteen_of_the_75_tokens_in_the_conditioning(tiny_models):
    model = tiny_models["sd1"]
    embedding = create_embedding(model, "zzzz1234", "", 16)
    embedding.vectors["clip_l"] += torch.randn_like(embedding.vectors["clip_l"])
    prompt = "a zzzz1234 by monet"
    a = encode_prompts(model, [prompt], [embedding])
    assert a.hidden_states.shape[1] == 77  # still one window
    # Changing vector 15 changes the states from its position on (causal attention) but not before it.
    embedding.vectors["clip_l"][15] += 1.0
    b = encode_prompts(model, [prompt], [embedding])
    changed = (a.hidden_states - b.hidden_states).abs().amax(dim=-1)[0]
    position_of_last_vector = 1 + 1 + 15  # BOS, "a", vectors 0..15
    assert changed[:position_of_last_vector].max() == 0
    assert changed[position_of_last_vector] > 0


def test_long_prompts_use_more_windows_and_embeddings_are_not_split(tiny_models):
    model = tiny_models["sd1"]
    embedding = create_embedding(model, "zzzz1234", "tree", 10)
    prompt = " ".join(["word"] * 70) + " zzzz1234"
    conditioning = encode_prompts(model, [prompt], [embedding])
    assert conditioning.hidden_states.shape[1] == 154  # 70 words then the 10 vectors in window 2


def test_embedding_of_wrong_width_is_a_clear_error(tiny_models):
    sd1_embedding = create_embedding(tiny_models["sd1"], "foreign", "tree", 1)
    with pytest.raises(ValueError, match="does not fit this sd2 model"):
        encode_prompts(tiny_models["sd2"], ["a foreign"], [sd1_embedding])


def test_cached_prompt_tokens_condition_exactly_like_fresh_ones(tiny_model):
    """Training tokenizes each template line once; a repeated, a long and an embedding-free prompt must
    condition the model exactly as uncached encoding does, for every encoder (SDXL has two tokenizers)."""
    embedding = create_embedding(tiny_model, "zzzz1234", "tree", 3)
    vectors = {embedding.name: embedding.vectors}
    tokenize = PromptTokenCache(tiny_model, {embedding.name: 3}, limit=2)
    prompts = ["a zzzz1234 by monet", "a photo", " ".join(["word"] * 80) + " zzzz1234", "a zzzz1234 by monet"]
    for _ in range(2):  # the second pass runs from the cache (or after evictions: limit 2 < 3 prompts)
        for prompt in prompts:
            cached = encode_tokenized(tiny_model, tokenize([prompt, prompt]), vectors)
            fresh = encode_prompts(tiny_model, [prompt, prompt], [embedding])
            assert torch.equal(cached.hidden_states, fresh.hidden_states)
            if fresh.pooled is not None:
                assert torch.equal(cached.pooled, fresh.pooled)
    assert len(tokenize) <= 2
