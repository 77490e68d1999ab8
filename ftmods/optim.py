"""Learning-rate schedules usable as ``lr_scheduler`` callables in configs."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosineLR(LambdaLR):
    """Linear warm-up from 0 to the base LR, then cosine decay to ``min_lr_ratio`` × base LR at ``total_steps``.

    Args:
        optimizer: The wrapped optimizer.
        warmup_steps: Steps of linear warm-up.
        total_steps: Step at which the cosine reaches its minimum (set it to ``trainer.max_steps``); the LR stays at
            the minimum afterwards.
        min_lr_ratio: Final LR as a fraction of the base LR.
        decay: ``cosine`` or ``linear`` decay after warm-up; ``constant`` keeps the base LR.

    Example::

        lr_scheduler:
          class_path: ftmods.optim.WarmupCosineLR
          init_args: {warmup_steps: 100, total_steps: 2000}
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int = 0,
        total_steps: int = 1000,
        min_lr_ratio: float = 0.0,
        decay: str = "cosine",
    ) -> None:
        if decay not in ("cosine", "linear", "constant"):
            raise ValueError(f"decay must be 'cosine', 'linear' or 'constant', got {decay!r}")
        if total_steps <= warmup_steps and decay != "constant":
            raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})")
        self.warmup_steps, self.total_steps, self.min_lr_ratio, self.decay = (
            warmup_steps,
            total_steps,
            min_lr_ratio,
            decay,
        )
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        """Multiplier of the base LR at ``step``."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.decay == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if self.decay == "cosine" else 1.0 - progress
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape


def build_optimizers(
    params: list[Any],
    optimizer: Callable[[list[Any]], Optimizer] | None,
    scheduler: Callable[[Optimizer], Any] | None,
    *,
    default_lr: float,
    default_weight_decay: float = 0.0,
    interval: str = "step",
) -> Any:
    """What a module's ``configure_optimizers`` returns.

    The injected optimizer over ``params`` (AdamW with the module's defaults when none is configured), plus the
    scheduler stepped every ``interval`` if one is set.

    Example:
        >>> import torch
        >>> opt = build_optimizers([torch.nn.Parameter(torch.zeros(1))], None, None, default_lr=1e-3)
        >>> type(opt).__name__, opt.defaults["lr"]
        ('AdamW', 0.001)
    """
    from torch.optim import AdamW

    built = AdamW(params, lr=default_lr, weight_decay=default_weight_decay) if optimizer is None else optimizer(params)
    if scheduler is None:
        return built
    return {"optimizer": built, "lr_scheduler": {"scheduler": scheduler(built), "interval": interval}}
