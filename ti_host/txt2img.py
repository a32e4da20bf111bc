"""The web UI's txt2img settings as a run's preview settings.

While the web UI builds its page, `Txt2imgCapture.capture` (registered with the web UI's after-component
callback) keeps the txt2img components by their elem_ids; the Train tab passes them to Train/Resume as extra
inputs, so a run gets what the user typed there at that moment. `preview_from_txt2img` turns those values
into our preview settings (pure: the web UIs' sampler names, seeds and sizes mapped to ours).

elem_ids (each read in the web UIs' sources): A1111 1.10 and Forge make all nine (`modules/ui_toprow.py`,
`modules/ui.py`, `modules/processing_scripts/{sampler,seed}.py`); SD.Next makes all but the scheduler
(`modules/ui_sections.py`, `modules/ui_guidance.py`), and its sampler dropdown gives an index.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# Our name for each txt2img setting -> the web UI's elem_id.
TXT2IMG_ELEM_IDS = {
    "prompt": "txt2img_prompt",
    "negative_prompt": "txt2img_neg_prompt",
    "sampler": "txt2img_sampling",
    "scheduler": "txt2img_scheduler",  # A1111 1.9 and later, Forge: the sampler's "Schedule type"
    "steps": "txt2img_steps",
    "cfg_scale": "txt2img_cfg_scale",
    "seed": "txt2img_seed",
    "width": "txt2img_width",
    "height": "txt2img_height",
}
_NAME_OF_ELEM_ID = {elem_id: name for name, elem_id in TXT2IMG_ELEM_IDS.items()}

# The web UIs' sampler names (lower case) -> ours (ti_core.config.PREVIEW_SAMPLERS). "DPM++ 2M" depends on
# the schedule type: see `_sampler`.
SAMPLERS = {
    "dpm++ 2m": "dpm++_2m",
    "dpm++ 2m karras": "dpm++_2m_karras",  # A1111 before 1.9 named sampler and schedule together
    "euler a": "euler_a",
    "euler": "euler",
    "ddim": "ddim",
    "unipc": "unipc",
}
# Schedule types that are the sampler's own: "Automatic" is the sampler's default, which for DPM++ 2M is
# Karras (A1111 1.10 and Forge: modules/sd_samplers_kdiffusion.py).
_AUTOMATIC = ("", "automatic")


class Txt2imgCapture:
    """The txt2img components of the page being built, by our name (the last one built wins: a UI reload
    builds them again)."""

    def __init__(self) -> None:
        self._components: dict[str, Any] = {}

    def capture(self, component: Any, **kwargs: Any) -> None:
        """The web UI's after-component callback: keep the component when it is one of txt2img's."""
        elem_id = getattr(component, "elem_id", None) or kwargs.get("elem_id")
        name = _NAME_OF_ELEM_ID.get(elem_id) if isinstance(elem_id, str) else None
        if name is not None:
            self._components[name] = component

    def components(self) -> dict[str, Any]:
        """The captured components by name; empty when the page has no txt2img prompt (nothing to take)."""
        return dict(self._components) if "prompt" in self._components else {}

    def named_values(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The components' values as the user sees them: a dropdown that gives its choice's index (SD.Next's
        sampler) gives the choice's name instead."""
        named = dict(values)
        for name, value in values.items():
            component = self._components.get(name)
            if getattr(component, "type", None) == "index" and isinstance(value, int):
                choices = _choice_names(getattr(component, "choices", None) or [])
                named[name] = choices[value] if 0 <= value < len(choices) else None
        return named


def _choice_names(choices: list) -> list[str]:
    """gradio 3.41+ keeps choices as (name, value) pairs; older ones as plain names."""
    return [str(choice[0]) if isinstance(choice, list | tuple) else str(choice) for choice in choices]


def preview_from_txt2img(txt2img: Mapping[str, Any], fields: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The txt2img values (by our names: prompt, negative_prompt, sampler, scheduler, steps, cfg_scale, seed,
    width, height; a missing one is left alone) as preview settings by TrainConfig key, and what could not be
    taken as it is, each in a few words. `fields` are the Train tab's preview values: what stays when a
    txt2img value cannot be used (an unknown sampler, a random seed)."""
    settings: dict[str, Any] = {}
    notes: list[str] = []
    if "prompt" in txt2img:
        settings["preview_prompt"] = _one_line(txt2img["prompt"])
        if not settings["preview_prompt"]:
            notes.append("the txt2img prompt is empty, so previews use a template line with a caption")
    if "negative_prompt" in txt2img:
        settings["preview_negative_prompt"] = _one_line(txt2img["negative_prompt"])
    if "sampler" in txt2img:
        sampler, note = _sampler(txt2img["sampler"], txt2img.get("scheduler"), fields.get("preview_sampler"))
        if sampler is not None:
            settings["preview_sampler"] = sampler
        if note:
            notes.append(note)
    if (steps := _number(txt2img.get("steps"))) is not None and steps >= 1:
        settings["preview_steps"] = round(steps)
    if (cfg := _number(txt2img.get("cfg_scale"))) is not None:
        if cfg >= 0:
            settings["preview_guidance"] = float(cfg)
        else:  # SD.Next's -1: the model's own default, which previews do not know
            notes.append(
                f"the txt2img CFG scale is the model's default, so previews keep {fields.get('preview_guidance')}"
            )
    if "seed" in txt2img:
        seed = _number(txt2img["seed"])
        if seed is None or seed == -1 or not seed.is_integer():
            kept = fields.get("preview_seed")
            notes.append(f"the txt2img seed is random, so previews keep seed {_plain(kept)} (comparable step to step)")
        else:
            settings["preview_seed"] = int(seed)
    for side in ("width", "height"):
        if (size := _number(txt2img.get(side))) is not None and size >= 0:
            rounded = max(8, round(size / 8) * 8) if size else 0
            settings[f"preview_{side}"] = rounded
            if rounded != size:
                notes.append(f"{side} {_plain(size)} rounded to {rounded}")
    return settings, notes


def _sampler(name: Any, scheduler: Any, fallback: Any) -> tuple[str | None, str]:
    """Our sampler for the web UI's sampler and schedule type, and a note when it is not an exact match."""
    sampler = str(name or "").strip()
    schedule = str(scheduler or "").strip()
    ours = SAMPLERS.get(sampler.lower())
    if ours is None:
        shown = sampler or "none"
        return fallback, f"the txt2img sampler {shown} has no preview counterpart, so previews use {fallback}"
    schedule_key = schedule.lower()
    # A1111 1.10's and Forge's "Automatic" DPM++ 2M is Karras; without a schedule type (SD.Next, A1111
    # before 1.9) the sampler's name says it all.
    if ours == "dpm++_2m" and (schedule_key == "karras" or (scheduler is not None and schedule_key in _AUTOMATIC)):
        return "dpm++_2m_karras", ""
    if schedule_key in _AUTOMATIC or (ours == "dpm++_2m_karras" and schedule_key == "karras"):
        return ours, ""
    return ours, f"the txt2img schedule type {schedule} has no preview counterpart, so previews use {ours}'s own"


def _one_line(text: Any) -> str:
    """A txt2img prompt is one prompt, whatever its line breaks: its lines joined with a space."""
    return " ".join(line.strip() for line in str(text or "").splitlines() if line.strip())


def _number(value: Any) -> float | None:
    """A slider's, number box's or (A1111 --use-textbox-seed) text box's value as a number; None if it is none."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(str(value).strip()) if isinstance(value, str) else float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _plain(value: Any) -> str:
    """8.0 as 8, for notes."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
