"""Data-aware factorization: fit a layer's factors to what its convolution computes on data.

Decomposing a kernel minimises the kernel error, which treats every input and output
channel alike; what matters is the error of the layer's *output* on real inputs. With a
calibration batch, :func:`tt_conv.compress` therefore

1. *weights* the kernel before decomposing it: input channels by the square root of their
   second-moment matrix on the batch (so directions the inputs never take cost nothing)
   and output channels by the inverse of their standard deviation (what a following
   batch norm does), and undoes the weighting on the input and output factors
   (:func:`whitening`, :func:`weighted_conv`, :func:`unweight_factors`);
2. *refits* the last, pointwise stage (and the bias) by least squares so that the layer,
   fed the inputs it sees in the compressed model, reproduces the original model's output
   at that point (:func:`refit_output_stage`); errors of earlier layers are compensated
   rather than accumulated.

Only the layer's factor matrices on the channel modes are touched, which every
factorization has: the input and output factors of CP and Tucker, the first and last
cores of a tensor train.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, Sequence, Tuple, Union

import torch
from torch import nn

from .layers import CPConv, FactorizedConv, TTConv, TuckerConv
from .layers.base import conv_geometry
from .profile import inference_pass

Inputs = Union[torch.Tensor, Tuple[torch.Tensor, ...]]

#: Relative floor added to the eigenvalues / scales so weights stay invertible (dead
#: channels, ReLU zeros).
WEIGHT_FLOOR = 1e-3
#: Relative ridge of the least-squares refit.
REFIT_RIDGE = 1e-6
#: Samples of the calibration batch processed at once when accumulating Gram matrices.
CHUNK = 64


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted activation is captured."""


def input_of(model: nn.Module, name: str, inputs: Inputs) -> torch.Tensor:
    """The input of submodule ``name`` when ``model`` runs on ``inputs`` (first call).

    The forward pass stops right after, in evaluation mode and without gradients; the
    model's training mode is restored.
    """
    module = model.get_submodule(name)
    box = {}

    def hook(mod, args):
        box["x"] = args[0].detach()
        raise _Stop

    try:
        inference_pass(model, inputs, [module.register_forward_pre_hook(hook)])
    except _Stop:
        pass
    if "x" not in box:
        raise ValueError(f"layer {name!r} did not run on the calibration batch")
    return box["x"]


@dataclass
class LayerStatistics:
    """Channel statistics of one convolution on the calibration batch.

    Attributes
    ----------
    input_moment : torch.Tensor
        ``(groups, in/groups, in/groups)``: second-moment matrix of the input channels of
        each group, over samples and positions (float64).
    output_std : torch.Tensor
        ``(out,)``: standard deviation of each output channel (float64).
    """

    input_moment: torch.Tensor
    output_std: torch.Tensor


def _channels_by_positions(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(0, 1).reshape(t.shape[1], -1)


def statistics(model: nn.Module, inputs: Inputs, names: Sequence[str]) -> Dict[str, LayerStatistics]:
    """:class:`LayerStatistics` of the named convolutions, in one forward pass."""
    wanted = set(names)
    found: Dict[str, LayerStatistics] = {}
    handles = []
    for name, module in model.named_modules():
        if name not in wanted:
            continue

        def hook(mod, args, output, name=name):
            if name in found:
                return
            x = _channels_by_positions(args[0].detach()).double()
            groups = mod.groups
            x = x.reshape(groups, x.shape[0] // groups, -1)
            moment = x @ x.transpose(1, 2) / max(x.shape[-1], 1)
            y = _channels_by_positions(output.detach()).double()
            std = y.std(dim=1) if y.shape[1] > 1 else y.abs().mean(dim=1)
            found[name] = LayerStatistics(moment, std)

        handles.append(module.register_forward_hook(hook))
    inference_pass(model, inputs, handles)
    return found


def whitening(stats: LayerStatistics, floor: float = WEIGHT_FLOOR):
    """The input weight ``S = M^(1/2)``, its inverse, and the output scales ``d`` (std).

    ``M`` is regularised by ``floor`` times its mean eigenvalue, ``d`` by ``floor`` times
    the mean scale, so both stay invertible.
    """
    values, vectors = torch.linalg.eigh(stats.input_moment)
    mean = values.clamp_min(0).mean(dim=-1, keepdim=True)
    values = values.clamp_min(0) + floor * mean + torch.finfo(values.dtype).tiny
    root = (vectors * values.sqrt().unsqueeze(-2)) @ vectors.transpose(-1, -2)
    inverse = (vectors * values.rsqrt().unsqueeze(-2)) @ vectors.transpose(-1, -2)
    std = stats.output_std
    scales = std + floor * std.mean() + torch.finfo(std.dtype).tiny
    return root, inverse, scales


def weighted_kernel(kernel: torch.Tensor, groups: int, root: torch.Tensor,
                    scales: torch.Tensor) -> torch.Tensor:
    """``W[o, i, ...] -> sum_j W[o, j, ...] S_g[j, i] / d[o]`` per group (float64)."""
    w = kernel.detach().double()
    out = w.shape[0]
    grouped = w.reshape(groups, out // groups, *w.shape[1:])
    weighted = torch.einsum("goj...,gji->goi...", grouped, root.to(w.device))
    weighted = weighted.reshape(w.shape) / scales.to(w.device).reshape(-1, *([1] * (w.dim() - 1)))
    return weighted


def weighted_conv(conv: nn.Module, root: torch.Tensor, scales: torch.Tensor) -> nn.Module:
    """A dense copy of ``conv`` whose kernel is :func:`weighted_kernel` (to decompose)."""
    dense = conv.to_conv() if isinstance(conv, FactorizedConv) else copy.deepcopy(conv)
    geometry, kernel, _ = conv_geometry(dense)
    with torch.no_grad():
        dense.weight.copy_(weighted_kernel(kernel, geometry["groups"], root, scales)
                           .to(dense.weight.dtype))
    return dense


def _channel_factors(layer: FactorizedConv) -> Tuple[nn.Parameter, nn.Parameter, bool]:
    """The input and output channel factors of a layer, and whether the output factor is
    stored ``(groups, rank, out/groups)`` (TT) rather than ``(groups, out/groups, rank)``."""
    if isinstance(layer, (CPConv, TuckerConv)):
        return layer.in_factor, layer.out_factor, False
    if isinstance(layer, TTConv):
        return layer.cores[0], layer.cores[-1], True
    raise TypeError(f"no channel factors known for {type(layer).__name__}")


def unweight_factors(layer: FactorizedConv, inverse_root: torch.Tensor,
                     scales: torch.Tensor) -> None:
    """Undo :func:`weighted_kernel` on a layer decomposed from a weighted kernel."""
    in_factor, out_factor, transposed = _channel_factors(layer)
    groups = layer.groups
    with torch.no_grad():
        fixed = torch.einsum("gji,gjr->gir", inverse_root.to(in_factor.device),
                             in_factor.double())
        in_factor.copy_(fixed.to(in_factor.dtype))
        d = scales.to(out_factor.device).reshape(groups, -1)
        if transposed:
            out_factor.mul_(d.unsqueeze(1).to(out_factor.dtype))
        else:
            out_factor.mul_(d.unsqueeze(2).to(out_factor.dtype))


def refit_output_stage(layer: FactorizedConv, x: torch.Tensor, target: torch.Tensor,
                       ridge: float = REFIT_RIDGE) -> None:
    """Least-squares refit of the layer's last (pointwise) stage and bias.

    Finds the output factor (and bias, if the layer has one) minimising
    ``||layer(x) - target||`` with the other factors fixed: a ridge-regularised linear
    regression of ``target`` on the activations entering the last stage, one per group.

    Parameters
    ----------
    layer : FactorizedConv
        Modified in place.
    x : torch.Tensor
        The inputs the layer will see (in the compressed model).
    target : torch.Tensor
        The outputs it should give (the original model's, at this layer), ``layer(x)``'s
        shape.
    """
    chain = layer.to_sequential()
    head = chain[:-1]
    groups = layer.groups
    _, out_factor, transposed = _channel_factors(layer)
    rank = out_factor.shape[1] if transposed else out_factor.shape[2]
    with_bias = layer.bias is not None
    width = rank + (1 if with_bias else 0)
    out_g = layer.out_channels // groups
    device = out_factor.device
    gram = torch.zeros(groups, width, width, dtype=torch.float64, device=device)
    cross = torch.zeros(groups, width, out_g, dtype=torch.float64, device=device)
    with torch.no_grad():
        for start in range(0, x.shape[0], CHUNK):
            z = head(x[start:start + CHUNK].to(out_factor.dtype))
            z = _channels_by_positions(z).double().reshape(groups, rank, -1)
            y = _channels_by_positions(target[start:start + CHUNK]).double()
            y = y.reshape(groups, out_g, -1)
            if with_bias:
                z = torch.cat([z, torch.ones_like(z[:, :1])], dim=1)
            gram += z @ z.transpose(1, 2)
            cross += z @ y.transpose(1, 2)
        diagonal = torch.diagonal(gram, dim1=1, dim2=2)
        penalty = ridge * diagonal.mean(dim=1, keepdim=True).clamp_min(torch.finfo(gram.dtype).tiny)
        gram = gram + torch.diag_embed(penalty.expand_as(diagonal))
        solution = torch.linalg.solve(gram, cross)  # (g, width, out_g)
        weight = solution[:, :rank]  # (g, rank, out_g)
        if transposed:
            out_factor.copy_(weight.to(out_factor.dtype))
        else:
            out_factor.copy_(weight.transpose(1, 2).to(out_factor.dtype))
        if with_bias:
            layer.bias.copy_(solution[:, rank].reshape(-1).to(layer.bias.dtype))
    # The stage weight must now be the solution: guards against a change of layout.
    last = layer.stage_weights()[-1].detach().reshape(groups, out_g, rank)
    expected = solution[:, :rank].transpose(1, 2).to(last.dtype)
    if not torch.allclose(last, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max() + 1)):
        raise RuntimeError(  # pragma: no cover - a layer-layout change
            f"{type(layer).__name__}: the refitted output factor does not reach its last stage"
        )
