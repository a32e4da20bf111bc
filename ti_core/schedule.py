"""Learning-rate schedules in the web UI's syntax: "0.005:100, 1e-3:1000, 1e-5".

Each comma-separated stage is ``rate:until_step``: the rate is used while the step being taken is below
``until_step``, then the next stage takes over. A stage without a step (or with ``:-1``) runs to the end of
training, so a bare number is a constant rate. Steps count optimizer steps from 0, as A1111 does, so a
resumed run lands in the same stage it would have reached without the interruption.
"""

from __future__ import annotations

import math

Schedule = list[tuple[float, int | None]]  # (rate, until_step); None = to the end


def _invalid(text: str, why: str) -> ValueError:
    return ValueError(f"Invalid learning rate schedule: {text!r} ({why})")


def _parse_stage(text: str, part: str) -> tuple[float, int | None]:
    rate_text, colon, until_text = part.partition(":")
    try:
        rate = float(rate_text)
    except ValueError:
        raise _invalid(text, f"{rate_text.strip()!r} is not a number") from None
    if not math.isfinite(rate) or rate <= 0:
        raise _invalid(text, f"the rate {rate_text.strip()} must be a positive number")
    if not colon or until_text.strip() == "-1":
        return rate, None
    try:
        until = int(until_text)
    except ValueError:
        raise _invalid(text, f"{until_text.strip()!r} is not a whole step number") from None
    if until <= 0:
        raise _invalid(text, f"the step {until} must be positive (or -1 for the end)")
    return rate, until


def parse_schedule(text: str) -> Schedule:
    """Parse "rate[:until_step], ..." into [(rate, until_step or None)]; ValueError on anything malformed.

    Stages must end at increasing steps, and nothing may follow a stage that runs to the end (A1111 would
    silently never reach it, which is always a typo).
    """
    if not isinstance(text, str) or not text.strip():
        raise _invalid(str(text), "it is empty")
    schedule: Schedule = []
    for part in text.split(","):
        if not part.strip():
            raise _invalid(text, "empty stage between commas")
        if schedule and schedule[-1][1] is None:
            raise _invalid(text, f"stage {part.strip()!r} follows a stage that runs to the end")
        rate, until = _parse_stage(text, part)
        if schedule and until is not None and until <= schedule[-1][1]:
            raise _invalid(text, f"step {until} does not come after step {schedule[-1][1]}")
        schedule.append((rate, until))
    return schedule


def learning_rate_at(schedule: Schedule, step: int, warmup_steps: int = 0) -> float:
    """The rate for optimizer step `step` (0-based), times a linear warmup over the first `warmup_steps`.

    After the last stage's step its rate carries on: training length is set by the step count, not by
    the schedule (A1111 stops training there instead, which surprises people who shorten a schedule).
    """
    rate = next((rate for rate, until in schedule if until is None or step < until), schedule[-1][0])
    if warmup_steps > 0 and step < warmup_steps:
        rate *= (step + 1) / warmup_steps
    return rate
