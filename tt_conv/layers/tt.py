"""Tensor-train convolutions."""

import math
from typing import List

import torch
from torch import nn

from .. import decompose as _decompose
from ..rank import tt_dims
from .base import FactorizedConv, StageSpec


class TTConv(FactorizedConv, factorization="tt"):
    """Convolution whose kernel is a tensor train over ``(in, k_1, ..., k_d, out)``.

    ``W[o, i, k_1, ..., k_d] = G_0[i] G_1[k_1] ... G_d[k_d] G_{d+1}[o]`` (a product of
    ``r_{j} x r_{j+1}`` matrices, boundary ranks 1), per group. The factorized path runs a
    1x1 convolution from the input channels to ``r_1``, one convolution along each spatial
    axis from ``r_j`` to ``r_{j+1}`` channels (carrying that axis' stride, padding and
    dilation), and a 1x1 convolution to the output channels with the bias.

    Parameters
    ----------
    rank : int, tuple of int or float
        One inner rank for every bond, the ``d + 1`` inner ranks, or the fraction of the
        kernel's parameters to keep (one shared inner rank). Ranks are clipped to what
        TT-SVD can produce.

    See :class:`~tt_conv.FactorizedConv` for the other parameters.

    Notes
    -----
    ``cores`` stores the first core as ``(groups, in, r_1)``, the spatial cores as
    ``(groups, r_j, k_j * r_{j+1})`` and the last as ``(groups, r_{d+1}, out)``;
    :meth:`tt_cores` gives them as ``(groups, r_j, n_j, r_{j+1})``.
    """

    _tt_ranks: List[int]
    _tt_modes: List[int]
    _n_cores: int

    def _make_factors(self, device=None, dtype=None) -> None:
        g = self.groups
        modes = tt_dims(self.group_kernel_shape)
        ranks = [1, *self.rank, 1]
        self._tt_modes = list(modes)
        self._tt_ranks = ranks
        self._n_cores = len(modes)
        factory = {"device": device, "dtype": dtype}
        shapes = [(g, modes[0], ranks[1])]
        shapes += [(g, ranks[j], modes[j] * ranks[j + 1]) for j in range(1, len(modes) - 1)]
        shapes.append((g, ranks[-2], modes[-1]))
        self.cores = nn.ParameterList(
            [nn.Parameter(torch.empty(*shape, **factory)) for shape in shapes]
        )

    def tt_cores(self) -> List[torch.Tensor]:
        """The cores as ``(groups, r_j, n_j, r_{j+1})`` over the modes ``(in, k..., out)``."""
        g = self.groups
        return [core.reshape(g, self._tt_ranks[j], self._tt_modes[j], self._tt_ranks[j + 1])
                for j, core in enumerate(self.cores)]

    def _factor_tensors(self) -> List[torch.Tensor]:
        return list(self.cores)

    def _n_summed_terms(self) -> int:
        return math.prod(self.rank)

    def _group_kernels(self) -> torch.Tensor:
        g = self.groups
        product = self.cores[0]
        for j, core in enumerate(self.cores):
            if j > 0:
                # (g, in * k_1 ... k_{j-1}, r_j) @ (g, r_j, n_j * r_{j+1})
                product = torch.matmul(product, core).reshape(g, -1, self._tt_ranks[j + 1])
        # product: (g, in * k_1 * ... * k_d * out, 1) -> (g, out, in, *k)
        product = product.reshape(g, -1, self._group_shape[0])
        return product.transpose(1, 2).reshape([g] + self._group_shape)

    def _reconstruction_flops(self) -> int:
        modes, ranks = self._tt_modes, self._tt_ranks
        flops, rows = 0, modes[0]
        for j in range(1, len(modes)):
            flops += 2 * self.groups * rows * ranks[j] * modes[j] * ranks[j + 1]
            rows *= modes[j]
        return flops

    def _stage_specs(self) -> List[StageSpec]:
        g = self.groups
        ranks = self.rank
        stages = [self._pointwise_stage(self.in_channels, g * ranks[0], g)]
        for axis in range(self.n_dim):
            stages.append(self._spatial_stage(axis, g * ranks[axis], g * ranks[axis + 1], g))
        stages.append(self._pointwise_stage(g * ranks[-1], self.out_channels, g))
        return stages

    def stage_weights(self) -> List[torch.Tensor]:
        g = self.groups
        ones = self._pointwise_shape()
        last = self._n_cores - 1
        weights: List[torch.Tensor] = []
        for j, core in enumerate(self.cores):
            if j == 0:
                weights.append(core.transpose(1, 2).reshape([-1, self._tt_modes[0]] + ones))
            elif j == last:
                weights.append(core.transpose(1, 2).reshape([self.out_channels,
                                                             self._tt_ranks[j]] + ones))
            else:
                r, k, r_next = self._tt_ranks[j], self._tt_modes[j], self._tt_ranks[j + 1]
                shape = [1] * self.n_dim
                shape[j - 1] = k
                # (g, r, k * r') -> (g * r', r, k along axis j - 1)
                weights.append(core.reshape(g, r, k, r_next).permute(0, 3, 1, 2)
                               .reshape([g * r_next, r] + shape))
        return weights

    def _decompose_group(self, kernel: torch.Tensor, **options) -> List[torch.Tensor]:
        n = kernel.dim()
        tensor = kernel.permute(*range(1, n), 0)  # (in, k_1, ..., k_d, out)
        cores = _decompose.tensor_train_cores(tensor, self.rank, **options)
        return [cores[0][0], *cores[1:-1], cores[-1][..., 0]]
