"""Tucker convolutions (Tucker-2 by default)."""


import math
from typing import List

import torch
from torch import nn

from .. import decompose as _decompose
from .base import FactorizedConv, StageSpec


class TuckerConv(FactorizedConv, factorization="tucker"):
    """Convolution whose kernel is a Tucker decomposition.

    ``W = G x_out U_out x_in U_in [x_1 S_1 ... x_d S_d]``, per group. The default Tucker-2
    form factorizes the two channel modes and keeps the spatial modes whole; a full Tucker
    decomposition also factorizes the spatial modes. The factorized path runs a 1x1
    convolution to ``r_in`` channels, the core as a ``k_1 x ... x k_d`` convolution from
    ``r_in`` to ``r_out`` channels (carrying stride, padding and dilation; a full Tucker
    core is first multiplied by its spatial factors) and a 1x1 convolution to the output
    channels with the bias.

    Parameters
    ----------
    rank : int, tuple of int or float
        ``r`` or ``(r_out, r_in)`` for Tucker-2, ``(r_out, r_in, s_1, ..., s_d)`` for a full
        Tucker decomposition, or the fraction of the kernel's parameters to keep (Tucker-2,
        channel ranks in proportion to the channel counts). Ranks are clipped to what the
        kernel allows.

    See :class:`~tt_conv.FactorizedConv` for the other parameters.
    """

    _core_shape: List[int]

    def _make_factors(self, device=None, dtype=None) -> None:
        g = self.groups
        out_g, in_g = self.group_kernel_shape[:2]
        r_out, r_in = self.rank[:2]
        spatial_ranks = self.rank[2:] or self.kernel_size
        factory = {"device": device, "dtype": dtype}
        self._core_shape = [g, r_out, r_in, *spatial_ranks]
        # Stored as (groups, r_out, r_in * spatial ranks); core_tensor() has the true shape.
        self.core = nn.Parameter(
            torch.empty(g, r_out, r_in * math.prod(spatial_ranks), **factory)
        )
        self.out_factor = nn.Parameter(torch.empty(g, out_g, r_out, **factory))
        self.in_factor = nn.Parameter(torch.empty(g, in_g, r_in, **factory))
        self.spatial_factors = nn.ParameterList(
            [nn.Parameter(torch.empty(g, k, s, **factory))
             for k, s in zip(self.kernel_size, self.rank[2:])]
        )

    @property
    def full_tucker(self) -> bool:
        """Whether the spatial modes are factorized too."""
        return len(self.rank) > 2

    def _factor_tensors(self) -> List[torch.Tensor]:
        return [self.core, self.out_factor, self.in_factor, *self.spatial_factors]

    def _n_summed_terms(self) -> int:
        return math.prod(self.rank)

    def core_tensor(self) -> torch.Tensor:
        """The core, ``(groups, r_out, r_in, *spatial ranks)``."""
        return self.core.view(self._core_shape)

    def core_kernel(self) -> torch.Tensor:
        """The core with its spatial factors applied, ``(groups, r_out, r_in, *kernel_size)``."""
        core = self.core_tensor()
        for axis, factor in enumerate(self.spatial_factors):
            dim = 3 + axis
            # (g, ..., s) @ (g, 1.., s, k): contract this spatial mode with its factor.
            moved = core.movedim(dim, -1)
            view = [factor.shape[0]] + [1] * (moved.dim() - 3) + [factor.shape[2], factor.shape[1]]
            core = torch.matmul(moved, factor.transpose(1, 2).reshape(view)).movedim(-1, dim)
        return core

    def _core_flops(self) -> int:
        if not self.full_tucker:
            return 0
        flops = 0
        shape = [self.groups, *self.rank]
        for axis, k in enumerate(self.kernel_size):
            s = shape[3 + axis]
            shape[3 + axis] = k
            flops += 2 * math.prod(shape) * s
        return flops

    def _group_kernels(self) -> torch.Tensor:
        g = self.groups
        out_g = self._group_shape[0]
        r_out, r_in = self._core_shape[1], self._core_shape[2]
        core = self.core_kernel().reshape(g, r_out, -1)
        mixed = torch.matmul(self.out_factor, core).reshape(g, out_g, r_in, -1)
        kernel = torch.matmul(mixed.transpose(2, 3), self.in_factor.transpose(1, 2).unsqueeze(1))
        return kernel.transpose(2, 3).reshape([g] + self._group_shape)

    def _reconstruction_flops(self) -> int:
        out_g, in_g = self.group_kernel_shape[:2]
        r_out, r_in = self.rank[:2]
        k = math.prod(self.kernel_size)
        return self._core_flops() + 2 * self.groups * out_g * k * r_in * (r_out + in_g)

    def _stage_weight_flops(self) -> int:
        return self._core_flops()

    def _stage_specs(self) -> List[StageSpec]:
        g = self.groups
        r_out, r_in = self.rank[:2]
        return [
            self._pointwise_stage(self.in_channels, g * r_in, g),
            self._full_stage(g * r_in, g * r_out, g),
            self._pointwise_stage(g * r_out, self.out_channels, g),
        ]

    def stage_weights(self) -> List[torch.Tensor]:
        g = self.groups
        r_out, r_in = self._core_shape[1], self._core_shape[2]
        ones = self._pointwise_shape()
        return [
            self.in_factor.transpose(1, 2).reshape([g * r_in, self._group_shape[1]] + ones),
            self.core_kernel().reshape([g * r_out, r_in] + self._group_shape[2:]),
            self.out_factor.reshape([self.out_channels, r_out] + ones),
        ]

    def _decompose_group(self, kernel: torch.Tensor, **options) -> List[torch.Tensor]:
        core, factors = _decompose.tucker(kernel, self.rank, **options)
        return [core, *factors]
