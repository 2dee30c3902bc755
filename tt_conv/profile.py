"""Parameter and FLOP counting for layers and whole models.

FLOPs are counted as :mod:`torch.utils.flop_counter` counts them: two per multiply-add of
every convolution and matrix product, nothing for biases, activations or padding. Single
convolutions are counted from their geometry (:meth:`tt_conv.FactorizedConv.flops`,
:func:`tt_conv.budget.dense_flops`), whole models by running them under
:class:`torch.utils.flop_counter.FlopCounterMode`.
"""

from __future__ import annotations

import contextlib
import copy

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .budget import dense_flops
from .layers import FactorizedConv

Inputs = Union[torch.Tensor, Sequence[torch.Tensor]]

_DENSE_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_conv(module: nn.Module) -> bool:
    """Whether ``module`` is a convolution tt_conv can factorize (or already has).

    Plain ``nn.Conv1d/2d/3d`` (transposed and uninitialised lazy convolutions excluded) and
    every :class:`~tt_conv.FactorizedConv`.
    """
    if isinstance(module, FactorizedConv):
        return True
    return (
        isinstance(module, _DENSE_CONVS)
        and not isinstance(module, nn.modules.lazy.LazyModuleMixin)
    )


def conv_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` for every convolution of ``model`` (see :func:`is_conv`), in order.

    Children of a factorized layer are not listed separately.
    """
    found = []
    skip_prefixes: List[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in skip_prefixes):
            continue
        if is_conv(module):
            found.append((name, module))
            skip_prefixes.append(name + ".")
    return found


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at the dotted ``name`` inside ``root``, in the training mode of the
    module it replaces (an evaluation-mode model stays so throughout; factorized layers keep
    their inference weights only there); returns the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    module.train(old.training)
    setattr(parent, child, module)
    return old


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``, also of modules that ``copy.deepcopy`` refuses: a tensor
    attribute computed from parameters (the ``weight`` of the older
    :func:`torch.nn.utils.weight_norm`) is copied detached, as its hook recomputes it."""
    memo = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def count_parameters(module: nn.Module) -> int:
    """Number of distinct parameters (shared tensors counted once; parameters of
    uninitialised lazy modules count 0)."""
    seen = set()
    total = 0
    for p in module.parameters():
        if isinstance(p, nn.parameter.UninitializedParameter):
            continue
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def layer_flops(module: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one convolution (dense or factorized, as it runs) on ``input_shape``."""
    if isinstance(module, FactorizedConv):
        return module.flops(input_shape)
    if is_conv(module):
        return dense_flops(module, input_shape)
    raise TypeError(f"expected a convolution, got {type(module).__name__}")


def example_inputs(model: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    """A zero tensor of ``input_shape`` on the model's device and in its floating dtype."""
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"input_shape must be a tuple of positive ints, got {input_shape!r}")
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return torch.zeros(shape, device=device, dtype=dtype)


def _call(model: nn.Module, inputs: Inputs):
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    return model(*inputs)


def inference_pass(model: nn.Module, inputs: Inputs, handles: Sequence = (), context=None):
    """Run ``model`` once on ``inputs`` in evaluation mode without gradients (inside
    ``context`` if given); restore its training mode and remove the hook ``handles``."""
    training = model.training
    try:
        model.eval()
        with torch.no_grad(), (context if context is not None else contextlib.nullcontext()):
            return _call(model, inputs)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()


def conv_input_shapes(model: nn.Module, inputs: Inputs) -> Dict[str, Tuple[int, ...]]:
    """The input shape of each convolution when ``model`` runs on ``inputs``.

    Runs one forward pass in evaluation mode without gradients (the model's training mode
    is restored). A convolution called several times keeps its first shape; one not called
    is absent.
    """
    shapes: Dict[str, Tuple[int, ...]] = {}
    handles = []
    for name, module in conv_modules(model):
        def hook(mod, args, name=name):
            if name not in shapes and args and isinstance(args[0], torch.Tensor):
                shapes[name] = tuple(args[0].shape)

        handles.append(module.register_forward_pre_hook(hook))
    inference_pass(model, inputs, handles)
    return shapes


def model_flops(model: nn.Module, inputs: Inputs) -> int:
    """Total FLOPs of one forward pass of ``model`` on ``inputs`` (torch.utils.flop_counter).

    Runs in evaluation mode without gradients; the model's training mode is restored. A
    first pass goes uncounted: factorized layers form the weights they keep outside
    autograd on it (see :meth:`tt_conv.FactorizedConv.flops`), so the count is every pass's.
    """
    inference_pass(model, inputs)
    counter = FlopCounterMode(display=False)
    inference_pass(model, inputs, context=counter)
    return int(counter.get_total_flops())


def conv_parameters(module: nn.Module) -> int:
    """Parameters of one convolution (kernel or factors, and bias)."""
    return count_parameters(module)


def dense_conv_parameters(module: nn.Module) -> int:
    """Parameters of the dense convolution a layer stands for (kernel and bias)."""
    if isinstance(module, FactorizedConv):
        return module.dense_parameters
    return count_parameters(module)


def kernel_shape(module: nn.Module) -> Tuple[int, ...]:
    """The dense kernel's shape, ``(out, in // groups, *kernel_size)``."""
    if isinstance(module, FactorizedConv):
        return module.weight_shape
    return tuple(module.weight.shape)


def summarize(model: nn.Module, inputs: Optional[Inputs] = None) -> dict:
    """Parameters (and FLOPs when ``inputs`` are given) of a model and of each of its convs.

    Returns
    -------
    dict
        ``{"parameters", "conv_parameters", "flops", "convs": [{"name", "type",
        "kernel_shape", "parameters", "input_shape", "flops"}, ...]}``; FLOP fields are
        None without ``inputs``.
    """
    shapes = conv_input_shapes(model, inputs) if inputs is not None else {}
    rows = []
    for name, module in conv_modules(model):
        shape = shapes.get(name)
        rows.append({
            "name": name,
            "type": type(module).__name__,
            "kernel_shape": kernel_shape(module),
            "parameters": count_parameters(module),
            "input_shape": shape,
            "flops": layer_flops(module, shape) if shape is not None else None,
        })
    return {
        "parameters": count_parameters(model),
        "conv_parameters": sum(r["parameters"] for r in rows),
        "flops": model_flops(model, inputs) if inputs is not None else None,
        "convs": rows,
    }
