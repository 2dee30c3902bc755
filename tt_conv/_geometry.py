"""Convolution geometry: argument normalisation, padding and dimension-generic dispatch.

Everything here is shared by every factorized layer so that stride, padding, dilation,
groups and padding modes behave exactly as in :class:`torch.nn.Conv1d`/``2d``/``3d``.
"""


import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

IntOrTuple = Union[int, Sequence[int]]


def as_tuple(value: IntOrTuple, n_dim: int, name: str, minimum: int = 1) -> Tuple[int, ...]:
    """Return ``value`` as a tuple of ``n_dim`` ints, each at least ``minimum``.

    Raises
    ------
    ValueError
        If ``value`` has the wrong length or a value below ``minimum``.
    TypeError
        If ``value`` is neither an int nor a sequence of ints.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a tuple of {n_dim} ints, got {value!r}")
    if isinstance(value, int):
        values = (value,) * n_dim
    else:
        try:
            values = tuple(value)
        except TypeError:
            raise TypeError(
                f"{name} must be an int or a tuple of {n_dim} ints, got {value!r}"
            ) from None
        if len(values) != n_dim or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in values
        ):
            raise ValueError(
                f"{name} must be an int or a tuple of {n_dim} ints for a {n_dim}-D "
                f"convolution, got {value!r}"
            )
    if any(v < minimum for v in values):
        raise ValueError(f"{name} must be >= {minimum} on every axis, got {value!r}")
    return values


def padding_pairs(
    padding: Union[str, IntOrTuple],
    kernel_size: Tuple[int, ...],
    stride: Tuple[int, ...],
    dilation: Tuple[int, ...],
) -> Tuple[Tuple[int, int], ...]:
    """Per-axis ``(before, after)`` padding for a torch-style ``padding`` argument.

    ``"same"`` follows PyTorch: total padding ``dilation * (k - 1)`` per axis, the odd
    element after (so even kernels pad asymmetrically), and it is refused for strided
    convolutions, as :class:`torch.nn.Conv2d` refuses it.
    """
    n_dim = len(kernel_size)
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0),) * n_dim
        if padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError(
                    f"padding='same' is not supported for strided convolutions "
                    f"(stride={stride}), as in torch.nn.Conv{n_dim}d"
                )
            pairs = []
            for k, d in zip(kernel_size, dilation):
                total = d * (k - 1)
                pairs.append((total // 2, total - total // 2))
            return tuple(pairs)
        raise ValueError(f"padding must be an int, a tuple, 'same' or 'valid', got {padding!r}")
    return tuple((p, p) for p in as_tuple(padding, n_dim, "padding", minimum=0))


def output_size(
    size: Sequence[int],
    pads: Sequence[Tuple[int, int]],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
) -> Tuple[int, ...]:
    """Spatial output size of a convolution (the formula of :class:`torch.nn.Conv2d`)."""
    return tuple(
        (n + a + b - d * (k - 1) - 1) // s + 1
        for n, (a, b), k, s, d in zip(size, pads, kernel_size, stride, dilation)
    )


def torch_pad_argument(pairs: Sequence[Tuple[int, int]]) -> List[int]:
    """``F.pad``'s argument (last axis first) for per-axis ``(before, after)`` pairs."""
    out: List[int] = []
    for before, after in reversed(pairs):
        out.extend((before, after))
    return out


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` is laid out channels-last (channels innermost) and not also plain."""
    return x.dim() >= 3 and x.shape[1] > 1 and x.stride(1) == 1 and not x.is_contiguous()


def conv_nd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
) -> torch.Tensor:
    """Dispatch to ``F.conv1d``/``conv2d``/``conv3d`` by the weight's number of dimensions."""
    n_dim = weight.dim() - 2
    if n_dim == 1:
        return F.conv1d(x, weight, bias, stride, padding, dilation, groups)
    if n_dim == 2:
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return F.conv3d(x, weight, bias, stride, padding, dilation, groups)


def conv_flops(
    batch: int,
    out_channels: int,
    in_channels_per_group: int,
    kernel_size: Sequence[int],
    out_size: Sequence[int],
) -> int:
    """FLOPs of one convolution as :mod:`torch.utils.flop_counter` counts them.

    Two per multiply-add; bias additions are not counted.
    """
    return 2 * batch * out_channels * in_channels_per_group * math.prod(kernel_size) * math.prod(
        out_size
    )
