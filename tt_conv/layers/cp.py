"""CP (canonical polyadic) convolutions."""


import math
from typing import List

import torch
from torch import nn

from .. import decompose as _decompose
from .base import FactorizedConv, StageSpec


class CPConv(FactorizedConv, factorization="cp"):
    """Convolution whose kernel is a sum of ``R`` rank-one tensors.

    ``W[o, i, k_1, ..., k_d] = sum_r A[o, r] B[i, r] S_1[k_1, r] ... S_d[k_d, r]``, per group.
    The factorized path projects the input channels to ``R`` (1x1 convolution), filters each
    of the ``R`` channels along every spatial axis in turn (depthwise 1-D convolutions, which
    carry that axis' stride, padding and dilation) and projects to the output channels
    (1x1 convolution with the bias). Spatial axes of size 1 with no stride or padding are
    folded into the first projection.

    Parameters
    ----------
    rank : int or float
        The number of rank-one terms ``R`` (clipped to
        :func:`tt_conv.rank.max_cp_rank`, where the decomposition is exact), or the fraction
        of the kernel's parameters to keep.

    See :class:`~tt_conv.FactorizedConv` for the other parameters.
    """

    _folded_axes: List[int]

    def _make_factors(self, device=None, dtype=None) -> None:
        g = self.groups
        out_g, in_g = self.group_kernel_shape[:2]
        (r,) = self.rank
        factory = {"device": device, "dtype": dtype}
        self.out_factor = nn.Parameter(torch.empty(g, out_g, r, **factory))
        self.in_factor = nn.Parameter(torch.empty(g, in_g, r, **factory))
        self.spatial_factors = nn.ParameterList(
            [nn.Parameter(torch.empty(g, k, r, **factory)) for k in self.kernel_size]
        )
        # Axes of size 1 without stride or padding only scale each rank-one term.
        self._folded_axes = [
            axis for axis in range(self.n_dim)
            if self.kernel_size[axis] == 1 and self.stride[axis] == 1
            and self._pad_pairs[axis] == (0, 0)
        ]

    def _factor_tensors(self) -> List[torch.Tensor]:
        return [self.out_factor, self.in_factor, *self.spatial_factors]

    def _n_summed_terms(self) -> int:
        return self.rank[0]

    def _group_kernels(self) -> torch.Tensor:
        g, r = self.groups, self.rank[0]
        product = self.in_factor
        for factor in self.spatial_factors:
            # Khatri-Rao product, built up one mode at a time: (g, in*k_1*..., r).
            product = (product.unsqueeze(2) * factor.unsqueeze(1)).reshape(g, -1, r)
        kernel = torch.matmul(self.out_factor, product.transpose(1, 2))
        return kernel.reshape([g] + self._group_shape)

    def _reconstruction_flops(self) -> int:
        out_g, in_g = self.group_kernel_shape[:2]
        return 2 * self.groups * out_g * self.rank[0] * in_g * math.prod(self.kernel_size)

    def _stage_specs(self) -> List[StageSpec]:
        g, r = self.groups, self.rank[0]
        stages = [self._pointwise_stage(self.in_channels, g * r, g)]
        for axis in range(self.n_dim):
            if axis not in self._folded_axes:
                stages.append(self._spatial_stage(axis, g * r, g * r, g * r))
        stages.append(self._pointwise_stage(g * r, self.out_channels, g))
        return stages

    def stage_weights(self) -> List[torch.Tensor]:
        g, r = self.groups, self.rank[0]
        ones = self._pointwise_shape()
        in_factor = self.in_factor
        spatial: List[torch.Tensor] = []
        for axis, factor in enumerate(self.spatial_factors):
            if axis in self._folded_axes:
                in_factor = in_factor * factor
            else:
                shape = [1] * self.n_dim
                shape[axis] = self.kernel_size[axis]
                spatial.append(factor.transpose(1, 2).reshape([g * r, 1] + shape))
        weights = [in_factor.transpose(1, 2).reshape([g * r, self.in_channels // g] + ones)]
        weights.extend(spatial)
        weights.append(self.out_factor.reshape([self.out_channels, r] + ones))
        return weights

    def _decompose_group(self, kernel: torch.Tensor, **options) -> List[torch.Tensor]:
        weights, factors = _decompose.cp(kernel, self.rank[0], **options)
        return balance_cp(weights, factors)


def balance_cp(weights: torch.Tensor, factors: List[torch.Tensor]) -> List[torch.Tensor]:
    """Absorb the CP weights into the factors, giving every factor column the same norm.

    Equal norms keep the factors on one scale, which conditions fine-tuning well.
    """
    norms = [torch.linalg.vector_norm(f, dim=0) for f in factors]
    scale = weights.abs() * torch.stack(norms).prod(dim=0)
    share = scale.pow(1.0 / len(factors))
    balanced = []
    for i, (factor, norm) in enumerate(zip(factors, norms)):
        column = torch.where(norm > 0, share / norm.clamp_min(torch.finfo(norm.dtype).tiny),
                             torch.zeros_like(norm))
        if i == 0:
            column = column * torch.sign(weights)
        balanced.append(factor * column)
    return balanced
