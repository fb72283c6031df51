"""Per-step schedules of DINO training (Caron et al. 2021), as WS-DINO uses them.

* learning rate: linear warm-up from 0 over ``warmup_epochs`` to its peak, then cosine
  decay to ``min_lr`` at the last step;
* teacher EMA momentum: cosine from 0.99 to 1;
* teacher temperature: linear warm-up per epoch, then constant.

Schedules are plain NumPy arrays of one value per optimisation step, computed from the
config alone, so a resumed run reads the same value at the same step.

Example
-------
>>> from napari_wsdino.core.schedules import cosine_schedule
>>> s = cosine_schedule(1.0, 0.0, epochs=4, steps_per_epoch=2, warmup_epochs=1)
>>> [round(float(v), 3) for v in s]
[0.0, 1.0, 1.0, 0.933, 0.75, 0.5, 0.25, 0.067]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def cosine_schedule(
    base: float,
    final: float,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: int = 0,
    start_warmup: float = 0.0,
) -> np.ndarray:
    """DINO's ``cosine_scheduler``: linear warm-up, then half a cosine from base to final."""
    total = epochs * steps_per_epoch
    warm = min(warmup_epochs, epochs) * steps_per_epoch
    head = np.linspace(start_warmup, base, warm) if warm else np.empty(0)
    iters = np.arange(total - warm)
    tail = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    return np.concatenate([head, tail])


def warmup_constant(
    start: float, value: float, epochs: int, steps_per_epoch: int, warmup_epochs: int = 0
) -> np.ndarray:
    """Linear per-epoch warm-up from ``start`` to ``value``, then constant (DINO's teacher
    temperature)."""
    warm = min(warmup_epochs, epochs)
    per_epoch = np.concatenate([np.linspace(start, value, warm), np.full(epochs - warm, value)])
    return np.repeat(per_epoch, steps_per_epoch)


@dataclass(frozen=True)
class Schedules:
    """Learning rate, teacher momentum and teacher temperature for every step."""

    lr: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray

    @classmethod
    def from_config(cls, config, steps_per_epoch: int) -> "Schedules":
        """Build from a :class:`napari_wsdino.core.train.TrainConfig`."""
        c, n = config, steps_per_epoch
        return cls(
            lr=cosine_schedule(c.lr, c.min_lr, c.epochs, n, c.warmup_epochs),
            momentum=cosine_schedule(c.momentum_teacher, 1.0, c.epochs, n),
            teacher_temp=warmup_constant(
                c.warmup_teacher_temp, c.teacher_temp, c.epochs, n, c.warmup_teacher_temp_epochs
            ),
        )

    def at(self, step: int) -> tuple[float, float, float]:
        """``(lr, momentum, teacher_temp)`` at a global step."""
        return float(self.lr[step]), float(self.momentum[step]), float(self.teacher_temp[step])
