"""The declaration of a training setting, and the list of them every front end is made from.

Each setting is declared once, as a field of `TrainConfig` (or of `DataConfig`, as ``data.<name>``) made with
`setting(...)`: its type (the annotation), default, range or choices, help, group and whether it is advanced.
From that list (ti_core.config.declared) come TrainConfig's checks, the command line's options (ti_core.train_cli), the Train tab's
fields (ti_ui.tabs.train) and the JSON the web UI route accepts (ti_host.routes). A new setting is one field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

GROUPS = ("run", "embedding", "data", "optimisation", "editability", "loss", "speed", "outputs")


@dataclass(frozen=True)
class Setting:
    """One training setting as its front ends show it. ``key`` is TrainConfig's ("data.x" for DataConfig)."""

    key: str
    kind: str  # the annotation: "int", "float", "str", "bool" or "Path"
    default: Any  # dataclasses.MISSING for a required setting
    help: str = ""
    group: str = "run"
    advanced: bool = False
    choices: tuple[Any, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    positive: bool = False  # above `minimum` (0), not equal to it
    zero_means: str = ""  # "off" or "never": 0 turns the setting off
    flags: tuple[str, ...] = ()  # command-line flags; default: --<name with dashes>
    label: str = ""  # the Train tab's label; default: the help
    elem_id: str = ""  # the Train tab's component; "" = not in the tab
    step: float | None = None  # a slider's step in the Train tab

    @property
    def name(self) -> str:
        return self.key.rpartition(".")[2]

    @property
    def cli_flags(self) -> tuple[str, ...]:
        return self.flags or ("--" + self.name.replace("_", "-"),)

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING

    def problem(self, value: Any) -> str | None:
        """What is wrong with an already type-checked `value` (one line), or None."""
        if self.choices and value not in self.choices:
            return f"{self.key} must be one of {', '.join(map(str, self.choices))}, not {value!r}"
        low, high = self.minimum, self.maximum
        if low is not None and high is not None and not low <= value <= high:
            return f"{self.key} must be between {low:g} and {high:g}, not {value}"
        if low is None or high is not None:
            return None
        if self.positive and value <= low:
            return f"{self.key} must be positive, not {value}"
        if value < low:
            if self.zero_means:
                return f"{self.key} must be 0 ({self.zero_means}) or positive, not {value}"
            return (
                f"{self.key} must not be negative, not {value}"
                if low == 0
                else f"{self.key} must be at least {low:g}, not {value}"
            )
        return None


def setting(default: Any = dataclasses.MISSING, help: str = "", **declared: Any) -> Any:
    """A dataclass field declaring a setting (see `Setting` for the keywords)."""
    return field(default=default, metadata={"setting": {"help": help, **declared}})


def settings_of(cls: type, prefix: str = "") -> list[Setting]:
    """The settings a config dataclass declares, in field order; a field without `setting(...)` counts too."""
    found = []
    for item in dataclasses.fields(cls):
        declared = dict(item.metadata.get("setting", {}))
        if "nested" in declared:
            found += settings_of(declared["nested"], prefix=f"{item.name}.")
            continue
        kind = item.type if isinstance(item.type, str) else item.type.__name__
        found.append(Setting(key=prefix + item.name, kind=kind, default=item.default, **declared))
    return found
