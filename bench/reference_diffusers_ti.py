"""The diffusers textual-inversion example's training algorithm, re-implemented as a steppable object.

Source: huggingface/diffusers `examples/textual_inversion/textual_inversion.py` (read at commit
000280f56a6a81e355313e77ec831575ad571d8b) and, for SDXL, `textual_inversion_sdxl.py` (read at 01db9ac0).
What is kept from the script, line for line where it matters for speed:

- `tokenizer.add_tokens([tok, tok_1, ...])`, `text_encoder.resize_token_embeddings(len(tokenizer))`, the
  initializer token's row copied into every new row;
- VAE, UNet and the text encoder frozen except `text_model.embeddings.token_embedding` (the whole
  49408+N-row table is trainable);
- `torch.optim.AdamW(text_encoder.get_input_embeddings().parameters(), weight_decay=1e-2)` (the script's
  default `--adam_weight_decay`), `get_scheduler("constant")`;
- after every `optimizer.step()`, the rows outside the placeholder ids restored from a clone taken before
  training (`index_no_updates` mask, rebuilt every step as in the script);
- the dataset: PIL open + RGB convert, a random imagenet template, the tokenizer padded to 77, bicubic
  resize to `resolution`, `RandomHorizontalFlip(p=0.5)`, a `DataLoader(shuffle=True, num_workers=0)`;
- every step: `vae.encode(pixels).latent_dist.sample() * scaling_factor`, `randn_like` noise, uniform
  timesteps, `DDPMScheduler.add_noise`, the text encoder in fp32 (autocast to the mixed-precision dtype,
  as `accelerator.prepare` wraps it), `unet(...)` in `weight_dtype`, MSE against the noise or v,
  backward (GradScaler for fp16), step, `loss.detach().item()` for the log;
- mixed precision: UNet and VAE cast to `weight_dtype`; the trained embedding table stays fp32;
  gradient checkpointing as the script enables it (`unet.train()`, both models' checkpointing; the SDXL
  script checkpoints only text_encoder_1).
- SDXL (`textual_inversion_sdxl.py`): both tokenizers get the tokens, TE1 and TE2 `hidden_states[-2]`
  concatenated, TE2's pooled output and the (original size, crop top-left, target size) time ids;
  `text_encoder_2` cast to `weight_dtype`. The stored script trains only TE1's rows; newer diffusers
  (PR #9010, see shared/research/TRAINERS.md §1) train both tables — `train_te2=True` does that, as our
  trainer trains both.

Left out because they do not run per step: accelerate's logging/trackers, checkpoints, validation,
saving. `Levers` switches on one speed technique at a time for the ablation (all off = the script).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

IMAGENET_TEMPLATES_SMALL = [  # the script's `imagenet_templates_small`
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
]


@dataclass(frozen=True)
class Levers:
    """Deviations from the script, one speed technique each (all False: the script as written)."""

    cache_latents: bool = False  # VAE-encode each image (and its mirror) once; draw from the stored distribution
    new_rows_only: bool = False  # train an [N, d] parameter spliced into the lookup, not the whole table
    fused_adamw: bool = False  # torch.optim.AdamW(fused=True)
    channels_last: bool = False  # UNet and VAE in channels_last memory format
    classic_attention: bool = False  # diffusers' AttnProcessor (no SDPA); the script gets SDPA by default
    unet_weight_grads: bool = False  # leave the UNet's weights requiring grad (computed, never stepped)
    compile_unet: bool = False  # torch.compile the UNet

    def label(self) -> str:
        on = [name for name, value in vars(self).items() if value]
        return "+".join(on) if on else "script"


class TextualInversionDataset(torch.utils.data.Dataset):
    """The script's dataset (object templates, bicubic resize, p=0.5 flip); SDXL adds its random crop."""

    def __init__(self, data_root, tokenizers, size, placeholder_token, repeats=100, sdxl=False, pixels=True):
        self.image_paths = sorted(os.path.join(data_root, name) for name in os.listdir(data_root))
        self.num_images = len(self.image_paths)
        self._length = self.num_images * repeats
        self.tokenizers, self.size, self.placeholder_token = tokenizers, size, placeholder_token
        self.sdxl, self.pixels = sdxl, pixels

    def __len__(self):
        return self._length

    def __getitem__(self, i):
        example = {"index": i % self.num_images}
        text = random.choice(IMAGENET_TEMPLATES_SMALL).format(self.placeholder_token)
        for number, tokenizer in enumerate(self.tokenizers, start=1):
            example[f"input_ids_{number}"] = tokenizer(
                text, padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt"
            ).input_ids[0]
        flip = random.random() < 0.5  # transforms.RandomHorizontalFlip(p=0.5) (torchvision is not needed here)
        example["flip"] = flip
        if not self.pixels:  # cached latents: only the prompt and the flip are drawn per step
            return example
        image = Image.open(self.image_paths[i % self.num_images])
        if image.mode != "RGB":
            image = image.convert("RGB")
        if self.sdxl:  # transforms.RandomCrop(size) before the resize, with the SDXL size conditioning
            example["original_size"] = (image.height, image.width)
            y1 = random.randint(0, max(0, image.height - self.size))
            x1 = random.randint(0, max(0, image.width - self.size))
            image = image.crop((x1, y1, x1 + min(self.size, image.width), y1 + min(self.size, image.height)))
            example["crop_top_left"] = (y1, x1)
        img = np.array(image).astype(np.uint8)
        image = Image.fromarray(img).resize((self.size, self.size), resample=Image.Resampling.BICUBIC)
        if flip:
            image = ImageOps.mirror(image)
        image = (np.array(image).astype(np.uint8) / 127.5 - 1.0).astype(np.float32)
        example["pixel_values"] = torch.from_numpy(image).permute(2, 0, 1)
        return example


class DiffusersTextualInversion:
    """Set up as the script does (`from_pretrained` of every part); `step()` runs one training step."""

    def __init__(
        self,
        pretrained: str | Path,
        train_data_dir: str | Path,
        *,
        resolution: int,
        train_batch_size: int = 1,
        placeholder_token: str = "<bench-ref>",
        initializer_token: str = "toy",
        num_vectors: int = 1,
        learning_rate: float = 5e-3,
        adam_weight_decay: float = 1e-2,
        mixed_precision: str = "no",
        gradient_checkpointing: bool = False,
        device: str | torch.device = "cpu",
        seed: int = 0,
        levers: Levers = Levers(),
        train_te2: bool = True,
    ) -> None:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from diffusers.optimization import get_scheduler
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        self.device, self.levers, self.batch_size, self.resolution = (
            torch.device(device),
            levers,
            train_batch_size,
            resolution,
        )
        random.seed(seed)
        torch.manual_seed(seed)
        folder = str(pretrained)
        self.sdxl = (Path(folder) / "text_encoder_2").is_dir()
        self.noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        tokenizers = [CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")]
        encoders = [CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")]
        if self.sdxl:
            tokenizers.append(CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2"))
            encoders.append(CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2"))
        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
        self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        self.tokenizers, self.encoders = tokenizers, encoders
        trained = encoders if (not self.sdxl or train_te2) else encoders[:1]

        # Add the placeholder tokens, resize the tables, copy the initializer row into the new rows.
        placeholder_tokens = [placeholder_token] + [f"{placeholder_token}_{i}" for i in range(1, num_vectors)]
        self.placeholder_ids = []
        for tokenizer, encoder in zip(tokenizers, encoders, strict=True):
            if tokenizer.add_tokens(placeholder_tokens) != num_vectors:
                raise ValueError(f"the tokenizer already contains {placeholder_token}")
            (initializer_id,) = tokenizer.encode(initializer_token, add_special_tokens=False)
            ids = tokenizer.convert_tokens_to_ids(placeholder_tokens)
            encoder.resize_token_embeddings(len(tokenizer))
            token_embeds = encoder.get_input_embeddings().weight.data
            with torch.no_grad():
                for token_id in ids:
                    token_embeds[token_id] = token_embeds[initializer_id].clone()
            self.placeholder_ids.append(ids)

        # Freeze everything but the token-embedding table(s).
        self.vae.requires_grad_(False)
        self.unet.requires_grad_(levers.unet_weight_grads)
        for encoder in encoders:
            encoder.requires_grad_(False)
        for encoder in trained:
            encoder.get_input_embeddings().requires_grad_(not levers.new_rows_only)
        if gradient_checkpointing:
            encoders[0].gradient_checkpointing_enable()
            if not self.sdxl:  # the SDXL script checkpoints only text_encoder_1
                # Keep unet in train mode if we are using gradient checkpointing to save memory.
                self.unet.train()
                self.unet.enable_gradient_checkpointing()
        if levers.classic_attention:
            from diffusers.models.attention_processor import AttnProcessor

            self.unet.set_attn_processor(AttnProcessor())

        # The parameters: the whole table(s), or (lever) only the new rows, spliced in by a forward hook.
        self.new_rows = []
        if levers.new_rows_only:
            for encoder, ids in zip(trained, self.placeholder_ids, strict=False):
                rows = torch.nn.Parameter(encoder.get_input_embeddings().weight.data[ids].clone().to(self.device))
                encoder.get_input_embeddings().register_forward_hook(_splice_hook(rows, ids[0], len(ids)))
                self.new_rows.append(rows)
            params = self.new_rows
        else:
            params = list(itertools.chain.from_iterable(e.get_input_embeddings().parameters() for e in trained))
        for encoder in encoders:
            encoder.to(self.device)  # accelerator.prepare moves the trained encoder (parameters keep identity)
        self.optimizer = torch.optim.AdamW(
            params,
            lr=learning_rate,
            betas=(0.9, 0.999),
            weight_decay=adam_weight_decay,
            eps=1e-08,
            **({"fused": True} if levers.fused_adamw else {}),
        )
        self.lr_scheduler = get_scheduler(
            "constant", optimizer=self.optimizer, num_warmup_steps=500, num_training_steps=10**6
        )

        # Mixed precision: frozen UNet/VAE (and SDXL's TE2) in weight_dtype, the trained table in fp32.
        self.weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]
        self.autocast = mixed_precision != "no"
        self.unet.to(self.device, dtype=self.weight_dtype)
        self.vae.to(self.device, dtype=self.weight_dtype)
        if self.sdxl:
            encoders[1].to(self.device, dtype=self.weight_dtype)
        if levers.channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        self.unet_forward = torch.compile(self.unet) if levers.compile_unet else self.unet
        self.scaler = _grad_scaler(self.device, mixed_precision == "fp16")

        # Data: the script's dataset and loader; or (lever) latent distributions encoded once.
        self.data_root = train_data_dir
        placeholder_string = " ".join(tokenizers[0].convert_ids_to_tokens(self.placeholder_ids[0]))
        self.dataset = TextualInversionDataset(
            train_data_dir, tokenizers, resolution, placeholder_string, sdxl=self.sdxl, pixels=not levers.cache_latents
        )
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=train_batch_size, shuffle=True, num_workers=0, drop_last=True
        )
        self.cached = self._encode_once() if levers.cache_latents else None
        self.batches = self._endless()
        self.orig_embeds_params = [e.get_input_embeddings().weight.data.clone() for e in trained]
        self.trained = trained
        for encoder in trained:
            encoder.train()
        self.last_loss = float("nan")

    def _endless(self):
        while True:
            yield from self.loader

    def _encode_once(self):
        """(lever) mean and std of every image's latent distribution, plain and mirrored."""
        dataset = TextualInversionDataset(self.data_root, self.tokenizers, self.resolution, "x", sdxl=self.sdxl)
        means, stds = {}, {}
        with torch.no_grad():
            for index in range(dataset.num_images):
                example = dataset[index]
                for flip in (False, True):
                    pixels = example["pixel_values"]
                    if flip != example["flip"]:
                        pixels = pixels.flip(-1)
                    dist = self.vae.encode(pixels[None].to(self.device, self.weight_dtype)).latent_dist
                    means[index, flip], stds[index, flip] = dist.mean, dist.std
        return means, stds

    def _latents(self, batch) -> torch.Tensor:
        if self.cached is None:
            pixels = batch["pixel_values"].to(self.device, dtype=self.weight_dtype)
            if self.levers.channels_last:
                pixels = pixels.contiguous(memory_format=torch.channels_last)
            latents = self.vae.encode(pixels).latent_dist.sample().detach()
        else:
            means, stds = self.cached
            keys = list(zip(batch["index"].tolist(), batch["flip"].tolist(), strict=True))
            mean = torch.cat([means[key] for key in keys])
            latents = mean + torch.cat([stds[key] for key in keys]) * torch.randn_like(mean)
        return latents * self.vae.config.scaling_factor

    def step(self) -> float:
        """One training step of the script's loop; returns the logged loss (a device sync, as the script)."""
        batch = next(self.batches)
        device, weight_dtype = self.device, self.weight_dtype
        latents = self._latents(batch)
        noise = torch.randn_like(latents)
        bsz = latents.shape[0]
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device)
        timesteps = timesteps.long()
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
        added_cond_kwargs = None
        with torch.autocast(device.type, dtype=weight_dtype) if self.autocast else contextlib.nullcontext():
            if self.sdxl:
                hidden_1 = self.encoders[0](batch["input_ids_1"].to(device), output_hidden_states=True).hidden_states[
                    -2
                ]
                output_2 = self.encoders[1](batch["input_ids_2"].to(device), output_hidden_states=True)
                encoder_hidden_states = torch.cat(
                    [hidden_1.to(weight_dtype), output_2.hidden_states[-2].to(weight_dtype)], dim=-1
                )
                original = torch.stack(batch["original_size"], dim=1)
                crop = torch.stack(batch["crop_top_left"], dim=1)
                target = torch.tensor([self.resolution, self.resolution]).expand(bsz, 2)
                time_ids = torch.cat([original, crop, target], dim=1).to(device, dtype=weight_dtype)
                added_cond_kwargs = {"text_embeds": output_2[0], "time_ids": time_ids}
            else:
                encoder_hidden_states = self.encoders[0](batch["input_ids_1"].to(device))[0].float()
        encoder_hidden_states = encoder_hidden_states.to(dtype=weight_dtype)
        if self.levers.channels_last:
            noisy_latents = noisy_latents.contiguous(memory_format=torch.channels_last)
        extra = {"added_cond_kwargs": added_cond_kwargs} if added_cond_kwargs else {}
        model_pred = self.unet_forward(noisy_latents, timesteps, encoder_hidden_states, **extra).sample
        if self.noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        elif self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"Unknown prediction type {self.noise_scheduler.config.prediction_type}")
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()
        if self.levers.unet_weight_grads:
            self.unet.zero_grad(set_to_none=True)
        if not self.levers.new_rows_only:
            # Let's make sure we don't update any embedding weights besides the newly added token
            for encoder, tokenizer, ids, orig in zip(
                self.trained, self.tokenizers, self.placeholder_ids, self.orig_embeds_params, strict=False
            ):
                index_no_updates = torch.ones((len(tokenizer),), dtype=torch.bool)
                index_no_updates[min(ids) : max(ids) + 1] = False
                with torch.no_grad():
                    encoder.get_input_embeddings().weight[index_no_updates] = orig[index_no_updates]
        self.last_loss = loss.detach().item()
        return self.last_loss

    def learned_embeds(self) -> torch.Tensor:
        """What the script saves: the placeholder rows of the (first) table."""
        if self.new_rows:
            return self.new_rows[0].detach().cpu()
        ids = self.placeholder_ids[0]
        return self.encoders[0].get_input_embeddings().weight[min(ids) : max(ids) + 1].detach().cpu()


def _splice_hook(rows: torch.nn.Parameter, first_id: int, count: int):
    """Forward hook on a token-embedding layer: positions holding the new ids take `rows` (differentiable)."""

    def hook(_module, inputs, output):
        (ids,) = inputs
        mask = (ids >= first_id) & (ids < first_id + count)
        if not bool(mask.any()):
            return output
        output = output.clone()
        output[mask] = rows[ids[mask] - first_id].to(output.dtype)
        return output

    return hook


def _grad_scaler(device: torch.device, enabled: bool):
    return torch.amp.GradScaler(device.type, enabled=enabled)
