"""Numeric precision of a training run: fp32, bf16 autocast, or fp16 autocast with loss scaling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..precision import PRECISIONS, autocast_context, check_precision

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionError(ValueError):
    """A precision the device cannot run (the message names ``--precision``)."""


@dataclass(frozen=True)
class Precision:
    """How the forward pass runs: ``autocast()`` context and whether to scale the loss.

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

    def autocast(self):
        """Context manager for the forward pass (a no-op for fp32)."""
        return autocast_context(self.device_type, self.name)

    def make_scaler(self) -> Optional["torch.amp.GradScaler"]:
        """A ``torch.amp.GradScaler`` for fp16, else ``None``."""
        if not self.uses_scaler:
            return None
        return torch.amp.GradScaler(self.device_type)


def resolve_precision(name: str, device: torch.device) -> Precision:
    """Check that ``device`` can run precision ``name`` and return it.

    Raises
    ------
    PrecisionError
        For an unknown name, fp16 off CUDA (CPU autocast in fp16 is slow and unscaled fp16
        training diverges: use bf16 on CPU), or bf16 on a GPU without bf16 support.
    """
    device = torch.device(device)
    try:
        check_precision(name, device)
    except ValueError as error:
        raise PrecisionError(f"--precision {name}: {error}") from None
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PrecisionError("--precision bf16 is not supported by this GPU; use fp16 or fp32")
    return Precision(name, device.type)
