"""The extension's entries in the web UI's Settings, in its existing "Training" section."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

SECTION = ("training", "Training")
MIXED_PRECISION_CHOICES = ["auto", "bf16", "fp16", "no"]


@dataclass(frozen=True)
class Setting:
    key: str
    default: Any
    label: str
    component: str | None = None  # a gradio class name; None lets the web UI pick from the default's type
    component_args: dict[str, Any] = field(default_factory=dict)


SETTINGS = (
    Setting(
        "ti_trainer_log_dir",
        "textual_inversion",
        "Textual Inversion trainer: folder for run logs, snapshots and previews (relative to the web UI's data folder)",
    ),
    Setting(
        "ti_trainer_unload_model",
        True,
        "Textual Inversion trainer: take the web UI's model off the GPU while training (it comes back afterwards)",
    ),
    Setting(
        "ti_trainer_mixed_precision",
        "auto",
        "Textual Inversion trainer: default mixed precision (auto: bf16 where the GPU supports it, else fp16 on CUDA, else off)",
        component="Radio",
        component_args={"choices": MIXED_PRECISION_CHOICES},
    ),
)
DEFAULTS = {setting.key: setting.default for setting in SETTINGS}


def register(shared) -> list[str]:
    """Add the settings with `shared.opts.add_option`; returns their keys."""
    option_info = shared.OptionInfo
    # The "training" category groups the section in A1111 1.7+'s settings page; SD.Next ignores it.
    extra = {"category_id": "training"} if "category_id" in inspect.signature(option_info).parameters else {}
    for setting in SETTINGS:
        component = None
        if setting.component is not None:
            import gradio  # the web UI's own gradio

            component = getattr(gradio, setting.component)
        info = option_info(
            setting.default,
            setting.label,
            component,
            dict(setting.component_args) or None,
            section=SECTION,
            **extra,
        )
        shared.opts.add_option(setting.key, info)
    return [setting.key for setting in SETTINGS]


def value(host, key: str) -> Any:
    """The setting's current value, or its default before the web UI has registered it."""
    return host.option(key, DEFAULTS[key])
