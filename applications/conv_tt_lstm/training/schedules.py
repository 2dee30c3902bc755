"""Scheduled sampling and learning-rate schedules (the release's plateau rule, linear, cosine).

:class:`TrainingSchedule` answers two questions per step: the probability ``r`` of feeding
the ground truth instead of the model's own output (scheduled sampling) and the learning
rate. The plateau rule reacts to validation rounds (:meth:`TrainingSchedule.end_of_round`);
its state is saved with the checkpoints (``state_dict``) so a resumed run continues the same
schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Dict, Literal

from ..checks import check_choice, check_int

#: Scheduled-sampling rules.
SAMPLING_RULES = ("plateau", "linear", "none")
#: Learning-rate decay rules.
LR_DECAYS = ("plateau", "cosine", "none")


@dataclass(frozen=True)
class ScheduleConfig:
    """Scheduled sampling and learning-rate decay.

    Scheduled sampling feeds the ground-truth frame instead of the network's own output at a
    future step with probability ``r``:

    * ``plateau`` (the release's rule): ``r`` starts at ``sampling_start``; once the
      validation loss has not improved for ``plateau_patience`` validation rounds, ``r``
      falls by ``plateau_decrement`` every round down to ``sampling_end``.
    * ``linear``: ``r`` goes from ``sampling_start`` at ``linear_start`` to ``sampling_end``
      at ``linear_end`` (steps), linearly per iteration.
    * ``none``: ``r = sampling_start`` throughout (0: always the network's own outputs).

    Learning-rate decay:

    * ``plateau`` (the release's rule): ``lr_decay_delay`` rounds after scheduled sampling
      started to fall, ``lr x lr_decay_factor`` every ``lr_decay_every`` rounds.
    * ``cosine``: half a cosine from ``optim.lr`` to ``optim.min_lr`` over the run, after
      ``warmup_steps`` of linear warm-up.
    * ``none``: constant (after the warm-up).
    """

    sampling: Literal["plateau", "linear", "none"] = "plateau"
    sampling_start: float = 1.0
    sampling_end: float = 0.0
    plateau_patience: int = 20
    plateau_decrement: float = 4e-3
    linear_start: int = 0
    linear_end: int = 0
    lr_decay: Literal["plateau", "cosine", "none"] = "plateau"
    lr_decay_delay: int = 20
    lr_decay_every: int = 5
    lr_decay_factor: float = 0.98
    warmup_steps: int = 0

    def __post_init__(self):
        check_choice("schedule.sampling", self.sampling, SAMPLING_RULES)
        check_choice("schedule.lr_decay", self.lr_decay, LR_DECAYS)
        for name in ("sampling_start", "sampling_end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"schedule.{name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("plateau_patience", "linear_start", "linear_end", "lr_decay_delay",
                     "warmup_steps"):
            check_int(f"schedule.{name}", getattr(self, name), 0)
        check_int("schedule.lr_decay_every", self.lr_decay_every, 1)
        if self.sampling == "linear" and self.linear_end < self.linear_start:
            raise ValueError(f"schedule.linear_end ({self.linear_end}) must be >= "
                             f"schedule.linear_start ({self.linear_start})")
        if not 0 < self.lr_decay_factor <= 1:
            raise ValueError(f"schedule.lr_decay_factor must be in (0, 1], "
                             f"got {self.lr_decay_factor!r}")


class TrainingSchedule:
    """Sampling ratio and learning rate as functions of the step and the validation history.

    Parameters
    ----------
    config : ScheduleConfig
        The rules (see its docstring).
    base_lr, min_lr : float
        Learning rate at the start (after warm-up) and the floor of every decay.
    total_steps : int
        Length of the run (for the cosine decay).
    """

    def __init__(self, config: ScheduleConfig, base_lr: float, min_lr: float, total_steps: int):
        self.config = config
        self.base_lr = float(base_lr)
        self.min_lr = float(min_lr)
        self.total_steps = int(total_steps)
        self.shortened = False
        # Plateau rule state: the validation history it needs, nothing else.
        self.best = math.inf
        self.rounds_since_best = 0
        self.rounds_since_plateau = -1  # -1: the plateau has not been reached
        self.plateau_ratio = config.sampling_start
        self.lr_scale = 1.0

    # -- queries

    def sampling_ratio(self, step: int) -> float:
        """Probability of reading the ground truth at a future step, for ``step``."""
        c = self.config
        if c.sampling == "none":
            return c.sampling_start
        if c.sampling == "plateau":
            return self.plateau_ratio
        if step <= c.linear_start:
            return c.sampling_start
        if step >= c.linear_end:
            return c.sampling_end
        fraction = (step - c.linear_start) / (c.linear_end - c.linear_start)
        return c.sampling_start + fraction * (c.sampling_end - c.sampling_start)

    def lr(self, step: int) -> float:
        """Learning rate of ``step`` (0-based)."""
        c = self.config
        if c.warmup_steps and step < c.warmup_steps:
            return self.base_lr * (step + 1) / c.warmup_steps
        if c.lr_decay == "cosine":
            span = max(1, self.total_steps - c.warmup_steps)
            progress = min(1.0, (step - c.warmup_steps) / span)
            return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * progress))
        if c.lr_decay == "plateau":
            return max(self.min_lr, self.base_lr * self.lr_scale)
        return self.base_lr

    # -- updates

    def end_of_round(self, validation_loss: float) -> None:
        """Account for one validation round (the release's epoch) with its loss."""
        c = self.config
        if validation_loss < self.best:
            self.best = float(validation_loss)
            self.rounds_since_best = 0
        else:
            self.rounds_since_best += 1
        if self.rounds_since_plateau < 0:
            if self.rounds_since_best >= c.plateau_patience:
                self.rounds_since_plateau = 0
            else:
                return
        else:
            self.rounds_since_plateau += 1
        if c.sampling == "plateau":
            self.plateau_ratio = max(c.sampling_end, self.plateau_ratio - c.plateau_decrement)
        after = self.rounds_since_plateau - c.lr_decay_delay
        if c.lr_decay == "plateau" and after >= 0 and after % c.lr_decay_every == 0:
            self.lr_scale *= c.lr_decay_factor

    def shorten(self, total_steps: int) -> None:
        """Fit the schedule into ``total_steps`` steps (fewer than planned).

        The cosine spans the new length; the warm-up and the linear sampling ramp shrink in
        proportion, so the run still ends on its own predictions at the low learning rate.
        The plateau rules count validation rounds, not steps, and stay as they are.
        """
        total_steps = int(total_steps)
        if not 1 <= total_steps <= self.total_steps:
            raise ValueError(f"a schedule of {self.total_steps} steps can be shortened to "
                             f"1..{self.total_steps} steps, not {total_steps}")
        factor = total_steps / self.total_steps
        c = self.config
        self.config = replace(c, linear_start=round(c.linear_start * factor),
                              linear_end=round(c.linear_end * factor),
                              warmup_steps=round(c.warmup_steps * factor))
        self.total_steps = total_steps
        self.shortened = True

    def state_dict(self) -> Dict[str, Any]:
        state = {"best": self.best, "rounds_since_best": self.rounds_since_best,
                 "rounds_since_plateau": self.rounds_since_plateau,
                 "plateau_ratio": self.plateau_ratio, "lr_scale": self.lr_scale}
        if self.shortened:
            # Only a shortened schedule keeps its lengths: a plain one resumed with more
            # ``run.steps`` follows the new configuration.
            c = self.config
            state.update(total_steps=self.total_steps, linear_start=c.linear_start,
                         linear_end=c.linear_end, warmup_steps=c.warmup_steps)
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.best = float(state["best"])
        self.rounds_since_best = int(state["rounds_since_best"])
        self.rounds_since_plateau = int(state["rounds_since_plateau"])
        self.plateau_ratio = float(state["plateau_ratio"])
        self.lr_scale = float(state["lr_scale"])
        if "total_steps" in state:
            self.shortened = True
            self.total_steps = int(state["total_steps"])
            self.config = replace(self.config, linear_start=int(state["linear_start"]),
                                  linear_end=int(state["linear_end"]),
                                  warmup_steps=int(state["warmup_steps"]))
