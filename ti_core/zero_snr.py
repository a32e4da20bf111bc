"""Zero-terminal-SNR models: whether a checkpoint was trained on a noise schedule whose last step is pure
noise (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed"), and the scheduler
that trains and samples it.

Such models (NoobAI-XL v-pred and its merges, the popular ones) predict v and were trained with betas
rescaled so that alpha_cumprod at the last timestep is 0. Training an embedding against them on the usual
schedule shows the UNet inputs it never saw at high noise and the wrong targets; diffusers' schedulers
rescale the betas themselves when their config says `rescale_betas_zero_snr`, so a model carries the fact
in its scheduler config and every scheduler made from it (training's DDPM, the previews' DPM-Solver) agrees.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

# A zero-size tensor named "ztsnr" marks such a checkpoint, as "v_pred" marks v-prediction (ComfyUI and
# Forge read both).
ZTSNR_KEY = "ztsnr"
_TRUE = {"1", "true", "yes", "on"}
_YAML_ZERO_SNR = re.compile(
    r"^\s*(?:rescale_betas_zero_snr|zero_terminal_snr|use_zero_terminal_snr|ztsnr)\s*:\s*['\"]?(\w+)",
    re.MULTILINE | re.IGNORECASE,
)


def zero_terminal_snr_from_checkpoint(keys: Collection[str], metadata: Mapping[str, str]) -> bool | None:
    """The "ztsnr" marker key, else SAI model-spec-style metadata (`modelspec.zero_terminal_snr`,
    `ztsnr`); None when the file says nothing."""
    if ZTSNR_KEY in keys:
        return True
    for name in ("modelspec.zero_terminal_snr", "modelspec.ztsnr", "ztsnr"):
        if name in metadata:
            return str(metadata[name]).strip().lower() in _TRUE
    return None


def sidecar_zero_terminal_snr(path: Path) -> bool | None:
    """From the `<checkpoint stem>.yaml` beside the file, when it has a `rescale_betas_zero_snr` (or
    `zero_terminal_snr`, `ztsnr`) line; None otherwise."""
    yaml_path = Path(path).with_suffix(".yaml")
    if not yaml_path.is_file():
        return None
    match = _YAML_ZERO_SNR.search(yaml_path.read_text(encoding="utf-8", errors="replace"))
    return match[1].lower() in _TRUE if match else None


def file_zero_terminal_snr(path: Path, keys: Collection[str], metadata: Mapping[str, str]) -> bool | None:
    """What a checkpoint file says: its `.yaml` first (the user's word, as for the prediction type), then the
    file's own marker key or metadata."""
    said = sidecar_zero_terminal_snr(path)
    return said if said is not None else zero_terminal_snr_from_checkpoint(keys, metadata)


def uses_zero_terminal_snr(scheduler: Any) -> bool:
    return bool(scheduler.config.get("rescale_betas_zero_snr", False))


def with_zero_terminal_snr(scheduler: Any, on: bool) -> Any:
    """A scheduler like `scheduler` whose betas are (or are not) rescaled to zero terminal SNR.

    On, it also samples with "trailing" timesteps, so the first sampling step starts at the last (pure
    noise) timestep, as the paper prescribes. A scheduler class without the option (PNDM, SD1's default)
    is replaced by Euler, which has it.
    """
    from diffusers import EulerDiscreteScheduler

    if uses_zero_terminal_snr(scheduler) == on:
        return scheduler
    config = dict(scheduler.config)
    config["rescale_betas_zero_snr"] = on
    if on:
        config["timestep_spacing"] = "trailing"
    cls = type(scheduler)
    if "rescale_betas_zero_snr" not in inspect.signature(cls.__init__).parameters:
        cls = EulerDiscreteScheduler
    return cls.from_config(config)
