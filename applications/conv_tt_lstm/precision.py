"""Numeric precision of a run: fp32, bf16 autocast, or fp16 autocast with loss scaling.

One :class:`Precision` serves training, evaluation and inference:
:func:`resolve_precision` checks a ``--precision`` name against the device and returns it
(``"auto"`` becomes the mixed precision the device runs fast, else fp32);
:meth:`Precision.autocast` wraps forward passes and :meth:`Precision.make_scaler` gives the
fp16 gradient scaler.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager, Optional, Tuple, Union

import torch

#: The precisions a run can use.
PRECISIONS: Tuple[str, ...] = ("fp32", "bf16", "fp16")

#: What the ``--precision`` options and the ``run.precision`` fields accept.
PRECISION_CHOICES: Tuple[str, ...] = PRECISIONS + ("auto",)

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


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX tiles or AVX512-BF16).

    Without either, oneDNN emulates bf16 convolutions, which then run many times slower
    than fp32 (measured on an AMD Zen 3: about 18 GFLOP/s bf16 against 150 fp32).
    """
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def fast_precision(device: Union[str, torch.device]) -> str:
    """The precision ``"auto"`` means on ``device``.

    bf16 on a CUDA device that supports it and on a CPU with bf16 hardware
    (:func:`cpu_has_fast_bf16`); fp32 elsewhere. fp16 is never chosen: it needs loss
    scaling, and bf16 is as fast where both exist.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return "fp32"


def resolve_precision(name: Union[str, Precision],
                      device: Union[str, torch.device]) -> Precision:
    """Check that ``device`` can run precision ``name`` and return it.

    A :class:`Precision` is returned as it is when it is for ``device``'s type;
    ``"auto"`` is resolved by :func:`fast_precision`.

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
    if name == "auto":
        name = fast_precision(device)
    if name not in PRECISIONS:
        raise PrecisionError(f"--precision {name}: precision must be one of {PRECISION_CHOICES}, "
                             f"got {name!r}")
    if name == "fp16" and device.type != "cuda":
        raise PrecisionError(
            f"--precision fp16: precision 'fp16' needs a CUDA device, got {device}; use "
            f"'bf16' (mixed precision that CPUs with AVX512-BF16/AMX run fast) or 'fp32'")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PrecisionError("--precision bf16 is not supported by this GPU; use fp16 or fp32")
    return Precision(name, device.type)
