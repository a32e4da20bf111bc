"""Keeping a trained embedding editable: the maths of the training methods that stop its norm from inflating.

Plain textual inversion lets a vector's norm grow to many times any vocabulary token's; the text encoder's
pre-norm layers then hardly mix the token with its context and the token overpowers every prompt it is put
in. The methods here keep the output a plain embedding (it loads everywhere) and change only how it is
trained:

- ``directional`` (Directional Textual Inversion, Kim et al. 2026): the vector's norm is fixed at the
  vocabulary's mean norm (per text encoder) and only its direction is trained: each gradient is projected
  onto the sphere's tangent plane and each step is retracted back onto the sphere. An optional prior pulls
  the direction toward the init text's (the paper's von Mises-Fisher prior, whose gradient is constant).
- ``cross_init`` (Cross Initialization, Pang et al. 2024): the vector starts from the text encoder's
  *output* for the init text, with a small L2 pull back toward it.
- the context regularization (CoRe's text-embedding term, Wu et al. 2025), usable with any method: for
  prompts that put the embedding among other words, the encoder's outputs at the other words' positions
  are kept close to those of the same prompt with the init text's vectors in its place.

Everything here is a small pure function of tensors (and, where it has to be, the model's text encoders);
ti_core.train calls them at its init, step and loss.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence

import torch

# "auto": the measured default (DEFAULT_METHOD) for a new run; a resumed run keeps the method it was trained with.
METHODS = ("auto", "plain", "directional", "cross_init")
DEFAULT_METHOD = "directional"  # bench/RESULTS.md, "Editability"
# A vector this many times the vocabulary's mean norm is far outside anything a word looks like (bench/RESULTS.md).
NORM_WARNING_RATIO = 3.0

# CrossInit's L2 weight toward the start (its train_cross_init.py --reg_weight).
CROSS_INIT_WEIGHT = 1e-5

# Prompts of the context regularization: the embedding among other words ({} is its place). Kept apart from
# the benchmark's test prompts (bench/bench_editability.py), which must be unseen.
CONTEXT_PROMPTS = (
    "a photo of {} on a wooden table",
    "{} floating in space",
    "a watercolor painting of {}",
    "{} next to a red car",
    "a close-up of {} in the rain",
    "an oil painting of {} at sunset",
    "{} in a city street at night",
    "a sketch of {} with a hat",
)

Vectors = Mapping[str, torch.Tensor]  # encoder key -> [N, d]


def resolve_method(requested: str, step: int, training_settings: str | None) -> str:
    """The method a run uses: the requested one, or for "auto" the one an embedding trained to `step` was trained
    with (its ``training_settings`` metadata; files of runs from before the methods existed mean "plain"), and
    DEFAULT_METHOD for an untrained one."""
    if requested != "auto":
        return requested
    if step <= 0:
        return DEFAULT_METHOD
    try:
        settings = json.loads(training_settings or "{}")
    except ValueError:
        settings = {}
    method = settings.get("method", "plain") if isinstance(settings, dict) else "plain"
    return method if method in METHODS and method != "auto" else "plain"


def vocabulary_mean_norms(model) -> dict[str, float]:
    """Per text encoder, the mean norm of its vocabulary's token embeddings: the scale a word has there."""
    with torch.no_grad():  # norms in float32 without a float32 copy of the table (a web UI's may be fp16 on a GPU)
        return {
            e.key: torch.linalg.vector_norm(e.token_table, dim=1, dtype=torch.float32).mean().item()
            for e in model.encoders
        }


def recorded_mean_norms(metadata: Mapping[str, str]) -> dict[str, float]:
    """The vocabulary mean norms a trained file records (`vocabulary_norms` metadata), or {} if it has none."""
    try:
        values = json.loads(metadata.get("vocabulary_norms") or "{}")
    except ValueError:
        return {}
    if not isinstance(values, dict):
        return {}
    return {str(k): float(v) for k, v in values.items() if isinstance(v, int | float) and v > 0}


def norm_ratios(vectors: Vectors, mean_norms: Mapping[str, float]) -> dict[str, list[float]]:
    """Each vector's norm as a multiple of its encoder's vocabulary mean norm (keys the model has)."""
    return {
        key: [float(n) / mean_norms[key] for n in tensor.detach().float().norm(dim=1)]
        for key, tensor in vectors.items()
        if key in mean_norms and mean_norms[key] > 0
    }


def largest_norm_ratio(vectors: Vectors, mean_norms: Mapping[str, float]) -> float | None:
    """The largest of `norm_ratios`, or None when no encoder matches."""
    ratios = [ratio for row in norm_ratios(vectors, mean_norms).values() for ratio in row]
    return max(ratios) if ratios else None


def norm_warning(ratio: float | None, threshold: float = NORM_WARNING_RATIO) -> str:
    """One line for a vector past the threshold; empty otherwise."""
    if ratio is None or ratio <= threshold:
        return ""
    return (
        f"Warning: a vector's norm is {ratio:.1f}x the vocabulary's mean; it may overpower other words in prompts "
        "(the directional method keeps it at 1x)"
    )


# ------------------------------------------------------------------------------------------------ directional


def retract_to_sphere(vectors: torch.Tensor, radius: float) -> torch.Tensor:
    """Each row scaled to norm `radius` (a zero row becomes the first axis times `radius`, so it stays defined)."""
    norms = vectors.norm(dim=1, keepdim=True)
    fallback = torch.zeros_like(vectors)
    fallback[:, 0] = 1.0
    safe = torch.where(norms > 1e-12, vectors / norms.clamp_min(1e-12), fallback)
    return safe * radius


def project_to_tangent(vectors: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """The gradient less its component along each row: what changes the direction, not the norm."""
    unit = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return gradient - (gradient * unit).sum(dim=1, keepdim=True) * unit


def direction_prior_loss(vectors: Vectors, anchors: Vectors, weight: float) -> torch.Tensor | float:
    """weight × mean(1 − cos(vector, anchor)): the von Mises-Fisher prior's pull toward the anchor direction
    (its gradient on the sphere is the anchor direction, constant as in the paper)."""
    if weight <= 0:
        return 0.0
    terms = [
        1 - torch.nn.functional.cosine_similarity(vectors[key], anchors[key].to(vectors[key]), dim=1).mean()
        for key in vectors
    ]
    return weight * torch.stack(terms).mean()


# ------------------------------------------------------------------------------------------------- cross init


def encoder_output_rows(model, init_text: str, num_vectors: int) -> dict[str, torch.Tensor]:
    """CrossInit's start: per text encoder, its final output (last hidden state, after the final layer norm) at
    the init text's tokens, spread over `num_vectors` as a new embedding's token rows are."""
    from .create import init_token_ids
    from .embedding import spread_vectors

    rows = {}
    for encoder in model.encoders:
        tokenizer = encoder.tokenizer
        ids = init_token_ids(tokenizer, init_text)
        if not ids:
            rows[encoder.key] = spread_vectors(torch.zeros(0, encoder.width), num_vectors)
            continue
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        sequence = [tokenizer.bos_token_id, *ids[:75], tokenizer.eos_token_id]
        sequence += [pad] * (77 - len(sequence))
        device = encoder.model.device
        with torch.no_grad():
            output = encoder.model(torch.tensor([sequence], device=device)).last_hidden_state[0]
        rows[encoder.key] = spread_vectors(output[1 : 1 + len(ids[:75])].float().cpu(), num_vectors)
    return rows


def anchor_loss(vectors: Vectors, anchors: Vectors, weight: float) -> torch.Tensor | float:
    """weight × the squared L2 distance to the anchors (summed over the width, mean over vectors and encoders):
    CrossInit's pull toward where it started."""
    if weight <= 0:
        return 0.0
    terms = [((vectors[key] - anchors[key].to(vectors[key])) ** 2).sum(dim=1).mean() for key in vectors]
    return weight * torch.stack(terms).mean()


# ------------------------------------------------------------------------------------------------ context


def context_prompts(name: str, seed: int, count: int) -> list[str]:
    """`count` of CONTEXT_PROMPTS with the embedding's name in its place, drawn by `seed` (one per micro-batch
    sample, from the step's own seed, so a resumed run draws the same ones)."""
    rng = random.Random(seed)
    return [rng.choice(CONTEXT_PROMPTS).format(name) for _ in range(count)]


def context_mask(hidden_states: torch.Tensor, splice_positions: Sequence[tuple[int, int]]) -> torch.Tensor:
    """[B, T] True at every position but the embedding's own (batch row, token position) slots."""
    mask = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
    for row, position in splice_positions:
        mask[row, position] = False
    return mask


def context_distance(states: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked positions of 1 − cos between the two conditionings' per-token states ([B, T, D]):
    0 when the other words are encoded exactly as with the reference in the embedding's place."""
    cosine = torch.nn.functional.cosine_similarity(states.float(), reference.float(), dim=-1)
    return ((1 - cosine) * mask).sum() / mask.sum().clamp_min(1)


def splice_slots(tokenized: Sequence, chunk_tokens: int = 77) -> list[tuple[int, int]]:
    """(batch row, token position in the conditioning) of every embedding vector in tokenized prompts."""
    return [
        (row, chunk * chunk_tokens + position)
        for row, prompt in enumerate(tokenized)
        for chunk, position, _name, _index in prompt.splices
    ]


def context_regularization(
    model, tokenized: Mapping[str, Sequence], name: str, vectors: Vectors, reference: Vectors, weight: float
) -> torch.Tensor | float:
    """weight × `context_distance` between the prompts encoded with the vectors and with the reference vectors
    (the init text's) in their place: two extra text-encoder passes, one of them without gradient."""
    from .prompt import encode_tokenized

    if weight <= 0:
        return 0.0
    with torch.no_grad():
        target = encode_tokenized(model, tokenized, {name: reference}).hidden_states
    states = encode_tokenized(model, tokenized, {name: vectors}).hidden_states
    mask = context_mask(states, splice_slots(tokenized[model.encoders[0].key]))
    return weight * context_distance(states, target, mask)


# ------------------------------------------------------------------------------------------- a run's hooks


class RunEditability:
    """What one training run does for its method: at the start (a new run only), around each optimizer step,
    and in the loss. Built from the model, the resolved method and the embedding's init text, so a resumed run
    rebuilds exactly the same anchors."""

    def __init__(self, model, config, init_text: str, num_vectors: int) -> None:
        from .create import create_embedding

        self.method = config.method
        self.name = config.name
        self.seed = config.seed
        self.direction_prior = config.direction_prior if self.method == "directional" else 0.0
        self.cross_init_weight = config.cross_init_weight if self.method == "cross_init" else 0.0
        self.context_weight = config.context_regularization
        self.mean_norms = vocabulary_mean_norms(model)
        device = model.unet.device
        needs_tokens = self.method == "directional" or self.context_weight > 0
        tokens = create_embedding(model, self.name, init_text, num_vectors).vectors if needs_tokens else {}
        self.token_rows = {key: tensor.to(device) for key, tensor in tokens.items()}  # the init text's rows
        outputs = encoder_output_rows(model, init_text, num_vectors) if self.method == "cross_init" else {}
        self.output_rows = {key: tensor.to(device) for key, tensor in outputs.items()}  # CrossInit's start

    def start(self, vectors: Mapping[str, torch.Tensor]) -> None:
        """A new run's first vectors (in place): on the sphere for directional, the encoder output for cross_init."""
        with torch.no_grad():
            for key, tensor in vectors.items():
                if self.method == "directional":
                    tensor.copy_(retract_to_sphere(tensor, self.mean_norms[key]))
                elif self.method == "cross_init":
                    tensor.copy_(self.output_rows[key])

    def loss(self, model, tokenize, vectors: Vectors, step: int, micro: int, rank: int, samples: int):
        """The method's terms added to the diffusion loss of one micro-batch (0.0 when there are none)."""
        total = direction_prior_loss(vectors, self.token_rows, self.direction_prior)
        total = total + anchor_loss(vectors, self.output_rows, self.cross_init_weight)
        if self.context_weight > 0:
            prompts = context_prompts(self.name, hash_seed(self.seed, "context", step, micro, rank), samples)
            total = total + context_regularization(
                model, tokenize(prompts), self.name, vectors, self.token_rows, self.context_weight
            )
        return total

    def before_step(self, vectors: Mapping[str, torch.Tensor]) -> None:
        """Directional: keep only the gradients' tangent part (the part that turns the direction)."""
        if self.method == "directional":
            for tensor in vectors.values():
                if tensor.grad is not None:
                    tensor.grad.copy_(project_to_tangent(tensor.detach(), tensor.grad))

    def after_step(self, vectors: Mapping[str, torch.Tensor]) -> None:
        """Directional: back onto the sphere after the optimizer's step."""
        if self.method == "directional":
            with torch.no_grad():
                for key, tensor in vectors.items():
                    tensor.copy_(retract_to_sphere(tensor, self.mean_norms[key]))

    def norm_ratio(self, vectors: Vectors) -> float | None:
        return largest_norm_ratio(vectors, self.mean_norms)


def hash_seed(*parts: object) -> int:
    """A 63-bit seed mixed from the parts (as the trainer's own step seeds are)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1
