"""`python -m ti_core train`: train an embedding from the command line.

    python -m ti_core train --model M --embeddings-dir D --name N --images I --steps 2000

Settings come from TrainConfig's defaults, then a JSON file (`--config`, e.g. a run's settings.json),
then the flags given. Progress is a tqdm bar; Ctrl+C stops after the current step and saves. It runs
unchanged under `accelerate launch -m ti_core.train_cli ...`: each process trains on its share of the
batches and only the main one writes. Several CPU processes (gloo) need accelerate's multi-process
launcher: `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m ti_core.train_cli ...`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .cli import UsageError, add_model_arguments, load_model_from_args
from .config import GRAD_CLIP, MIXED_PRECISION, TrainConfig
from .data import BUILTIN_TEMPLATES, LATENT_SAMPLING, DataConfig

# MKL sums in an order that depends on memory alignment unless told otherwise, and Adam amplifies the
# last-bit differences, so the same seed would not give the same embedding twice on the CPU. It must be
# set before MKL's first call; importing torch makes none.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

FLAG = {"action": argparse.BooleanOptionalAction}
# (flags, setting, argparse options). "data." settings belong to DataConfig. Every default is None, so
# only the flags actually given override --config and the defaults.
OPTIONS: list[tuple[tuple[str, ...], str, dict[str, Any]]] = [
    (("--embeddings-dir",), "embeddings_dir", {"help": "folder of the embedding file"}),
    (("--name",), "name", {"help": "the embedding's name: its file stem and prompt token"}),
    (
        ("--images",),
        "data.images",
        {"help": "folder of training images (captions: .txt beside them, or the file name)"},
    ),
    (("--log-dir",), "log_dir", {"help": "snapshots, previews, loss.csv and settings.json go to LOG_DIR/NAME"}),
    (("--init-text",), "init_text", {"help": "text whose tokens start a new embedding's vectors"}),
    (("--vectors",), "vectors", {"type": int, "help": "vectors per token of a new embedding, 1 to 75"}),
    (("--resume",), "resume", FLAG | {"help": "continue training the existing embedding (and its optimizer state)"}),
    (("--overwrite",), "overwrite", FLAG | {"help": "replace an existing embedding with a new one"}),
    (("--steps",), "steps", {"type": int, "help": "the step to train to"}),
    (("--learning-rate",), "learning_rate", {"help": 'rate or schedule, e.g. "0.005:100, 1e-3:1000, 1e-5"'}),
    (("--warmup-steps", "--warmup"), "warmup_steps", {"type": int, "help": "linear warmup steps"}),
    (("--batch-size",), "batch_size", {"type": int}),
    (("--gradient-accumulation",), "gradient_accumulation", {"type": int, "help": "batches per optimizer step"}),
    (("--grad-clip",), "grad_clip", {"choices": GRAD_CLIP, "help": "clip gradients by value or by norm"}),
    (("--grad-clip-value",), "grad_clip_value", {"type": float}),
    (
        ("--norm-control",),
        "norm_control",
        {"type": float, "help": "cap vector norms at this x the vocabulary's median (0 = off)"},
    ),
    (("--min-snr-gamma",), "min_snr_gamma", {"type": float, "help": "min-SNR loss weighting (0 = off; 5 is usual)"}),
    (("--noise-offset",), "noise_offset", {"type": float}),
    (("--timestep-min",), "timestep_min", {"type": int}),
    (("--timestep-max",), "timestep_max", {"type": int, "help": "exclusive"}),
    (("--seed",), "seed", {"type": int}),
    (("--mixed-precision",), "mixed_precision", {"choices": MIXED_PRECISION}),
    (("--gradient-checkpointing",), "gradient_checkpointing", FLAG | {"help": "less memory, about 50%% more compute"}),
    (
        ("--compile",),
        "compile",
        FLAG | {"help": "torch.compile the UNet and text encoders: faster steps after a one-off compile of minutes"},
    ),
    (("--cache-latents",), "cache_latents", FLAG | {"help": "keep VAE latents on disk in the log folder"}),
    (("--save-every",), "save_every", {"type": int, "help": "snapshot every N steps (0 = never)"}),
    (("--preview-every",), "preview_every", {"type": int, "help": "preview image every N steps (0 = never)"}),
    (("--validation-every",), "validation_every", {"type": int, "help": "validation loss every N steps (0 = never)"}),
    (("--validation-samples",), "validation_samples", {"type": int}),
    (("--preview-prompt",), "preview_prompt", {"help": "default: a template line with the first image's caption"}),
    (("--preview-negative-prompt",), "preview_negative_prompt", {}),
    (("--preview-seed",), "preview_seed", {"type": int}),
    (("--preview-steps",), "preview_steps", {"type": int}),
    (("--preview-guidance",), "preview_guidance", {"type": float}),
    (("--save-optimizer-state",), "save_optimizer_state", FLAG),
    (("--resolution",), "data.resolution", {"type": int, "help": "training size in pixels, a multiple of 8"}),
    (("--recursive",), "data.recursive", FLAG | {"help": "also read images in subfolders"}),
    (("--buckets",), "data.buckets", FLAG | {"help": "aspect-ratio buckets instead of square crops"}),
    (("--flip",), "data.flip", FLAG | {"help": "mirror images at random"}),
    (("--template",), "data.template", {"help": f"prompt template: {', '.join(BUILTIN_TEMPLATES)} or a file"}),
    (("--shuffle-tags",), "data.shuffle_tags", FLAG),
    (("--tag-dropout",), "data.tag_dropout", {"type": float, "help": "probability of leaving out each caption tag"}),
    (("--repeats",), "data.repeats", {"type": int, "help": "times each image appears per epoch"}),
    (("--latent-sampling",), "data.latent_sampling", {"choices": LATENT_SAMPLING}),
    (("--alpha-weight",), "data.alpha_weight", FLAG | {"help": "weight the loss by the images' alpha channel"}),
]
REQUIRED = ("name", "embeddings_dir", "data.images")


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `train` command on the main CLI's subparsers."""
    parser = subparsers.add_parser(
        "train", help="train an embedding on a folder of images", description=__doc__.split("\n\n")[0]
    )
    add_model_arguments(parser, required=True)
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps... (default: the GPU if there is one)")
    parser.add_argument("--config", type=Path, help="JSON settings (a run's settings.json); flags override them")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    for flags, setting, options in OPTIONS:
        default = _default(setting)
        help_text = options.get("help", "")
        if default not in (None, ""):
            help_text = f"{help_text} (default: {default})".lstrip()
        if "action" not in options and "choices" not in options:
            options = {**options, "metavar": flags[0][2:].upper().replace("-", "_")}
        parser.add_argument(*flags, dest=_dest(setting), default=None, **{**options, "help": help_text})
    parser.set_defaults(run=run_train)
    return parser


def _dest(setting: str) -> str:
    return setting.replace(".", "_")


def _default(setting: str) -> Any:
    owner, name = (DataConfig, setting[5:]) if setting.startswith("data.") else (TrainConfig, setting)
    default = next(field.default for field in dataclasses.fields(owner) if field.name == name)
    return None if default is dataclasses.MISSING else default


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from --config and the flags given; UsageError (exit 2) for anything invalid."""
    values: dict[str, Any] = _read_settings(args.config) if args.config else {}
    data = dict(values.pop("data", None) or {})
    for _, setting, _ in OPTIONS:
        value = getattr(args, _dest(setting))
        if value is None:
            continue
        if isinstance(value, Path):
            value = str(value)
        if setting.startswith("data."):
            data[setting[5:]] = value
        else:
            values[setting] = value
    given = {**values, **{f"data.{key}": value for key, value in data.items()}}
    for setting in REQUIRED:
        if setting not in given:
            flag = next(flags[0] for flags, name, _ in OPTIONS if name == setting)
            raise UsageError(f"{flag} is required (or give {setting!r} in --config)")
    try:
        return TrainConfig.from_dict({**values, "data": data})
    except ValueError as error:
        raise UsageError(str(error)) from None


def _read_settings(path: Path) -> dict[str, Any]:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise UsageError(f"--config {path}: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise UsageError(f"--config {path}: not valid JSON ({error})") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a JSON object of settings")
    return values


def run_train(args: argparse.Namespace) -> int:
    """The `train` command: 0 when the run finished or was interrupted (and saved), else an error."""
    config = config_from_args(args)
    if not config.data.images.is_dir():  # worth knowing before the slow model load
        raise ValueError(f"images: {config.data.images} is not a folder")
    accelerator = _accelerator()
    model = load_model_from_args(args)
    _place(model, _device(args, accelerator), config.mixed_precision)
    from .train import train

    cancel = threading.Event()
    main_process = accelerator is None or accelerator.is_main_process
    with _stop_on_interrupt(cancel), Progress(enabled=main_process) as progress:
        result = train(model, config, progress, cancel=cancel, accelerator=accelerator)
    if result.stopped in ("done", "interrupted"):
        if main_process:
            print(result.message)
        return 0
    raise RuntimeError(result.message) from result.error


def _accelerator():
    """An Accelerator when started by `accelerate launch` (or torchrun) with several processes, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator()


def _device(args: argparse.Namespace, accelerator):
    import torch

    if accelerator is not None:
        return accelerator.device
    if args.device:
        return torch.device(args.device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _place(model, device, mixed_precision: str) -> None:
    """Move the model to the device; on a GPU with mixed precision, cast the frozen UNet and text encoders
    first, so the full-precision weights never have to fit in GPU memory. The VAE stays float32 (SDXL's
    overflows in fp16)."""
    import torch

    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision)
    for module in [model.unet, *(encoder.model for encoder in model.encoders)]:
        if half is not None and device.type != "cpu":
            module.to(half)
        module.to(device)
    model.vae.to(device)


@contextlib.contextmanager
def _stop_on_interrupt(cancel: threading.Event) -> Iterator[None]:
    """Ctrl+C asks the run to stop after the current step (it then saves); a second one aborts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()
        print("Stopping after this step (Ctrl+C again to abort)...", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class Progress:
    """Shows TrainEvents: a tqdm bar for the steps (on a terminal), a line for snapshots, previews and
    validation. The run's last message is printed by run_train."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        if self.bar is not None:
            self.bar.close()

    def __call__(self, event) -> None:
        from tqdm import tqdm

        if not self.enabled:
            return
        if event.kind == "start":
            print(event.message)
            self.bar = tqdm(total=event.total, initial=event.step, unit="step", dynamic_ncols=True, disable=None)
        elif event.kind == "step" and self.bar is not None:
            self.bar.update(event.step - self.bar.n)
            self.bar.set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.lr:.3g}", refresh=False)
        elif event.kind in ("snapshot", "preview", "validation"):
            tqdm.write(event.message)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m ti_core.train_cli ARGS` = `python -m ti_core train ARGS` (what `accelerate launch -m` runs)."""
    from .cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
