"""`python -m ti_core train`: train an embedding from the command line.

    python -m ti_core train --model M --embeddings-dir D --name N --images I --steps 2000

Settings come from TrainConfig's defaults, then a named preset (`--preset`), then a JSON file (`--config`,
e.g. a run's settings.json or a preset file), then the flags given; without --resolution the model's own resolution is used. Progress is a line that
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

from . import config as config_module
from .command_line import UsageError, add_model_arguments, load_model_from_args, run_command, top_parser
from .config import TrainConfig, declared
from .settings import Setting
from .timodel import TIModel

# MKL sums in an order that depends on memory alignment unless told otherwise, and Adam amplifies the
# last-bit differences, so the same seed would not give the same embedding twice on the CPU. It must be
# set before MKL's first call; importing torch makes none.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `train` command on the main CLI's subparsers."""
    parser = subparsers.add_parser(
        "train", help="train an embedding on a folder of images", description=__doc__.split("\n\n")[0]
    )
    add_model_arguments(parser, required=True)
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps... (default: the GPU if there is one)")
    parser.add_argument(
        "--config", type=Path, help="JSON settings (a run's settings.json or a preset file); flags override them"
    )
    parser.add_argument(
        "--preset",
        help="a named preset (shipped, or saved in the presets folder beside the log folder); "
        "--config and flags override it",
    )
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    for item in declared():
        parser.add_argument(*item.cli_flags, dest=_dest(item.key), default=None, **_argparse_options(item))
    parser.set_defaults(run=run_train)
    return parser


PREVIEW_SETTINGS = (
    "preview_prompt", "preview_negative_prompt", "preview_sampler", "preview_steps", "preview_guidance",
    "preview_seed", "preview_width", "preview_height", "negative_embedding",
)  # fmt: skip


def add_compare_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `compare` command: a run's snapshots rendered side by side, with its preview settings."""
    parser = subparsers.add_parser(
        "compare",
        help="render a run's snapshots (LOG_DIR/NAME/NAME-STEP) side by side into LOG_DIR/NAME/images/NAME-snapshots.png",
    )
    add_model_arguments(parser, required=True)
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps... (default: the GPU if there is one)")
    parser.add_argument("--log-dir", type=Path, required=True)
    parser.add_argument("--name", required=True, help="the embedding's name")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    for item in declared():
        if item.key in PREVIEW_SETTINGS:  # the run's own (settings.json) unless given
            parser.add_argument(*item.cli_flags, dest=_dest(item.key), default=None, **_argparse_options(item))
    parser.set_defaults(run=run_compare)
    return parser


def run_compare(args: argparse.Namespace) -> int:
    """The `compare` command: prints where the grid was written."""
    from .names import validate_name

    folder = Path(args.log_dir) / validate_name(args.name)
    if not (folder / "settings.json").is_file():
        raise UsageError(f"no run of {args.name} in {args.log_dir} (no {folder / 'settings.json'})")
    values = _read_settings(folder / "settings.json")
    values.update({key: getattr(args, key) for key in PREVIEW_SETTINGS if getattr(args, key) is not None})
    values.update(name=args.name, log_dir=str(args.log_dir))
    try:
        config = config_module.TrainConfig.from_dict(values)
    except ValueError as error:
        raise UsageError(str(error)) from None
    print(f"Loading {args.model}...", flush=True)
    model = load_model_from_args(args)
    _place(model, _device(args, None), config.mixed_precision)
    from .train import compare_snapshots

    result = compare_snapshots(
        model, config, lambda event: print(event.message, flush=True) if event.kind == "step" else None
    )
    print(result.message.rpartition(": ")[2])
    return 0


def _dest(setting: str) -> str:
    return setting.replace(".", "_")


_TYPES = {"int": int, "float": float}


def _argparse_options(item: Setting) -> dict[str, Any]:
    """The argparse keywords of a declared setting. Every default is None, so only the flags actually given
    override --config and the defaults; the help shows the setting's own default."""
    options: dict[str, Any] = {}
    if item.kind == "bool":
        options["action"] = argparse.BooleanOptionalAction
    elif item.choices:
        options["choices"] = item.choices
    else:
        options["metavar"] = item.cli_flags[0][2:].upper().replace("-", "_")
    if item.kind in _TYPES:
        options["type"] = _TYPES[item.kind]
    default = None if item.key == "data.resolution" or item.required else item.default  # resolution: the model's
    help_text = item.help
    if default not in (None, ""):
        help_text = f"{help_text} (default: {default})".lstrip()
    return {**options, "help": help_text}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from --config and the flags given; UsageError (exit 2) for anything invalid."""
    values: dict[str, Any] = _read_settings(args.config) if args.config else {}
    if getattr(args, "preset", None):
        values = _with_preset(args, values)
    data = dict(values.pop("data", None) or {})
    items = declared()
    for setting in (item.key for item in items):
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
    for item in items:
        if item.required and item.key not in given:
            raise UsageError(f"{item.cli_flags[0]} is required (or give {item.key!r} in --config)")
    try:
        return config_module.TrainConfig.from_dict({**values, "data": data})
    except ValueError as error:
        raise UsageError(str(error)) from None


def _with_preset(args: argparse.Namespace, values: dict[str, Any]) -> dict[str, Any]:
    """The preset's settings overridden by --config's `values` (the flags come after both)."""
    from .preset import load_preset

    log_dir = args.log_dir or values.get("log_dir") or config_module.setting_named("log_dir").default
    try:
        preset = load_preset(args.preset, log_dir)
    except ValueError as error:
        raise UsageError(f"--preset: {error}") from None
    data = {**preset.pop("data", {}), **(values.get("data") or {})}
    return {**preset, **values, "data": data}


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
    from .train import AlreadyTrained, StepsReached, check_trainable
    from .train.optimizers import optimizer_available

    if not config.data.images.is_dir():
        raise ValueError(f"--images {config.data.images} is not a folder")
    if problem := optimizer_available(config.optimizer):  # e.g. prodigy without prodigyopt
        raise ValueError(problem)
    try:
        check_trainable(config)
    except AlreadyTrained as error:
        raise AlreadyTrained(error.path, error.step, "add --resume", "--overwrite") from None
    except StepsReached as error:
        raise StepsReached(error.path, error.step, "give --steps above {step} to resume it") from None


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


def _place(model: TIModel, device, mixed_precision: str) -> None:
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

    def build_parser() -> argparse.ArgumentParser:
        parser, commands = top_parser()
        add_train_parser(commands)
        return parser

    return run_command(build_parser, ["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
