"""Data-aware factorization: fit a layer's factors to what its convolution computes on data.

Decomposing a kernel minimises the kernel error, which treats every input and output
channel alike; what matters is the error of the layer's *output* on real inputs. With a
calibration batch and ``fit="data"``, :func:`tt_conv.compress` therefore also tries

1. *weighting* the kernel before decomposing it: input channels by the square root of their
   second-moment matrix on the batch (so directions the inputs never take cost nothing)
   and output channels by the inverse of their standard deviation (what a following
   batch norm does), undoing the weighting on the input and output factors
   (:func:`whitening`, :func:`weighted_conv`, :func:`unweight_factors`);
2. *refitting* the last, pointwise stage (and the bias) by least squares so that the layer,
   fed the inputs it sees in the compressed model, reproduces the original model's output
   at that point (:func:`refit_output_stage`), with a ridge towards the decomposition's
   weights chosen on held-out samples, refused when underdetermined, and kept per output
   channel only where it lowers the held-out error.

:class:`CalibrationRun` holds the batch through a compression: the fit / held-out split,
the working copy the layers are swapped into, and the held-out error of what the next
convolution receives, on which the candidates are judged.

Only the layer's factor matrices on the channel modes are touched, which every
factorization has: the input and output factors of CP and Tucker, the first and last
cores of a tensor train.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .decompose import relative_error
from .layers import CPConv, FactorizedConv, TTConv, TuckerConv
from .layers.base import conv_geometry
from .profile import copy_model, inference_pass, set_submodule

Inputs = Union[torch.Tensor, Tuple[torch.Tensor, ...]]

#: Relative floor added to the eigenvalues / scales so weights stay invertible (dead
#: channels, ReLU zeros).
WEIGHT_FLOOR = 1e-3
#: Relative ridge of the least-squares refit.
REFIT_RIDGE = 1e-6
#: Samples of the calibration batch processed at once when accumulating Gram matrices.
CHUNK = 64
#: Relative ridges (towards the decomposition's weights) tried when held-out samples choose.
RIDGES = (1e-6, 1e-4, 1e-2, 1e-1, 1.0, 10.0, 100.0)
#: The refit needs at least this many positions (samples x output positions) per unknown.
MIN_POSITIONS_PER_UNKNOWN = 2


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
    dense = conv.to_conv() if isinstance(conv, FactorizedConv) else copy_model(conv)
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


def scale_output_channels(layer: FactorizedConv, scales: torch.Tensor) -> None:
    """Multiply the layer's kernel by ``scales`` (one per output channel), in its output
    factor (the bias is left as it is)."""
    _, out_factor, transposed = _channel_factors(layer)
    with torch.no_grad():
        d = scales.to(out_factor.device).reshape(layer.groups, -1)
        if transposed:
            out_factor.mul_(d.unsqueeze(1).to(out_factor.dtype))
        else:
            out_factor.mul_(d.unsqueeze(2).to(out_factor.dtype))


def unweight_factors(layer: FactorizedConv, inverse_root: torch.Tensor,
                     scales: torch.Tensor) -> None:
    """Undo :func:`weighted_kernel` on a layer decomposed from a weighted kernel."""
    in_factor, _, _ = _channel_factors(layer)
    with torch.no_grad():
        fixed = torch.einsum("gji,gjr->gir", inverse_root.to(in_factor.device),
                             in_factor.double())
        in_factor.copy_(fixed.to(in_factor.dtype))
    scale_output_channels(layer, scales)


@dataclass
class RefitResult:
    """What :func:`refit_output_stage` did.

    Attributes
    ----------
    ridge : float
        The relative ridge used (chosen on the held-out samples when given).
    channels_refit : int
        Output channels whose refitted weights were kept (all without held-out samples;
        with them, only those whose held-out error the refit lowered).
    held_out_before, held_out_after : float or None
        Relative error of the layer's output on the held-out samples before and after
        (None without held-out samples).
    """

    ridge: float
    channels_refit: int
    held_out_before: Optional[float] = None
    held_out_after: Optional[float] = None


def _refit_statistics(head, x, target, groups, rank, out_g, with_bias, dtype, device):
    """Gram ``Z Z^T``, cross ``Z Y^T``, ``sum Y^2`` per output channel and the number of
    positions, for the activations ``Z`` entering the last stage (float64, by chunks)."""
    width = rank + (1 if with_bias else 0)
    gram = torch.zeros(groups, width, width, dtype=torch.float64, device=device)
    cross = torch.zeros(groups, width, out_g, dtype=torch.float64, device=device)
    energy = torch.zeros(groups, out_g, dtype=torch.float64, device=device)
    positions = 0
    with torch.no_grad():
        for start in range(0, x.shape[0], CHUNK):
            z = head(x[start:start + CHUNK].to(dtype))
            z = _channels_by_positions(z).double().reshape(groups, rank, -1)
            y = _channels_by_positions(target[start:start + CHUNK]).double()
            y = y.reshape(groups, out_g, -1)
            if with_bias:
                z = torch.cat([z, torch.ones_like(z[:, :1])], dim=1)
            gram += z @ z.transpose(1, 2)
            cross += z @ y.transpose(1, 2)
            energy += (y * y).sum(dim=2)
            positions += z.shape[2]
    if not (torch.isfinite(gram).all() and torch.isfinite(cross).all()):
        raise ValueError("the activations entering the last stage hold NaN or inf values")
    return gram, cross, energy, positions


def _residuals(gram, cross, energy, solution):
    """``||Z^T W - Y^T||^2`` per output channel from the statistics, ``(groups, out_g)``."""
    fitted = torch.einsum("gwo,gwv,gvo->go", solution, gram, solution)
    return (energy - 2 * torch.einsum("gwo,gwo->go", solution, cross) + fitted).clamp_min(0)


def refit_output_stage(layer: FactorizedConv, x: torch.Tensor, target: torch.Tensor,
                       ridge: float = REFIT_RIDGE, *, held_out=None) -> RefitResult:
    """Least-squares refit of the layer's last (pointwise) stage and bias.

    Finds the output factor (and bias, if the layer has one) minimising
    ``||layer(x) - target||`` with the other factors fixed: a linear regression of
    ``target`` on the activations entering the last stage, one per group, with a ridge
    penalty pulling the weights towards their current values (the decomposition's).

    Parameters
    ----------
    layer : FactorizedConv
        Modified in place.
    x : torch.Tensor
        The inputs the layer will see (in the compressed model).
    target : torch.Tensor
        The outputs it should give (the original model's, at this layer), ``layer(x)``'s
        shape.
    ridge : float
        Ridge penalty relative to the mean diagonal of the Gram matrix (without
        ``held_out``).
    held_out : (tensor, tensor), optional
        Inputs and targets not used for fitting. Then the ridge is the one of
        :data:`RIDGES` with the smallest held-out error, and each output channel keeps its
        refitted weights only where they lower its held-out error (else its weights stay
        as they were): the refit never makes the held-out error worse.

    Returns
    -------
    RefitResult

    Raises
    ------
    ValueError
        If the fit is underdetermined (fewer than :data:`MIN_POSITIONS_PER_UNKNOWN` times as
        many positions, samples x output positions, as unknowns per output channel) or the
        activations are not finite; the message says how many samples are needed.
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
    args = (groups, rank, out_g, with_bias, out_factor.dtype, device)
    gram, cross, energy, positions = _refit_statistics(head, x, target, *args)
    if positions < MIN_POSITIONS_PER_UNKNOWN * width:
        per_sample = max(1, positions // max(1, x.shape[0]))
        needed = -(-MIN_POSITIONS_PER_UNKNOWN * width // per_sample)
        raise ValueError(
            f"the refit of {type(layer).__name__} is underdetermined: {positions:,} positions "
            f"({x.shape[0]} samples x {per_sample:,}) for {width:,} unknowns per output "
            f"channel; it needs at least {needed:,} samples")
    with torch.no_grad():
        current = out_factor.detach().double()
        current = current if transposed else current.transpose(1, 2)  # (g, rank, out_g)
        if with_bias:
            current = torch.cat([current, layer.bias.detach().double().reshape(groups, 1, out_g)],
                                dim=1)
        diagonal = torch.diagonal(gram, dim1=1, dim2=2)
        mean = diagonal.mean(dim=1, keepdim=True).clamp_min(torch.finfo(gram.dtype).tiny)

        def solve(relative):
            # Ridge towards the current weights (the decomposition's), not towards zero: a
            # large penalty leaves the layer as it was instead of shrinking its output.
            penalty = torch.diag_embed((relative * mean).expand_as(diagonal))
            return torch.linalg.solve(gram + penalty, cross + penalty @ current)

        before = after = None
        if held_out is None:
            chosen, solution = ridge, solve(ridge)
            keep = torch.ones(groups, out_g, dtype=torch.bool, device=device)
        else:
            h_gram, h_cross, h_energy, _ = _refit_statistics(head, held_out[0], held_out[1],
                                                             *args)
            base = _residuals(h_gram, h_cross, h_energy, current)
            trials = [(float(_residuals(h_gram, h_cross, h_energy, s).sum()), r, s)
                      for r, s in ((r, solve(r)) for r in RIDGES)]
            _, chosen, solution = min(trials, key=lambda t: t[0])
            refit = _residuals(h_gram, h_cross, h_energy, solution)
            keep = refit < base
            total = float(h_energy.sum()) + 1e-300
            before = math.sqrt(float(base.sum()) / total)
            after = math.sqrt(float(torch.where(keep, refit, base).sum()) / total)
        if not torch.isfinite(solution).all():
            raise ValueError("the refit gave NaN or inf weights")
        solution = torch.where(keep.unsqueeze(1), solution, current)
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
    return RefitResult(chosen, int(keep.sum()), before, after)


def standardized_error(output: torch.Tensor, target: torch.Tensor) -> float:
    """Relative error with every channel scaled by its standard deviation in ``target``.

    What a batch norm after the layer does to the error: low-variance channels count as
    much as high-variance ones (a plain relative error hides errors in them).
    """
    y = _channels_by_positions(target).double()
    e = _channels_by_positions(output).double() - y
    scale = y.std(dim=1) if y.shape[1] > 1 else y.abs().mean(dim=1)
    scale = scale + WEIGHT_FLOOR * scale.mean() + torch.finfo(scale.dtype).tiny
    e, y = e / scale[:, None], (y - y.mean(dim=1, keepdim=True)) / scale[:, None]
    return math.sqrt(float((e * e).sum()) / max(float((y * y).sum()), 1e-300))


# --------------------------------------------------------------------------- a compression run


def batch_size(inputs: Inputs) -> int:
    """Number of samples of a batch (a tensor or a tuple of tensors)."""
    return int((inputs if isinstance(inputs, torch.Tensor) else inputs[0]).shape[0])


def take(inputs: Inputs, index: slice) -> Inputs:
    """The samples ``index`` of a batch (a tensor or a tuple of tensors)."""
    if isinstance(inputs, torch.Tensor):
        return inputs[index]
    return tuple(t[index] for t in inputs)


def output_error(output, reference) -> float:
    """Relative error over every floating tensor of two model outputs of the same structure."""
    got = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]
    want = [t for t in tree_flatten(reference)[0] if isinstance(t, torch.Tensor)]
    pairs = [(a, b) for a, b in zip(got, want)
             if a.is_floating_point() and a.shape == b.shape]
    if not pairs or len(got) != len(want):
        return math.nan
    return relative_error(torch.cat([a.reshape(-1).double() for a, _ in pairs]),
                          torch.cat([b.reshape(-1).double() for _, b in pairs]))


class CalibrationRun:
    """The calibration batch through one compression.

    Holds the original model and a working copy into which the factorized layers are
    swapped one by one, so that each layer is fitted and judged on the inputs it gets in
    the compressed model. Under data fitting the batch is split into *fit* samples (the
    first three quarters, in batch order) and *held-out* samples (the last quarter, at
    least one) on which every candidate is judged, so a batch ordered by source (clips,
    images of one kind) is judged on sources it was not fitted on: by the error of what the next convolution (in call order) receives, or of the
    model's output after the last one. Without data fitting every sample serves for both.

    Parameters
    ----------
    original : nn.Module
        The model being compressed (never modified).
    inputs : tensor or tuple of tensors
        The calibration batch.
    order : sequence of str
        Names of the convolutions in the order the model first calls them.
    hold_out : bool
        Split off held-out samples (data fitting).
    """

    def __init__(self, original: nn.Module, inputs: Inputs, order: Sequence[str],
                 hold_out: bool):
        self.original = original
        self.working = copy_model(original)
        self.inputs = inputs
        n = batch_size(inputs)
        if hold_out and n < 2:
            raise ValueError(
                f"a data-aware fit needs a calibration batch of at least 2 samples (some "
                f"held out to judge the fit), got {n}")
        held = max(1, n // 4) if hold_out else n
        self.fit_slice = slice(0, n - held) if hold_out else slice(0, n)
        self.held_slice = slice(n - held, n)
        self.fit_inputs = take(inputs, self.fit_slice)
        self.held_inputs = take(inputs, self.held_slice)
        self.order = list(order)
        self._reference: Dict[str, torch.Tensor] = {}
        self._reference_output = None

    def layer_data(self, name: str, conv: nn.Module, weighting=None):
        """:class:`~tt_conv.factorize.LayerData` of the convolution ``name`` (computing
        ``conv``'s function), or None if it did not run on the batch."""
        from_working = input_of(self.working, name, self.inputs)
        original = input_of(self.original, name, self.inputs)
        with torch.no_grad():
            target = conv(original)
        return dict(
            x_fit=from_working[self.fit_slice], target_fit=target[self.fit_slice],
            x_held=from_working[self.held_slice], target_held=target[self.held_slice],
            weighting=weighting,
        )

    def _reference_at(self, name: Optional[str]):
        if name is None:
            if self._reference_output is None:
                self._reference_output = inference_pass(self.original, self.held_inputs)
            return self._reference_output
        if name not in self._reference:
            self._reference[name] = input_of(self.original, name, self.held_inputs)
        return self._reference[name]

    def downstream_error(self, name: str):
        """A function giving, for a candidate layer at ``name``, the held-out relative error
        of what the next convolution receives (of the model output after the last one)."""
        position = self.order.index(name) if name in self.order else len(self.order)
        following = self.order[position + 1] if position + 1 < len(self.order) else None
        reference = self._reference_at(following)

        def error(layer: nn.Module) -> float:
            old = set_submodule(self.working, name, layer)
            try:
                if following is None:
                    return output_error(inference_pass(self.working, self.held_inputs),
                                        reference)
                return relative_error(input_of(self.working, following, self.held_inputs),
                                      reference)
            finally:
                set_submodule(self.working, name, old)

        return error

    def accept(self, name: str, layer: nn.Module) -> None:
        """Swap ``layer`` into the working model for good."""
        set_submodule(self.working, name, layer)

    def model_error(self, model: nn.Module) -> float:
        """Relative error of ``model``'s output against the original's on the held-out
        samples."""
        return output_error(inference_pass(model, self.held_inputs), self._reference_at(None))
