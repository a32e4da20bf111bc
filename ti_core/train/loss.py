"""The loss maths: noise, timesteps and targets of one batch, the MSE with its alpha-map and min-SNR weights,
the norm limits; pure functions of their inputs (every random draw comes from a generator passed in)."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence

import torch

from ..config import TrainConfig
from ..prompt import Conditioning, TokenizedPrompt, encode_tokenized
from ..timodel import TIModel


def noise_scheduler_for(model: TIModel, config: TrainConfig):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(model.scheduler.config)
    if model.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"cannot train against a {model.prediction_type!r}-prediction model (epsilon or v only)")
    if config.timestep_max > scheduler.config.num_train_timesteps:
        raise ValueError(
            f"timestep_max {config.timestep_max} is beyond the model's {scheduler.config.num_train_timesteps} timesteps"
        )
    return scheduler


def vocabulary_norm_limits(model: TIModel, norm_control: float) -> dict[str, float]:
    """Per encoder, the largest norm a vector may reach: `norm_control` × the median token-row norm.

    Unconstrained TI vectors grow to many times the norm of any real token; the text encoder then lets
    them dominate the prompt, which is why heavily trained embeddings ignore the rest of it (poor
    editability, the method's known weak spot). Capping the norm near the vocabulary's keeps them
    word-like (OneTrainer's preserve_embedding_norm does the same).
    """
    if norm_control <= 0:
        return {}
    with torch.no_grad():
        return {e.key: norm_control * e.token_table.float().norm(dim=1).median().item() for e in model.encoders}


def mixed_seed(*parts: object) -> int:
    """A 63-bit seed mixed from the parts; the same parts give the same seed in every process and run."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


def step_generators(
    seed: int, step: int, micro: int, rank: int, device: torch.device
) -> tuple[torch.Generator, random.Random]:
    """The random sources of one micro-batch: torch (noise, timesteps) and Python (prompt lines, tags)."""
    generator = torch.Generator(device=device).manual_seed(mixed_seed(seed, "noise", step, micro, rank))
    return generator, random.Random(mixed_seed(seed, "prompt", step, micro, rank))


def batch_loss(
    model: TIModel,
    noise_scheduler,
    vectors: Mapping[str, torch.Tensor],
    batch,
    tokenized: Mapping[str, Sequence[TokenizedPrompt]],
    generator,
    config: TrainConfig,
) -> torch.Tensor:
    """The loss of one batch (its prompts tokenized for each encoder) at random timesteps and noise drawn
    from `generator`."""
    device = generator.device
    latents = batch.latents.to(device)
    noise = torch.randn(latents.shape, generator=generator, device=device)
    if config.noise_offset:
        # Offset noise (Guttenberg 2023): a per-channel constant lets the model learn overall brightness.
        noise += config.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator, device=device)
    timesteps = torch.randint(
        config.timestep_min, config.timestep_max, (len(latents),), generator=generator, device=device
    )
    conditioning = encode_tokenized(model, tokenized, {config.name: vectors})
    weights = None if batch.weights is None else batch.weights.to(device)
    return diffusion_loss(
        model, noise_scheduler, conditioning, latents, noise, timesteps, weights, batch.time_ids, config.min_snr_gamma
    )


def diffusion_loss(
    model: TIModel,
    noise_scheduler,
    conditioning: Conditioning,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    weights: torch.Tensor | None = None,
    time_ids: torch.Tensor | None = None,
    min_snr_gamma: float = 0.0,
) -> torch.Tensor:
    """Mean MSE between the UNet's prediction and its target (the noise, or v = α·ε − σ·x₀), per sample
    weighted by the alpha map (normalised by its sum, so an opaque image counts like an unweighted one)."""
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    v_prediction = model.prediction_type == "v_prediction"
    target = noise_scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
    extra = {}
    if conditioning.pooled is not None:  # SDXL: pooled text embedding and size/crop conditioning
        extra["added_cond_kwargs"] = {"text_embeds": conditioning.pooled, "time_ids": time_ids.to(latents.device)}
    prediction = model.unet(noisy, timesteps, encoder_hidden_states=conditioning.hidden_states, **extra).sample
    error = (prediction.float() - target.float()) ** 2
    if weights is None:
        per_sample = error.mean(dim=(1, 2, 3))
    else:
        coverage = weights.sum(dim=(1, 2, 3)) * error.shape[1]  # weights are [B, 1, h, w]; error is [B, C, h, w]
        per_sample = (error * weights).sum(dim=(1, 2, 3)) / coverage.clamp_min(1e-8)
    if min_snr_gamma > 0:
        per_sample = per_sample * min_snr_weights(noise_scheduler, timesteps, min_snr_gamma, v_prediction)
    return per_sample.mean()


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023): min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v,
    so that easy low-noise timesteps stop dominating the gradient."""
    alphas = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas / (1 - alphas)
    if v_prediction:
        return snr.clamp(max=gamma) / (snr + 1)
    # min(SNR, γ)/SNR written without the division where SNR <= γ: a zero-terminal-SNR model's last
    # timestep has SNR 0, where the quotient would be 0/0.
    return torch.where(snr > gamma, gamma / snr.clamp(min=gamma), torch.ones_like(snr))


def control_norms(vectors: Mapping[str, torch.Tensor], limits: Mapping[str, float]) -> None:
    """Scale down, in place, each vector whose norm exceeds its encoder's limit (see vocabulary_norm_limits)."""
    with torch.no_grad():
        for key, limit in limits.items():
            norms = vectors[key].norm(dim=1, keepdim=True)
            vectors[key].mul_((limit / norms.clamp_min(1e-12)).clamp(max=1.0))
