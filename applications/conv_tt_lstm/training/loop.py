"""One optimiser step with mixed precision, gradient clipping and a non-finite-loss check."""

from __future__ import annotations

import math
from typing import Optional

import torch

from .distributed import DistContext, all_reduce_mean


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the step is named and nothing was updated.

    ``resume_from`` (set by the training skeleton) is the newest checkpoint from before the
    divergence, ``None`` when there is none; the message says which file to resume from.
    """

    def __init__(self, step: int, value: float, resume_from: Optional[str] = None,
                 resume_step: Optional[int] = None, note: str = ""):
        remedy = ("lower the learning rate (--lr), clip gradients harder (--set "
                  "optim.clip_grad_norm=...) or use --precision fp32")
        if resume_from is not None:
            where = (f"Resume from the last checkpoint from before the divergence, "
                     f"{resume_from} (step {resume_step}, finite loss and weights): {remedy}, "
                     f"then --resume {resume_from} (--resume auto picks it too)")
        else:
            where = (f"No checkpoint from before the divergence exists: {remedy}, then start "
                     f"over with --overwrite")
        super().__init__(f"the training loss is {value} at step {step}: stopping. {where}."
                         + (f" {note}" if note else ""))
        self.step = step
        self.value = value
        self.resume_from = resume_from
        self.resume_step = resume_step


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, *, step: int,
                   context: DistContext, scaler: Optional["torch.amp.GradScaler"] = None,
                   clip_grad_norm: float = 0.0,
                   parameters=None) -> float:
    """Back-propagate ``loss`` and update, unless the loss (mean over ranks) is not finite.

    Every rank sees the same reduced loss, so all ranks stop together on a NaN.

    Parameters
    ----------
    loss : torch.Tensor
        Scalar loss of this rank's batch.
    optimizer : torch.optim.Optimizer
    step : int
        The step number, for the error message.
    context : DistContext
    scaler : torch.amp.GradScaler, optional
        fp16 loss scaling (its own inf checks skip steps with overflowing gradients).
    clip_grad_norm : float
        Clip the global gradient norm to this (0: no clipping).
    parameters : iterable of torch.Tensor, optional
        What to clip (default: the optimiser's parameters).

    Returns
    -------
    float
        The loss averaged over ranks.

    Raises
    ------
    NonFiniteLossError
        Before any gradient is applied.
    """
    reduced = float(all_reduce_mean(loss.detach().float(), context))
    if not math.isfinite(reduced):
        raise NonFiniteLossError(step, reduced)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if clip_grad_norm > 0:
        if parameters is None:
            parameters = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(parameters, clip_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return reduced
