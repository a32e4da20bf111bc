"""`python -m ti_core train`: train an embedding from the command line.

    python -m ti_core train --model M --embeddings-dir D --name N --images I --steps 2000

Settings come from TrainConfig's defaults, then a JSON file (`--config`, e.g. a run's settings.json),
then the flags given; without --resolution the model's own resolution is used. Progress is a line that
updates in place on a terminal and a plain line every few seconds otherwise; Ctrl+C stops after the current
step and saves. It runs
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
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .cli import UsageError, add_model_arguments, load_model_from_args
from .config import GRAD_CLIP, MIXED_PRECISION, TrainConfig
from .data import BUILTIN_TEMPLATES, LATENT_SAMPLING, DataConfig
from .editability import METHODS

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
    (
        ("--method",),
        "method",
        {
            "choices": METHODS,
            "help": "plain TI; directional: fixed norm, only the direction trained; cross_init: start from the "
            "text encoder's output (auto: directional for a new run, a resumed run keeps its own)",
        },
    ),
    (("--direction-prior",), "direction_prior", {"type": float, "help": "directional: pull toward the init text"}),
    (("--cross-init-weight",), "cross_init_weight", {"type": float, "help": "cross_init: L2 pull toward the start"}),
    (
        ("--context-regularization",),
        "context_regularization",
        {"type": float, "help": "keep the other words of prompts encoded as with the init text (0 = off)"},
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
    (
        ("--resolution",),
        "data.resolution",
        {"type": int, "help": "training size in pixels, a multiple of 8 (default: the model's own)"},
    ),
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
        default = None if setting == "data.resolution" else _default(setting)  # the model's: known once loaded
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
    args.resolution_from_model = "data.resolution" not in given
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
    check_before_loading(config)  # every mistake that can be found without the model, before its slow load
    accelerator = _accelerator()
    main_process = accelerator is None or accelerator.is_main_process
    if main_process:
        print(f"Loading {args.model}...", flush=True)
    model = load_model_from_args(args)
    if getattr(args, "resolution_from_model", False):
        config.data = dataclasses.replace(config.data, resolution=int(model.resolution))
    _place(model, _device(args, accelerator), config.mixed_precision)
    from .train import AlreadyTrained, train

    cancel = threading.Event()
    try:
        with _stop_on_interrupt(cancel), Progress(enabled=main_process) as progress:
            result = train(model, config, progress, cancel=cancel, accelerator=accelerator)
    except AlreadyTrained as error:  # trained in the meantime: say it with this command's flags
        raise ValueError(str(AlreadyTrained(error.path, error.step, "add --resume", "--overwrite"))) from None
    if result.stopped in ("done", "interrupted"):
        if main_process:
            print(result.message)
        return 0
    raise RuntimeError(result.message) from result.error


def check_before_loading(config: TrainConfig) -> None:
    """The images folder and the embedding's state: ValueError/FileExistsError (one line, naming the flags)."""
    from .formats import load_embedding
    from .names import embedding_path
    from .train import AlreadyTrained, resume_source

    if not config.data.images.is_dir():
        raise ValueError(f"--images {config.data.images} is not a folder")
    path = embedding_path(config.embeddings_dir, config.name)
    if config.resume:
        source = resume_source(config)
        step = load_embedding(source).step
        if step >= config.steps:
            raise ValueError(f"{source} is already trained to step {step}; give --steps above {step} to resume it")
    elif not config.overwrite and path.is_file():
        step = load_embedding(path).step
        if step > 0:
            raise AlreadyTrained(path, step, "add --resume", "--overwrite")


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
    """Shows TrainEvents. On a terminal one line is redrawn in place (step/total, steps/s, ETA, loss, the last
    snapshot); otherwise a plain line every `every` seconds and at the end. Snapshots, previews and validation
    are lines of their own. The run's last message is printed by run_train."""

    def __init__(
        self,
        enabled: bool = True,
        stream=None,
        live: bool | None = None,
        every: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.enabled, self.every, self.clock = enabled, every, clock
        self.stream = stream if stream is not None else sys.stdout
        self.live = live if live is not None else _is_terminal(self.stream)
        self.last_snapshot: int | None = None
        self.shown_at: float | None = None
        self.pending = ""  # the newest step line not printed yet (plain output)
        self.drawn = 0  # the width of the live line on screen

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        if self.live and self.drawn:
            self._write("\n")
            self.drawn = 0
        elif self.pending:
            self._write(self.pending + "\n")
        self.pending = ""

    def __call__(self, event) -> None:
        if not self.enabled:
            return
        if event.kind == "start":
            self._line(event.message)
        elif event.kind == "step":
            self._step(event)
        elif event.kind in ("snapshot", "preview", "validation", "warning"):
            if event.kind == "snapshot":
                self.last_snapshot = event.step
            self._line(event.message)

    def _step(self, event) -> None:
        text = step_line(event, self.last_snapshot)
        if self.live:
            self._write("\r" + text.ljust(self.drawn))
            self.drawn = len(text)
            return
        now = self.clock()
        self.pending = text
        if self.shown_at is None or now - self.shown_at >= self.every or event.step >= event.total:
            self._write(text + "\n")
            self.shown_at, self.pending = now, ""

    def _line(self, text: str) -> None:
        """A line of its own, above the live line (which is drawn again at the next step)."""
        if self.live and self.drawn:
            self._write("\r" + " " * self.drawn + "\r")
            self.drawn = 0
        self._write(text + "\n")

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


def step_line(event, last_snapshot: int | None = None) -> str:
    """`step 12/30  1.32 steps/s  ETA 0:00:14  loss 0.1234  snapshot: step 10` (the parts that are known)."""
    parts = [f"step {event.step}/{event.total}"]
    if event.steps_per_second:
        rate = event.steps_per_second
        parts.append(f"{rate:.2f} steps/s" if rate >= 1 else f"{1 / rate:.1f} s/step")
    if event.eta_seconds is not None:
        parts.append(f"ETA {_clock_time(event.eta_seconds)}")
    if event.loss is not None:
        parts.append(f"loss {event.loss:.4f}")
    if last_snapshot is not None:
        parts.append(f"snapshot: step {last_snapshot}")
    return "  ".join(parts)


def _clock_time(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m ti_core.train_cli ARGS` = `python -m ti_core train ARGS` (what `accelerate launch -m` runs)."""
    from .cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
