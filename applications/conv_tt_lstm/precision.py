"""Numeric precision of a forward pass: fp32, or bf16 / fp16 mixed precision via autocast."""

from __future__ import annotations

import contextlib
from typing import ContextManager, Tuple, Union

import torch

#: Precisions accepted by :func:`autocast_context` (and the ``--precision`` options).
PRECISIONS: Tuple[str, ...] = ("fp32", "bf16", "fp16")

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: Union[str, torch.device]) -> torch.device:
    """Validate ``precision`` for ``device`` and return the device as a ``torch.device``.

    Raises
    ------
    ValueError
        An unknown precision, or fp16 on a device other than CUDA (CPU autocast in fp16 is
        neither fast nor what the fp16 recipe with a gradient scaler is meant for; use bf16).
    """
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(
            f"precision 'fp16' needs a CUDA device, got {device}; use 'bf16' (mixed "
            f"precision that CPUs with AVX512-BF16/AMX run fast) or 'fp32'"
        )
    return device


def autocast_context(device: Union[str, torch.device], precision: str) -> ContextManager:
    """The autocast context of ``precision`` on ``device`` (fp32: no autocast)."""
    device = check_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])
