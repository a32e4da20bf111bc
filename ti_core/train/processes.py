"""This process's place among the training processes (`accelerate launch`), and what they agree on."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch


class Processes:
    """This process's place among the training processes: one, unless launched with `accelerate launch`."""

    def __init__(self, accelerator=None) -> None:
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator else 0
        self.world = accelerator.num_processes if accelerator else 1
        self.is_main = self.rank == 0

    def _sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        return self.accelerator.reduce(torch.tensor(values, device=self.accelerator.device), reduction="sum").tolist()

    def mean(self, value: float) -> float:
        return self._sum([value])[0] / self.world

    def any(self, flag: bool) -> bool:
        """True in every process if it is true in one (so all stop at the same step)."""
        return self._sum([float(flag)])[0] > 0

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        if self.world > 1:
            for param in params:
                param.grad = self.accelerator.reduce(param.grad, reduction="mean")

    def identical(self, vectors: Mapping[str, torch.Tensor]) -> bool:
        flat = torch.cat([tensor.flatten() for _, tensor in sorted(vectors.items())]).to(self.accelerator.device)
        gathered = self.accelerator.gather(flat[None])
        return bool((gathered == gathered[0]).all())

    def main_first(self):
        return self.accelerator.main_process_first() if self.accelerator else contextlib.nullcontext()
