"""One-call compression of a trained model, with a report, and export to plain PyTorch.

:func:`compress` factorizes every selected convolution of a model (a copy by default) and
returns the compressed model and a :class:`CompressionReport`; :func:`export` turns every
factorized layer back into plain ``nn.Sequential`` chains that run without tt_conv.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import calibrate as _calibrate
from . import rank as _rank
from .decompose import relative_error
from .layers import FactorizedConv
from .layers.base import IMPLEMENTATIONS, conv_geometry
from .profile import (
    conv_input_shapes,
    conv_modules,
    count_parameters,
    example_inputs,
    kernel_shape,
    layer_flops,
    model_flops,
)
from .report import CompressionReport, LayerReport

FACTORIZATION_CHOICES = (*_rank.FACTORIZATIONS, "auto")
_SELECTORS = ("params", "flops", "evbmf", "energy", "error")
_MODIFIERS = ("min_rank", "global")

# =========================================================================== rank specification


@dataclass(frozen=True)
class RankSpec:
    """A normalised ``rank=`` argument of :func:`compress`.

    Attributes
    ----------
    kind : {"explicit", "params", "flops", "evbmf", "energy", "error"}
    value : int, tuple of int or float
        Explicit ranks, the fraction kept (params, flops), the EVBMF weakening factor, the
        energy fraction kept, or the relative error allowed.
    global_budget : bool
        Spread a total ``params``/``flops`` target over the layers instead of one fraction
        per layer.
    min_rank : int
        Lower bound on every data-driven rank.
    """

    kind: str
    value: Any
    global_budget: bool = False
    min_rank: int = 1

    @property
    def is_budget(self) -> bool:
        return self.kind in ("params", "flops")

    @property
    def metric(self) -> str:
        """What "shrinking" is measured in: FLOPs for FLOP budgets, parameters otherwise."""
        return "flops" if self.kind == "flops" else "params"

    def describe(self) -> str:
        if self.kind == "explicit":
            return f"explicit ranks {self.value}"
        text = {
            "params": f"{self.value:g} of the parameters",
            "flops": f"{self.value:g} of the FLOPs",
            "evbmf": f"EVBMF (weakening {self.value:g})",
            "energy": f"{self.value:g} of the spectral energy",
            "error": f"relative error {self.value:g}",
        }[self.kind]
        if self.global_budget:
            text += " over all selected convolutions (global)"
        if self.min_rank > 1:
            text += f", min rank {self.min_rank}"
        return text


def parse_rank(rank) -> RankSpec:
    """Normalise a ``rank=`` argument (see :func:`compress`), or raise naming what is wrong."""
    if isinstance(rank, RankSpec):
        return rank
    if isinstance(rank, bool):
        raise TypeError(f"rank must be a number, a tuple of ints, 'evbmf' or a dict, got {rank!r}")
    if isinstance(rank, float):
        _rank._check_fraction(rank, "rank (a fraction of the parameters)")
        return RankSpec("params", rank)
    if isinstance(rank, int):
        if rank <= 0:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        return RankSpec("explicit", rank)
    if isinstance(rank, str):
        if rank.lower() == "evbmf":
            return RankSpec("evbmf", 1.0)
        raise ValueError(
            f"rank as a string must be 'evbmf', got {rank!r}; use a dict such as "
            f"{{'energy': 0.9}} for the other methods"
        )
    if isinstance(rank, Mapping):
        keys = set(rank)
        unknown = keys - set(_SELECTORS) - set(_MODIFIERS)
        if unknown:
            raise ValueError(
                f"unknown rank key(s) {sorted(unknown)}; expected one of {list(_SELECTORS)} "
                f"plus optionally {list(_MODIFIERS)}"
            )
        selectors = [k for k in _SELECTORS if k in keys]
        if len(selectors) != 1:
            raise ValueError(
                f"rank dict needs exactly one of {list(_SELECTORS)}, got {sorted(keys)}"
            )
        kind = selectors[0]
        value = rank[kind]
        min_rank = _rank._check_min_rank(rank.get("min_rank", 1))
        global_budget = rank.get("global", False)
        if not isinstance(global_budget, bool):
            raise TypeError(f"rank['global'] must be True or False, got {global_budget!r}")
        if global_budget and kind not in ("params", "flops"):
            raise ValueError(
                f"rank['global'] applies to 'params' and 'flops' targets, not {kind!r}"
            )
        if kind == "evbmf":
            value = 1.0 if value is True else value
            _rank._check_fraction(value, "rank['evbmf'] (the weakening factor)", allow_zero=True)
        elif kind == "error":
            _rank._check_fraction(value, "rank['error']", allow_zero=True)
        else:
            _rank._check_fraction(value, f"rank[{kind!r}]")
        return RankSpec(kind, float(value), global_budget, min_rank)
    try:
        values = tuple(rank)
    except TypeError:
        raise TypeError(
            f"rank must be a float, an int, a tuple of ints, 'evbmf' or a dict, got {rank!r}"
        ) from None
    _rank._check_rank_value(values)
    return RankSpec("explicit", values)


# =========================================================================== selection


def _matches(name: str, pattern: str) -> bool:
    """Glob match on the module name, or ``pattern`` names a parent module of it."""
    return fnmatch.fnmatchcase(name, pattern) or name.startswith(pattern + ".")


def _as_patterns(value, argument: str) -> List[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    try:
        patterns = list(value)
    except TypeError:
        raise TypeError(f"{argument} must be a pattern or a list of patterns, got {value!r}") from None
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{argument} must hold strings (module-name patterns), got {value!r}")
    return patterns


def _warn_unmatched(patterns: Sequence[str], names: Sequence[str], argument: str) -> None:
    examples = ", ".join(repr(n) for n in names[:3])
    for pattern in patterns:
        if not any(_matches(n, pattern) for n in names):
            warnings.warn(
                f"{argument} pattern {pattern!r} matches no convolution (the model's "
                f"convolutions are named like {examples})",
                UserWarning,
                stacklevel=3,
            )


def _layer_settings(name, factorization, rank_spec, overrides) -> Tuple[str, RankSpec]:
    for pattern, override in overrides.items():
        if _matches(name, pattern):
            if "factorization" in override:
                factorization = override["factorization"]
            if "rank" in override:
                rank_spec = parse_rank(override["rank"])
    return factorization, rank_spec


def _check_overrides(overrides) -> Dict[str, Dict[str, Any]]:
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise TypeError(
            f"overrides must map module-name patterns to dicts of 'factorization'/'rank', "
            f"got {type(overrides).__name__}"
        )
    checked = {}
    for pattern, override in overrides.items():
        if not isinstance(pattern, str) or not isinstance(override, Mapping):
            raise TypeError(
                f"overrides must map module-name patterns to dicts, got {pattern!r}: {override!r}"
            )
        unknown = set(override) - {"factorization", "rank"}
        if unknown:
            raise ValueError(
                f"overrides[{pattern!r}] has unknown key(s) {sorted(unknown)}; expected "
                f"'factorization' and/or 'rank'"
            )
        if "factorization" in override:
            _check_factorization_choice(override["factorization"], f"overrides[{pattern!r}]")
        if "rank" in override:
            parse_rank(override["rank"])
        checked[pattern] = dict(override)
    return checked


def _check_factorization_choice(factorization, argument="factorization") -> str:
    if not isinstance(factorization, str) or factorization.lower() not in FACTORIZATION_CHOICES:
        raise ValueError(
            f"{argument} must be one of {', '.join(map(repr, FACTORIZATION_CHOICES))}, "
            f"got {factorization!r}"
        )
    return factorization.lower()


# =========================================================================== calibration


def _calibration_inputs(calibration):
    """The model inputs of a calibration batch: a tensor, a tuple of tensors, or the first
    batch of an iterable (a DataLoader); from an ``(inputs, targets)`` batch, the inputs."""
    if calibration is None:
        return None
    if isinstance(calibration, torch.Tensor):
        return calibration
    if isinstance(calibration, (tuple, list)):
        if not calibration or not all(isinstance(t, torch.Tensor) for t in calibration):
            raise TypeError(
                "calibration as a tuple must hold the model's input tensors, got "
                f"{[type(t).__name__ for t in calibration]}"
            )
        return tuple(calibration)
    try:
        batch = next(iter(calibration))
    except TypeError:
        raise TypeError(
            f"calibration must be a tensor, a tuple of tensors or an iterable of batches (a "
            f"DataLoader), got {type(calibration).__name__}"
        ) from None
    except StopIteration:
        raise ValueError("calibration is an empty iterable: no batch to calibrate on") from None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, torch.Tensor):
        return batch
    raise TypeError(
        f"calibration batches must be tensors or (inputs, targets) pairs, got "
        f"{type(batch).__name__}"
    )


# =========================================================================== per-layer work


@dataclass
class _Candidate:
    factorization: str
    ranks: Tuple[int, ...]
    layer: FactorizedConv
    params: int
    flops: Optional[int]
    kernel_error: float
    output_error: Optional[float]

    @property
    def score(self) -> float:
        """What "auto" minimises: the output error when measured, else the kernel error."""
        return self.output_error if self.output_error is not None else self.kernel_error


@dataclass
class _LayerJob:
    """Everything :func:`_compress_layer` needs about one selected convolution."""

    name: str
    conv: nn.Module
    factorization: str
    spec: RankSpec
    input_shape: Optional[Tuple[int, ...]]
    dense_params: int
    dense_flops: Optional[int]
    weighting: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None

    @property
    def dense_cost(self) -> int:
        return self.dense_flops if self.spec.metric == "flops" else self.dense_params

    @property
    def group_dims(self) -> Tuple[int, ...]:
        shape = kernel_shape(self.conv)
        return (shape[0] // self.conv.groups, *shape[1:])

    def kernel(self) -> torch.Tensor:
        """The kernel ranks are chosen on: the data-weighted one under data fitting."""
        kernel = conv_geometry(self.conv)[1]
        if self.weighting is None:
            return kernel
        root, _, scales = self.weighting
        return _calibrate.weighted_kernel(kernel, self.conv.groups, root, scales)


def _data_driven_ranks(job: _LayerJob, factorization: str, spectra=None) -> Tuple[int, ...]:
    spec, kernel, groups = job.spec, job.kernel(), job.conv.groups
    if spec.kind == "evbmf":
        return _rank.evbmf_rank(factorization, kernel, groups=groups, weakening=spec.value,
                                min_rank=spec.min_rank, spectra=spectra)
    if spec.kind == "energy":
        return _rank.energy_rank(factorization, kernel, spec.value, groups=groups,
                                 min_rank=spec.min_rank)
    if factorization == "tt":
        return _rank.tt_svd_rank(kernel, spec.value, groups=groups, min_rank=spec.min_rank)
    return _rank.error_rank(factorization, kernel, spec.value, groups=groups,
                            min_rank=spec.min_rank)


def _budget_ranks(job: _LayerJob, factorization: str, fraction: float) -> Tuple[int, ...]:
    try:
        return _rank.layer_budget_rank(job.conv, factorization, fraction,
                                       metric=job.spec.metric, input_shape=job.input_shape)
    except ValueError as error:
        raise ValueError(
            f"layer {job.name!r}: {error}; exclude it (exclude=[{job.name!r}]) or give it a "
            f"larger rank (overrides={{{job.name!r}: {{'rank': ...}}}})"
        ) from None


def _select_ranks(job: _LayerJob, factorization: str) -> Tuple[int, ...]:
    spec = job.spec
    if spec.kind == "explicit":
        return _rank.resolve_rank(factorization, job.group_dims, spec.value)
    if spec.is_budget:
        return _budget_ranks(job, factorization, spec.value)
    return _data_driven_ranks(job, factorization)


class _Builder:
    """Builds, fits and measures candidate layers for one job."""

    def __init__(self, job: _LayerJob, implementation: str, options, x=None, target=None):
        self.job = job
        self.implementation = "factorized" if job.spec.kind == "flops" else implementation
        self.options = options
        self.x = x  # the layer's input in the compressed model
        self.target = target  # the original model's output at this layer

    def __call__(self, factorization: str, ranks) -> _Candidate:
        job = self.job
        source = job.conv
        if job.weighting is not None:
            root, _, scales = job.weighting
            source = _calibrate.weighted_conv(job.conv, root, scales)
        layer = FactorizedConv.from_conv(
            source, factorization=factorization, rank=tuple(ranks),
            implementation=self.implementation, **self.options.get(factorization, {}),
        )
        if job.weighting is not None:
            _, inverse, scales = job.weighting
            _calibrate.unweight_factors(layer, inverse, scales)
            _, _, bias = conv_geometry(job.conv)
            if bias is not None:
                with torch.no_grad():
                    layer.bias.copy_(bias)
            _calibrate.refit_output_stage(layer, self.x, self.target)
        output_error = None
        if self.target is not None:
            with torch.no_grad():
                output_error = relative_error(layer(self.x), self.target)
        return _Candidate(
            factorization=factorization,
            ranks=tuple(layer.rank),
            layer=layer,
            params=count_parameters(layer),
            flops=None if job.input_shape is None else layer.flops(job.input_shape),
            kernel_error=relative_error(layer.reconstruct_kernel(), conv_geometry(job.conv)[1]),
            output_error=output_error,
        )


def _auto_candidates(job: _LayerJob, make: _Builder, budget_cost=None) -> List[_Candidate]:
    """Each factorization at the same cost (see :func:`compress`)."""
    metric = job.spec.metric
    if budget_cost is not None:
        fraction = budget_cost / job.dense_cost
        if metric == "params":
            # The global cost counts the bias; layer budgets cover the kernel only.
            bias = conv_geometry(job.conv)[2]
            kernel = math.prod(kernel_shape(job.conv))
            fraction = (budget_cost - (0 if bias is None else bias.numel())) / kernel
    elif job.spec.is_budget:
        fraction = job.spec.value
    else:
        tucker_ranks = _data_driven_ranks(job, "tucker")
        params = _rank.n_factor_parameters("tucker", job.group_dims, tucker_ranks)
        fraction = params / math.prod(job.group_dims)
    fraction = min(1.0, fraction)
    candidates = []
    for factorization in _rank.FACTORIZATIONS:
        if fraction <= 0:
            break
        try:
            ranks = _rank.layer_budget_rank(job.conv, factorization, fraction, metric=metric,
                                            input_shape=job.input_shape)
        except ValueError:
            continue  # this factorization cannot fit the budget even at rank 1
        candidates.append(make(factorization, ranks))
    if not candidates:
        raise ValueError(
            f"layer {job.name!r}: no factorization fits {fraction:.3g} of its {metric} even at "
            f"rank 1; exclude it (exclude=[{job.name!r}]) or give it a larger rank"
        )
    return candidates


def _rank_request_clipped(factorization, requested, resolved) -> bool:
    values = (requested,) if isinstance(requested, int) else tuple(requested)
    if len(values) == 1:
        values = values * len(resolved)
    if factorization == "tt" and len(values) == len(resolved) + 2:
        values = values[1:-1]
    return tuple(values) != tuple(resolved)


def _shrinks(candidate: _Candidate, job: _LayerJob) -> bool:
    if job.spec.metric == "flops":
        return candidate.flops is not None and candidate.flops < job.dense_flops
    return candidate.params < job.dense_params


def _compress_layer(job: _LayerJob, make: _Builder, global_choice=None):
    """Factorize one layer; returns its report line and the new layer (None: left dense)."""
    base = dict(name=job.name, kernel_shape=kernel_shape(job.conv),
                params_before=job.dense_params, flops_before=job.dense_flops)

    def dense(note, output_error=None):
        return LayerReport(**base, factorization="dense", ranks=None,
                           params_after=job.dense_params, flops_after=job.dense_flops,
                           output_error=output_error, note=note), None

    note = ""
    if global_choice is not None:
        factorization, ranks, cost = global_choice
        if ranks is None:
            return dense("left dense: the shared threshold would not shrink it")
        if job.factorization == "auto":
            candidates = _auto_candidates(job, make, budget_cost=cost)
        else:
            candidates = [make(factorization, ranks)]
    elif job.factorization == "auto":
        candidates = _auto_candidates(job, make)
    else:
        ranks = _select_ranks(job, job.factorization)
        if job.spec.kind == "explicit" and _rank_request_clipped(
                job.factorization, job.spec.value, ranks):
            note = f"ranks {job.spec.value} clipped to {ranks}, the most this kernel allows"
        candidates = [make(job.factorization, ranks)]

    shrinking = [c for c in candidates if _shrinks(c, job)]
    if not shrinking:
        best = min(candidates, key=lambda c: c.score)
        metric = job.spec.metric
        after = best.flops if metric == "flops" else best.params
        before = job.dense_flops if metric == "flops" else job.dense_params
        what = "FLOPs" if metric == "flops" else "parameters"
        return dense(f"left dense: {best.factorization} at ranks {best.ranks} would have "
                     f"{after:,} {what} >= {before:,}")
    best = min(shrinking, key=lambda c: c.score)
    if job.factorization == "auto":
        scores = ", ".join(f"{c.factorization} {c.score:.3g}" for c in candidates)
        which = "output" if best.output_error is not None else "kernel"
        note = f"auto: {best.factorization} ({which} errors: {scores})"
    return LayerReport(
        **base, factorization=best.factorization, ranks=best.ranks, params_after=best.params,
        flops_after=best.flops, kernel_error=best.kernel_error,
        output_error=best.output_error, note=note,
    ), best.layer


# =========================================================================== global budget


def _global_allocation(jobs: List[_LayerJob], spec: RankSpec):
    """The largest energy fraction ``e`` shared by all layers keeping the total cost within
    the target, found by bisection, and each layer's ``(factorization, ranks, cost)``.

    A layer's cost at ``e`` is that of its factorization at the smallest ranks keeping ``e``
    of every relevant unfolding's energy (of the data-weighted kernel under data fitting),
    or its dense cost when that would not shrink it (then ``ranks`` is None). Under
    ``"auto"`` the Tucker ranks set each layer's share.
    """
    metric = spec.metric
    target = spec.value * sum(job.dense_cost for job in jobs)
    prepared = []
    for job in jobs:
        factorization = "tucker" if job.factorization == "auto" else job.factorization
        spectra = _rank.unfolding_spectra(factorization, job.kernel(), job.conv.groups)
        bias = conv_geometry(job.conv)[2]
        prepared.append((job, factorization, spectra, 0 if bias is None else bias.numel()))
    costs: Dict[Tuple[int, Tuple[int, ...]], int] = {}

    def cost_of(i, job, factorization, ranks, bias):
        if (i, ranks) not in costs:
            if metric == "params":
                factors = _rank.n_factor_parameters(factorization, job.group_dims, ranks)
                costs[i, ranks] = job.conv.groups * factors + bias
            else:
                costs[i, ranks] = _rank.factorized_flops(job.conv, factorization, ranks,
                                                         job.input_shape)
        return costs[i, ranks]

    def allocation(energy):
        total, chosen = 0, {}
        for i, (job, factorization, spectra, bias) in enumerate(prepared):
            def rank_of(s, _u):
                tail = (1.0 - energy) * float((s.astype(float) ** 2).sum())
                return max(spec.min_rank, _rank.tail_rank(s, tail))

            ranks = _rank._ranks_from_spectra(factorization, job.group_dims, spectra, rank_of)
            cost = cost_of(i, job, factorization, ranks, bias)
            if cost >= job.dense_cost:
                total += job.dense_cost
                chosen[job.name] = (factorization, None, job.dense_cost)
            else:
                total += cost
                chosen[job.name] = (factorization, ranks, cost)
        return total, chosen

    low_total, low_choice = allocation(0.0)
    if low_total > target:
        raise ValueError(
            f"rank: a global {metric} target of {spec.value:g} x "
            f"{target / spec.value:,.0f} = {target:,.0f} is below what rank {spec.min_rank} "
            f"everywhere allows ({low_total:,}); raise the fraction or exclude small layers"
        )
    best = (0.0, low_choice)
    total, choice = allocation(1.0)
    if total <= target:
        return 1.0, choice
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        total, choice = allocation(mid)
        if total <= target:
            lo, best = mid, (mid, choice)
        else:
            hi = mid
    return best


# =========================================================================== compress


def compress(
    model: nn.Module,
    factorization: str = "tucker",
    rank: Any = 0.25,
    *,
    include: Optional[Union[str, Sequence[str]]] = None,
    exclude: Optional[Union[str, Sequence[str]]] = None,
    overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
    input_shape: Optional[Sequence[int]] = None,
    calibration: Any = None,
    fit: str = "auto",
    inplace: bool = False,
    implementation: str = "auto",
    decomposition_options: Optional[Mapping[str, Mapping[str, Any]]] = None,
    progress: bool = True,
) -> Tuple[nn.Module, CompressionReport]:
    """Factorize the convolutions of a trained model and report what it cost.

    Parameters
    ----------
    model : nn.Module
        Any model holding ``nn.Conv1d/2d/3d`` layers (factorized layers are re-factorized
        from their reconstructed kernels).
    factorization : {"tucker", "cp", "tt", "auto"}
        ``"auto"`` factorizes each layer all three ways at the same cost and keeps the most
        accurate (smallest output error on the calibration batch when given, else kernel
        error). The cost is the layer's budget for ``params``/``flops`` ranks, and for
        data-driven ranks the parameter count of the Tucker ranks they select.
    rank : float, int, tuple of int, "evbmf" or dict
        * a float ``f`` in (0, 1] or ``{"params": f}``: each layer keeps at most ``f`` of its
          kernel's parameters (:func:`tt_conv.rank.layer_budget_rank`);
        * ``{"flops": f}``: each layer at most ``f`` of its FLOPs on its input (needs
          ``input_shape`` or ``calibration``; the layers then run factorized);
        * ``{"params": f, "global": True}`` / ``{"flops": f, "global": True}``: the selected
          convolutions together (kernels and biases, layers left dense included) keep at
          most ``f`` of their parameters / FLOPs. The budget is spread by one energy
          threshold shared by all layers (each unfolding keeps that fraction of its
          spectral energy), the largest that fits, found by bisection;
        * ``"evbmf"`` or ``{"evbmf": w}``: EVBMF ranks (:func:`tt_conv.rank.evbmf_rank`),
          weakened by ``w`` in [0, 1] (1 = plain EVBMF);
        * ``{"energy": e}``: the smallest ranks keeping ``e`` of the spectral energy of every
          unfolding; ``{"error": eps}``: ranks for a relative kernel error ``eps`` (TT-SVD
          for TT);
        * an int or tuple: explicit ranks (clipped to the kernel).

        Dicts accept ``"min_rank"`` too. See :mod:`tt_conv.rank` for the conventions.
    include, exclude : str or list of str, optional
        Module-name patterns (:mod:`fnmatch` globs; a plain name also covers the modules
        inside it). Only convolutions matching ``include`` (all by default) and not
        ``exclude`` are compressed. Patterns matching no convolution are warned about.
    overrides : dict, optional
        ``{pattern: {"factorization": ..., "rank": ...}}`` per-layer settings; later
        patterns win over earlier ones.
    input_shape : tuple of int, optional
        Model input shape ``(batch, channels, *spatial)`` for FLOP counts and budgets.
    calibration : tensor, tuple of tensors or iterable of batches, optional
        A batch (or the first batch of a DataLoader; from ``(inputs, targets)`` the inputs)
        on which each layer's output error is measured: the relative error of its output
        in the compressed model against the original model's at that point. Its shape
        stands in for ``input_shape`` when that is not given.
    fit : {"auto", "data", "kernel"}
        ``"kernel"`` decomposes each kernel as it is. ``"data"`` (needs ``calibration``;
        ``"auto"`` picks it when a batch is given) weights each kernel by its input and
        output channel statistics on the batch before decomposing it and ranking it, and
        refits each layer's last stage and bias by least squares to reproduce the original
        model's output at that layer from the inputs it gets in the compressed model, layer
        after layer (see :mod:`tt_conv.calibrate`). Costs two partial forward passes of the
        batch per layer.
    inplace : bool
        Modify ``model`` itself; by default a deep copy is compressed and ``model`` is never
        modified. Layers are swapped in only once all of them are built.
    implementation : {"auto", "factorized", "reconstructed"}
        How factorized layers run (FLOP budgets always run factorized).
    decomposition_options : dict, optional
        ``{"cp": {...}, "tucker": {...}, "tt": {...}}``: keyword arguments for the
        decompositions (see :mod:`tt_conv.decompose`).
    progress : bool
        Show a tqdm progress bar over the layers (on a terminal).

    Returns
    -------
    compressed : nn.Module
        ``model`` itself when ``inplace``, else a compressed copy.
    report : CompressionReport
        One row per convolution (those not selected listed as dense) and totals.

    Raises
    ------
    ValueError
        For a model with no convolution, patterns selecting none, NaN or inf weights, a
        budget below what rank 1 allows, a FLOP target without an input shape, or a
        calibration batch the model cannot run; each message names the layer or argument.
    """
    from tqdm.auto import tqdm

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    default_factorization = _check_factorization_choice(factorization)
    default_spec = parse_rank(rank)
    overrides = _check_overrides(overrides)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if fit not in ("auto", "data", "kernel"):
        raise ValueError(f"fit must be 'auto', 'data' or 'kernel', got {fit!r}")
    options = {str(k).lower(): dict(v) for k, v in (decomposition_options or {}).items()}
    for key in options:
        if key not in _rank.FACTORIZATIONS:
            raise ValueError(
                f"decomposition_options keys must be among {_rank.FACTORIZATIONS}, got {key!r}"
            )

    convs = conv_modules(model)
    if not convs:
        raise ValueError(
            f"model ({type(model).__name__}) has no nn.Conv1d, nn.Conv2d or nn.Conv3d layer to "
            f"compress"
        )
    names = [name for name, _ in convs]
    include_patterns = _as_patterns(include, "include")
    exclude_patterns = _as_patterns(exclude, "exclude")
    _warn_unmatched(include_patterns, names, "include")
    _warn_unmatched(exclude_patterns, names, "exclude")
    _warn_unmatched(list(overrides), names, "overrides")
    selected = [
        (name, conv) for name, conv in convs
        if (not include_patterns or any(_matches(name, p) for p in include_patterns))
        and not any(_matches(name, p) for p in exclude_patterns)
    ]
    if not selected:
        raise ValueError(
            f"include={include_patterns} and exclude={exclude_patterns} leave none of the "
            f"model's {len(convs)} convolutions to compress"
        )
    for name, conv in selected:
        _, kernel, bias = conv_geometry(conv)
        for what, tensor in (("weight", kernel), ("bias", bias)):
            if tensor is not None and not torch.isfinite(tensor).all():
                raise ValueError(
                    f"layer {name!r} has NaN or inf values in its {what}; cannot compress it"
                )

    calib_inputs = _calibration_inputs(calibration)
    if fit == "data" and calib_inputs is None:
        raise ValueError("fit='data' needs a calibration batch (calibration=...)")
    data_fit = calib_inputs is not None and fit != "kernel"
    if input_shape is not None:
        shape_inputs = example_inputs(model, input_shape)
    else:
        shape_inputs = calib_inputs
    input_shapes: Dict[str, Tuple[int, ...]] = {}
    if shape_inputs is not None:
        argument = "input_shape" if input_shape is not None else "calibration"
        try:
            input_shapes = conv_input_shapes(model, shape_inputs)
        except Exception as error:
            raise ValueError(f"the model could not run on {argument}: {error}") from error
    params_before = count_parameters(model)
    flops_before = model_flops(model, shape_inputs) if shape_inputs is not None else None
    reference_output = _run(model, calib_inputs) if calib_inputs is not None else None
    stats = {}
    if data_fit:
        stats = _calibrate.statistics(model, calib_inputs, [name for name, _ in selected])

    jobs: List[_LayerJob] = []
    for name, conv in selected:
        layer_factorization, spec = _layer_settings(name, default_factorization, default_spec,
                                                    overrides)
        layer_factorization = _check_factorization_choice(layer_factorization)
        shape = input_shapes.get(name)
        if spec.kind == "flops" and shape is None:
            raise ValueError(
                f"rank {spec.describe()!r} for layer {name!r} needs the layer's input shape: "
                f"pass input_shape (or calibration)"
                + ("" if shape_inputs is None else f"; layer {name!r} did not run on it")
            )
        if layer_factorization == "auto" and spec.kind == "explicit":
            raise ValueError(
                f"factorization='auto' (layer {name!r}) needs a budget or a data-driven rank "
                f"to compare factorizations at equal cost, not explicit ranks {spec.value}"
            )
        weighting = _calibrate.whitening(stats[name]) if name in stats else None
        jobs.append(_LayerJob(
            name=name, conv=conv, factorization=layer_factorization, spec=spec,
            input_shape=shape, dense_params=count_parameters(conv),
            dense_flops=layer_flops(conv, shape) if shape is not None else None,
            weighting=weighting,
        ))

    global_choice: Dict[str, Tuple] = {}
    shared_energy = None
    global_jobs = [job for job in jobs if job.spec.global_budget]
    if global_jobs:
        specs = {job.spec for job in global_jobs}
        if len(specs) > 1:
            raise ValueError(
                "all layers under a global budget must share one rank spec; got "
                f"{sorted(s.describe() for s in specs)}"
            )
        shared_energy, global_choice = _global_allocation(global_jobs, next(iter(specs)))

    # With a calibration batch, layers are swapped into a working copy one by one, so each
    # is measured (and fitted) on the inputs it gets in the compressed model.
    working = None
    if calib_inputs is not None:
        working = copy.deepcopy(model)
    reports: List[LayerReport] = []
    replacements: Dict[str, nn.Module] = {}
    bar = tqdm(jobs, desc="compressing", unit="layer", disable=None if progress else True)
    try:
        for job in bar:
            bar.set_postfix_str(job.name)
            x = target = None
            if working is not None:
                x = _calibrate.input_of(working, job.name, calib_inputs)
                original_input = _calibrate.input_of(model, job.name, calib_inputs)
                with torch.no_grad():
                    target = job.conv(original_input)
            make = _Builder(job, implementation, options, x, target)
            report, layer = _compress_layer(job, make, global_choice.get(job.name))
            if layer is None and target is not None:
                with torch.no_grad():
                    report.output_error = relative_error(job.conv(x), target)
            reports.append(report)
            if layer is not None:
                replacements[job.name] = layer
                if working is not None:
                    _set_submodule(working, job.name, layer)
    finally:
        bar.close()

    # One row per convolution of the model, in order: excluded ones are listed as dense.
    by_name = {r.name: r for r in reports}
    selected_names = {name for name, _ in selected}
    rows = []
    for name, conv in convs:
        if name in selected_names:
            rows.append(by_name[name])
            continue
        shape = input_shapes.get(name)
        params = count_parameters(conv)
        flops = layer_flops(conv, shape) if shape is not None else None
        rows.append(LayerReport(
            name=name, kernel_shape=kernel_shape(conv), factorization="dense", ranks=None,
            params_before=params, params_after=params, flops_before=flops, flops_after=flops,
            note="not selected (include/exclude)",
        ))
    reports = rows

    if inplace:
        target_model = model
        for name, layer in replacements.items():
            _set_submodule(model, name, layer)
    elif working is not None:
        target_model = working
    else:
        target_model = copy.deepcopy(model)
        for name, layer in replacements.items():
            _set_submodule(target_model, name, layer)

    model_output_error = None
    if isinstance(reference_output, torch.Tensor):
        output = _run(target_model, calib_inputs)
        if isinstance(output, torch.Tensor) and output.shape == reference_output.shape:
            model_output_error = relative_error(output, reference_output)
    notes = []
    if data_fit:
        notes.append("data-aware fit on the calibration batch (fit='data')")
    report = CompressionReport(
        layers=reports,
        factorization=default_factorization,
        rank=default_spec.describe(),
        model_params_before=params_before,
        model_params_after=count_parameters(target_model),
        model_flops_before=flops_before,
        model_flops_after=model_flops(target_model, shape_inputs)
        if shape_inputs is not None else None,
        input_shape=None if shape_inputs is None else _shape_of(shape_inputs),
        model_output_error=model_output_error,
        shared_energy=shared_energy,
        notes=notes,
    )
    return target_model, report


def _shape_of(inputs) -> Tuple[int, ...]:
    return tuple((inputs if isinstance(inputs, torch.Tensor) else inputs[0]).shape)


def _run(model: nn.Module, inputs):
    """``model(inputs)`` in evaluation mode without gradients (training mode restored)."""
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            return model(inputs) if isinstance(inputs, torch.Tensor) else model(*inputs)
    finally:
        model.train(training)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)

# =========================================================================== export


def export(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every factorized layer of ``model`` by its plain ``nn.Sequential`` chain.

    The result holds only standard PyTorch modules (it loads and runs without tt_conv, e.g.
    after ``torch.save``) and computes the same outputs as the factorized model, with the
    same parameters (:meth:`tt_conv.FactorizedConv.to_sequential`).

    Parameters
    ----------
    model : nn.Module
        A model, typically from :func:`compress`; a :class:`~tt_conv.FactorizedConv` alone is
        exported as its ``nn.Sequential``.
    inplace : bool
        Modify ``model`` itself instead of a deep copy.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, FactorizedConv):
        return model.to_sequential()
    target = model if inplace else copy.deepcopy(model)
    factorized = [(name, module) for name, module in target.named_modules()
                  if isinstance(module, FactorizedConv)]
    for name, module in factorized:
        sequential = module.to_sequential()
        sequential.train(module.training)
        _set_submodule(target, name, sequential)
    return target
