"""Numeric precision of a run: fp32, bf16 autocast, or fp16 autocast with loss scaling.

One :class:`Precision` serves training, evaluation and inference:
:func:`resolve_precision` checks a ``--precision`` name against the device and returns it;
:meth:`Precision.autocast` wraps forward passes and :meth:`Precision.make_scaler` gives the
fp16 gradient scaler.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager, Optional, Tuple, Union

import torch

#: Precisions of the ``--precision`` options and the ``run.precision`` fields.
PRECISIONS: Tuple[str, ...] = ("fp32", "bf16", "fp16")

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionError(ValueError):
    """A precision the device cannot run (the message names ``--precision``)."""


@dataclass(frozen=True)
class Precision:
    """How forward passes run: the ``autocast()`` context and whether to scale the loss.

    Attributes
    ----------
    name : {"fp32", "bf16", "fp16"}
    device_type : str
        ``"cpu"`` or ``"cuda"`` (autocast's device type).
    """

    name: str
    device_type: str

    @property
    def dtype(self) -> torch.dtype:
        """The autocast dtype (float32 for fp32: no autocast)."""
        return _DTYPES[self.name]

    @property
    def uses_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 has fp32's range."""
        return self.name == "fp16"

    def autocast(self) -> ContextManager:
        """Context manager for a forward pass (a no-op for fp32)."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def make_scaler(self) -> Optional["torch.amp.GradScaler"]:
        """A ``torch.amp.GradScaler`` for fp16, else ``None``."""
        if not self.uses_scaler:
            return None
        return torch.amp.GradScaler(self.device_type)


def resolve_precision(name: Union[str, Precision],
                      device: Union[str, torch.device]) -> Precision:
    """Check that ``device`` can run precision ``name`` and return it.

    A :class:`Precision` is returned as it is when it is for ``device``'s type.

    Raises
    ------
    PrecisionError
        For an unknown name, fp16 off CUDA (CPU autocast in fp16 is slow and unscaled fp16
        training diverges: use bf16 on CPU), or bf16 on a GPU without bf16 support.
    """
    device = torch.device(device)
    if isinstance(name, Precision):
        if name.device_type != device.type:
            raise PrecisionError(f"--precision {name.name} was resolved for {name.device_type}, "
                                 f"not for {device}")
        return name
    if name not in PRECISIONS:
        raise PrecisionError(f"--precision {name}: precision must be one of {PRECISIONS}, "
                             f"got {name!r}")
    if name == "fp16" and device.type != "cuda":
        raise PrecisionError(
            f"--precision fp16: precision 'fp16' needs a CUDA device, got {device}; use "
            f"'bf16' (mixed precision that CPUs with AVX512-BF16/AMX run fast) or 'fp32'")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PrecisionError("--precision bf16 is not supported by this GPU; use fp16 or fp32")
    return Precision(name, device.type)
