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
    of the ``R`` channels with its separable spatial filter ``S_1[:, r] x ... x S_d[:, r]``
    (one depthwise convolution carrying the stride, padding and dilation) and projects to
    the output channels (1x1 convolution with the bias). For a pointwise kernel without
    stride or padding the spatial factors are scalars, folded into the first projection.

    Parameters
    ----------
    rank : int or float
        The number of rank-one terms ``R`` (clipped to
        :func:`tt_conv.rank.max_cp_rank`, where the decomposition is exact), or the fraction
        of the kernel's parameters to keep.

    See :class:`~tt_conv.FactorizedConv` for the other parameters.

    Notes
    -----
    One ``k_1 x ... x k_d`` depthwise convolution costs more multiply-adds than ``d``
    one-dimensional ones, but depthwise convolutions are bound by memory traffic, so for
    small kernels (3 x 3) one pass over the activations is as fast as ``d``. From
    ``prod(k) >= 2 sum(k)`` on (5 x 5, 7 x 7, 3 x 3 x 3) the chain filters along one axis at
    a time, each stage with that axis' stride, padding and dilation, which measured faster
    there on a 2-core CPU (batch 8, channels-last); 3 x 3 measured the same both ways.
    """

    _spatial_stage_used: bool
    _separable_stages: bool

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
        # A 1x1 kernel without padding only scales each rank-one term (its stride, if any,
        # goes to the first pointwise stage: see _chain_specs).
        self._spatial_stage_used = not self._pointwise_kernel
        # Whether the chain filters along one spatial axis at a time (see Notes).
        self._separable_stages = (
            self._spatial_stage_used and sum(k > 1 for k in self.kernel_size) > 1
            and math.prod(self.kernel_size) >= 2 * sum(self.kernel_size)
        )

    def _factor_tensors(self) -> List[torch.Tensor]:
        return [self.out_factor, self.in_factor, *self.spatial_factors]

    def _n_summed_terms(self) -> int:
        return self.rank[0]

    def spatial_filters(self) -> torch.Tensor:
        """The separable filter of every term, ``(groups, k_1 * ... * k_d, R)``."""
        g, r = self.groups, self.rank[0]
        product = self.spatial_factors[0]
        for j, factor in enumerate(self.spatial_factors):
            if j > 0:
                product = (product.unsqueeze(2) * factor.unsqueeze(1)).reshape(g, -1, r)
        return product

    def _group_kernels(self) -> torch.Tensor:
        g, r = self.groups, self.rank[0]
        # Khatri-Rao product of the input and spatial factors: (g, in * k_1 * ..., r).
        product = (self.in_factor.unsqueeze(2) * self.spatial_filters().unsqueeze(1))
        kernel = torch.matmul(self.out_factor, product.reshape(g, -1, r).transpose(1, 2))
        return kernel.reshape([g] + self._group_shape)

    def _reconstruction_flops(self) -> int:
        out_g, in_g = self.group_kernel_shape[:2]
        return 2 * self.groups * out_g * self.rank[0] * in_g * math.prod(self.kernel_size)

    def _stage_specs(self) -> List[StageSpec]:
        return self._stages(self._separable_stages)

    def _stages(self, separable: bool) -> List[StageSpec]:
        """The chain's stages, its depthwise stage one per spatial axis if ``separable``."""
        g, r = self.groups, self.rank[0]
        stages = [self._pointwise_stage(self.in_channels, g * r, g)]
        if separable:
            stages += [self._spatial_stage(axis, g * r, g * r, g * r)
                       for axis in range(self.n_dim)]
        elif self._spatial_stage_used:
            stages.append(self._full_stage(g * r, g * r, g * r))
        stages.append(self._pointwise_stage(g * r, self.out_channels, g))
        return stages

    def stage_weights(self) -> List[torch.Tensor]:
        return self._weights(self._separable_stages)

    def _weights(self, separable: bool) -> List[torch.Tensor]:
        """The weights of :meth:`_stages` ``(separable)``, in execution order."""
        g, r = self.groups, self.rank[0]
        ones = self._pointwise_shape()
        in_factor = self.in_factor
        spatial: List[torch.Tensor] = []
        if separable:
            for axis, factor in enumerate(self.spatial_factors):
                shape = self._axis_tuple(axis, self.kernel_size[axis], 1)
                spatial.append(factor.transpose(1, 2).reshape([g * r, 1] + shape))
        elif self._spatial_stage_used:
            spatial.append(self.spatial_filters().transpose(1, 2)
                           .reshape([g * r, 1] + self._group_shape[2:]))
        else:
            in_factor = in_factor * self.spatial_filters()
        weights = [in_factor.transpose(1, 2).reshape([g * r, self._group_shape[1]] + ones)]
        weights.extend(spatial)
        weights.append(self.out_factor.reshape([self.out_channels, r] + ones))
        return weights

    def to_sequential(self, as_executed: bool = False) -> nn.Sequential:
        """The factorized chain as plain PyTorch convolutions, with this layer's parameters.

        The depthwise stage is exported as ``d`` one-dimensional depthwise convolutions (one
        per spatial axis, each carrying that axis' stride, padding and dilation), so the
        exported chain stores each term's ``d`` separable vectors rather than their
        ``k_1 x ... x k_d`` product and never holds more parameters than this layer.
        ``as_executed=True`` exports the chain as it runs (see
        :meth:`FactorizedConv.to_sequential`).
        """
        if (as_executed or not self._spatial_stage_used or self.n_dim == 1
                or self._separable_stages):
            return super().to_sequential(as_executed)
        # The chain runs one k x k depthwise stage (as fast for small kernels); the export
        # holds the d vectors of each term instead of their product.
        return self._sequential(self._stages(True), self._weights(True))

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
