"""One validated training configuration, shared by the CLI, the UI and the run's saved settings.json.

Every setting a training run uses lives here, so a run is reproduced from its settings.json alone
(``TrainConfig.from_dict(json.load(...))``). Bad values raise ValueError with one line naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import DataConfig
from .editability import METHODS
from .names import validate_name
from .schedule import parse_schedule
from .settings import Setting, setting, settings_of

RUN_RECORDS = ("model", "preview_prompts")  # what a run's settings.json records beside its settings
MIXED_PRECISION = ("no", "fp16", "bf16")
GRAD_CLIP = ("disabled", "value", "norm")
OPTIMIZERS = ("adamw", "adafactor", "prodigy", "adamw8bit")
# ti_core.preview.SAMPLERS: the diffusers scheduler behind each name.
PREVIEW_SAMPLERS = ("dpm++_2m", "dpm++_2m_karras", "euler", "euler_a", "ddim", "unipc")
LR_SCHEDULERS = ("schedule", "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts")


@dataclass
class TrainConfig:
    """Settings of one textual-inversion training run (defaults follow A1111 where it has one). Each field is
    the one declaration of its setting (ti_core.settings): type, default, range, help, group."""

    name: str = setting(help="the embedding's name: its file stem and prompt token", group="embedding")
    embeddings_dir: Path = setting(help="folder of the embedding file", group="run")
    data: DataConfig = field(metadata={"setting": {"nested": DataConfig}})
    # A1111's default; the run's files go to <log_dir>/<name>/
    log_dir: Path = setting(
        Path("textual_inversion"), "snapshots, previews, loss.csv and settings.json go to LOG_DIR/NAME"
    )

    # The embedding: created from init_text when missing; an existing one needs resume or overwrite.
    init_text: str = setting("*", "text whose tokens start a new embedding's vectors", group="embedding")
    vectors: int = setting(
        1, "vectors per token of a new embedding, 1 to 75", group="embedding", minimum=1, maximum=75
    )
    resume: bool = setting(False, "continue training the existing embedding (and its optimizer state)")
    overwrite: bool = setting(False, "replace an existing embedding with a new one")

    # Optimisation. `steps` is the step the run ends at, so a resumed run keeps the same target.
    steps: int = setting(
        2000, "the step to train to", group="optimisation", minimum=1, label="Steps", elem_id="ti_train_steps"
    )
    learning_rate: str = setting(
        "0.005",  # A1111 schedule string, see ti_core.schedule
        'rate or schedule, e.g. "0.005:100, 1e-3:1000, 1e-5"',
        group="optimisation",
        label="Learning rate (schedule: 0.005:100, 1e-3:1000, 1e-5)",
        elem_id="ti_train_learning_rate",
    )
    warmup_steps: int = setting(
        0, "linear warmup steps", group="optimisation", advanced=True, minimum=0,
        flags=("--warmup-steps", "--warmup"), label="Warm-up steps", elem_id="ti_train_warmup",
    )  # fmt: skip
    batch_size: int = setting(1, group="optimisation", minimum=1, label="Batch size", elem_id="ti_train_batch")
    optimizer: str = setting(
        "adamw", "adamw; adafactor; prodigy (learning-rate-free: a rate of 1.0) with prodigyopt installed; "
        "adamw8bit on CUDA with bitsandbytes", group="optimisation", advanced=True, choices=OPTIMIZERS,
        label="Optimizer", elem_id="ti_train_optimizer",
    )  # fmt: skip
    lr_scheduler: str = setting(
        "schedule", "schedule: the learning rate's stages; or a named schedule (diffusers') of one rate",
        group="optimisation", advanced=True, choices=LR_SCHEDULERS, label="Learning-rate schedule",
        elem_id="ti_train_lr_scheduler",
    )  # fmt: skip
    lr_cycles: int = setting(
        1, "hard restarts of cosine_with_restarts", group="optimisation", advanced=True, minimum=1,
        label="Restarts (cosine with restarts)", elem_id="ti_train_lr_cycles",
    )  # fmt: skip
    gradient_accumulation: int = setting(
        1, "batches per optimizer step", group="optimisation", minimum=1,
        label="Gradient accumulation", elem_id="ti_train_accumulation",
    )  # fmt: skip
    grad_clip: str = setting(
        "disabled", "clip gradients by value or by norm", group="optimisation", advanced=True, choices=GRAD_CLIP,
        label="Gradient clipping", elem_id="ti_train_grad_clip",
    )  # fmt: skip
    grad_clip_value: float = setting(
        0.1, group="optimisation", advanced=True, minimum=0, positive=True, label="Clip at",
        elem_id="ti_train_grad_clip_value",
    )  # fmt: skip
    norm_control: float = setting(
        0.0, "cap vector norms at this x the vocabulary's median (0 = off)", group="optimisation", advanced=True,
        minimum=0, zero_means="off", label="Norm cap, x the vocabulary's median (0: off)",
        elem_id="ti_train_norm_control",
    )  # fmt: skip
    seed: int = setting(0, group="optimisation", advanced=True, label="Seed", elem_id="ti_train_seed")

    # Editability: how the vectors are kept word-like (ti_core.editability; the default by bench/RESULTS.md).
    method: str = setting(
        "auto",
        "plain TI; directional: fixed norm, only the direction trained; cross_init: start from the text encoder's "
        "output (auto: directional for a new run, a resumed run keeps its own)",
        group="editability", choices=METHODS, label="Method", elem_id="ti_train_method",
    )  # fmt: skip
    direction_prior: float = setting(
        0.0, "directional: pull toward the init text (0 = off, as in the paper)", group="editability", minimum=0,
        zero_means="off", label="Directional: pull toward the init text (0: off)", elem_id="ti_train_direction_prior",
    )  # fmt: skip
    cross_init_weight: float = setting(
        1e-5, "cross_init: L2 pull toward the start (CrossInit's reg_weight)", group="editability", minimum=0,
        zero_means="off", label="CrossInit: pull toward the start", elem_id="ti_train_cross_init_weight",
    )  # fmt: skip
    context_regularization: float = setting(
        0.0, "keep the other words of prompts encoded as with the init text (0 = off)", group="editability",
        minimum=0, zero_means="off",
        label="Context regularization: keep the other words of a prompt as with the init text (0: off)",
        elem_id="ti_train_context_regularization",
    )  # fmt: skip

    # The diffusion loss.
    min_snr_gamma: float = setting(
        0.0, "min-SNR loss weighting (0 = off; 5 is usual)", group="loss", advanced=True, minimum=0,
        zero_means="off", label="Min-SNR gamma (0: off, 5 is usual)", elem_id="ti_train_min_snr_gamma",
    )  # fmt: skip  # 5 is the value of Hang et al. (2023)
    noise_offset: float = setting(
        0.0, group="loss", advanced=True, minimum=0, label="Noise offset", elem_id="ti_train_noise_offset"
    )
    timestep_min: int = setting(
        0, group="loss", advanced=True, label="Timesteps from", elem_id="ti_train_timestep_min"
    )
    timestep_max: int = setting(
        1000, "exclusive", group="loss", advanced=True, label="Timesteps to (exclusive)",
        elem_id="ti_train_timestep_max",
    )  # fmt: skip

    # Speed and memory.
    mixed_precision: str = setting(
        "no", group="speed", choices=MIXED_PRECISION, label="Mixed precision", elem_id="ti_train_precision"
    )
    gradient_checkpointing: bool = setting(
        False, "less memory, about 50%% more compute", group="speed",
        label="Gradient checkpointing (less memory, slower)", elem_id="ti_train_gradient_checkpointing",
    )  # fmt: skip
    compile: bool = setting(
        False, "torch.compile the UNet and text encoders: faster steps after a one-off compile of minutes",
        group="speed", advanced=True, label="Compile (faster steps after minutes of compiling)",
        elem_id="ti_train_compile",
    )  # fmt: skip
    cache_latents: bool = setting(
        True, "keep VAE latents on disk in the log folder", group="speed", advanced=True,
        label="Cache latents on disk (in the log folder)", elem_id="ti_train_cache_latents",
    )  # fmt: skip  # between runs

    # What the run writes, every N steps (0 = never; no previews also means no <name>.preview.png card).
    save_every: int = setting(
        500, "snapshot every N steps (0 = never)", group="outputs", minimum=0, zero_means="never",
        label="Save a copy every N steps (0: never)", elem_id="ti_train_save_every",
    )  # fmt: skip
    preview_every: int = setting(
        500, "preview image every N steps (0 = never)", group="outputs", minimum=0, zero_means="never",
        label="Preview every N steps (0: never)", elem_id="ti_train_preview_every",
    )  # fmt: skip
    validation_every: int = setting(
        0, "validation loss every N steps (0 = never)", group="outputs", advanced=True, minimum=0,
        zero_means="never", label="Validation loss every N steps (0: never)", elem_id="ti_train_validation_every",
    )  # fmt: skip
    validation_samples: int = setting(
        4, group="outputs", advanced=True, minimum=1, label="Validation samples",
        elem_id="ti_train_validation_samples",
    )  # fmt: skip
    # Previews: several prompts (one per line), each rendered with the same seed at every preview step.
    preview_prompt: str = setting(
        "", "one prompt per line (default: a template line with the first image's caption)", group="outputs",
        label="Preview prompts, one per line (empty: a template line with a caption)",
        elem_id="ti_train_preview_prompt",
    )  # fmt: skip
    preview_negative_prompt: str = setting(
        "", group="outputs", label="Preview negative prompt", elem_id="ti_train_preview_negative_prompt"
    )
    preview_sampler: str = setting(
        "dpm++_2m", "the previews' sampler", group="outputs", choices=PREVIEW_SAMPLERS, label="Preview sampler",
        elem_id="ti_train_preview_sampler",
    )  # fmt: skip
    preview_steps: int = setting(
        20, group="outputs", minimum=1, label="Preview sampling steps", elem_id="ti_train_preview_steps"
    )
    preview_guidance: float = setting(
        7.0, group="outputs", minimum=0, label="Preview CFG scale", elem_id="ti_train_preview_guidance"
    )
    preview_seed: int = setting(0, group="outputs", label="Preview seed", elem_id="ti_train_preview_seed")
    preview_width: int = setting(
        0, "preview width in pixels, a multiple of 8 (0 = the training resolution)", group="outputs", minimum=0,
        maximum=4096, label="Preview width (0: the training resolution)", elem_id="ti_train_preview_width",
    )  # fmt: skip
    preview_height: int = setting(
        0, "preview height in pixels, a multiple of 8 (0 = the training resolution)", group="outputs", minimum=0,
        maximum=4096, label="Preview height (0: the training resolution)", elem_id="ti_train_preview_height",
    )  # fmt: skip
    # A negative embedding (trained on what the user wants less of) is used in the negative prompt, so its
    # previews put it there, each beside the same image without it. The training itself is the same.
    negative_embedding: bool = setting(
        False, "a negative embedding: previews put it in the negative prompt, beside the image without it",
        group="outputs", label="Negative embedding (previews use it in the negative prompt, beside one without)",
        elem_id="ti_train_negative_embedding",
    )  # fmt: skip
    save_optimizer_state: bool = setting(
        True, group="outputs", advanced=True, label="Save the optimizer state (for an exact resume)",
        elem_id="ti_train_save_optimizer_state",
    )  # fmt: skip

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            self.data = _data_from_dict(self.data)
        if not isinstance(self.data, DataConfig):
            raise ValueError(f"data must be a DataConfig, not {type(self.data).__name__}")
        for item in dataclasses.fields(self):
            if item.name != "data":
                setattr(self, item.name, _coerce(item.name, item.type, getattr(self, item.name)))
        self.name = validate_name(self.name)
        parse_schedule(self.learning_rate)  # raises "Invalid learning rate schedule: ..."
        _check(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a JSON-style dict (as written by `to_dict`); unknown keys are an error. A run's
        settings.json also records its model (`"model"`: what it was trained against) and the prompts its previews
        used (`"preview_prompts"`), which are not settings."""
        values = {key: value for key, value in values.items() if key not in RUN_RECORDS}
        _reject_unknown(cls, values, "training setting")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (paths as strings) that `from_dict` turns back into an equal config."""
        return _json_safe(dataclasses.asdict(self))


def declared() -> list[Setting]:
    """Every training setting, in declaration order: TrainConfig's and, as ``data.<name>``, DataConfig's."""
    return settings_of(TrainConfig)


def setting_named(key: str) -> Setting:
    return next(item for item in declared() if item.key == key)


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
    """Each setting against its declared range or choices, then what involves two settings."""
    for item in declared():
        if not item.key.startswith("data."):
            problem = item.problem(getattr(config, item.key))
            if problem:
                raise ValueError(problem)
    if not 0 <= config.timestep_min < config.timestep_max:
        raise ValueError(
            "timesteps must satisfy 0 <= timestep_min < timestep_max, "
            f"not {config.timestep_min}..{config.timestep_max}"
        )
    if config.lr_scheduler != "schedule" and len(parse_schedule(config.learning_rate)) > 1:
        raise ValueError(
            f"lr_scheduler {config.lr_scheduler} takes one learning rate, not the stages "
            f"{config.learning_rate!r}: give a single rate or use lr_scheduler schedule"
        )
    for side in ("preview_width", "preview_height"):
        if getattr(config, side) % 8:
            raise ValueError(
                f"{side} must be a multiple of 8 (or 0 for the training resolution), not {getattr(config, side)}"
            )
    if config.resume and config.overwrite:
        raise ValueError("resume and overwrite exclude each other")


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value
