"""Inference convolutions on CPU with weights prepacked for oneDNN.

On a CPU, every ``F.conv2d`` call reorders its weight into oneDNN's blocked layout before
convolving; for a factorized layer's small stages that reorder can cost as much as the
convolution (``ONEDNN_VERBOSE=1`` prints both times). A layer in inference keeps
its weights (see :meth:`tt_conv.FactorizedConv._kept`), so it can keep them reordered too:
:class:`PackedConvs` reorders each stage's weight once per input shape and runs the
convolution with PyTorch's oneDNN operator for prepacked weights (the one ``torch.compile``
uses on CPU).

The operator is an internal one, so each packed weight is checked once against
``F.conv2d`` on the call that packs it; a stage whose result differs, or where the
operator is missing or fails, runs ``F.conv2d`` from then on. Only 2-D channels-last
activations in float32 or bfloat16 on a CPU take this path, and never under a
``TorchDispatchMode`` (a FLOP counter counts ``aten.convolution``) or while tracing.
"""

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

_PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
#: Packed weights kept per layer (stages x input shapes) before they are formed afresh.
_MAX_KEPT = 32
#: Largest relative difference from ``F.conv2d`` accepted on the checking call.
_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _operators_available() -> bool:
    try:
        return (torch.backends.mkldnn.is_available()
                and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight")
                and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))
    except (AttributeError, RuntimeError):  # pragma: no cover - a build without oneDNN
        return False


_AVAILABLE = _operators_available()
#: Whether a TorchFunctionMode is active (a tracer or counter that must see F.conv2d).
_function_mode_enabled = getattr(torch._C, "_is_torch_function_mode_enabled", lambda: False)


def _channels_last_2d(x: torch.Tensor) -> bool:
    return (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and not x.is_contiguous() and 1 not in x.shape[2:])


def pack_weight(weight: torch.Tensor, input_shape, stride: List[int], padding: List[int],
                dilation: List[int], groups: int):
    """``weight`` reordered into oneDNN's layout for inputs of ``input_shape``."""
    return torch._C._nn.mkldnn_reorder_conv2d_weight(
        weight.to_mkldnn(), padding, stride, dilation, groups, list(input_shape))


def convolve_packed(x: torch.Tensor, packed, bias: Optional[torch.Tensor], stride: List[int],
                    padding: List[int], dilation: List[int], groups: int) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, ...)`` with the weight as :func:`pack_weight` left it."""
    return torch.ops.mkldnn._convolution_pointwise(
        x, packed, bias, padding, stride, dilation, groups, "none", [], "")


class PackedConvs:
    """The prepacked weights of one layer's kept convolutions, by stage and input shape."""

    def __init__(self):
        self._packed: Dict[Tuple, object] = {}
        self._refused: set = set()

    def run(self, stage: int, x: torch.Tensor, weight: torch.Tensor,
            bias: Optional[torch.Tensor], stride: List[int], padding: List[int],
            dilation: List[int], groups: int) -> Optional[torch.Tensor]:
        """The convolution of stage ``stage`` with its prepacked weight, or None where this
        path does not apply (the caller then runs ``F.conv2d``)."""
        if not _AVAILABLE or stage in self._refused or x.device.type != "cpu" \
                or weight.dim() != 4 or weight.dtype not in _PACKABLE_DTYPES \
                or x.dtype != weight.dtype \
                or torch.jit.is_tracing() or _get_current_dispatch_mode() is not None \
                or _function_mode_enabled():
            return None
        if not _channels_last_2d(x):
            return None
        key = (stage, tuple(x.shape))
        packed = self._packed.get(key)
        if packed is None:
            return self._pack_and_check(key, x, weight, bias, stride, padding, dilation, groups)
        return convolve_packed(x, packed, bias, stride, padding, dilation, groups)

    def _pack_and_check(self, key, x, weight, bias, stride, padding, dilation, groups):
        expected = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        stage = key[0]
        try:
            packed = pack_weight(weight, x.shape, stride, padding, dilation, groups)
            y = convolve_packed(x, packed, bias, stride, padding, dilation, groups)
        except (RuntimeError, NotImplementedError, TypeError):
            self._refused.add(stage)
            return expected
        reference = expected.float()
        difference = (y.float() - reference).norm() / reference.norm().clamp_min(1e-30)
        if y.shape != expected.shape or y.dtype != expected.dtype \
                or not _channels_last_2d(y) == _channels_last_2d(expected) \
                or not bool(difference <= _TOLERANCE[weight.dtype]):
            self._refused.add(stage)
            return expected
        if len(self._packed) >= _MAX_KEPT:
            self._packed.clear()
        self._packed[key] = packed
        return y
