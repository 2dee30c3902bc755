"""The plain convolution a conv module really computes, or why there is none.

A module can be an instance of ``nn.Conv2d`` and compute something else: timm's
``StdConv2d`` / ``ScaledStdConv2d`` standardise their kernel in ``forward``, a conv under
:func:`torch.nn.utils.parametrizations.weight_norm` (or any parametrization) computes its
kernel from other parameters, ``Conv2dSame`` pads by the input's size, a forward hook may
change the output. Factorizing such a module's raw ``weight`` silently changes the model,
so :func:`plain_equivalent` looks at what the module's call does instead:

* an exact ``nn.Conv1d/2d/3d`` (or a factorized layer) with no hooks is used as it is;
* anything else is run on two probe inputs of different sizes under a
  :class:`torch.overrides.TorchFunctionMode` that records every torch call touching the
  input. When the input reaches the output through nothing but (at most) one ``F.pad`` and
  one convolution, the kernel, bias, stride, padding, dilation and groups of that
  convolution (computed from the parameters however the module likes) make a plain
  convolution, which is checked to give the module's output on both probes. Its kernel is
  the one to factorize, and what was baked in is said;
* otherwise (other operations on the input, padding that depends on the input size,
  padding no torch conv can express, hooks that could do anything, an uninitialised lazy
  conv) there is no plain equivalent and the reason names the class.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ._geometry import padding_pairs
from .layers import FactorizedConv
from .profile import inference_pass

EXACT_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FUNCTIONS = (torch.conv1d, torch.conv2d, torch.conv3d)
_CONV_SIGNATURE = inspect.Signature([
    inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default)
    for name, default in (("input", inspect.Parameter.empty), ("weight", inspect.Parameter.empty),
                          ("bias", None), ("stride", 1), ("padding", 0), ("dilation", 1),
                          ("groups", 1))
])
_PAD_SIGNATURE = inspect.Signature([
    inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default)
    for name, default in (("input", inspect.Parameter.empty), ("pad", inspect.Parameter.empty),
                          ("mode", "constant"), ("value", None))
])
# Calls on the input that return it unchanged in value.
_VALUE_PRESERVING = {torch.Tensor.contiguous}
# Hooks of PyTorch's own (older) weight re-parametrizations: they only recompute ``weight``.
_WEIGHT_HOOK_TYPES = (WeightNorm, SpectralNorm)
#: Relative tolerance of the check that a plain equivalent gives the module's output.
CHECK_TOLERANCE = 1e-4


@dataclass
class PlainEquivalent:
    """What :func:`plain_equivalent` found for one module.

    Attributes
    ----------
    conv : nn.Module or None
        An exact ``nn.Conv1d/2d/3d`` or :class:`~tt_conv.FactorizedConv` computing what the
        module computes (the module itself when it is one), or None.
    baked : str
        What the plain convolution fixed that the module computes in its forward (empty for
        plain convolutions).
    reason : str
        Why there is no plain equivalent (empty when there is one).
    """

    conv: Optional[nn.Module]
    baked: str = ""
    reason: str = ""


def is_uninitialized_lazy(module: nn.Module) -> bool:
    """Whether ``module`` is a lazy convolution whose parameters are not created yet."""
    return (isinstance(module, nn.modules.lazy.LazyModuleMixin)
            and module.has_uninitialized_params())


def is_plain_conv(module: nn.Module) -> bool:
    """Whether ``module`` applies exactly the kernel it holds: a
    :class:`~tt_conv.FactorizedConv`, or an ``nn.Conv1d/2d/3d`` itself (not a subclass with
    its own forward) that is not re-parametrized and has no forward pre-hooks."""
    return isinstance(module, FactorizedConv) or (
        type(module) in EXACT_CONV_TYPES and not parametrize.is_parametrized(module)
        and not module._forward_pre_hooks)


def user_hooks(module: nn.Module) -> List[str]:
    """Kinds of hooks on ``module`` that replacing it would drop (weight re-parametrization
    hooks of PyTorch excluded: their effect is in the kernel)."""
    kinds = []
    pre = [h for h in module._forward_pre_hooks.values() if not isinstance(h, _WEIGHT_HOOK_TYPES)]
    for kind, hooks in (("forward pre-hook", pre), ("forward hook", module._forward_hooks),
                        ("backward hook", module._backward_hooks),
                        ("backward pre-hook", getattr(module, "_backward_pre_hooks", {}))):
        if len(hooks):
            kinds.append(kind)
    return kinds


def plain_equivalent(module: nn.Module, probe_sizes: Optional[Tuple[Tuple[int, ...], ...]] = None,
                     ) -> PlainEquivalent:
    """The plain convolution ``module`` computes (see the module docstring), or the reason
    there is none.

    Parameters
    ----------
    module : nn.Module
        A convolution (an instance of ``nn.Conv1d/2d/3d``, of a subclass, or a factorized
        layer).
    probe_sizes : tuple of tuple of int, optional
        Spatial sizes of the probe inputs (default: two sizes of different parity that fit
        the kernel).
    """
    name = type(module).__name__
    if is_uninitialized_lazy(module):
        return PlainEquivalent(None, reason=(
            f"uninitialised lazy convolution ({name}): pass input_shape= or calibration= so "
            f"that it is initialised, or run the model once before compressing"))
    hooks = user_hooks(module)
    if hooks:
        return PlainEquivalent(None, reason=(
            f"{name} has {' and '.join(hooks)}s, which could change what it computes and "
            f"would be lost with the module"))
    if is_plain_conv(module):
        return PlainEquivalent(module)
    n_dim = len(module.kernel_size)
    if probe_sizes is None:
        smallest = [(k - 1) * d + 1 for k, d in zip(module.kernel_size, module.dilation)]
        probe_sizes = (tuple(n + 2 * s + 3 for n, s in zip(smallest, module.stride)),
                       tuple(n + 2 * s + 4 for n, s in zip(smallest, module.stride)))
    traces = [_trace(module, size, n_dim) for size in probe_sizes]
    pads = [t[1] for t in traces]
    if pads[0] is not None and pads[1] is not None and pads[0] != pads[1]:
        return PlainEquivalent(None, reason=(
            f"{name}: its padding depends on the input size ({pads[0]} (before, after) per "
            f"axis at size {probe_sizes[0]}, {pads[1]} at {probe_sizes[1]}), as TensorFlow's "
            f"'SAME' padding does; no fixed convolution computes it"))
    for result, _ in traces:
        if isinstance(result, str):
            return PlainEquivalent(None, reason=f"{name}: {result}")
    (conv, x, y), (other, x2, y2) = (t[0] for t in traces)
    if _geometry_of(conv) != _geometry_of(other):
        return PlainEquivalent(None, reason=(
            f"{name}: the convolution its forward runs changes with the input size"))
    for probe, expected in ((x, y), (x2, y2)):
        with torch.no_grad():
            got = conv(probe)
        scale = float(expected.abs().max()) + 1e-30
        if got.shape != expected.shape or not torch.allclose(
                got, expected, rtol=CHECK_TOLERANCE, atol=CHECK_TOLERANCE * scale):
            return PlainEquivalent(None, reason=(
                f"{name}: the convolution its forward runs does not reproduce its output"))
    return PlainEquivalent(conv, baked=_baked(module, conv))


# --------------------------------------------------------------------------- tracing


class _InputTrace(TorchFunctionMode):
    """Records the torch calls that touch the input (or what was computed from it)."""

    def __init__(self, x: torch.Tensor):
        super().__init__()
        self.data = {id(x)}
        self.keep = [x]  # tensors in ``data`` stay alive so their ids are not reused
        self.pads: List[Any] = []
        self.convs: List[Any] = []
        self.problem: Optional[str] = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and id(t) in self.data]
        if not inputs:
            return out
        results = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if func in _CONV_FUNCTIONS:
            bound = _CONV_SIGNATURE.bind(*args, **kwargs)
            bound.apply_defaults()
            call = dict(bound.arguments)
            if id(call["input"]) not in self.data or any(
                    isinstance(call[k], torch.Tensor) and id(call[k]) in self.data
                    for k in ("weight", "bias")):
                self.problem = self.problem or "its kernel depends on the input"
            self.convs.append((call, out))
        elif func is F.pad:
            bound = _PAD_SIGNATURE.bind(*args, **kwargs)
            bound.apply_defaults()
            self.pads.append((dict(bound.arguments), out))
        elif func in _VALUE_PRESERVING:
            pass
        elif results:
            self.problem = self.problem or (
                f"its forward applies {getattr(func, '__name__', func)!s} to the input or "
                f"the convolution's output")
        for t in results:
            self.data.add(id(t))
            self.keep.append(t)
        return out


def _trace(module: nn.Module, size: Tuple[int, ...], n_dim: int):
    """``(result, padding)`` of one probe: the result is ``(plain conv, probe, module
    output)`` or a string saying what failed; the padding, the (before, after) zero padding
    per axis the forward applied (None when unknown)."""
    weight = next((p for p in module.parameters()), None)
    device = weight.device if weight is not None else torch.device("cpu")
    dtype = weight.dtype if weight is not None and weight.is_floating_point() else torch.float32
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, module.in_channels, *size, generator=generator).to(device, dtype)
    trace = _InputTrace(x)
    try:
        y = inference_pass(module, x, context=trace)
    except Exception as error:  # a module may refuse a probe in many ways
        return f"could not run it on a probe input of shape {tuple(x.shape)} ({error})", None
    if trace.problem:
        return trace.problem, None
    if len(trace.convs) != 1:
        return f"its forward runs {len(trace.convs)} convolutions on the input", None
    call, conv_out = trace.convs[0]
    if conv_out is not y:
        return "its output is not the output of the convolution it runs", None
    if len(trace.pads) > 1:
        return "its forward pads the input several times", None
    pad = None
    if trace.pads:
        pad, padded = trace.pads[0]
        if pad["input"] is not x or call["input"] is not padded:
            return "its forward pads something other than the input of the convolution", None
    elif call["input"] is not x:
        return "its convolution does not run on the input as given", None
    if call["weight"].dim() - 2 != n_dim:
        return f"its forward runs a {call['weight'].dim() - 2}-D convolution", None
    conv, pairs = _plain_conv(call, pad, n_dim)
    return (conv if isinstance(conv, str) else (conv, x, y)), pairs


def _axis_tuple(value, n_dim: int) -> Tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n_dim
    values = tuple(int(v) for v in value)
    return values * n_dim if len(values) == 1 else values


def _plain_conv(call, pad, n_dim: int):
    """The ``nn.ConvNd`` of a recorded convolution (and padding), or why none exists, and
    the (before, after) padding per axis."""
    weight, bias = call["weight"].detach(), call["bias"]
    kernel_size = tuple(weight.shape[2:])
    stride = _axis_tuple(call["stride"], n_dim)
    dilation = _axis_tuple(call["dilation"], n_dim)
    padding = call["padding"]
    conv_pairs = list(padding_pairs(padding if isinstance(padding, str) else _axis_tuple(
        padding, n_dim), kernel_size, stride, dilation))
    mode = "zeros"
    if pad is not None:
        amounts = list(pad["pad"])
        if len(amounts) % 2 or len(amounts) > 2 * n_dim:
            return "its forward pads axes other than the spatial ones", None
        pairs = [(0, 0)] * n_dim
        for i in range(len(amounts) // 2):
            pairs[n_dim - 1 - i] = (int(amounts[2 * i]), int(amounts[2 * i + 1]))
        if pad["mode"] == "constant":
            if pad["value"] not in (None, 0, 0.0):
                return f"its forward pads with the value {pad['value']}", None
            conv_pairs = [(a + c, b + d) for (a, b), (c, d) in zip(pairs, conv_pairs)]
        elif any(p != (0, 0) for p in conv_pairs):
            return f"its forward pads in mode {pad['mode']!r} and then with zeros", None
        else:
            mode, conv_pairs = pad["mode"], pairs
    if all(a == b for a, b in conv_pairs):
        padding = tuple(a for a, _ in conv_pairs)
    elif (mode == "zeros" and all(s == 1 for s in stride)
          and conv_pairs == list(padding_pairs("same", kernel_size, stride, dilation))):
        padding = "same"
    else:
        return (f"its padding {conv_pairs} is asymmetric (before, after) per axis, which no "
                f"torch convolution expresses"), conv_pairs
    groups = int(call["groups"])
    in_channels = int(call["input"].shape[1])
    cls = EXACT_CONV_TYPES[n_dim - 1]
    conv = cls(in_channels, weight.shape[0], kernel_size, stride=stride, padding=padding,
               dilation=dilation, groups=groups, bias=bias is not None, padding_mode=mode,
               device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias.detach())
    return conv, conv_pairs


def _geometry_of(conv: nn.Module):
    return (conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride),
            conv.padding, tuple(conv.dilation), conv.groups, conv.padding_mode)


def _padding_text(conv: nn.Module) -> str:
    return f"padding {conv.padding!r}" + (
        f" ({conv.padding_mode})" if conv.padding_mode != "zeros" else "")


def _baked(module: nn.Module, conv: nn.Module) -> str:
    """What the plain convolution fixed, in words (empty when nothing differs)."""
    parts = []
    name = type(module).__name__
    if parametrize.is_parametrized(module):
        kinds = sorted({type(p).__name__ for plist in module.parametrizations.values()
                        for p in plist})
        parts.append(f"the parametrized kernel ({', '.join(kinds)})")
    elif any(isinstance(h, _WEIGHT_HOOK_TYPES) for h in module._forward_pre_hooks.values()):
        kinds = sorted({type(h).__name__ for h in module._forward_pre_hooks.values()
                        if isinstance(h, _WEIGHT_HOOK_TYPES)})
        parts.append(f"the re-parametrized kernel ({', '.join(kinds)})")
    else:
        raw = getattr(module, "weight", None)
        if not (isinstance(raw, torch.Tensor) and raw.shape == conv.weight.shape
                and torch.equal(raw.detach(), conv.weight.detach())):
            parts.append(f"the kernel {name}.forward computes from its weight")
    raw_bias = getattr(module, "bias", None)
    if conv.bias is not None and isinstance(raw_bias, torch.Tensor) and not torch.equal(
            raw_bias.detach(), conv.bias.detach()):
        parts.append("its bias as forward computes it")
    if (conv.padding != getattr(module, "padding", conv.padding)
            or conv.padding_mode != getattr(module, "padding_mode", conv.padding_mode)):
        parts.append(f"{_padding_text(conv)} as its forward applies it")
    if not parts:
        return ""
    return f"{name}: " + " and ".join(parts) + " baked in (checked on two probe inputs)"
