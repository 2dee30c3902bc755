"""One-call compression of a trained model, with a report, and export to plain PyTorch.

:func:`compress` factorizes every selected convolution of a model (a copy by default) and
returns the compressed model and a :class:`CompressionReport`; :func:`export` turns every
factorized layer back into plain ``nn.Sequential`` chains that run without tt_conv.

:func:`compress` reads as its phases, each a function of this module: check the
arguments, initialise lazy convolutions, select the convolutions (and find what each one
really computes), probe the model on its inputs, plan the ranks, factorize layer by layer,
assemble the compressed model, and report.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from . import calibrate
from ._checks import FACTORIZATIONS
from .budget import (
    Allocation,
    GlobalLayer,
    InfeasibleBudget,
    check_autocast,
    forget_latencies,
    conv_latency,
    conv_latency_fraction,
    measure_model_seconds,
    measure_models_side_by_side,
    timed_under_autocast,
    shared_energy_allocation,
)
from .decompose import relative_error
from .equivalent import is_uninitialized_lazy
from .factorize import DATA_FIT_MARGIN, LayerData, LayerJob, LayerOutcome, factorize_layer
from .layers import FactorizedConv
from .layers.base import IMPLEMENTATIONS, conv_geometry
from .profile import (
    conv_input_shapes,
    copy_model,
    count_parameters,
    example_inputs,
    inference_pass,
    kernel_shape,
    layer_flops,
    model_flops,
    set_submodule,
)
from .rankspec import RankSpec, check_factorization_choice, parse_rank
from .report import CompressionReport, LayerReport
from .selection import ConvEntry, check_overrides, select_convolutions

__all__ = ["compress", "export", "parse_rank", "RankSpec"]


@dataclass
class Settings:
    """The checked arguments of :func:`compress`."""

    factorization: str
    spec: RankSpec
    overrides: Dict[str, Dict[str, Any]]
    fit: str
    strict: bool
    implementation: str
    options: Dict[str, Dict[str, Any]]
    progress: bool


@dataclass
class Probe:
    """What one look at the model on its inputs told (phase :func:`probe_model`)."""

    shape_inputs: Any
    calibration: Optional[calibrate.CalibrationRun]
    data_fit: bool
    input_shapes: Dict[str, Tuple[int, ...]]
    params_before: int
    flops_before: Optional[int]
    statistics: Dict[str, calibrate.LayerStatistics] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)


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
    strict: bool = False,
    inplace: bool = False,
    implementation: str = "auto",
    autocast: Any = None,
    decomposition_options: Optional[Mapping[str, Mapping[str, Any]]] = None,
    progress: bool = True,
) -> Tuple[nn.Module, CompressionReport]:
    """Factorize the convolutions of a trained model and report what it cost.

    Parameters
    ----------
    model : nn.Module
        Any model holding ``nn.Conv1d/2d/3d`` layers (factorized layers are re-factorized
        from their reconstructed kernels). A conv subclass or a wrapped conv (timm's
        ``StdConv2d``, a parametrized or weight-normed conv) is factorized from the kernel
        its forward really uses, with its padding, and the report says what was baked in;
        one that computes anything else (padding by the input size, forward hooks, other
        operations) stays dense with a warning naming it (:mod:`tt_conv.equivalent`).
        Uninitialised lazy convolutions are initialised by one pass on ``input_shape`` or
        ``calibration`` (on the copy), or stay dense without them.
    factorization : {"tucker", "cp", "tt", "auto"}
        ``"auto"`` factorizes each layer all three ways at the same cost and keeps the most
        accurate (smallest output error on the calibration batch when given, else kernel
        error). The cost is the layer's budget for ``params``/``flops`` ranks, and for
        data-driven ranks the parameter count of the Tucker ranks they select.
    rank : float, int, tuple of int, "evbmf" or dict
        * a float ``f`` in (0, 1] or ``{"params": f}``: each layer keeps at most ``f`` of its
          kernel's parameters (:func:`tt_conv.rank.layer_budget_rank`);
        * ``{"flops": f}``: each layer at most ``f`` of its FLOPs on its input (needs
          ``input_shape`` or ``calibration``; the layers then run factorized, and the
          dense and compressed models are timed side by side on that input, into the
          report, with a warning when the compressed one is slower);
        * ``{"latency": f}``: the whole model's measured forward time on ``input_shape``, on
          the model's device, in its dtype (or under ``autocast``) and channels-last (the
          layout its layers are timed in; run the result channels-last too), at most ``f``
          of the dense model's: each
          layer's ranks priced by its measured time, spread by the shared energy threshold
          below, then the compressed model measured whole and the share corrected (see
          :class:`LatencyPlan`); the report gives measured per-layer and model latencies;
        * ``{"params": f, "global": True}`` / ``{"flops": f, "global": True}``: the selected
          convolutions together (kernels and biases, layers left dense included) keep at
          most ``f`` of their parameters / FLOPs. The budget is spread by one energy
          threshold shared by all layers (each unfolding keeps that fraction of its
          spectral energy), the largest that fits, found by bisection; where every
          unfolding is kept whole and budget is left, CP ranks (which can exceed the
          unfoldings' ranks) grow by one common factor into it. The ranks of FLOP (and
          latency) budgets are rounded to multiples of 8 (from 12) or 16 (from 40), which
          convolution kernels run fastest (:func:`tt_conv.rank.hardware_multiple`);
          ``"multiple_of": m`` rounds to multiples of ``m`` instead, 1 keeps them exact;
        * ``"evbmf"`` or ``{"evbmf": w}``: EVBMF ranks (:func:`tt_conv.rank.evbmf_rank`),
          weakened by ``w`` in [0, 1] (1 = plain EVBMF);
        * ``{"energy": e}``: the smallest ranks keeping ``e`` of the spectral energy of every
          unfolding; ``{"error": eps}``: ranks for a relative kernel error ``eps`` (TT-SVD
          for TT);
        * an int or tuple: explicit ranks (clipped to the kernel).

        Dicts accept ``"min_rank"`` too, global budgets ``"multiple_of"``. See :mod:`tt_conv.rank` for the conventions.
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
        of real inputs. Each layer's output error is measured on it: the relative error of
        its output in the compressed model against the original model's at that point. Its
        shape stands in for ``input_shape`` when that is not given.
    fit : {"auto", "data", "kernel"}
        ``"kernel"`` (and ``"auto"``, the default) decomposes each kernel as it is; a
        calibration batch then only measures errors (and chooses the factorization under
        ``"auto"``), so the model is the one compressing without it would give. ``"data"``
        (needs ``calibration`` of at least 2 samples) holds the last quarter of the batch
        out and, for each layer, also decomposes the kernel weighted by its input and
        output channel statistics on the other samples, with and without a least-squares
        refit of its last stage (see :mod:`tt_conv.calibrate`); a data-aware candidate
        replaces the kernel fit only if it lowers the held-out error of what the next
        convolution receives by at least 5 %, and if the calibrated model's held-out output
        error is not at least 5 % below the kernel-only model's, the kernel fits are
        returned (the report says so). Ranks never depend on the data. Output errors in the
        report are then held-out errors. Held-out samples that come from the batch's own
        sources do not show every shift: on a pretrained pitch network calibrated on 6 clips
        the data-aware fit lowered every held-out error yet cost accuracy on other clips
        (see the results pages), which is why it is not the default.
    strict : bool
        By default a layer that cannot shrink within its budget (a depthwise convolution,
        one with a single channel per group, a tiny kernel) is left dense and its row says
        why; global budgets take what such layers cannot give from the others. With
        ``strict=True`` such a layer raises instead.
    inplace : bool
        Modify ``model`` itself; by default a deep copy is compressed and ``model`` is never
        modified. Layers are swapped in only once all of them are built.
    implementation : {"auto", "factorized", "reconstructed"}
        How factorized layers run (FLOP budgets always run factorized). With ``"auto"`` and a
        known input shape each layer's two executions are timed on its actual input shape
        and device and the faster kept (:func:`tt_conv.budget.measured_implementation`);
        without one, the layers' own estimate decides.
    autocast : {None, "fp32", "bf16", "fp16"} or torch.dtype, optional
        The mixed precision the compressed model will run in: every measured time (latency
        budgets, the measured execution choice) is then taken under ``torch.autocast`` of
        that dtype on the model's device, since which execution is faster, and by how much,
        changes with it (bf16 convolutions on AMX CPUs, fp16 on GPUs). ``None`` (default) or
        ``"fp32"``: in the model's own dtype.
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
        global budget below what rank 1 allows, a layer that cannot shrink (``strict=True``)
        or no layer that can, a FLOP target without an input shape, or a calibration batch
        the model cannot run; each message names the layer or argument.
    """
    settings = check_settings(model, factorization, rank, overrides, fit, strict,
                              implementation, decomposition_options, progress)
    timing = check_autocast(autocast)
    forget_latencies()  # this call's times, measured together (see forget_latencies)
    with timed_under_autocast(timing):
        compressed, report = _compress(model, settings, include, exclude, input_shape,
                                       calibration, inplace)
    if timing is not None:
        report.latency_autocast = str(timing).replace("torch.", "")
    return compressed, report


def _compress(model, settings: Settings, include, exclude, input_shape, calibration,
              inplace) -> Tuple[nn.Module, CompressionReport]:
    """The phases of :func:`compress`, in order, on checked settings."""
    shape_inputs, calibration_inputs = model_inputs(model, input_shape, calibration)
    model = initialise_lazy(model, shape_inputs, inplace)
    entries = select_convolutions(model, settings.factorization, settings.spec,
                                  include=include, exclude=exclude,
                                  overrides=settings.overrides)
    probe = probe_model(model, entries, shape_inputs, calibration_inputs, settings,
                        "input_shape" if input_shape is not None else "calibration")
    jobs = plan_jobs(entries, probe, settings.implementation)
    latency = LatencyPlan.measure(model, jobs, probe, settings.spec)
    # A latency budget's trial allocations are measured, not kept: without calibration data
    # (whose fits depend on the layers before) they are built without decomposing, "auto"
    # layers as the Tucker stand-in the allocation priced, and only the allocation kept is
    # decomposed, once (see _decompose_kept).
    deferred = latency is not None and probe.calibration is None
    while True:
        try:
            allocation = plan_global_budget(jobs, latency.conv_fraction if latency else None)
        except InfeasibleBudget as error:
            if latency is None:
                raise
            if latency.result is None:
                if not latency.remeasured:
                    latency = LatencyPlan.measure_again(model, jobs, probe, settings.spec)
                    continue
                raise latency.infeasible(error) from None
            break  # a corrected share below the least ranks: keep the models measured
        outcomes = factorize_layers(jobs, allocation, probe, settings, structure_only=deferred)
        compressed, kernel_only = assemble(model, outcomes, probe, inplace and latency is None)
        if latency is None or not latency.again((allocation, outcomes, compressed, kernel_only),
                                                 compressed, probe):
            break
    if latency is not None:
        # The chosen attempt's layers, into a fresh copy (a calibration run's working copy
        # holds the last attempt's) or into the model itself.
        allocation, outcomes, _, kernel_only = latency.result
        if deferred:
            outcomes = _decompose_kept(model, jobs, allocation, outcomes, probe, settings,
                                       latency)
        compressed = _replaced(model, {n: o.layer for n, o in outcomes.items()
                                       if o.layer is not None}, inplace)
    report = build_report(model, compressed, entries, outcomes, probe, settings, allocation,
                          kernel_only)
    if latency is not None:
        latency.annotate(report)
    elif settings.spec.kind == "flops" and probe.shape_inputs is not None \
            and compressed is not model:  # in place, no dense model is left to time
        measure_flop_budget_speed(model, compressed, probe, settings, report)
    return compressed, report


def _decompose_kept(model, jobs, allocation, measured: Dict[str, LayerOutcome], probe: Probe,
                    settings: Settings, latency: "LatencyPlan") -> Dict[str, LayerOutcome]:
    """The trial allocation a latency budget kept (``measured``, built without decomposing),
    decomposed.

    Layers of one factorization come out as they were measured (their times are cached).
    An ``"auto"`` layer was measured as the Tucker stand-in its allocation priced; now every
    factorization is decomposed at that layer's share and the least kernel error among
    those measured within the stand-in's time is kept (ResNet-34 at 0.6 of its latency:
    four allocations of three decompositions per layer took 178 s on 2 cores, 65 s so). Each
    layer is then at most as slow as the one measured, but not the model as a whole, so a
    model with other choices is measured again; over the target, the layers chosen
    differently are rebuilt as measured.
    """
    outcomes = factorize_layers(jobs, allocation, probe, settings)
    auto = {job.name for job in jobs if isinstance(job, LayerJob) and job.factorization == "auto"}
    changed = [name for name, outcome in outcomes.items()
               if _structure(outcome) != _structure(measured[name])]
    chosen = [name for name in changed if name in auto
              and outcomes[name].row.factorization != measured[name].row.factorization]
    unexpected = [name for name in changed if name not in chosen]
    if unexpected:
        warnings.warn(
            f"rank={{'latency': {latency.fraction:g}}}: layer(s) {unexpected} were built "
            "differently once decomposed than when the model was measured; its "
            "measured latency may not describe them", stacklevel=4)
    if chosen and not latency.confirm(
            _replaced(model, {n: o.layer for n, o in outcomes.items() if o.layer is not None},
                      inplace=False), probe, len(chosen)):
        outcomes.update(factorize_layers([job for job in jobs if isinstance(job, LayerJob)
                                          and job.name in chosen],
                                         allocation, probe, settings, allocated_only=True))
    return outcomes


def _structure(outcome: LayerOutcome):
    """What a layer's time depends on: its factorization, ranks and execution."""
    row = outcome.row
    return row.factorization, row.ranks, row.implementation


def measure_flop_budget_speed(model: nn.Module, compressed: nn.Module, probe: Probe,
                              settings: Settings, report: CompressionReport) -> None:
    """Phase 9 of a FLOP budget: the dense and the compressed model timed side by side on
    the input shape, into the report, with a warning if the compressed one is slower.

    A FLOP cut is not a speed-up everywhere: on mobile networks (EfficientNet-B0,
    MobileNetV3 on a 2-core CPU) most of the time is outside the convolutions that shrink,
    and the small pointwise layers a factorization splits in two run slower than the one
    they replace: at a third of the FLOPs they ran at 0.54-0.96 of dense's speed
    (``benchmarks/model_speed.py --model efficientnet_b0``, docs/results/model_speed.rst).
    """
    dense, measured = measure_models_side_by_side([model, compressed],
                                                  _as_args(probe.shape_inputs))
    report.model_latency_before, report.model_latency_after = dense, measured
    if measured > dense:
        warnings.warn(
            f"rank {settings.spec.describe()!r}: the compressed model measured "
            f"{measured / dense:.2f} of the dense model's time at input "
            f"{_shape_of(probe.shape_inputs)} on this device, slower than dense: its FLOP cut "
            f"does not make it faster here. rank={{'latency': f}} measures instead, and "
            f"leaves dense the layers whose factorized form is not faster", stacklevel=4)


# =========================================================================== phases


def check_settings(model, factorization, rank, overrides, fit, strict, implementation,
                   decomposition_options, progress) -> Settings:
    """Phase 0: every argument checked, or an exception naming it."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if fit not in ("auto", "data", "kernel"):
        raise ValueError(f"fit must be 'auto', 'data' or 'kernel', got {fit!r}")
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be True or False, got {strict!r}")
    options = {str(k).lower(): dict(v) for k, v in (decomposition_options or {}).items()}
    for key in options:
        if key not in FACTORIZATIONS:
            raise ValueError(
                f"decomposition_options keys must be among {FACTORIZATIONS}, got {key!r}"
            )
    return Settings(check_factorization_choice(factorization), parse_rank(rank),
                    check_overrides(overrides), fit, strict, implementation, options,
                    bool(progress))


def calibration_inputs(calibration):
    """The model inputs of a calibration batch: a tensor, a tuple of tensors, or the first
    batch of an iterable (a DataLoader); from an ``(inputs, targets)`` batch, the inputs."""
    if calibration is None:
        return None
    if isinstance(calibration, torch.Tensor):
        return _finite_batch(calibration)
    if isinstance(calibration, (tuple, list)):
        if not calibration or not all(isinstance(t, torch.Tensor) for t in calibration):
            raise TypeError(
                "calibration as a tuple must hold the model's input tensors, got "
                f"{[type(t).__name__ for t in calibration]}"
            )
        return tuple(_finite_batch(t) for t in calibration)
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
        return _finite_batch(batch[0])
    if isinstance(batch, torch.Tensor):
        return _finite_batch(batch)
    raise TypeError(
        f"calibration batches must be tensors or (inputs, targets) pairs, got "
        f"{type(batch).__name__}"
    )


def _finite_batch(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, unless it holds NaN or inf (the least-squares fits would fail on it)."""
    if tensor.is_floating_point() or tensor.is_complex():
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise ValueError(f"the calibration batch holds {bad} NaN or inf value(s) of "
                             f"{tensor.numel()}; calibrate on finite inputs")
    return tensor


def model_inputs(model: nn.Module, input_shape, calibration):
    """Phase 1: the inputs that size the model (``input_shape`` zeros, else the calibration
    batch) and the calibration batch itself."""
    batch = calibration_inputs(calibration)
    shape_inputs = example_inputs(model, input_shape) if input_shape is not None else batch
    return shape_inputs, batch


def initialise_lazy(model: nn.Module, shape_inputs, inplace: bool) -> nn.Module:
    """Phase 2: a model whose lazy convolutions are initialised by one pass on the inputs
    (on a copy unless ``inplace``); the model itself when it has none or no input is given
    (then they stay dense, with the reason in the report)."""
    if shape_inputs is None or not any(is_uninitialized_lazy(m) for m in model.modules()):
        return model
    target = model if inplace else copy_model(model)
    try:
        inference_pass(target, shape_inputs)
    except Exception as error:
        raise ValueError(f"the model could not run on its inputs to initialise its lazy "
                         f"layers: {error}") from error
    return target


def probe_model(model: nn.Module, entries: Sequence[ConvEntry], shape_inputs, batch,
                settings: Settings, argument: str) -> Probe:
    """Phase 3: input shapes of the convolutions, parameters and FLOPs before, and the
    calibration run (fit / held-out split, channel statistics on the fit samples)."""
    if settings.fit == "data" and batch is None:
        raise ValueError("fit='data' needs a calibration batch (calibration=...)")
    input_shapes: Dict[str, Tuple[int, ...]] = {}
    if shape_inputs is not None:
        try:
            input_shapes = conv_input_shapes(model, shape_inputs)
        except Exception as error:
            raise ValueError(f"the model could not run on {argument}: {error}") from error
    probe = Probe(
        shape_inputs=shape_inputs, calibration=None, data_fit=False, input_shapes=input_shapes,
        params_before=count_parameters(model),
        flops_before=model_flops(model, shape_inputs) if shape_inputs is not None else None,
    )
    if batch is None:
        return probe
    order = list(conv_input_shapes(model, batch)) if argument != "calibration" else \
        list(input_shapes)
    data_fit = settings.fit == "data"
    if data_fit and calibrate.batch_size(batch) < 2:
        raise ValueError("fit='data' needs a calibration batch of at least 2 samples "
                         "(some are held out to judge the fit)")
    probe.calibration = calibrate.CalibrationRun(model, batch, order, hold_out=data_fit)
    probe.data_fit = data_fit
    if data_fit:
        names = [e.name for e in entries if e.to_factorize and e.name in order]
        probe.statistics = calibrate.statistics(model, probe.calibration.fit_inputs, names)
    return probe


def plan_jobs(entries: Sequence[ConvEntry], probe: Probe, implementation: str = "auto"
              ) -> List[Union[LayerJob, ConvEntry]]:
    """Phase 4: a :class:`~tt_conv.factorize.LayerJob` per layer to factorize (the entry
    itself for a layer that stays dense), in the model's order. The dense layer's time is
    measured where the execution or the budget is (latency budgets; ``"auto"`` with known
    shapes, except under FLOP budgets)."""
    jobs: List[Union[LayerJob, ConvEntry]] = []
    for entry in entries:
        if not entry.to_factorize:
            jobs.append(entry)
            continue
        spec, name = entry.spec, entry.name
        shape = probe.input_shapes.get(name)
        if entry.factorization == "auto" and spec.kind == "explicit":
            raise ValueError(
                f"factorization='auto' (layer {name!r}) needs a budget or a data-driven rank "
                f"to compare factorizations at equal cost, not explicit ranks {spec.value}"
            )
        if spec.needs_shapes and shape is None:
            if probe.shape_inputs is None:
                raise ValueError(
                    f"rank {spec.describe()!r} for layer {name!r} needs the layer's input "
                    f"shape: pass input_shape (or calibration)")
            entry.dense_reason = "left dense: it did not run on the model's inputs, so its " \
                                 "FLOPs are unknown"
            jobs.append(entry)
            continue
        jobs.append(LayerJob(
            name=name, conv=entry.plain, factorization=entry.factorization, spec=spec,
            input_shape=shape, dense_params=count_parameters(entry.module),
            dense_flops=layer_flops(entry.plain, shape) if shape is not None else None,
            baked=entry.baked,
            dense_latency=conv_latency(entry.plain, None, None, shape)
            if shape is not None and (spec.metric == "latency" or (
                implementation == "auto" and spec.kind != "flops")) else None,
        ))
    return jobs


@dataclass
class LatencyPlan:
    """A ``{"latency": f}`` budget: the dense model's measured time, the share of it the
    selected convolutions may keep, and the compressed models tried.

    The convolutions' first share is :func:`tt_conv.budget.conv_latency_fraction` of their
    own measured latencies (what is not convolution does not shrink). Layers timed one by
    one do not add up exactly to the model's time, so each compressed model is measured
    whole, in rounds interleaved with the dense model measured again beside it, and the share
    corrected until one model is under the target and one over, then bisected, at most
    ``ATTEMPTS`` allocations in all. A correction takes the model's time as the part that
    does not shrink (its share measured before compressing) plus the convolutions' part, in
    proportion to their share, and aims at ``AIM`` of the target (scaling the share by target
    / measured alone under-corrects by the part that does not shrink: a model 1 % over
    stayed over through four allocations). The result
    is the model with the largest share (the least kernel error) that held the target, or,
    if none did, the last one (with a warning); the report says which.
    """

    ATTEMPTS = 4
    #: A corrected allocation aims at this much of the target, so that the machine's noise
    #: in the next measurement, or in the user's, does not carry it over (on a shared 2-core
    #: machine, ``benchmarks/model_speed.py --rank '{"latency": 0.5}'`` measured a Tucker
    #: ResNet-50 at 0.436 of dense when compressing and at 0.53 a minute later).
    AIM = 0.95
    #: Stop once a model that holds the target uses this much of it.
    CLOSE_ENOUGH = 0.90

    fraction: float
    model_before: float
    conv_before: float
    conv_fraction: float
    model_after: Optional[float] = None
    #: The dense model's time measured side by side with ``model_after``.
    dense_after: Optional[float] = None
    #: The dense model, measured again beside each compressed one.
    dense: Any = None
    attempts: int = 0
    held_share: Optional[float] = None
    over_share: Optional[float] = None
    result: Any = None

    #: Whether the dense model and its layers were measured a second time (see
    #: :meth:`measure_again`).
    remeasured: bool = False
    #: Lines for the report's notes.
    notes: List[str] = field(default_factory=list)

    @classmethod
    def measure(cls, model, jobs, probe: Probe, spec: RankSpec) -> Optional["LatencyPlan"]:
        """The plan, from the dense model's time and its layers' (measured by
        :func:`plan_jobs`); a share out of reach is measured again once before it is
        refused (:meth:`measure_again`)."""
        if spec.kind != "latency":
            return None
        try:
            return cls._measured(model, jobs, probe, spec)
        except ValueError:
            return cls.measure_again(model, jobs, probe, spec)

    @classmethod
    def _measured(cls, model, jobs, probe: Probe, spec: RankSpec) -> "LatencyPlan":
        timed = [job for job in jobs if isinstance(job, LayerJob)]
        model_before = measure_model_seconds(model, _as_args(probe.shape_inputs))
        conv_before = sum(job.dense_latency for job in timed)
        return cls(spec.value, model_before, conv_before,
                   conv_latency_fraction(spec.value, model_before, conv_before), dense=model)

    @classmethod
    def measure_again(cls, model, jobs, probe: Probe, spec: RankSpec) -> "LatencyPlan":
        """The plan measured afresh: every layer's dense time and the model's again.

        The time outside the convolutions is the model's time less its layers', taken
        moments apart; a machine that slowed down for one of them inflates or hides it, and
        so can make a feasible target look out of reach. Called once, when the first
        measurement or the first allocation finds the target out of reach; what it finds
        then stands (its ValueError is the user's).
        """
        forget_latencies()
        for job in jobs:
            if isinstance(job, LayerJob) and job.dense_latency is not None:
                job.dense_latency = conv_latency(job.conv, None, None, job.input_shape)
        plan = cls._measured(model, jobs, probe, spec)
        plan.remeasured = True
        return plan

    def again(self, result, compressed, probe: Probe) -> bool:
        """Record one compressed model; whether to allocate again (``conv_fraction`` is then
        the next share to try)."""
        self.attempts += 1
        # The dense model again, in rounds interleaved with the compressed one: measured
        # minutes apart, the two times differed with the machine's drift and with the heap
        # the process had grown meanwhile (freed memory reused or faulted in again).
        dense, measured = measure_models_side_by_side([self.dense, compressed],
                                                      _as_args(probe.shape_inputs))
        ratio = measured / dense
        share = self.conv_fraction
        if ratio <= self.fraction:
            if self.held_share is None or share > self.held_share:
                self.held_share, self.result = share, result
                self.model_after, self.dense_after = measured, dense
            close = ratio >= self.CLOSE_ENOUGH * self.fraction or share >= 1.0
        else:
            self.over_share = share if self.over_share is None else min(self.over_share, share)
            if self.held_share is None:
                self.result, self.model_after, self.dense_after = result, measured, dense
            close = False
        if close or self.attempts >= self.ATTEMPTS:
            return False
        if self.held_share is not None and self.over_share is not None:
            self.conv_fraction = 0.5 * (self.held_share + self.over_share)
        else:
            self.conv_fraction = min(1.0, max(1e-3, self.corrected_share(share, ratio)))
        return self.conv_fraction != share

    def corrected_share(self, share: float, ratio: float) -> float:
        """The convolutions' share that brings a model measured at ``ratio`` of dense with
        ``share`` to ``AIM`` of the target: ``ratio = rest + share * slope``, the rest (the
        dense model's time outside the selected convolutions, as a fraction) fixed."""
        rest = max(self.model_before - self.conv_before, 0.0) / self.model_before
        target = self.AIM * self.fraction
        if ratio - rest <= 0 or target <= rest:  # the rest was misjudged: scale instead
            return share * target / ratio
        return share * (target - rest) / (ratio - rest)

    def confirm(self, compressed, probe: Probe, chosen: int) -> bool:
        """Measure ``compressed`` (the kept allocation with ``chosen`` "auto" layers of
        another factorization than measured) beside the dense model; whether it holds the
        target (it then stands for the result)."""
        dense, measured = measure_models_side_by_side([self.dense, compressed],
                                                      _as_args(probe.shape_inputs))
        ratio = measured / dense
        held = ratio <= self.fraction
        if held:
            self.model_after, self.dense_after = measured, dense
        self.notes.append(
            f"auto: {chosen} layer(s) measured as Tucker took another factorization of less "
            f"kernel error; measured again at {ratio:.3g} of dense, "
            + ("kept" if held else "over the target: those layers were rebuilt as measured"))
        return held

    def infeasible(self, error: InfeasibleBudget) -> ValueError:
        """``error`` (the convolutions' share is below their least cost) said in the terms of
        the budget asked for: the whole model's latency."""
        rest = max(self.model_before - self.conv_before, 0.0)
        return ValueError(
            f"rank: a latency target of {self.fraction:g} x {self.model_before * 1e3:.4g} ms "
            f"leaves the selected convolutions {self.conv_fraction * self.conv_before * 1e3:.4g}"
            f" ms ({self.conv_fraction:.3g} of their measured {self.conv_before * 1e3:.4g} ms;"
            f" the model's other operations take {rest * 1e3:.4g} ms), below {error.floor}; "
            "raise the fraction or exclude small layers")

    def annotate(self, report: CompressionReport) -> None:
        report.model_latency_before = self.dense_after
        report.model_latency_after = self.model_after
        report.latency_target = self.fraction
        report.notes.append(
            f"latency budget: {self.attempts} allocation(s) measured; the convolutions keep "
            f"{(self.held_share or self.conv_fraction):.3g} of their own measured time")
        report.notes.extend(self.notes)
        if self.model_after > self.fraction * self.dense_after:
            warnings.warn(
                f"rank={{'latency': {self.fraction:g}}}: the compressed model measured "
                f"{self.model_after / self.dense_after:.3f} of the dense model's latency "
                f"after {self.attempts} allocations; the target was not held", stacklevel=3)


def _as_args(inputs):
    return inputs if isinstance(inputs, tuple) else (inputs,)


def plan_global_budget(jobs: Sequence[Union[LayerJob, ConvEntry]],
                       fraction: Optional[float] = None) -> Dict[str, Allocation]:
    """Phase 5: each layer's share of a global budget (empty without one); ``fraction``
    replaces the spec's (the convolutions' share of a latency budget)."""
    under = [job for job in jobs if isinstance(job, LayerJob) and job.spec.global_budget]
    if not under:
        return {}
    specs = {job.spec for job in under}
    if len(specs) > 1:
        raise ValueError(
            "all layers under a global budget must share one rank spec; got "
            f"{sorted(s.describe() for s in specs)}"
        )
    spec = next(iter(specs))
    layers = [GlobalLayer(job.name, job.conv,
                          "tucker" if job.factorization == "auto" else job.factorization,
                          job.kernel, job.dense_cost, job.input_shape) for job in under]
    energy, allocation = shared_energy_allocation(
        layers, spec.value if fraction is None else fraction, spec.metric, spec.min_rank,
        spec.rank_multiple)
    allocation = dict(allocation)
    allocation["__energy__"] = energy  # type: ignore[assignment]
    return allocation


def factorize_layers(jobs: Sequence[Union[LayerJob, ConvEntry]], allocation, probe: Probe,
                     settings: Settings, structure_only: bool = False,
                     allocated_only: bool = False) -> Dict[str, LayerOutcome]:
    """Phase 6: every layer factorized (or left dense), in order; with calibration each is
    fitted and judged on the inputs it gets in the compressed model so far. With
    ``allocated_only`` only the factorization each allocation priced is built, with
    ``structure_only`` without decomposing (see :func:`tt_conv.factorize.factorize_layer`)."""
    outcomes: Dict[str, LayerOutcome] = {}
    run = probe.calibration
    todo = [job for job in jobs if isinstance(job, LayerJob)]
    bar = tqdm(todo, desc="compressing", unit="layer", disable=None if settings.progress else True)
    try:
        for job in bar:
            bar.set_postfix_str(job.name)
            data = None
            if run is not None and job.name in run.order:
                stats = probe.statistics.get(job.name)
                data = LayerData(
                    **run.layer_data(job.name, job.conv,
                                     calibrate.whitening(stats) if stats is not None else None),
                    downstream_error=run.downstream_error(job.name) if probe.data_fit else None,
                )
            outcome = factorize_layer(job, allocation.get(job.name),
                                      implementation=settings.implementation,
                                      options=settings.options, strict=settings.strict,
                                      data=data, structure_only=structure_only,
                                      allocated_only=allocated_only)
            if run is not None and job.name not in run.order:
                outcome.row.note = "; ".join(filter(None, [
                    outcome.row.note, "did not run on the calibration batch: fitted to its "
                                      "kernel alone"]))
            if outcome.layer is None and data is not None:
                with torch.no_grad():
                    outcome.row.output_error = relative_error(
                        job.conv(data.x_held), data.target_held)
            if outcome.layer is not None and run is not None:
                run.accept(job.name, outcome.layer)
            outcomes[job.name] = outcome
    finally:
        bar.close()
    if outcomes and all(o.over_budget for o in outcomes.values()):
        name, first = next(iter(outcomes.items()))
        raise ValueError(
            f"layer {name!r}: {first.row.note.removeprefix('left dense: ')}; and so for every "
            f"selected layer: nothing can be factorized at {settings.spec.describe()}")
    return outcomes


def _replaced(model: nn.Module, layers: Mapping[str, nn.Module], inplace: bool) -> nn.Module:
    target = model if inplace else copy_model(model)
    for name, layer in layers.items():
        set_submodule(target, name, layer)
    return target


def assemble(model: nn.Module, outcomes: Mapping[str, LayerOutcome], probe: Probe,
             inplace: bool) -> Tuple[nn.Module, bool]:
    """Phase 7: the compressed model (the layers swapped in only now that all are built),
    and whether the kernel-only fit replaced the calibrated one because the calibrated
    model's held-out output error was not clearly (by ``DATA_FIT_MARGIN``) smaller."""
    chosen = {name: o.layer for name, o in outcomes.items() if o.layer is not None}
    if probe.data_fit:
        kernel = {name: o.kernel_layer if o.kernel_layer is not None else o.layer
                  for name, o in outcomes.items() if o.layer is not None}
        if any(kernel[name] is not chosen[name] for name in chosen):
            run = probe.calibration
            kernel_model = _replaced(model, kernel, inplace=False)
            if run.model_error(run.working) >= (1 - DATA_FIT_MARGIN) * run.model_error(
                    kernel_model):
                for name, outcome in outcomes.items():
                    if outcome.layer is not None and outcome.kernel_layer is not None:
                        outcome.layer = outcome.kernel_layer
                        outcome.row.note = "; ".join(filter(None, [
                            outcome.row.note, "kernel fit kept: the calibrated model's "
                                              "held-out output error was not clearly smaller"]))
                return (_replaced(model, kernel, inplace) if inplace else kernel_model), True
    if probe.calibration is not None and not inplace:
        return probe.calibration.working, False
    return _replaced(model, chosen, inplace), False


def build_report(model: nn.Module, compressed: nn.Module, entries: Sequence[ConvEntry],
                 outcomes: Mapping[str, LayerOutcome], probe: Probe, settings: Settings,
                 allocation, kernel_only: bool) -> CompressionReport:
    """Phase 8: one row per convolution of the model, in order, and the totals."""
    rows = []
    for entry in entries:
        if entry.name in outcomes:
            row = outcomes[entry.name].row
            if kernel_only and outcomes[entry.name].kernel_layer is not None:
                _refresh(row, outcomes[entry.name].layer, entry)
            rows.append(row)
            continue
        rows.append(_dense_row(entry, probe))
    model_output_error = None
    if probe.calibration is not None:
        model_output_error = probe.calibration.model_error(compressed)
    notes = list(probe.notes)
    if probe.data_fit:
        run = probe.calibration
        notes.append(
            f"data-aware fit (fit='data'): fitted on {calibrate.batch_size(run.fit_inputs)} "
            f"calibration samples, judged and measured on "
            f"{calibrate.batch_size(run.held_inputs)} held-out ones (output errors are "
            f"held-out errors)")
        if kernel_only:
            notes.append("the calibrated fit was discarded for the kernel fit: its held-out "
                         "model output error was larger")
    kept = [r for r in rows if r.factorization == "dense"]
    if kept:
        notes.append(f"{len(kept)} of {len(rows)} convolutions kept dense (reasons above)")
    energy = allocation.get("__energy__") if allocation else None
    return CompressionReport(
        layers=rows, factorization=settings.factorization, rank=settings.spec.describe(),
        model_params_before=probe.params_before,
        model_params_after=count_parameters(compressed),
        model_flops_before=probe.flops_before,
        model_flops_after=model_flops(compressed, probe.shape_inputs)
        if probe.shape_inputs is not None else None,
        input_shape=None if probe.shape_inputs is None else _shape_of(probe.shape_inputs),
        model_output_error=model_output_error, shared_energy=energy, notes=notes,
        measured_on=(f"{calibrate.batch_size(probe.calibration.held_inputs)} held-out "
                     f"calibration samples" if probe.data_fit else "the calibration batch"),
    )


def _refresh(row: LayerReport, layer: FactorizedConv, entry: ConvEntry) -> None:
    """A row's numbers for the kernel-fit layer that replaced the calibrated one (its
    output error, measured for the calibrated layer, no longer applies)."""
    row.kernel_error = relative_error(layer.reconstruct_kernel(), conv_geometry(entry.plain)[1])
    row.output_error = None


def _dense_row(entry: ConvEntry, probe: Probe) -> LayerReport:
    module = entry.plain if entry.plain is not None else entry.module
    lazy = is_uninitialized_lazy(entry.module)
    shape = probe.input_shapes.get(entry.name)
    params = count_parameters(entry.module) if not lazy else 0
    flops = None
    if shape is not None and not lazy:
        try:
            flops = layer_flops(module, shape)
        except (TypeError, ValueError):
            flops = None
    return LayerReport(
        name=entry.name, kernel_shape=() if lazy else kernel_shape(module),
        factorization="dense", ranks=None, params_before=params, params_after=params,
        flops_before=flops, flops_after=flops, note=entry.dense_reason,
    )


def _shape_of(inputs) -> Tuple[int, ...]:
    return tuple((inputs if isinstance(inputs, torch.Tensor) else inputs[0]).shape)


# =========================================================================== export


def export(model: nn.Module, *, inplace: bool = False, as_executed: bool = False
           ) -> nn.Module:
    """Replace every factorized layer of ``model`` by its plain ``nn.Sequential`` chain.

    The result holds only standard PyTorch modules (it loads and runs without tt_conv, e.g.
    after ``torch.save``) and computes the same outputs as the factorized model, with the
    same parameters (:meth:`tt_conv.FactorizedConv.to_sequential`), or with
    ``as_executed=True`` as the factorized layers run (consecutive 1 x 1 stages merged:
    fewer, cheaper convolutions for inference).

    Parameters
    ----------
    model : nn.Module
        A model, typically from :func:`compress`; a :class:`~tt_conv.FactorizedConv` alone is
        exported as its ``nn.Sequential``.
    inplace : bool
        Modify ``model`` itself instead of a deep copy.
    as_executed : bool
        Export each layer's chain as it executes (see
        :meth:`tt_conv.FactorizedConv.to_sequential`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, FactorizedConv):
        return model.to_sequential(as_executed)
    target = model if inplace else copy_model(model)
    factorized = [(name, module) for name, module in target.named_modules()
                  if isinstance(module, FactorizedConv)]
    for name, module in factorized:
        set_submodule(target, name, module.to_sequential(as_executed))
    return target
