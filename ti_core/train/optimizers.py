"""The optimizers a run can use and its learning rate at each step.

The learning rate is a pure function of the step (A1111's schedule strings, or diffusers' named schedules
evaluated at the step), so a resumed run uses the rate an uninterrupted one would have: no scheduler state.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

from ..config import TrainConfig
from ..schedule import learning_rate_at, parse_schedule


def optimizer_available(name: str) -> str:
    """Why `name` cannot be used on this machine (one line), or "" when it can."""
    if name == "prodigy" and importlib.util.find_spec("prodigyopt") is None:
        return "optimizer prodigy needs the prodigyopt package: pip install prodigyopt"
    if name == "adamw8bit":
        if not torch.cuda.is_available():
            return "optimizer adamw8bit needs a CUDA GPU: use adamw on this machine"
        if importlib.util.find_spec("bitsandbytes") is None:
            return "optimizer adamw8bit needs the bitsandbytes package: pip install bitsandbytes"
    return ""


def usable_optimizers(choices: tuple[str, ...]) -> list[str]:
    """The declared optimizers this machine can run (adamw8bit only on CUDA with bitsandbytes)."""
    return [name for name in choices if not optimizer_available(name)]


def make_optimizer(name: str, params: list[torch.Tensor], device: torch.device) -> torch.optim.Optimizer:
    """The run's optimizer with a learning rate of 0 (set before each step). Weight decay 0 everywhere, as in
    A1111: decay pulls the vectors towards zero, which is not a neutral prior for token embeddings."""
    problem = optimizer_available(name)
    if problem:
        raise ValueError(problem)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed, scheduled rate: Adafactor's own relative step and parameter scaling would override it.
        return Adafactor(params, lr=0.0, relative_step=False, scale_parameter=False, warmup_init=False)
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=1.0, weight_decay=0.0)  # it refuses 0; each step sets the rate
    if name == "adamw8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, lr=0.0, weight_decay=0.0)
    # Fused kernels on CUDA; with one or two small tensors nothing else matters.
    return torch.optim.AdamW(params, lr=0.0, weight_decay=0.0, fused=True if device.type == "cuda" else None)


def learning_rate_function(config: TrainConfig) -> Callable[[int], float]:
    """The learning rate of the optimizer step taken at `step` (counted from 0)."""
    schedule = parse_schedule(config.learning_rate)
    if config.lr_scheduler == "schedule":
        return lambda step: learning_rate_at(schedule, step, config.warmup_steps)
    factor = named_schedule_factor(config.lr_scheduler, config.warmup_steps, config.steps, config.lr_cycles)
    rate = schedule[0][0]
    return lambda step: rate * factor(step)


def named_schedule_factor(name: str, warmup_steps: int, steps: int, cycles: int = 1) -> Callable[[int], float]:
    """diffusers' schedule `name` as the factor of the rate at a step: its LambdaLR's function, evaluated
    where diffusers' training scripts would be after `step` scheduler steps."""
    from diffusers.optimization import get_scheduler

    holder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    extra = {"num_cycles": cycles} if name == "cosine_with_restarts" else {}
    scheduler = get_scheduler(name, holder, num_warmup_steps=warmup_steps, num_training_steps=steps, **extra)
    function = scheduler.lr_lambdas[0]
    return lambda step: float(function(step))
