"""Conversion to and from tensorly-torch's ``FactorizedConv``.

:func:`from_tltorch` turns a ``tltorch.FactorizedConv`` into the equivalent
:class:`~tt_conv.CPConv`, :class:`~tt_conv.TuckerConv` or :class:`~tt_conv.TTConv`;
:func:`to_tltorch` goes the other way. Both keep the kernel, the bias and the geometry, so
the two layers compute the same output; where the other library cannot represent a layer
exactly they raise a ``ValueError`` naming what is unsupported instead of converting wrongly.

What tensorly-torch 0.5 can represent, read from its forward pass: per-axis stride, zero
padding (one symmetric amount per axis) and dilation are applied faithfully by every
implementation when the layer is built with its constructor (its ``from_conv`` keeps only
``stride[0]``, a defect these functions avoid); it has no ``groups``, no ``padding_mode``, no
``'same'``/``'valid'`` strings and no asymmetric padding.

Mapping of the factors (one group):

* CP: tensorly-torch keeps a weight vector next to the factors of ``(out, in, k_1, ...)``;
  tt-conv absorbs it into the factors (balanced so every factor column has the same norm),
  and :func:`to_tltorch` writes a weight vector of ones. tensorly-torch's layer therefore has
  ``R`` more parameters.
* Tucker: tensorly-torch factorizes every mode, which is tt-conv's full Tucker form
  (rank ``(r_out, r_in, s_1, ..., s_d)``). A Tucker-2 layer (spatial modes kept whole) is
  written with identity spatial factors, exact but ``sum k_j ** 2`` parameters larger;
  ``from_tltorch(..., tucker_form="tucker2")`` multiplies the spatial factors into the core
  to get a Tucker-2 layer back.
* TT: both run the train over ``(in, k_1, ..., k_d, out)`` with boundary ranks 1; the cores
  are the same tensors.

Ranks larger than a kernel allows (tensorly-torch accepts any) are reduced exactly, by
orthogonal transformations that leave the kernel unchanged, to the ranks tt-conv would use.

Importing tensorly-torch switches TensorLy's backend to PyTorch for the whole program; these
functions import it lazily and put the previous backend back straight away, so using them
never changes ``tensorly.get_backend()``. tensorly-torch's own layers call TensorLy
functions that need the PyTorch backend: run them under
``with tensorly.backend_context("pytorch"):`` unless the backend is PyTorch already.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import decompose as _decompose
from .layers.base import FactorizedConv
from .layers.cp import CPConv, balance_cp
from .layers.tt import TTConv
from .layers.tucker import TuckerConv
from .rank import clip_tt_rank, clip_tucker_rank, max_cp_rank, tt_dims

__all__ = ["from_tltorch", "to_tltorch", "import_tltorch"]

TUCKER_FORMS = ("full", "tucker2")


# --------------------------------------------------------------------------- tensorly-torch import


@contextlib.contextmanager
def _tensorly_backend_preserved():
    """Restore TensorLy's backend exactly (global default and this thread's) on exit.

    TensorLy keeps the global backend on its ``BackendManager`` class and an optional
    per-thread override; ``tensorly.backend_context`` would restore the thread's backend as
    the global one, so both are saved and put back as they were.
    """
    from tensorly.backend import BackendManager as manager

    local = manager._THREAD_LOCAL_DATA.__dict__
    had_local = "backend" in local
    saved_local = local.get("backend")
    saved_global = manager._backend
    saved_default = manager._default_backend
    try:
        yield
    finally:
        manager._backend = saved_global
        manager._default_backend = saved_default
        if had_local:
            local["backend"] = saved_local
        else:
            local.pop("backend", None)


def import_tltorch():
    """Import and return the ``tltorch`` module without letting it switch TensorLy's backend.

    Raises
    ------
    ImportError
        If tensorly-torch is not installed.
    """
    with _tensorly_backend_preserved():
        try:
            import tltorch
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError(
                "tt_conv.interop needs tensorly-torch: pip install tensorly-torch "
                "(it is in tt-conv's 'test' extra)"
            ) from error
    return tltorch


# --------------------------------------------------------------------------- exact rank reduction


def _unfold(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    return tensor.movedim(mode, 0).reshape(tensor.shape[mode], -1)


def _fold(matrix: torch.Tensor, mode: int, shape: Sequence[int]) -> torch.Tensor:
    moved = [shape[mode]] + [n for i, n in enumerate(shape) if i != mode]
    return matrix.reshape(moved).movedim(0, mode)


def reduce_tucker(
    core: torch.Tensor, factors: List[Optional[torch.Tensor]]
) -> Tuple[torch.Tensor, List[Optional[torch.Tensor]]]:
    """Shrink Tucker ranks to what the tensor allows, leaving the tensor unchanged.

    A mode whose rank exceeds its dimension gets its factor multiplied into the core (the
    factor becomes the identity); a mode whose rank exceeds the product of the other core
    dimensions is cut to that product by a QR decomposition of the core's unfolding. The
    result has the ranks of :func:`tt_conv.rank.clip_tucker_rank`.

    Parameters
    ----------
    core : torch.Tensor
    factors : list of torch.Tensor or None
        ``(dim_i, rank_i)`` per mode; ``None`` marks a mode the core keeps whole.
    """
    factors = list(factors)
    changed = True
    while changed:
        changed = False
        for mode, factor in enumerate(factors):
            if factor is None:
                continue
            dim, rank = factor.shape
            if rank > dim:
                core = _fold(factor @ _unfold(core, mode), mode,
                             [dim if i == mode else n for i, n in enumerate(core.shape)])
                factors[mode] = torch.eye(dim, dtype=core.dtype, device=core.device)
                changed = True
                continue
            others = math.prod(core.shape) // core.shape[mode]
            if rank > others:
                q, r = torch.linalg.qr(_unfold(core, mode))  # (rank, others), (others, others)
                factors[mode] = factor @ q
                core = _fold(r, mode, [others if i == mode else n for i, n in enumerate(core.shape)])
                changed = True
    return core, factors


def reduce_tt(cores: List[torch.Tensor]) -> List[torch.Tensor]:
    """Shrink TT ranks to what TT-SVD can produce, leaving the tensor unchanged.

    A left-to-right sweep enforces ``r_{j+1} <= r_j n_j`` and a right-to-left sweep
    ``r_j <= n_j r_{j+1}`` (QR factorizations pushed into the neighbouring core), giving the
    ranks of :func:`tt_conv.rank.clip_tt_rank`. Cores are ``(r_j, n_j, r_{j+1})``.
    """
    cores = list(cores)
    for j in range(len(cores) - 1):
        r, n, r_next = cores[j].shape
        if r_next > r * n:
            q, rr = torch.linalg.qr(cores[j].reshape(r * n, r_next))  # (rn, rn), (rn, r_next)
            cores[j] = q.reshape(r, n, r * n)
            cores[j + 1] = torch.tensordot(rr, cores[j + 1], dims=1)
    for j in range(len(cores) - 1, 0, -1):
        r, n, r_next = cores[j].shape
        if r > n * r_next:
            q, rr = torch.linalg.qr(cores[j].reshape(r, n * r_next))  # (r, m), (m, m)
            cores[j] = rr.reshape(n * r_next, n, r_next)
            cores[j - 1] = torch.tensordot(cores[j - 1], q, dims=1)
    return cores


# --------------------------------------------------------------------------- tensorly-torch -> tt-conv


def _check_tensor_hooks(weight: nn.Module) -> None:
    """Warn about tensor dropout (identity at evaluation) and refuse other hooks."""
    from tltorch.tensor_hooks._tensor_dropout import TensorDropout

    hooks = list(weight._forward_hooks.values()) + list(weight._forward_pre_hooks.values())
    dropout = [h for h in hooks if isinstance(h, TensorDropout)]
    others = [h for h in hooks if not isinstance(h, TensorDropout)]
    if others:
        names = ", ".join(sorted({type(h).__name__ for h in others}))
        raise ValueError(
            f"the tensorly-torch layer's weight has forward hooks ({names}) that change the "
            f"kernel it computes; tt-conv cannot carry them over. Remove them first (e.g. "
            f"tltorch.remove_tensor_lasso) once their effect is folded into the factors"
        )
    if dropout:
        warnings.warn(
            "tensor dropout on the tensorly-torch layer is not carried over; the converted "
            "layer matches it in evaluation mode",
            UserWarning,
            stacklevel=3,
        )


def _tltorch_geometry(layer) -> dict:
    order = layer.order
    as_ints = lambda array: tuple(int(v) for v in list(array))  # noqa: E731
    return dict(stride=as_ints(layer.stride), padding=as_ints(layer.padding),
                dilation=as_ints(layer.dilation), n_dim=order)


def from_tltorch(
    layer: nn.Module,
    implementation: Optional[str] = None,
    tucker_form: str = "full",
) -> FactorizedConv:
    """Convert a tensorly-torch ``FactorizedConv`` into a tt-conv layer.

    Parameters
    ----------
    layer : tltorch.FactorizedConv
        A single convolution (``n_layers=1``) factorized as CP, Tucker or TT.
    implementation : {None, "auto", "factorized", "reconstructed"}
        How the new layer runs; ``None`` keeps the tensorly-torch layer's choice
        (``"mobilenet"``, its other CP chain, becomes ``"factorized"``).
    tucker_form : {"full", "tucker2"}
        For Tucker layers: ``"full"`` keeps every factor (tt-conv's full Tucker rank, the
        same parameters); ``"tucker2"`` multiplies the spatial factors into the core, giving
        tt-conv's Tucker-2 form (exact; the inverse of :func:`to_tltorch` on a Tucker-2
        layer).

    Returns
    -------
    CPConv, TuckerConv or TTConv
        Same kernel, bias, stride, padding and dilation; on the layer's device, in its dtype.
        CP weights are absorbed into the factors; ranks beyond what the kernel allows are
        reduced exactly (a CP rank beyond :func:`tt_conv.rank.max_cp_rank` is replaced by the
        exact CP decomposition of the kernel at that rank).

    Raises
    ------
    TypeError
        If ``layer`` is not a tensorly-torch ``FactorizedConv``, or its weight is dense or
        complex.
    ValueError
        If it parametrizes several convolutions (``n_layers > 1``), its weight carries
        hooks other than tensor dropout, or an argument is invalid.
    """
    tltorch = import_tltorch()
    if not isinstance(layer, tltorch.FactorizedConv):
        raise TypeError(
            f"layer must be a tltorch.FactorizedConv, got {type(layer).__name__}"
        )
    if tucker_form not in TUCKER_FORMS:
        raise ValueError(f"tucker_form must be one of {TUCKER_FORMS}, got {tucker_form!r}")
    if layer.layers_shape != ():
        raise ValueError(
            f"the tensorly-torch layer parametrizes several convolutions jointly "
            f"(n_layers={layer.n_layers}); only n_layers=1 converts to a tt-conv layer"
        )
    weight = layer.weight
    if not isinstance(weight, (tltorch.CPTensor, tltorch.TuckerTensor, tltorch.TTTensor)):
        raise TypeError(
            f"only CP, Tucker and TT tensorly-torch convolutions convert, got a weight of type "
            f"{type(weight).__name__}"
        )
    tensors = list(weight.parameters()) + list(weight.buffers())
    if any(t.is_complex() for t in tensors):
        raise TypeError("complex tensorly-torch convolutions are not supported")
    _check_tensor_hooks(weight)

    if implementation is None:
        implementation = "reconstructed" if layer.implementation == "reconstructed" else "factorized"
    geometry = _tltorch_geometry(layer)
    bias = layer.bias
    reference = tensors[0]
    factory = dict(device=reference.device, dtype=reference.dtype)
    common = dict(bias=bias is not None, implementation=implementation, **geometry, **factory)

    if isinstance(weight, tltorch.CPTensor):
        new, values = _cp_from_tltorch(weight, common)
    elif isinstance(weight, tltorch.TuckerTensor):
        new, values = _tucker_from_tltorch(weight, common, tucker_form)
    else:
        new, values = _tt_from_tltorch(weight, common)

    with torch.no_grad():
        for target, value in zip(new._factor_tensors(), values):
            target.copy_(value.reshape(target.shape))
        if bias is not None:
            new.bias.copy_(bias.reshape(new.bias.shape))
    return new


def _work(tensor: torch.Tensor) -> torch.Tensor:
    """Factors are transformed in float64, then cast to the layer's dtype by ``copy_``."""
    return tensor.detach().to(torch.float64)


def _cp_from_tltorch(weight, common: dict):
    out_c, in_c, *kernel_size = weight.shape
    dims = tuple(weight.shape)
    cp_weights = _work(weight.weights)
    factors = [_work(f) for f in weight.factors]
    rank = int(cp_weights.shape[0])
    if rank > max_cp_rank(dims):
        kernel = torch.einsum("r,...r->...", cp_weights, _khatri_rao_outer(factors))
        cp_weights, factors = _decompose.exact_cp(kernel)
        rank = max_cp_rank(dims)
    layer = CPConv(in_c, out_c, tuple(kernel_size), rank=rank, **common)
    _check_rank(layer, (rank,))
    balanced = balance_cp(cp_weights, factors)
    return layer, [f.unsqueeze(0) for f in balanced]


def _khatri_rao_outer(factors: List[torch.Tensor]) -> torch.Tensor:
    """``(dim_1, ..., dim_n, R)``: the rank-one terms of a CP decomposition, stacked."""
    out = factors[0]
    for factor in factors[1:]:
        out = out.unsqueeze(-2) * factor.reshape((1,) * (out.dim() - 1) + tuple(factor.shape))
    return out


def _tucker_from_tltorch(weight, common: dict, tucker_form: str):
    out_c, in_c, *kernel_size = weight.shape
    dims = tuple(weight.shape)
    core = _work(weight.core)
    factors: List[Optional[torch.Tensor]] = [_work(f) for f in weight.factors]
    if tucker_form == "tucker2":
        for axis in range(2, len(dims)):
            spatial = factors[axis]
            core = _fold(spatial @ _unfold(core, axis), axis,
                         [spatial.shape[0] if i == axis else n for i, n in enumerate(core.shape)])
            factors[axis] = None
    core, factors = reduce_tucker(core, factors)
    rank = tuple(f.shape[1] for f in factors if f is not None)
    layer = TuckerConv(in_c, out_c, tuple(kernel_size), rank=rank, **common)
    _check_rank(layer, clip_tucker_rank(dims, rank))
    values = [core.unsqueeze(0)] + [f.unsqueeze(0) for f in factors if f is not None]
    return layer, values


def _tt_from_tltorch(weight, common: dict):
    *_, out_c = weight.shape
    in_c, *kernel_size = weight.shape[:-1]
    cores = reduce_tt([_work(c) for c in weight.factors])
    rank = tuple(int(c.shape[0]) for c in cores[1:])
    layer = TTConv(in_c, out_c, tuple(kernel_size), rank=rank, **common)
    _check_rank(layer, clip_tt_rank(tt_dims(layer.group_kernel_shape), rank))
    values = [cores[0][0]] + cores[1:-1] + [cores[-1][..., 0]]
    return layer, [v.unsqueeze(0) for v in values]


def _check_rank(layer: FactorizedConv, expected: Sequence[int]) -> None:
    if tuple(layer.rank) != tuple(expected):  # pragma: no cover - guarded by the reductions
        raise RuntimeError(
            f"internal error: converted ranks {tuple(expected)} became {tuple(layer.rank)}"
        )


# --------------------------------------------------------------------------- tt-conv -> tensorly-torch


def _tltorch_padding(layer: FactorizedConv) -> Tuple[int, ...]:
    """Symmetric per-axis zero padding, or a ValueError naming what tensorly-torch lacks."""
    if layer.padding_mode != "zeros":
        raise ValueError(
            f"tensorly-torch's FactorizedConv only pads with zeros; this layer has "
            f"padding_mode={layer.padding_mode!r}"
        )
    pairs = layer._pad_pairs
    if any(before != after for before, after in pairs):
        raise ValueError(
            f"tensorly-torch's FactorizedConv only pads symmetrically; this layer's "
            f"padding={layer.padding!r} pads (before, after) = {tuple(pairs)} per axis"
        )
    return tuple(before for before, _ in pairs)


def to_tltorch(layer: FactorizedConv, implementation: Optional[str] = None):
    """Convert a tt-conv layer into a tensorly-torch ``FactorizedConv`` with the same factors.

    Parameters
    ----------
    layer : CPConv, TuckerConv or TTConv
    implementation : {None, "factorized", "reconstructed"}
        tensorly-torch's execution; ``None`` follows the layer's.

    Returns
    -------
    tltorch.FactorizedConv
        Built with tensorly-torch's constructor (so its ``state_dict`` loads into a layer
        built with the same arguments), on the layer's device and in its dtype; CP gets a
        weight vector of ones, a Tucker-2 layer identity spatial factors. Run it under
        ``tensorly.backend_context("pytorch")`` unless TensorLy's backend is PyTorch.

    Raises
    ------
    TypeError
        If ``layer`` is not a tt-conv factorized convolution.
    ValueError
        For what tensorly-torch cannot represent: ``groups > 1``, a ``padding_mode`` other
        than ``"zeros"``, asymmetric padding (e.g. ``"same"`` with an even kernel).
    """
    if not isinstance(layer, (CPConv, TuckerConv, TTConv)):
        raise TypeError(
            f"layer must be a tt_conv CPConv, TuckerConv or TTConv, got {type(layer).__name__}"
        )
    if implementation is None:
        implementation = layer.implementation
    if implementation not in ("factorized", "reconstructed"):
        raise ValueError(
            f"implementation must be None, 'factorized' or 'reconstructed', got "
            f"{implementation!r}"
        )
    if layer.groups != 1:
        raise ValueError(
            f"tensorly-torch's FactorizedConv has no groups; this layer has "
            f"groups={layer.groups}"
        )
    padding = _tltorch_padding(layer)
    tltorch = import_tltorch()
    reference = next(layer.parameters())
    factory = dict(device=reference.device, dtype=reference.dtype)

    with torch.no_grad():
        if isinstance(layer, CPConv):
            (rank,) = layer.rank
            tensor = tltorch.CPTensor(
                nn.Parameter(torch.ones(rank, **factory)),
                [_param(layer.out_factor[0]), _param(layer.in_factor[0]),
                 *(_param(f[0]) for f in layer.spatial_factors)],
            )
            name, tl_rank = "cp", rank
        elif isinstance(layer, TuckerConv):
            if layer.full_tucker:
                spatial = [_param(f[0]) for f in layer.spatial_factors]
            else:
                spatial = [nn.Parameter(torch.eye(k, **factory)) for k in layer.kernel_size]
            tensor = tltorch.TuckerTensor(
                _param(layer.core_tensor()[0]),
                [_param(layer.out_factor[0]), _param(layer.in_factor[0]), *spatial],
            )
            name, tl_rank = "tucker", tuple(tensor.rank)
        else:
            natural = layer.tt_cores()  # (groups, r_j, n_j, r_{j+1})
            cores = [c[0] for c in natural]
            tensor = tltorch.TTTensor([_param(c) for c in cores])
            name, tl_rank = "tt", list(tensor.rank)

    new = tltorch.FactorizedConv(
        layer.in_channels, layer.out_channels, layer.kernel_size, order=layer.n_dim,
        stride=layer.stride, padding=padding, dilation=layer.dilation,
        bias=layer.bias is not None, factorization=name, rank=tl_rank,
        implementation=implementation, **factory,
    )
    # Replace the uninitialised factors the constructor made with ours (same shapes and
    # types, so the forward function it chose still applies).
    new.weight = tensor
    new.rank = tensor.rank
    if layer.bias is not None:
        with torch.no_grad():
            new.bias.copy_(layer.bias)
    return new


def _param(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor.detach().clone().contiguous())
