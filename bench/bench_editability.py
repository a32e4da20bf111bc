"""Editability: does a trained embedding stay usable among other words? Plain textual inversion, a norm clamp and
the methods of ti_core.editability, trained by the real trainer on a tiny real-architecture SD1 model.

    python bench/bench_editability.py                # 3 seeds, about 5-10 minutes on one CPU core
    python bench/bench_editability.py --steps 100 --seeds 1

The world. The concept is a real word, so there is a right answer to compare with: the tiny model (seed 0, real
CLIP vocabulary) draws a few images of "a photo of a teapot" (its own samples, several sampling seeds), and each
method learns an embedding from those images, starting from the init word "object". Plain TI cannot tell the
images apart from the word "teapot" beyond what its vector does to the model, so a perfect embedding would
condition like "teapot" does, at a word's norm.

The scores, per method, mean ± standard deviation over the seeds (each seed changes the images drawn and the
training's own randomness; steps and learning rate are equal for all):
- reconstruction: the diffusion loss on the concept images (fixed noise and timesteps, prompts of the training
  template), lower is better; "learnt" is how far below the init word's loss it is (×1000): most of the loss is the
  noise no prompt can predict, so the part an embedding can learn is this difference.
- context distance: for new prompts (none seen in training) with the embedding among other words, the mean
  1 − cosine similarity between the text encoder's output states after the embedding (the following words, the
  end token and the padding states, which all reach the UNet's cross-attention) and those of the same prompt with
  "teapot" in its place. 0 = the rest of the prompt is encoded exactly as with the true word. Positions before the
  embedding are left out: CLIP's causal attention makes them identical by construction.
- UNet context error: the same prompts through the UNet at fixed latents, noise and timesteps: the mean squared
  difference of its predictions with the embedding and with "teapot", as a share of the difference between
  "teapot" and the init word "object" (0 = the image the prompt makes is the true word's).
- norm ratio: the vector's norm over the vocabulary's mean token norm (1 = a word's scale).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import torch  # noqa: E402

from ti_core.config import TrainConfig  # noqa: E402
from ti_core.data import DataConfig  # noqa: E402
from ti_core.editability import vocabulary_mean_norms  # noqa: E402
from ti_core.formats import load_embedding  # noqa: E402
from ti_core.models import from_pipeline  # noqa: E402
from ti_core.prompt import encode_prompts, tokenize_for_model  # noqa: E402
from ti_core.testing import build_tiny_pipeline  # noqa: E402
from ti_core.train import train  # noqa: E402

TRUE_WORD, INIT_WORD, NAME = "teapot", "object", "concept"
IMAGES = 6
RESOLUTION = 64
# New prompts, none of them a training template line or a context-regularization prompt.
TEST_PROMPTS = (
    "a painting of {} in the snow",
    "{} on the beach next to a dog",
    "a child holding {} in a garden",
    "{} made of glass, studio lighting",
    "a drawing of {} in a forest",
    "{} under a bridge at dawn",
)
RECONSTRUCTION_PROMPTS = ("a photo of a {}", "a rendering of a {}", "the photo of a {}", "a close-up photo of a {}")
CONTEXT_WEIGHT = 1.0
# name -> TrainConfig overrides; equal steps and learning rate for all.
METHODS = {
    "plain TI": {"method": "plain"},
    "norm clamp (1x median)": {"method": "plain", "norm_control": 1.0},
    "directional": {"method": "directional"},
    "cross_init": {"method": "cross_init"},
    "plain + context reg": {"method": "plain", "context_regularization": CONTEXT_WEIGHT},
    "directional + context reg": {"method": "directional", "context_regularization": CONTEXT_WEIGHT},
}


def listening_world(pipeline, out_scale: float = 8.0, key_scale: float = 4.0):
    """The tiny model with a UNet that listens to its prompt: every cross-attention's output ×8 and keys ×4.

    As built (random weights), the tiny UNet hardly reacts to the text: the concept images' loss was the same to
    four digits with "object" and with "teapot", so there was no concept to learn. This changes the world, not the
    scores: the cross-attention now carries the prompt into the prediction as a trained model's does."""
    with torch.no_grad():
        for name, module in pipeline.unet.named_modules():
            if name.endswith("attn2"):
                module.to_out[0].weight.mul_(out_scale)
                module.to_k.weight.mul_(key_scale)
    return pipeline


def draw_concept_images(pipeline, folder: Path, seed: int) -> None:
    """The model's own samples of "a photo of a teapot", as PNGs captioned by their file names."""
    folder.mkdir(parents=True, exist_ok=True)
    pipeline.set_progress_bar_config(disable=True)
    for index in range(IMAGES):
        generator = torch.Generator().manual_seed(1000 * seed + index)
        image = pipeline(
            f"a photo of a {TRUE_WORD}",
            height=RESOLUTION,
            width=RESOLUTION,
            num_inference_steps=20,
            guidance_scale=7.0,
            generator=generator,
        ).images[0]
        image.save(folder / f"{index}.png")


def word_vectors(model, word: str) -> dict[str, torch.Tensor]:
    """A one-token word's token row(s), as a 1-vector embedding (so positions line up with the trained one)."""
    vectors = {}
    for encoder in model.encoders:
        (token,) = encoder.tokenizer(word, add_special_tokens=False).input_ids
        vectors[encoder.key] = encoder.token_table[token : token + 1].detach().float().clone()
    return vectors


class Scorer:
    """Fixed samples for the scores: the concept images' latents with noise and timesteps, test-prompt noise."""

    def __init__(self, model, images: Path, seed: int) -> None:
        from ti_core.data import encode_dataset, scan_images
        from ti_core.train import noise_scheduler_for

        self.model = model
        config = DataConfig(images=images, resolution=RESOLUTION)
        dataset = encode_dataset(model, config, scan_images(config).items, cache_dir=None)
        self.latents = torch.cat([batch.latents for batch in dataset.batches(IMAGES, seed=0, epoch=0)])
        generator = torch.Generator().manual_seed(seed + 12345)
        self.scheduler = noise_scheduler_for(model, TrainConfig(name="x", embeddings_dir=images, data=config))
        self.timesteps = torch.linspace(50, 950, len(RECONSTRUCTION_PROMPTS)).long()
        self.noise = torch.randn((len(RECONSTRUCTION_PROMPTS), *self.latents.shape), generator=generator)
        self.test_latents = torch.randn((len(TEST_PROMPTS), *self.latents.shape[1:]), generator=generator)
        self.test_noise = torch.randn(self.test_latents.shape, generator=generator)
        self.test_timesteps = torch.linspace(100, 900, len(TEST_PROMPTS)).long()
        self.true = word_vectors(model, TRUE_WORD)
        self.init = word_vectors(model, INIT_WORD)
        self.mean_norms = vocabulary_mean_norms(model)

    @torch.no_grad()
    def reconstruction(self, vectors) -> float:
        from ti_core.train import diffusion_loss

        total = 0.0
        for index, line in enumerate(RECONSTRUCTION_PROMPTS):
            conditioning = encode_prompts(self.model, [line.format(NAME)] * len(self.latents), {NAME: vectors})
            timesteps = self.timesteps[index].repeat(len(self.latents))
            total += diffusion_loss(
                self.model, self.scheduler, conditioning, self.latents, self.noise[index], timesteps
            ).item()
        return total / len(RECONSTRUCTION_PROMPTS)

    @torch.no_grad()
    def conditioning(self, vectors):
        prompts = [line.format(NAME) for line in TEST_PROMPTS]
        return encode_prompts(self.model, prompts, {NAME: vectors}).hidden_states, prompts

    @torch.no_grad()
    def context(self, vectors) -> tuple[float, torch.Tensor]:
        """(context distance, the UNet's predictions on the test prompts)."""
        states, prompts = self.conditioning(vectors)
        reference, _ = self.conditioning(self.true)
        tokenized = tokenize_for_model(self.model, prompts, {NAME: 1})[self.model.encoders[0].key]
        mask = torch.zeros(states.shape[:2], dtype=torch.bool)
        for row, prompt in enumerate(tokenized):
            (_chunk, position, _name, _index) = prompt.splices[0]
            mask[row, position + 1 :] = True  # after the embedding
        cosine = torch.nn.functional.cosine_similarity(states, reference, dim=-1)
        distance = float(((1 - cosine) * mask).sum() / mask.sum())
        noisy = self.scheduler.add_noise(self.test_latents, self.test_noise, self.test_timesteps)
        prediction = self.model.unet(noisy, self.test_timesteps, encoder_hidden_states=states).sample
        return distance, prediction

    def unet_error(self, prediction: torch.Tensor) -> float:
        _, true_prediction = self.context(self.true)
        _, init_prediction = self.context(self.init)
        scale = float(((true_prediction - init_prediction) ** 2).mean())
        return float(((prediction - true_prediction) ** 2).mean()) / scale

    def norm_ratio(self, vectors) -> float:
        return max(float(tensor.norm(dim=1).max()) / self.mean_norms[key] for key, tensor in vectors.items())

    def score(self, vectors) -> dict[str, float]:
        distance, prediction = self.context(vectors)
        return {
            "reconstruction": self.reconstruction(vectors),
            "context": distance,
            "unet": self.unet_error(prediction),
            "norm": self.norm_ratio(vectors),
        }


def run_method(model, folder: Path, images: Path, seed: int, steps: int, overrides: dict) -> dict[str, torch.Tensor]:
    config = TrainConfig(
        name=NAME,
        embeddings_dir=folder / "embeddings",
        log_dir=folder / "log",
        data=DataConfig(images=images, resolution=RESOLUTION, template="subject"),
        init_text=INIT_WORD,
        steps=steps,
        learning_rate="0.005",
        seed=seed,
        save_every=0,
        preview_every=0,
        cache_latents=False,
        save_optimizer_state=False,
        **overrides,
    )
    result = train(model, config)
    if result.stopped != "done":
        raise RuntimeError(result.message)
    return load_embedding(result.embedding_path).vectors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--only", help="comma-separated method names (default: all)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)  # tiny models: a second thread gains little
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    pipeline = listening_world(build_tiny_pipeline("sd1"))
    model = from_pipeline(pipeline, "tiny-sd1")
    scores: dict[str, list[dict[str, float]]] = {name: [] for name in ["init word", "true word", *METHODS]}
    gaps: dict[str, list[float]] = {name: [] for name in METHODS}
    with tempfile.TemporaryDirectory() as temp:
        for seed in range(args.seeds):
            images = Path(temp) / f"images-{seed}"
            draw_concept_images(pipeline, images, seed)
            scorer = Scorer(model, images, seed)
            init, true = scorer.score(scorer.init), scorer.score(scorer.true)
            scores["init word"].append(init)
            scores["true word"].append(true)
            gaps.setdefault("init word", []).append(0.0)
            gaps.setdefault("true word", []).append(1000 * (init["reconstruction"] - true["reconstruction"]))
            for name, overrides in METHODS.items():
                if args.only and name not in args.only.split(","):
                    continue
                vectors = run_method(
                    model, Path(temp) / f"{seed}-{len(gaps[name])}-{name}", images, seed, args.steps, overrides
                )
                result = scorer.score(vectors)
                scores[name].append(result)
                gaps[name].append(1000 * (init["reconstruction"] - result["reconstruction"]))
                print(f"seed {seed} {name}: {result}", flush=True)
    print_table(scores, gaps, args, time.perf_counter() - began)
    return 0


def _cell(values: list[float], digits: int) -> str:
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def print_table(scores, gaps, args, seconds: float) -> None:
    print()
    print(f"{args.seeds} seeds, {args.steps} steps, learning rate 0.005, {seconds:.0f} s in all")
    print()
    print(
        "| embedding | reconstruction loss | learnt (init − loss) ×1000 | context distance | UNet context error | norm ratio |"
    )
    print("|---|---|---|---|---|---|")
    for name, rows in scores.items():
        if not rows:
            continue
        gap = _cell(gaps[name], 1)
        print(
            f"| {name} | {_cell([r['reconstruction'] for r in rows], 4)} | {gap} | "
            f"{_cell([r['context'] for r in rows], 4)} | {_cell([r['unet'] for r in rows], 3)} | "
            f"{_cell([r['norm'] for r in rows], 2)} |"
        )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
