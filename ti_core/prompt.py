"""Prompt conditioning with embeddings, the way the web UIs do it.

A prompt is tokenized; wherever an embedding's token sequence (its name, tokenized) appears, those
tokens are replaced by the embedding's N vectors. The vectors enter the text encoder through a forward
hook on its token-embedding layer, so the encoder itself is never changed, works the same on every
transformers version, and gradients reach only the vectors (which is how training uses it too).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .timodel import TIModel
from .vocab import clean_text

CHUNK_TOKENS = 75  # tokens per 77-token window, between BOS and EOS
# Id written where an embedding vector goes; the hook overwrites its row. Any ordinary id below EOS
# works: CLIP's legacy pooling takes the position of the largest id (EOS), so it must not be EOS.
SPLICE_ID = 0

Vectors = Mapping[str, Mapping[str, torch.Tensor]]  # embedding name -> encoder key -> [N, d]


@dataclass(frozen=True)
class Slot:
    """One position of a tokenized prompt: a vocabulary token, or vector `index` of embedding `name`."""

    token: int
    name: str | None = None
    index: int = 0


@dataclass
class TokenizedPrompt:
    """77-token windows of ids, with where embedding vectors are spliced in."""

    ids: torch.Tensor  # [chunks, 77]
    splices: list[tuple[int, int, str, int]]  # (chunk, position, embedding name, vector index)
    eos_positions: list[int]  # per chunk: where EOS is (the pooled output's position)


def embedding_token_ids(tokenizer, names: Sequence[str]) -> dict[str, list[int]]:
    """The token ids of each embedding name, as it appears in a prompt."""
    return {name: tokenizer(clean_text(name), add_special_tokens=False).input_ids for name in names}


def to_slots(tokenizer, prompt: str, vector_counts: Mapping[str, int]) -> list[Slot]:
    """Tokenize a prompt, replacing each embedding's tokens by its N vector slots (longest name first)."""
    ids = tokenizer(clean_text(prompt), add_special_tokens=False).input_ids
    names = embedding_token_ids(tokenizer, list(vector_counts))
    by_first: dict[int, list[tuple[list[int], str]]] = {}
    for name, name_ids in sorted(names.items(), key=lambda item: -len(item[1])):
        if name_ids:
            by_first.setdefault(name_ids[0], []).append((name_ids, name))
    slots: list[Slot] = []
    position = 0
    while position < len(ids):
        for name_ids, name in by_first.get(ids[position], []):
            if ids[position : position + len(name_ids)] == name_ids:
                slots += [Slot(SPLICE_ID, name, i) for i in range(vector_counts[name])]
                position += len(name_ids)
                break
        else:
            slots.append(Slot(ids[position]))
            position += 1
    return slots


def token_count(tokenizer, prompt: str, vector_counts: Mapping[str, int] | None = None) -> int:
    """How many prompt tokens a prompt uses, each embedding counting as its number of vectors."""
    return len(to_slots(tokenizer, prompt, vector_counts or {}))


def _chunks(slots: list[Slot]) -> list[list[Slot]]:
    """Split into windows of 75; an embedding that would straddle a boundary moves to the next window
    (as A1111 does), unless it is longer than a window."""
    chunks: list[list[Slot]] = [[]]
    position = 0
    while position < len(slots):
        slot = slots[position]
        run = 1
        if slot.name is not None and slot.index == 0:
            while (
                position + run < len(slots)
                and slots[position + run].name == slot.name
                and slots[position + run].index > 0
            ):
                run += 1
        current = chunks[-1]
        if len(current) + run > CHUNK_TOKENS and current and run <= CHUNK_TOKENS:
            chunks.append([])
            current = chunks[-1]
        for item in slots[position : position + run]:
            if len(current) == CHUNK_TOKENS:
                chunks.append([])
                current = chunks[-1]
            current.append(item)
        position += run
    return chunks


def tokenize_prompt(tokenizer, prompt: str, vector_counts: Mapping[str, int]) -> TokenizedPrompt:
    """Tokenize into 77-token windows (BOS, up to 75 tokens, EOS, padding) with splice positions."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rows, splices, eos_positions = [], [], []
    for chunk_index, chunk in enumerate(_chunks(to_slots(tokenizer, prompt, vector_counts))):
        row = [bos] + [slot.token for slot in chunk] + [eos]
        eos_positions.append(len(row) - 1)
        rows.append(row + [pad] * (CHUNK_TOKENS + 2 - len(row)))
        splices += [
            (chunk_index, 1 + i, slot.name, slot.index) for i, slot in enumerate(chunk) if slot.name is not None
        ]
    return TokenizedPrompt(torch.tensor(rows), splices, eos_positions)


@contextmanager
def spliced(text_encoder, rows: torch.Tensor, positions: torch.Tensor, vectors: torch.Tensor) -> Iterator[None]:
    """While active, the encoder's token-embedding output at `positions` (pairs of batch row, token)
    is replaced by `vectors` (one per position). The hook is removed afterwards, even on error."""

    def hook(_module, _inputs, output):
        if rows.numel() == 0:
            return output
        output = output.clone()
        output[rows, positions] = vectors.to(output.dtype)
        return output

    handle = text_encoder.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class Conditioning:
    """What the UNet is conditioned on: per-token states, and (SDXL) the pooled text embedding."""

    hidden_states: torch.Tensor  # [B, 77 * chunks, D]
    pooled: torch.Tensor | None = None  # [B, P] for SDXL


def _batch(tokenized: Sequence[TokenizedPrompt]) -> TokenizedPrompt:
    """Stack prompts to one batch, padding to the same number of windows by repeating an empty one."""
    chunks = max(t.ids.shape[0] for t in tokenized)
    ids, splices, eos_positions = [], [], []
    for row, item in enumerate(tokenized):
        extra = chunks - item.ids.shape[0]
        empty = item.ids[-1:].clone()
        empty[0, 1] = empty[0, item.eos_positions[-1]]  # BOS EOS pad...: an empty window
        empty[0, 2:] = empty[0, -1]
        ids.append(torch.cat([item.ids] + [empty] * extra))
        splices += [(row * chunks + c, p, n, i) for c, p, n, i in item.splices]
        eos_positions += item.eos_positions + [1] * extra
    return TokenizedPrompt(torch.cat(ids), splices, eos_positions)


def encode_tokenized(
    model: TIModel, tokenized: Mapping[str, Sequence[TokenizedPrompt]], vectors: Vectors
) -> Conditioning:
    """Run the text encoder(s) on tokenized prompts with the embeddings' vectors spliced in.

    SD1/SD2 condition on the last hidden state, SDXL on the penultimate layer of both encoders
    concatenated, plus the second encoder's projected pooled output (as diffusers and the web UIs do).
    `tokenized` holds each encoder's tokenization (by encoder key): they differ only in padding.
    """
    states, pooled = [], None
    for encoder in model.encoders:
        batch = _batch(tokenized[encoder.key])
        count = len(tokenized[encoder.key])
        chunks = batch.ids.shape[0] // count
        device = encoder.model.device
        rows = torch.tensor([c for c, _, _, _ in batch.splices], dtype=torch.long, device=device)
        positions = torch.tensor([p for _, p, _, _ in batch.splices], dtype=torch.long, device=device)
        if batch.splices:
            spliced_vectors = torch.stack([vectors[n][encoder.key][i] for _, _, n, i in batch.splices]).to(device)
        else:
            spliced_vectors = torch.zeros(0, encoder.width, device=device)
        with spliced(encoder.model, rows, positions, spliced_vectors):
            output = encoder.model(batch.ids.to(device), output_hidden_states=model.architecture == "sdxl")
        if model.architecture == "sdxl":
            hidden = output.hidden_states[-2]
            if encoder.key == "clip_g":
                # Pooled output at each window's EOS, projected; the first window's, as the web UIs do.
                last = output.last_hidden_state
                first_windows = torch.arange(0, count * chunks, chunks, device=device)
                eos = torch.tensor(batch.eos_positions, device=device)[first_windows]
                pooled = encoder.model.text_projection(last[first_windows, eos])
        else:
            hidden = output.last_hidden_state
        states.append(hidden.reshape(count, chunks * hidden.shape[1], hidden.shape[2]))
    return Conditioning(torch.cat(states, dim=-1), pooled)


def encode_prompts(model: TIModel, prompts: Sequence[str], embeddings: Sequence | Vectors = ()) -> Conditioning:
    """Encode prompts in which embedding tokens (file stems) are replaced by their vectors.

    `embeddings` is a sequence of `Embedding`s or a mapping name -> {encoder key: [N, d] tensor}.
    """
    vectors = embeddings if isinstance(embeddings, Mapping) else {e.name: e.vectors for e in embeddings}
    for name, per_encoder in vectors.items():
        for encoder in model.encoders:
            tensor = per_encoder.get(encoder.key)
            if tensor is None or tensor.shape[-1] != encoder.width:
                have = {key: tuple(t.shape) for key, t in per_encoder.items()}
                raise ValueError(
                    f"embedding {name!r} does not fit this {model.architecture} model: "
                    f"it has {have}, the model needs {encoder.key} vectors {encoder.width} wide"
                )
    counts = {name: next(iter(per_encoder.values())).shape[0] for name, per_encoder in vectors.items()}
    return encode_tokenized(model, tokenize_for_model(model, prompts, counts), vectors)


def tokenize_for_model(
    model, prompts: Sequence[str], vector_counts: Mapping[str, int]
) -> dict[str, list[TokenizedPrompt]]:
    """Each encoder's tokenization of the prompts (SDXL's second tokenizer pads with "!", not EOS)."""
    return {e.key: [tokenize_prompt(e.tokenizer, prompt, vector_counts) for prompt in prompts] for e in model.encoders}


class PromptTokenCache:
    """`tokenize_for_model` for one set of embeddings, remembering each prompt's tokens.

    A training run renders the same few template lines over and over; BPE and text cleaning cost about as
    much per step as the optimizer (bench/RESULTS.md). The cache is bounded because shuffled or dropped tags
    make nearly every prompt new. Cached `TokenizedPrompt`s are shared, so callers must not modify them
    (`encode_tokenized` only reads them).
    """

    def __init__(self, model: TIModel, vector_counts: Mapping[str, int], limit: int = 4096) -> None:
        self.model, self.vector_counts, self.limit = model, dict(vector_counts), limit
        self._tokens: dict[str, dict[str, TokenizedPrompt]] = {}

    def __call__(self, prompts: Sequence[str]) -> dict[str, list[TokenizedPrompt]]:
        for prompt in prompts:
            if prompt not in self._tokens:
                if len(self._tokens) >= self.limit:
                    self._tokens.pop(next(iter(self._tokens)))  # the oldest entry
                self._tokens[prompt] = {
                    e.key: tokenize_prompt(e.tokenizer, prompt, self.vector_counts) for e in self.model.encoders
                }
        return {e.key: [self._tokens[prompt][e.key] for prompt in prompts] for e in self.model.encoders}

    def __len__(self) -> int:
        return len(self._tokens)
