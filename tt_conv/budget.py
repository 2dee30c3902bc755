"""Budgets that need the layers: parameter and FLOP costs of factorized convolutions.

:mod:`tt_conv.rank` chooses ranks from a kernel alone; this module prices them on a
convolution (its geometry, its input size) and solves for the ranks that fit a budget:

* :func:`dense_flops` and :func:`factorized_flops`: FLOPs of a convolution, dense or
  factorized at given ranks, as :mod:`torch.utils.flop_counter` counts them;
* :func:`layer_cost`: what a layer costs at given ranks, in parameters or FLOPs;
* :func:`layer_budget_rank`: the largest ranks keeping a conv within a fraction of its
  parameters or FLOPs (exact integer search, never over budget);
* :func:`shared_energy_allocation`: a whole-network budget spread by one energy threshold
  shared by every layer, the largest that fits;
* :func:`measure_seconds`, :func:`conv_latency` and :func:`measured_implementation`: the
  measured time of a convolution's forward pass on the actual device and input shape, dense
  or factorized at given ranks (cached), which the ``"latency"`` budget and the measured
  execution choice of :func:`tt_conv.compress` use.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ._checks import check_factorization, check_fraction, check_min_rank, check_multiple_of
from ._geometry import conv_flops, output_size, padding_pairs
from .layers import FactorizedConv
from .layers.base import conv_geometry, has_unit_spatial_axis
from .rank import (
    budget_rank,
    group_dims,
    max_cp_rank,
    n_factor_parameters,
    ranks_from_spectra,
    ranks_within,
    resolve_rank,
    next_rounded_rank,
    rounded_ranks,
    tail_rank,
    unfolding_spectra,
)

METRICS = ("params", "flops", "latency")


def factorized_flops(conv, factorization: str, ranks, input_shape) -> int:
    """FLOPs of ``conv`` factorized at ``ranks``, run factorized, on ``input_shape``.

    Counted as :meth:`tt_conv.FactorizedConv.flops` counts them, on a parameter-free copy of
    the layer's geometry (the meta device), so no decomposition runs.
    """
    geometry, kernel, bias = conv_geometry(conv)
    layer = FactorizedConv.class_for(factorization)(
        **geometry, bias=bias is not None, rank=tuple(ranks), implementation="factorized",
        device="meta", dtype=kernel.dtype,
    )
    return layer.flops(input_shape, "factorized")


def dense_flops(conv, input_shape) -> int:
    """FLOPs of the plain convolution ``conv`` on ``input_shape`` (flop_counter's count)."""
    shape = tuple(int(s) for s in input_shape)
    n_dim = len(conv.kernel_size)
    if len(shape) == n_dim + 1:
        shape = (1, *shape)
    if len(shape) != n_dim + 2 or shape[1] != conv.in_channels:
        raise ValueError(
            f"input_shape must be (batch, {conv.in_channels}, *{n_dim} spatial sizes) for this "
            f"convolution, got {tuple(input_shape)}"
        )
    pads = padding_pairs(conv.padding, tuple(conv.kernel_size), tuple(conv.stride),
                         tuple(conv.dilation))
    out = output_size(shape[2:], pads, conv.kernel_size, conv.stride, conv.dilation)
    return conv_flops(shape[0], conv.out_channels, conv.in_channels // conv.groups,
                      conv.kernel_size, out)


def layer_cost(conv, factorization: str, ranks, metric: str = "params",
               input_shape: Optional[Sequence[int]] = None):
    """What ``conv`` factorized at ``ranks`` costs: parameters (factors of every group and
    the bias), FLOPs on ``input_shape`` (run factorized) or the measured seconds of a
    forward pass on ``input_shape`` (:func:`conv_latency`, run factorized: the other
    execution, a convolution with the reconstructed kernel, is never faster than dense)."""
    if metric == "flops":
        return factorized_flops(conv, factorization, ranks, input_shape)
    if metric == "latency":
        return conv_latency(conv, factorization, ranks, input_shape, "factorized")
    _, kernel, bias = conv_geometry(conv)
    factors = n_factor_parameters(factorization, group_dims(kernel, conv.groups), ranks)
    return conv.groups * factors + (0 if bias is None else bias.numel())


def layer_budget_rank(
    conv,
    factorization: str,
    fraction: float,
    *,
    metric: str = "params",
    input_shape: Optional[Sequence[int]] = None,
) -> Tuple[int, ...]:
    """The largest ranks keeping ``conv`` within a fraction of its parameters or FLOPs.

    Parameters
    ----------
    conv : nn.Conv1d, nn.Conv2d, nn.Conv3d or FactorizedConv
    factorization : {"cp", "tucker", "tt"}
    fraction : float in (0, 1]
        Of the dense kernel's parameters (``metric="params"``, biases excluded as they are
        kept), or of the dense convolution's FLOPs on ``input_shape`` (``metric="flops"``,
        for the factorized execution).
    metric : {"params", "flops"}
    input_shape : tuple of int
        ``(batch, channels, *spatial)``; required for ``metric="flops"``.

    Returns
    -------
    tuple of int
        Ranks in the factorization's convention (:func:`tt_conv.rank.budget_rank`'s family:
        one CP rank, Tucker-2 channel ranks in proportion to their limits, one shared TT
        rank), found by exact integer search; the budget is never exceeded.

    Raises
    ------
    ValueError
        If even rank 1 is over budget, naming the budget and what rank 1 needs.
    """
    factorization = check_factorization(factorization)
    check_fraction(fraction, "fraction")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    geometry, kernel, _ = conv_geometry(conv)
    dims = group_dims(kernel, geometry["groups"])
    if metric == "params":
        return budget_rank(factorization, dims, fraction * math.prod(dims))
    if input_shape is None:
        raise ValueError("metric='flops' needs input_shape, the conv's (batch, channels, *spatial)")
    budget = fraction * dense_flops(conv, input_shape)

    def cost(ranks):
        return factorized_flops(conv, factorization, ranks, input_shape)

    return ranks_within(
        factorization, dims, cost, budget,
        budget_text=f"FLOP budget of {fraction:g} x {budget / fraction:.4g} = {budget:.4g}",
        unit="FLOPs",
        subject=f"a kernel of shape {tuple(kernel.shape)} on input {tuple(input_shape)}")


# --------------------------------------------------------------------------- global budgets


@dataclass
class GlobalLayer:
    """One convolution under a whole-network budget (see :func:`shared_energy_allocation`).

    Attributes
    ----------
    name : str
    conv : nn.Module
        The (plain) convolution; its geometry prices the ranks.
    factorization : {"cp", "tucker", "tt"}
        Whose ranks set the layer's share.
    kernel : torch.Tensor
        The kernel the spectra come from (the data-weighted one under data fitting).
    dense_cost : int
        Parameters (kernel and bias) or FLOPs of the dense layer.
    input_shape : tuple of int, optional
        Needed for FLOP budgets.
    """

    name: str
    conv: torch.nn.Module
    factorization: str
    kernel: torch.Tensor
    dense_cost: int
    input_shape: Optional[Tuple[int, ...]] = None


@dataclass(frozen=True)
class Allocation:
    """A layer's share of a global budget: its ranks (None: left dense) and their cost."""

    factorization: str
    ranks: Optional[Tuple[int, ...]]
    cost: int


class InfeasibleBudget(ValueError):
    """A global budget below what the smallest ranks allow.

    ``floor`` says that least cost in words (``"what rank 1 everywhere allows (8.2 ms, of
    which 28 layers that cannot shrink keep 6.1 ms)"``), for callers that state the budget
    in other terms (a latency budget's whole-model target).
    """

    def __init__(self, message: str, floor: str):
        super().__init__(message)
        self.floor = floor


def shared_energy_allocation(
    layers: Sequence[GlobalLayer], fraction: float, metric: str = "params", min_rank: int = 1,
    multiple_of: Union[int, str] = 1,
) -> Tuple[float, Dict[str, Allocation]]:
    """The largest energy fraction ``e`` shared by all layers keeping their total cost within
    ``fraction`` of their dense cost, found by bisection, and each layer's allocation.

    A layer's cost at ``e`` is that of its factorization at the smallest ranks keeping ``e``
    of every relevant unfolding's energy, or its dense cost when that would not shrink it
    (then its ranks are None): what layers that cannot shrink (depthwise, tiny) do not give
    is taken from the others, and the total never exceeds the target.

    With ``multiple_of`` other than 1 (an int, or ``"auto"``: see
    :func:`tt_conv.rank.hardware_multiple`) each layer's ranks at ``e`` are rounded to the
    nearest multiple (:func:`tt_conv.rank.rounded_ranks`, at least ``min_rank``), unless the
    rounded ones would not shrink the layer; the bisection then spreads the budget over
    rounded ranks, so the total still never exceeds the target. CP ranks grown into budget
    left over (below) are not rounded.

    Raises
    ------
    ValueError
        If even rank ``min_rank`` everywhere is over the target.
    """
    check_fraction(fraction, "fraction")
    check_min_rank(min_rank)
    check_multiple_of(multiple_of)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    target = fraction * sum(layer.dense_cost for layer in layers)
    prepared = []
    for layer in layers:
        spectra = unfolding_spectra(layer.factorization, layer.kernel, layer.conv.groups)
        prepared.append((layer, spectra, group_dims(layer.kernel, layer.conv.groups)))
    costs: Dict[Tuple[int, Tuple[int, ...]], int] = {}

    def price(i, layer, ranks):
        if (i, ranks) not in costs:
            costs[i, ranks] = layer_cost(layer.conv, layer.factorization, ranks, metric,
                                         layer.input_shape)
        return costs[i, ranks]

    def allocation(energy) -> Tuple[int, Dict[str, Allocation]]:
        total, chosen = 0, {}
        for i, (layer, spectra, dims) in enumerate(prepared):
            def rank_of(s, _u):
                tail = (1.0 - energy) * float((s.astype(float) ** 2).sum())
                return max(min_rank, tail_rank(s, tail))

            ranks = ranks_from_spectra(layer.factorization, dims, spectra, rank_of)
            if multiple_of != 1:
                rounded = rounded_ranks(layer.factorization, dims,
                                        [max(min_rank, r) for r in ranks], multiple_of)
                if price(i, layer, rounded) < layer.dense_cost:
                    ranks = rounded
            cost = price(i, layer, ranks)
            if cost >= layer.dense_cost:
                total += layer.dense_cost
                chosen[layer.name] = Allocation(layer.factorization, None, layer.dense_cost)
            else:
                total += cost
                chosen[layer.name] = Allocation(layer.factorization, ranks, cost)
        return total, chosen

    low_total, low_choice = allocation(0.0)
    if low_total > target:
        dense = [name for name, a in low_choice.items() if a.ranks is None]
        def amount(value) -> str:  # seconds are shown in ms, counts as counts
            return f"{value * 1e3:.4g} ms" if metric == "latency" else f"{value:,.0f}"

        # "auto" leaves ranks below 12 as they are: its floor is rank min_rank itself.
        rounding = ("" if multiple_of in (1, "auto") else
                    f" rounded to multiples ('multiple_of': {multiple_of!r}; 1 keeps them exact)")
        floor = (f"what rank {min_rank} everywhere{rounding} allows ({amount(low_total)}"
                 + (f", of which {len(dense)} "
                    + ("layer that cannot shrink keeps " if len(dense) == 1 else
                       "layers that cannot shrink keep ")
                    + amount(sum(low_choice[n].cost for n in dense)) if dense else "") + ")")
        raise InfeasibleBudget(
            f"rank: a global {metric} target of {fraction:g} x {amount(target / fraction)} = "
            f"{amount(target)} is below {floor}; raise the fraction or exclude small layers",
            floor)
    total, choice = allocation(1.0)
    if total <= target:
        # Every unfolding whole and budget left: CP ranks, which the spectra cap at the
        # unfoldings' ranks (a 512 x 256 x 64 kernel's at 512), may still grow.
        return 1.0, _grown_cp(prepared, choice, target, metric)
    best = (0.0, low_choice)
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        total, choice = allocation(mid)
        if total <= target:
            lo, best = mid, (mid, choice)
        else:
            hi = mid
    if multiple_of != 1 and metric != "latency":
        best = best[0], _filled(prepared, best[1], target, multiple_of, price)
    return best


def _filled(prepared, choice: Dict[str, Allocation], target: float,
            multiple_of: Union[int, str], price) -> Dict[str, Allocation]:
    """``choice`` with what rounding left of the budget spent, as the shared threshold
    would: one rank at a time raised to its next rounded value, always the one whose
    unfolding keeps the least of its energy, while the total fits ``target``.

    Rounded ranks move in steps of 8 or 16, so with few layers the threshold alone can stop
    well short of the target. Parameter and FLOP budgets only: a latency would be measured
    for every trial.
    """
    choice = dict(choice)
    total = sum(a.cost for a in choice.values())
    # kept_energy[i][g][v][r]: the fraction of unfolding v's energy (group g, layer i) that
    # its first r singular values hold, once for the whole fill.
    kept_energy = []
    for _, spectra, _ in prepared:
        layer_kept = []
        for group in spectra:
            fractions = []
            for values in group:
                squares = np.concatenate([[0.0], np.cumsum(values.astype(float) ** 2)])
                fractions.append(squares / (squares[-1] or 1.0))
            layer_kept.append(fractions)
        kept_energy.append(layer_kept)

    def kept(i, factorization, u, rank):
        """The least fraction of energy the unfoldings that rank ``u`` sets keep."""
        groups = kept_energy[i]
        unfoldings = range(len(groups[0])) if factorization == "cp" else (u,)
        return min(float(g[v][min(rank, len(g[v]) - 1)]) for g in groups for v in unfoldings)

    while True:
        best = None
        for i, (layer, _, dims) in enumerate(prepared):
            held = choice[layer.name]
            if held.ranks is None:
                continue
            for u, r in enumerate(held.ranks):
                raised = list(held.ranks)
                raised[u] = next_rounded_rank(r, multiple_of)
                ranks = rounded_ranks(layer.factorization, dims, raised, 1)
                now = kept(i, layer.factorization, u, r)
                if (ranks == held.ranks or (best is not None and now >= best[0])
                        or kept(i, layer.factorization, u, ranks[u]) <= now):
                    continue
                cost = price(i, layer, ranks)
                if cost < layer.dense_cost and total - held.cost + cost <= target:
                    best = (now, layer.name, Allocation(layer.factorization, ranks, cost))
        if best is None:
            return choice
        _, name, allocation = best
        total += allocation.cost - choice[name].cost
        choice[name] = allocation


def _grown_cp(prepared, choice: Dict[str, Allocation], target: float,
              metric: str) -> Dict[str, Allocation]:
    """``choice`` with its CP ranks scaled up by one common factor, the largest that keeps
    the total within ``target``; each rank at most the kernel's exact CP rank and below its
    dense cost. Parameter and FLOP budgets only: their costs are formulas, while a latency
    would be measured for every trial rank."""
    if metric == "latency":
        return choice
    growing = []
    for layer, _, dims in prepared:
        allocated = choice[layer.name]
        if layer.factorization != "cp" or allocated.ranks is None:
            continue

        def cost(rank, layer=layer):
            return layer_cost(layer.conv, "cp", (rank,), metric, layer.input_shape)

        # The largest rank still cheaper than dense (costs grow with the rank).
        low, high = allocated.ranks[0], max_cp_rank(dims)
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if cost(mid) < layer.dense_cost else (low, mid - 1)
        if low > allocated.ranks[0]:
            growing.append((layer.name, allocated.ranks[0], low, cost))
    if not growing:
        return choice
    fixed = sum(a.cost for name, a in choice.items() if name not in {g[0] for g in growing})

    def grown(factor):
        ranks = {name: min(cap, max(start, math.floor(start * factor)))
                 for name, start, cap, _ in growing}
        return ranks, fixed + sum(cost(ranks[name]) for name, _, _, cost in growing)

    low, high = 1.0, max(cap / start for _, start, cap, _ in growing)
    if grown(high)[1] <= target:
        low = high
    else:
        for _ in range(40):
            mid = 0.5 * (low + high)
            low, high = (mid, high) if grown(mid)[1] <= target else (low, mid)
    ranks, _ = grown(low)
    result = dict(choice)
    for name, _, _, cost in growing:
        result[name] = Allocation("cp", (ranks[name],), cost(ranks[name]))
    return result


def unshrinkable_reason(conv, factorization: str, fraction: float) -> Optional[str]:
    """Why ``conv`` cannot keep ``fraction`` of its parameters as a ``factorization``, or None.

    The reasons users meet: a depthwise convolution (one input and one output channel per
    group: only its spatial modes could be factorized), a single input or output channel,
    or a kernel so small that rank 1 already needs more than the budget.
    """
    _, kernel, _ = conv_geometry(conv)
    dims = group_dims(kernel, conv.groups)
    budget = fraction * math.prod(dims)
    smallest = n_factor_parameters(factorization, dims, resolve_rank(factorization, dims, 1))
    if smallest <= budget and smallest < math.prod(dims):
        return None
    shape = "x".join(map(str, dims))
    if dims[0] == dims[1] == 1 and conv.groups > 1:
        what = f"depthwise ({conv.groups} groups of one channel; each group's kernel is {shape})"
    elif dims[0] == 1 or dims[1] == 1:
        what = f"{'one input' if dims[1] == 1 else 'one output'} channel per group (kernel {shape})"
    else:
        what = f"small kernel ({shape} per group)"
    return (f"{what}: {factorization} at rank 1 needs {smallest:,} parameters per group, over "
            f"its budget of {budget:,.1f} of {math.prod(dims):,}")


# --------------------------------------------------------------------------- latency


#: Autocast dtypes a model may be timed under, by name.
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                   "fp16": torch.float16, "float16": torch.float16}

#: The autocast dtype every measurement of this context runs under (None: the model's own
#: dtype); set by :func:`timed_under_autocast`.
_TIMING_AUTOCAST: ContextVar[Optional[torch.dtype]] = ContextVar("tt_conv_timing_autocast",
                                                                default=None)


def check_autocast(value: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    """``None`` (time in the model's dtype), or the autocast dtype named by ``value``
    (``"bf16"``, ``"fp16"``, ``torch.bfloat16``, ``torch.float16``)."""
    if value is None or value in ("fp32", "float32"):
        return None
    if isinstance(value, torch.dtype) and value in AUTOCAST_DTYPES.values():
        return value
    if isinstance(value, str) and value.lower() in AUTOCAST_DTYPES:
        return AUTOCAST_DTYPES[value.lower()]
    raise ValueError(f"autocast must be None, 'fp32', 'bf16' or 'fp16' (or torch.bfloat16 / "
                     f"torch.float16), got {value!r}")


@contextlib.contextmanager
def timed_under_autocast(dtype: Optional[torch.dtype]) -> Iterator[None]:
    """Within the block, :func:`measure_seconds` (and so every measured latency) runs the
    module under ``torch.autocast`` of ``dtype`` on its inputs' device (``None``: as is)."""
    token = _TIMING_AUTOCAST.set(check_autocast(dtype))
    try:
        yield
    finally:
        _TIMING_AUTOCAST.reset(token)


def measure_seconds(module: torch.nn.Module, example, *, min_seconds: float = 0.005,
                    rounds: int = 3) -> float:
    """Seconds of one forward pass of ``module(example)`` in inference mode, measured.

    ``example`` is a tensor or a tuple of tensors (the positional inputs). After a warm-up
    pass, each of ``rounds`` rounds runs enough passes to last about ``min_seconds`` and the
    least mean per pass is kept (the least is the least disturbed by other work on the
    machine). CUDA work is synchronised around each round. The module runs in evaluation
    mode (batch norms use their running statistics and are not updated); its own mode is
    restored afterwards. Inside :func:`timed_under_autocast` it runs under that autocast.
    """
    return measure_side_by_side([module], example, min_seconds=min_seconds, rounds=rounds)[0]


def measure_side_by_side(modules: Sequence[torch.nn.Module], example, *,
                         min_seconds: float = 0.005, rounds: int = 3) -> List[float]:
    """:func:`measure_seconds` of several modules on the same inputs, their rounds
    interleaved (first, second, ..., first, second, ...), so that the machine's drift and
    the state of the process's heap weigh on each alike; the least per module."""
    inputs = example if isinstance(example, tuple) else (example,)
    cuda = any(t.is_cuda for t in inputs)
    dtype = _TIMING_AUTOCAST.get()
    autocast = (contextlib.nullcontext() if dtype is None else
                torch.autocast(inputs[0].device.type, dtype=dtype))

    def sync():
        if cuda:
            torch.cuda.synchronize()

    modes = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        with torch.inference_mode(), autocast:
            passes = []
            for module in modules:
                module(*inputs)
                sync()
                start = time.perf_counter()
                module(*inputs)
                sync()
                once = max(time.perf_counter() - start, 1e-7)
                passes.append(max(1, math.ceil(min_seconds / once)))
            best = [math.inf] * len(modules)
            for _ in range(rounds):
                for i, module in enumerate(modules):
                    start = time.perf_counter()
                    for _ in range(passes[i]):
                        module(*inputs)
                    sync()
                    best[i] = min(best[i], (time.perf_counter() - start) / passes[i])
    finally:
        for m, training in modes:
            m.training = training
    return best


def timed_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the layout every latency is measured in: channels-last for 4-D/5-D tensors
    without a unit spatial axis (what ``.to(memory_format=torch.channels_last)`` gives a
    model; NCHW convolutions are slower, several times so under bf16 on CPUs without AMX),
    else as is."""
    if not has_unit_spatial_axis(x):
        if x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        if x.dim() == 5:
            return x.contiguous(memory_format=torch.channels_last_3d)
    return x


def example_input(input_shape: Sequence[int], device, dtype) -> torch.Tensor:
    """A random input of ``input_shape`` in the measured layout (:func:`timed_layout`)."""
    return timed_layout(torch.randn(tuple(int(s) for s in input_shape), device=device,
                                    dtype=dtype))


def measure_model_seconds(model: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> float:
    """:func:`measure_seconds` of a whole model in the layout its layers are measured in.

    A copy of ``model`` with its 4-D/5-D parameters and buffers channels-last runs on the
    inputs in :func:`timed_layout`, so the model's time and its layers' times (measured one
    by one on :func:`example_input`) describe the same computation; ``model`` is untouched.
    """
    return measure_models_side_by_side([model], inputs)[0]


def measure_models_side_by_side(models: Sequence[torch.nn.Module],
                                inputs: Sequence[torch.Tensor]) -> List[float]:
    """:func:`measure_model_seconds` of several models, measured in interleaved rounds
    (:func:`measure_side_by_side`): a compressed model against the dense one, both in the
    same minute and the same state of the process's heap."""
    clones = [copy.deepcopy(model) for model in models]
    with torch.no_grad():
        for clone in clones:
            for tensor in itertools.chain(clone.parameters(), clone.buffers()):
                tensor.data = timed_layout(tensor.data)
    # More and longer rounds than one layer gets: the model's time decides whether a latency
    # budget held, and on a shared 2-core machine three single passes of a 30 ms model
    # scattered by a quarter from one measurement to the next.
    return measure_side_by_side(clones, tuple(timed_layout(x) if isinstance(x, torch.Tensor)
                                              else x for x in inputs),
                                min_seconds=0.05, rounds=5)


#: Measured seconds by everything they depend on (geometry, ranks, execution, input shape,
#: device, dtype, autocast, thread count): ResNet blocks repeat shapes, and budgets ask again.
_LATENCY_CACHE: Dict[tuple, float] = {}


def forget_latencies() -> None:
    """Drop every cached :func:`conv_latency`. :func:`tt_conv.compress` does so first: a
    latency budget sets the dense model's time, measured then, against its layers' times,
    and on a machine whose speed drifts from minute to minute (a shared one) layer times
    kept from an earlier call would make the rest of the model look larger or smaller
    than it is."""
    _LATENCY_CACHE.clear()


def _geometry_key(geometry: dict) -> tuple:
    return tuple(sorted((k, v if not isinstance(v, list) else tuple(v))
                        for k, v in geometry.items()))


def conv_latency(conv, factorization: Optional[str], ranks, input_shape: Sequence[int],
                 implementation: Optional[str] = None) -> float:
    """Measured seconds of one forward pass of ``conv``'s geometry on ``input_shape``.

    Dense (``factorization=None``) or factorized at ``ranks``, on ``conv``'s device and in its
    dtype (under the autocast of :func:`timed_under_autocast`, if any), in inference mode,
    channels-last (see :func:`example_input`). The weights are
    random: the time does not depend on their values, so no decomposition runs. A factorized
    layer is timed both ways (factorized chain, and one convolution with the reconstructed
    kernel) and the faster counts, unless ``implementation`` names one. Cached.
    """
    geometry, kernel, bias = conv_geometry(conv)
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == kernel.dim() - 1:
        shape = (1, *shape)
    if factorization is not None:
        factorization = check_factorization(factorization)
        if implementation is None:
            return min(conv_latency(conv, factorization, ranks, shape, choice)
                       for choice in ("factorized", "reconstructed"))
    key = (factorization, _geometry_key(geometry), bias is not None,
           None if ranks is None else tuple(ranks), implementation, shape,
           str(kernel.device), kernel.dtype, _TIMING_AUTOCAST.get(), torch.get_num_threads())
    if key not in _LATENCY_CACHE:
        options = dict(device=kernel.device, dtype=kernel.dtype)
        if factorization is None:
            module = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)[kernel.dim() - 3](
                **geometry, bias=bias is not None, **options)
        else:
            module = FactorizedConv.shaped_like(conv, factorization, rank=tuple(ranks),
                                                implementation=implementation)
        # Under autocast a layer inside the model receives activations already cast (the
        # layer before returned them in the autocast dtype): timing it on float32 inputs
        # would count a cast of its input that the model does not run.
        input_dtype = _TIMING_AUTOCAST.get() or kernel.dtype
        _LATENCY_CACHE[key] = measure_seconds(module,
                                              example_input(shape, kernel.device, input_dtype))
    return _LATENCY_CACHE[key]


def measured_implementation(conv, factorization: str, ranks, input_shape: Sequence[int]
                            ) -> Tuple[str, Dict[str, float]]:
    """The faster execution of ``conv`` factorized at ``ranks`` on ``input_shape``, measured,
    and both times.

    ``"factorized"`` (the chain of small convolutions) or ``"reconstructed"`` (one
    convolution with the reconstructed kernel), each timed by :func:`conv_latency` on the
    conv's device and dtype (so a latency budget's allocation and the layer it builds read
    the same cached times).
    """
    times = {choice: conv_latency(conv, factorization, ranks, input_shape, choice)
             for choice in ("factorized", "reconstructed")}
    return min(times, key=times.get), times


def conv_latency_fraction(fraction: float, model_seconds: float, conv_seconds: float) -> float:
    """The fraction of the convolutions' own latency that keeps a whole model at ``fraction``
    of its latency: what is not convolution (``model_seconds - conv_seconds``: activations,
    norms, pooling, layers left out) does not shrink.

    Raises
    ------
    ValueError
        If the rest alone takes more than ``fraction`` of the model's time.
    """
    check_fraction(fraction, "rank['latency']")
    rest = max(model_seconds - conv_seconds, 0.0)
    allowed = fraction * model_seconds - rest
    if allowed <= 0 or conv_seconds <= 0:
        raise ValueError(
            f"rank: a latency target of {fraction:g} x {model_seconds * 1e3:.4g} ms is below what "
            f"the model's other operations take ({rest * 1e3:.4g} ms measured besides the "
            f"{conv_seconds * 1e3:.4g} ms of the selected convolutions); raise the fraction")
    return min(1.0, allowed / conv_seconds)


__all__: List[str] = [
    "METRICS", "InfeasibleBudget", "factorized_flops", "dense_flops", "layer_cost", "layer_budget_rank",
    "GlobalLayer", "Allocation", "shared_energy_allocation", "unshrinkable_reason",
    "measure_seconds", "example_input", "conv_latency", "forget_latencies",
    "measured_implementation",
    "conv_latency_fraction",
]
