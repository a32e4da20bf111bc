"""Training: optimise an embedding's vectors against a frozen Stable Diffusion model.

One concept a module: `loop` (the run), `loss` (the maths), `patching` (the model while it trains),
`outputs` (snapshots, validation, previews, the final save), `run_folder` and `lock` (the run's files),
`start` (new, created or resumed embedding), `clock`, `processes` and `events` (what a run reports), and
`compare` (a run's snapshots rendered side by side, a job like a run).
"""

from .clock import Clock
from .compare import compare_snapshots
from .events import AlreadyTrained, StepsReached, TrainEvent, TrainingLocked, TrainResult
from .lock import exclusive_lock
from .loop import OutOfMemoryError, train
from .loss import (
    batch_loss,
    control_norms,
    diffusion_loss,
    min_snr_weights,
    noise_scheduler_for,
    step_generators,
    vocabulary_norm_limits,
)
from .outputs import Outputs, ValidationSample, render_preview, validation_loss, validation_set
from .patching import autocast, casts_frozen_weights, training_mode
from .processes import Processes
from .run_folder import RunFolder, vectors_hash
from .start import adopt_resumed_file, check_trainable, resume_source, starting_embedding

__all__ = [
    "AlreadyTrained",
    "Clock",
    "OutOfMemoryError",
    "Outputs",
    "Processes",
    "RunFolder",
    "StepsReached",
    "TrainEvent",
    "TrainResult",
    "TrainingLocked",
    "ValidationSample",
    "adopt_resumed_file",
    "autocast",
    "batch_loss",
    "check_trainable",
    "compare_snapshots",
    "casts_frozen_weights",
    "control_norms",
    "diffusion_loss",
    "exclusive_lock",
    "min_snr_weights",
    "noise_scheduler_for",
    "render_preview",
    "resume_source",
    "starting_embedding",
    "step_generators",
    "train",
    "training_mode",
    "validation_loss",
    "validation_set",
    "vectors_hash",
    "vocabulary_norm_limits",
]
