"""One convolution of :func:`tt_conv.compress`: its ranks, its candidate layers, the choice.

A :class:`LayerJob` holds everything known about one selected convolution (its plain
equivalent, factorization, rank rule, input shape, costs). :func:`factorize_layer` turns it
into a :class:`LayerOutcome`: the factorized layer (or None, left dense, with the reason)
and its report row.

Candidates: every factorization to try (one, or three under ``"auto"``) at its ranks,
decomposed from the kernel as it is; with calibration data also from the data-weighted
kernel, with and without the least-squares refit of the last stage
(:mod:`tt_conv.calibrate`). Under calibration the candidate whose *held-out* downstream
error is smallest wins (what the next layer sees, see :class:`tt_conv.calibrate.CalibrationRun`),
so the data-aware fit is kept only where it helps; otherwise the smallest kernel error.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from . import calibrate
from . import rank as _rank
from ._checks import FACTORIZATIONS
from .budget import (
    Allocation,
    factorized_flops,
    layer_budget_rank,
    measured_implementation,
    unshrinkable_reason,
)
from .decompose import relative_error
from .layers import FactorizedConv
from .layers.base import conv_geometry
from .profile import count_parameters, kernel_shape
from .rankspec import RankSpec
from .report import LayerReport


class LeftDense(Exception):
    """A layer cannot be factorized within its budget (the message says why)."""


@dataclass
class LayerJob:
    """Everything :func:`factorize_layer` needs about one selected convolution."""

    name: str
    conv: nn.Module  # the plain equivalent: nn.ConvNd or FactorizedConv
    factorization: str
    spec: RankSpec
    input_shape: Optional[Tuple[int, ...]]
    dense_params: int
    dense_flops: Optional[int]
    baked: str = ""
    #: Measured seconds of the dense layer's forward pass on ``input_shape`` (latency budgets).
    dense_latency: Optional[float] = None

    @property
    def dense_cost(self):
        return {"flops": self.dense_flops, "latency": self.dense_latency}.get(
            self.spec.metric, self.dense_params)

    @property
    def group_dims(self) -> Tuple[int, ...]:
        shape = kernel_shape(self.conv)
        return (shape[0] // self.conv.groups, *shape[1:])

    @property
    def kernel(self) -> torch.Tensor:
        return conv_geometry(self.conv)[1]


@dataclass
class LayerData:
    """The calibration data of one layer: its inputs in the compressed model and the
    original model's outputs there, split into fit and held-out samples, the channel
    weighting from the fit samples, and the judge of downstream errors."""

    x_fit: torch.Tensor
    target_fit: torch.Tensor
    x_held: torch.Tensor
    target_held: torch.Tensor
    weighting: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    downstream_error: Optional[Callable[[nn.Module], float]] = None


@dataclass
class Candidate:
    factorization: str
    ranks: Tuple[int, ...]
    layer: FactorizedConv
    params: int
    flops: Optional[int]
    kernel_error: float
    fit: str = "kernel"
    latency: Optional[float] = None
    output_error: Optional[float] = None
    standardized_error: Optional[float] = None
    downstream: Optional[float] = None
    note: str = ""

    def fit_key(self):
        """How the fits of one factorization are compared: held-out downstream error (ties,
        as when the next layer does not see this layer, by the channel-standardised output
        error), else the score."""
        if self.downstream is None:
            return (self.score,)
        return (round(self.downstream, 12), self.standardized_error)

    @property
    def score(self) -> float:
        """How factorizations are compared: the output error when measured, else the
        kernel error."""
        return self.output_error if self.output_error is not None else self.kernel_error


@dataclass
class LayerOutcome:
    """A layer's report row, its new layer (None: left dense) and the layer a kernel-only
    fit would have given (for the final with/without-calibration check)."""

    row: LayerReport
    layer: Optional[FactorizedConv]
    kernel_layer: Optional[FactorizedConv] = None
    #: Left dense because no rank fits its budget (not because factors would not shrink it).
    over_budget: bool = False


# --------------------------------------------------------------------------- ranks


def data_driven_ranks(job: LayerJob, factorization: str) -> Tuple[int, ...]:
    """Ranks of a data-driven rule on the layer's own kernel (never the data-weighted one:
    calibration does not change what EVBMF or an energy threshold keeps)."""
    spec, kernel, groups = job.spec, job.kernel, job.conv.groups
    if spec.kind == "evbmf":
        return _rank.evbmf_rank(factorization, kernel, groups=groups, weakening=spec.value,
                                min_rank=spec.min_rank, match_tucker=True)
    if spec.kind == "energy":
        return _rank.energy_rank(factorization, kernel, spec.value, groups=groups,
                                 min_rank=spec.min_rank)
    if factorization == "tt":
        return _rank.tt_svd_rank(kernel, spec.value, groups=groups, min_rank=spec.min_rank)
    return _rank.error_rank(factorization, kernel, spec.value, groups=groups,
                            min_rank=spec.min_rank)


def _budget_ranks(job: LayerJob, factorization: str, fraction: float) -> Tuple[int, ...]:
    # Under a latency budget the factorizations of "auto" are compared at the FLOPs of the
    # allocated ranks (see _auto_fraction), then held to the allocated measured latency.
    metric = "flops" if job.spec.metric == "latency" else job.spec.metric
    try:
        return layer_budget_rank(job.conv, factorization, fraction, metric=metric,
                                 input_shape=job.input_shape)
    except ValueError as error:
        reason = None if metric == "flops" else unshrinkable_reason(
            job.conv, factorization, fraction)
        raise LeftDense(reason or str(error)) from None


def _rank_request_clipped(factorization, requested, resolved) -> bool:
    values = (requested,) if isinstance(requested, int) else tuple(requested)
    if len(values) == 1:
        values = values * len(resolved)
    if factorization == "tt" and len(values) == len(resolved) + 2:
        values = values[1:-1]
    return tuple(values) != tuple(resolved)


def _auto_fraction(job: LayerJob, allocation: Optional[Allocation]) -> float:
    """The share of its cost every factorization gets under ``"auto"``."""
    if allocation is not None:
        if job.spec.metric == "params":
            # The global cost counts the bias; layer budgets cover the kernel only.
            bias = conv_geometry(job.conv)[2]
            return (allocation.cost - (0 if bias is None else bias.numel())) / math.prod(
                kernel_shape(job.conv))
        if job.spec.metric == "latency":
            return factorized_flops(job.conv, allocation.factorization, allocation.ranks,
                                    job.input_shape) / job.dense_flops
        return allocation.cost / job.dense_cost
    if job.spec.is_budget:
        return job.spec.value
    tucker = data_driven_ranks(job, "tucker")
    return _rank.n_factor_parameters("tucker", job.group_dims, tucker) / math.prod(job.group_dims)


def planned_ranks(job: LayerJob, allocation: Optional[Allocation],
                  allocated_only: bool = False
                  ) -> Tuple[List[Tuple[str, Tuple[int, ...]]], str]:
    """``[(factorization, ranks), ...]`` to try, and a note; raises :class:`LeftDense`.
    With ``allocated_only`` an allocated ``"auto"`` layer tries only the factorization its
    allocation priced (see :func:`factorize_layer`)."""
    if allocation is not None and allocation.ranks is None:
        raise LeftDense("the shared global threshold would not shrink it")
    if job.factorization == "auto" and not (allocated_only and allocation is not None):
        fraction = min(1.0, _auto_fraction(job, allocation))
        plans, reasons = [], []
        for factorization in FACTORIZATIONS:
            if fraction <= 0:
                break
            try:
                plans.append((factorization, _budget_ranks(job, factorization, fraction)))
            except LeftDense as reason:
                reasons.append(str(reason))
        if not plans:
            raise LeftDense(reasons[0] if reasons else
                            f"no factorization fits {fraction:.3g} of its {job.spec.metric}")
        if allocation is not None and job.spec.metric == "latency":
            # The allocated ranks themselves, which fit the latency share by construction.
            plans = [(f, allocation.ranks if f == allocation.factorization else r)
                     for f, r in plans]
        return plans, ""
    if allocation is not None:
        return [(allocation.factorization, allocation.ranks)], ""
    spec, factorization = job.spec, job.factorization
    if spec.kind == "explicit":
        ranks = _rank.resolve_rank(factorization, job.group_dims, spec.value)
        note = ""
        if _rank_request_clipped(factorization, spec.value, ranks):
            note = f"ranks {spec.value} clipped to {ranks}, the most this kernel allows"
        return [(factorization, ranks)], note
    if spec.is_budget:
        return [(factorization, _budget_ranks(job, factorization, spec.value))], ""
    return [(factorization, data_driven_ranks(job, factorization))], ""


# --------------------------------------------------------------------------- candidates


def _decomposed(job: LayerJob, factorization: str, ranks, implementation: str,
                options: Dict[str, Dict[str, Any]], weighting=None,
                structure_only: bool = False) -> Candidate:
    """A candidate layer: ``job``'s kernel decomposed at ``ranks``; with ``structure_only``
    a layer of that structure with its initial weights instead (no decomposition, kernel
    error NaN), for a latency budget's trial allocations, whose measured time does not
    depend on the weights."""
    source = job.conv
    if weighting is not None:
        root, _, scales = weighting
        source = calibrate.weighted_conv(job.conv, root, scales)
    execution = "factorized" if job.spec.kind == "flops" else implementation
    if structure_only:
        layer = FactorizedConv.shaped_like(job.conv, factorization, rank=tuple(ranks),
                                           implementation=execution)
    else:
        layer = FactorizedConv.from_conv(source, factorization=factorization,
                                         rank=tuple(ranks), implementation=execution,
                                         **options.get(factorization, {}))
    latency = None
    if job.input_shape is not None and (job.spec.metric == "latency" or (
            implementation == "auto" and job.spec.kind != "flops")):
        # The execution that is faster on this device and this input shape, measured
        # (FLOP budgets always run factorized: that is what they count).
        choice, times = measured_implementation(job.conv, factorization, layer.rank,
                                                job.input_shape)
        layer.set_implementation(choice)
        latency = times[choice]
    if weighting is not None:
        _, inverse, scales = weighting
        calibrate.unweight_factors(layer, inverse, scales)
        bias = conv_geometry(job.conv)[2]
        if bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias)
    return Candidate(
        factorization=factorization, ranks=tuple(layer.rank), layer=layer,
        params=count_parameters(layer),
        flops=None if job.input_shape is None else layer.flops(job.input_shape),
        kernel_error=(math.nan if structure_only else
                      relative_error(layer.reconstruct_kernel(), job.kernel)),
        fit="kernel" if weighting is None else "data", latency=latency,
    )


def _refitted(candidate: Candidate, data: LayerData, kernel: torch.Tensor) -> Optional[Candidate]:
    """A copy of ``candidate`` with its last stage refitted on the fit samples, or None
    (then ``candidate.note`` says why)."""
    layer = copy.deepcopy(candidate.layer)
    try:
        result = calibrate.refit_output_stage(layer, data.x_fit, data.target_fit,
                                              held_out=(data.x_held, data.target_held))
    except ValueError as error:
        candidate.note = f"refit skipped: {error}"
        return None
    if result.channels_refit == 0:
        candidate.note = "refit skipped: it lowered no channel's held-out error"
        return None
    return Candidate(
        factorization=candidate.factorization, ranks=candidate.ranks, layer=layer,
        params=candidate.params, flops=candidate.flops, latency=candidate.latency,
        kernel_error=relative_error(layer.reconstruct_kernel(), kernel), fit="data+refit",
        note=f"refit: ridge {result.ridge:g}, {result.channels_refit} of "
             f"{layer.out_channels} channels",
    )


def _judge(candidate: Candidate, data: LayerData) -> None:
    """Held-out errors of a candidate: its output's, and what the next layer sees."""
    with torch.no_grad():
        output = candidate.layer(data.x_held)
    candidate.output_error = relative_error(output, data.target_held)
    candidate.standardized_error = calibrate.standardized_error(output, data.target_held)
    if data.downstream_error is not None:
        candidate.downstream = data.downstream_error(candidate.layer)


#: A data-aware fit replaces the kernel fit only if it lowers the held-out downstream error
#: by at least this fraction: small gains on a few held-out samples do not generalise.
DATA_FIT_MARGIN = 0.05


def _better(candidate: Candidate, held: Candidate) -> bool:
    """Whether ``candidate`` replaces ``held`` (two fits of one factorization, in order:
    kernel fit first)."""
    if held.fit == "kernel" and candidate.fit != "kernel" and candidate.downstream is not None:
        return candidate.downstream < (1 - DATA_FIT_MARGIN) * held.downstream
    return candidate.fit_key() < held.fit_key()


def _shrinks(candidate: Candidate, job: LayerJob, allocation: Optional[Allocation] = None
             ) -> bool:
    if job.spec.metric == "flops":
        return candidate.flops is not None and candidate.flops < job.dense_flops
    if job.spec.metric == "latency":
        limit = job.dense_latency if allocation is None else allocation.cost
        return candidate.latency is not None and candidate.latency <= limit
    return candidate.params < job.dense_params


def _ms(seconds: Optional[float]) -> str:
    return "?" if seconds is None else f"{seconds * 1e3:.3g} ms"


# --------------------------------------------------------------------------- one layer


def factorize_layer(job: LayerJob, allocation: Optional[Allocation], *, implementation: str,
                    options: Dict[str, Dict[str, Any]], strict: bool = False,
                    data: Optional[LayerData] = None, structure_only: bool = False,
                    allocated_only: bool = False) -> LayerOutcome:
    """Factorize one layer (see the module docstring).

    ``allocated_only`` builds only the factorization a global budget's allocation priced,
    at its ranks (under ``"auto"``, the Tucker stand-in whose cost is the layer's share, not
    every factorization). ``structure_only`` (no data; implies ``allocated_only``) builds
    that layer without decomposing its kernel: the same structure, ranks and execution,
    initial weights and a NaN kernel error, for a latency budget's trial allocations.

    Raises
    ------
    ValueError
        With ``strict=True``, for a layer that cannot be factorized within its budget.
    """
    base = dict(name=job.name, kernel_shape=kernel_shape(job.conv),
                params_before=job.dense_params, flops_before=job.dense_flops,
                latency_before=job.dense_latency)

    def dense(note, over_budget=False):
        return LayerOutcome(LayerReport(**base, factorization="dense", ranks=None,
                                        params_after=job.dense_params,
                                        flops_after=job.dense_flops,
                                        latency_after=job.dense_latency, note=note), None,
                            over_budget=over_budget)

    try:
        plans, note = planned_ranks(job, allocation, allocated_only or structure_only)
    except LeftDense as reason:
        if strict:
            raise ValueError(
                f"layer {job.name!r}: {reason}; exclude it (exclude=[{job.name!r}]), give it "
                f"a larger rank (overrides={{{job.name!r}: {{'rank': ...}}}}) or leave "
                f"strict=False to keep such layers dense") from None
        return dense(f"left dense: {reason}", over_budget=allocation is None)
    candidates: List[Candidate] = []
    kernel_fits: Dict[str, Candidate] = {}
    if structure_only and (data is not None or len(plans) > 1):
        raise ValueError("structure_only builds one factorization without data")
    for factorization, ranks in plans:
        kernel_fit = _decomposed(job, factorization, ranks, implementation, options,
                                 structure_only=structure_only)
        kernel_fits[factorization] = kernel_fit
        candidates.append(kernel_fit)
        if data is not None and data.weighting is not None:
            weighted = _decomposed(job, factorization, ranks, implementation, options,
                                   data.weighting)
            candidates.append(weighted)
            refitted = _refitted(weighted, data, job.kernel)
            if refitted is not None:
                candidates.append(refitted)
    shrinking = [c for c in candidates if _shrinks(c, job, allocation)]
    if not shrinking:
        best = min(candidates, key=lambda c: c.kernel_error)
        metric = job.spec.metric
        if metric == "latency":
            reason = (f"{best.factorization} at ranks {best.ranks} measured "
                      f"{_ms(best.latency)} > {_ms(job.dense_latency if allocation is None else allocation.cost)}"
                      f" allowed")
        else:
            after = best.flops if metric == "flops" else best.params
            before = job.dense_flops if metric == "flops" else job.dense_params
            what = "FLOPs" if metric == "flops" else "parameters"
            reason = (f"{best.factorization} at ranks {best.ranks} would have {after:,} {what} "
                      f">= {before:,}")
        if strict and job.spec.kind != "explicit":
            raise ValueError(f"layer {job.name!r}: {reason} (strict=True)")
        return dense(f"left dense: {reason}")
    if data is not None:
        for candidate in shrinking:
            _judge(candidate, data)
    per_factorization = {}
    for candidate in shrinking:
        held = per_factorization.get(candidate.factorization)
        if held is None or _better(candidate, held):
            per_factorization[candidate.factorization] = candidate
    best = min(per_factorization.values(), key=lambda c: c.score)
    notes = [n for n in (note, job.baked) if n]
    if data is not None and data.weighting is not None:
        fits = ", ".join(f"{c.fit} {c.downstream if c.downstream is not None else c.score:.3g}"
                         for c in shrinking if c.factorization == best.factorization)
        notes.append(f"fit: {best.fit} (held-out "
                     f"{'downstream' if best.downstream is not None else 'output'} error "
                     f"of each fit: {fits})")
        notes += [c.note for c in shrinking
                  if c.factorization == best.factorization and c.note]
    if len(plans) > 1:
        which = "output" if best.output_error is not None else "kernel"
        scores = ", ".join(f"{c.factorization} {c.score:.3g}" for c in per_factorization.values())
        notes.append(f"auto: {best.factorization} ({which} errors: {scores})")
    kernel_fit = kernel_fits.get(best.factorization)
    row = LayerReport(
        **base, factorization=best.factorization, ranks=best.ranks, params_after=best.params,
        flops_after=best.flops, kernel_error=best.kernel_error,
        output_error=best.output_error, note="; ".join(notes),
        latency_after=best.latency,
        implementation=best.layer.implementation,
    )
    return LayerOutcome(row, best.layer, kernel_fit.layer if kernel_fit is not None else None)
