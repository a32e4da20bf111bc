"""One validated training configuration, shared by the CLI, the UI and the run's saved settings.json.

Every setting a training run uses lives here, so a run is reproduced from its settings.json alone
(``TrainConfig.from_dict(json.load(...))``). Bad values raise ValueError with one line naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import DataConfig
from .editability import METHODS
from .names import validate_name
from .schedule import parse_schedule

MIXED_PRECISION = ("no", "fp16", "bf16")
GRAD_CLIP = ("disabled", "value", "norm")


@dataclass
class TrainConfig:
    """Settings of one textual-inversion training run (defaults follow A1111 where it has one)."""

    name: str
    embeddings_dir: Path
    data: DataConfig
    log_dir: Path = Path("textual_inversion")  # A1111's default; the run's files go to <log_dir>/<name>/

    # The embedding: created from init_text when missing; an existing one needs resume or overwrite.
    init_text: str = "*"
    vectors: int = 1
    resume: bool = False
    overwrite: bool = False

    # Optimisation. `steps` is the step the run ends at, so a resumed run keeps the same target.
    steps: int = 2000
    learning_rate: str = "0.005"  # A1111 schedule string, see ti_core.schedule
    warmup_steps: int = 0
    batch_size: int = 1
    gradient_accumulation: int = 1
    grad_clip: str = "disabled"  # "disabled" | "value" | "norm"
    grad_clip_value: float = 0.1
    norm_control: float = 0.0  # 0 = off; else cap each vector's norm at this × the vocabulary's median norm
    seed: int = 0

    # Editability: how the vectors are kept word-like (ti_core.editability; the default by bench/RESULTS.md).
    method: str = (
        "auto"  # "auto" (new runs: directional; a resumed run keeps its own) | "plain" | "directional" | "cross_init"
    )
    direction_prior: float = 0.0  # directional: pull toward the init text's direction (0 = off, as in the paper)
    cross_init_weight: float = 1e-5  # cross_init: L2 pull toward the start (CrossInit's reg_weight)
    context_regularization: float = 0.0  # weight of the context term, any method (0 = off)

    # The diffusion loss.
    min_snr_gamma: float = 0.0  # 0 = off; 5 is the value of Hang et al. (2023)
    noise_offset: float = 0.0
    timestep_min: int = 0
    timestep_max: int = 1000  # exclusive

    # Speed and memory.
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the UNet and text encoders: faster steps after a one-off compile
    cache_latents: bool = True  # keep VAE latents on disk under the log folder between runs

    # What the run writes, every N steps (0 = never; no previews also means no <name>.preview.png card).
    save_every: int = 500
    preview_every: int = 500
    validation_every: int = 0
    validation_samples: int = 4
    preview_prompt: str = ""  # empty: a template line filled with the first image's caption
    preview_negative_prompt: str = ""
    preview_seed: int = 0
    preview_steps: int = 20
    preview_guidance: float = 7.0
    save_optimizer_state: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            self.data = _data_from_dict(self.data)
        if not isinstance(self.data, DataConfig):
            raise ValueError(f"data must be a DataConfig, not {type(self.data).__name__}")
        for field in dataclasses.fields(self):
            if field.name != "data":
                setattr(self, field.name, _coerce(field.name, field.type, getattr(self, field.name)))
        self.name = validate_name(self.name)
        parse_schedule(self.learning_rate)  # raises "Invalid learning rate schedule: ..."
        _check(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a JSON-style dict (as written by `to_dict`); unknown keys are an error."""
        _reject_unknown(cls, values, "training setting")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (paths as strings) that `from_dict` turns back into an equal config."""
        return _json_safe(dataclasses.asdict(self))


def _data_from_dict(values: dict[str, Any]) -> DataConfig:
    _reject_unknown(DataConfig, values, "data setting")
    return DataConfig(**values)  # it takes the images folder as a string or a Path


def _reject_unknown(cls, values: dict[str, Any], what: str) -> None:
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {what}{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}")


def _coerce(name: str, kind: str, value: Any) -> Any:
    """Check a value against its field's annotation, accepting what JSON and UI sliders produce
    (2.0 for 2, "out" as a Path)."""
    if kind == "Path":
        if isinstance(value, str | Path) and str(value).strip():
            return Path(value)
        raise ValueError(f"{name} must be a folder path, not {value!r}")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name} must be true or false, not {value!r}")
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{name} must be a whole number, not {value!r}")
    if kind == "float":
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ValueError(f"{name} must be a finite number, not {value!r}")
    if kind == "str":
        if isinstance(value, str):
            return value
        raise ValueError(f"{name} must be text, not {value!r}")
    raise TypeError(f"TrainConfig.{name}: no check for annotation {kind!r}")


def _check(config: TrainConfig) -> None:
    def require(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(message)

    require(1 <= config.vectors <= 75, f"vectors must be between 1 and 75, not {config.vectors}")
    require(config.steps >= 1, f"steps must be at least 1, not {config.steps}")
    require(config.warmup_steps >= 0, f"warmup_steps must not be negative, not {config.warmup_steps}")
    require(config.batch_size >= 1, f"batch_size must be at least 1, not {config.batch_size}")
    require(
        config.gradient_accumulation >= 1,
        f"gradient_accumulation must be at least 1, not {config.gradient_accumulation}",
    )
    require(
        config.grad_clip in GRAD_CLIP, f"grad_clip must be one of {', '.join(GRAD_CLIP)}, not {config.grad_clip!r}"
    )
    require(config.grad_clip_value > 0, f"grad_clip_value must be positive, not {config.grad_clip_value}")
    require(config.norm_control >= 0, f"norm_control must be 0 (off) or positive, not {config.norm_control}")
    require(config.method in METHODS, f"method must be one of {', '.join(METHODS)}, not {config.method!r}")
    for weight in ("direction_prior", "cross_init_weight", "context_regularization"):
        require(getattr(config, weight) >= 0, f"{weight} must be 0 (off) or positive, not {getattr(config, weight)}")
    require(config.min_snr_gamma >= 0, f"min_snr_gamma must be 0 (off) or positive, not {config.min_snr_gamma}")
    require(config.noise_offset >= 0, f"noise_offset must not be negative, not {config.noise_offset}")
    require(
        0 <= config.timestep_min < config.timestep_max,
        f"timesteps must satisfy 0 <= timestep_min < timestep_max, not {config.timestep_min}..{config.timestep_max}",
    )
    require(
        config.mixed_precision in MIXED_PRECISION,
        f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, not {config.mixed_precision!r}",
    )
    for every in ("save_every", "preview_every", "validation_every"):
        require(getattr(config, every) >= 0, f"{every} must be 0 (never) or positive, not {getattr(config, every)}")
    require(config.validation_samples >= 1, f"validation_samples must be at least 1, not {config.validation_samples}")
    require(config.preview_steps >= 1, f"preview_steps must be at least 1, not {config.preview_steps}")
    require(config.preview_guidance >= 0, f"preview_guidance must not be negative, not {config.preview_guidance}")
    require(not (config.resume and config.overwrite), "resume and overwrite exclude each other")


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value
