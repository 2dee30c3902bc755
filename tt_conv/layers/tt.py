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
    """

    def _make_factors(self, device=None, dtype=None) -> None:
        g = self.groups
        modes = tt_dims(self.group_kernel_shape)
        ranks = [1, *self.rank, 1]
        factory = {"device": device, "dtype": dtype}
        shapes = [(g, modes[0], ranks[1])]
        shapes += [(g, ranks[j], modes[j], ranks[j + 1]) for j in range(1, len(modes) - 1)]
        shapes.append((g, ranks[-2], modes[-1]))
        self.cores = nn.ParameterList(
            [nn.Parameter(torch.empty(*shape, **factory)) for shape in shapes]
        )
        self._n_cores = len(shapes)

    def _factor_tensors(self) -> List[torch.Tensor]:
        return list(self.cores)

    def _n_summed_terms(self) -> int:
        return math.prod(self.rank)

    def _group_kernels(self) -> torch.Tensor:
        g = self.groups
        last = self._n_cores - 1
        product = self.cores[0]
        for j, core in enumerate(self.cores):
            if j == last:
                product = torch.matmul(product, core)
            elif j > 0:
                r, k, r_next = core.shape[1], core.shape[2], core.shape[3]
                product = torch.matmul(product, core.reshape(g, r, k * r_next))
                product = product.reshape(g, -1, r_next)
        # product: (g, in * k_1 * ... * k_d, out) -> (g, out, in, *k)
        return product.transpose(1, 2).reshape([g] + self._group_shape)

    def _reconstruction_flops(self) -> int:
        modes = tt_dims(self.group_kernel_shape)
        ranks = [1, *self.rank, 1]
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
                weights.append(core.transpose(1, 2).reshape([-1, core.shape[1]] + ones))
            elif j == last:
                weights.append(core.transpose(1, 2).reshape([self.out_channels, core.shape[1]] + ones))
            else:
                shape = [1] * self.n_dim
                shape[j - 1] = core.shape[2]
                # (g, r, k, r') -> (g * r', r, k along axis j - 1)
                weights.append(core.permute(0, 3, 1, 2).reshape([g * core.shape[3], core.shape[1]] + shape))
        return weights

    def _decompose_group(self, kernel: torch.Tensor, **options) -> List[torch.Tensor]:
        n = kernel.dim()
        tensor = kernel.permute(*range(1, n), 0)  # (in, k_1, ..., k_d, out)
        cores = _decompose.tensor_train_cores(tensor, self.rank, **options)
        return [cores[0][0], *cores[1:-1], cores[-1][..., 0]]
