"""Measured latency: the per-layer timings, the measured execution choice and the
``{"latency": f}`` budget of :func:`tt_conv.compress`.

No test asserts a speed of its own: each checks what the feature guarantees by its own
measurements (a factorized layer is kept only where its measured time is under its share;
the report's verdict is the one its numbers give).
"""

import importlib
import warnings

import pytest
import torch
from torch import nn

import tt_conv
from tt_conv import budget as B
from conftest import threads_fixture

_one_thread = threads_fixture(1)


def make_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    ).eval()


SHAPE = (2, 3, 24, 24)


def test_latency_rank_spec_is_a_whole_model_budget():
    spec = tt_conv.parse_rank({"latency": 0.5})
    assert (spec.kind, spec.value, spec.global_budget, spec.metric) == ("latency", 0.5, True, "latency")
    assert spec.is_budget and spec.needs_shapes
    assert "measured latency" in spec.describe()
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        tt_conv.parse_rank({"latency": 1.5})


def test_latency_budget_needs_an_input_shape():
    with pytest.raises(ValueError, match="input_shape"):
        tt_conv.compress(make_cnn(), "tucker", {"latency": 0.5}, progress=False)


def test_conv_latency_fraction_leaves_out_what_does_not_shrink():
    # 10 ms model, 8 ms of it convolutions: half the model is 5 ms, 3 ms of convolutions.
    assert B.conv_latency_fraction(0.5, 0.010, 0.008) == pytest.approx(3 / 8)
    assert B.conv_latency_fraction(1.0, 0.010, 0.008) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="other operations"):
        B.conv_latency_fraction(0.1, 0.010, 0.008)


def test_conv_latency_is_cached_and_measured_for_each_execution():
    conv = nn.Conv2d(16, 32, 3, padding=1)
    dense = B.conv_latency(conv, None, None, (1, 16, 12, 12))
    assert dense > 0 and B.conv_latency(conv, None, None, (1, 16, 12, 12)) == dense
    both = [B.conv_latency(conv, "tucker", (4, 4), (1, 16, 12, 12), how)
            for how in ("factorized", "reconstructed")]
    assert B.conv_latency(conv, "tucker", (4, 4), (1, 16, 12, 12)) == min(both)
    choice, times = B.measured_implementation(conv, "tucker", (4, 4), (1, 16, 12, 12))
    assert times == dict(zip(("factorized", "reconstructed"), both))
    assert times[choice] == min(both)


def test_measure_seconds_restores_the_training_mode_and_keeps_batch_norm_statistics():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    before = model[1].running_mean.clone()
    assert B.measure_seconds(model, torch.randn(2, 3, 8, 8)) > 0
    assert model.training and model[1].training
    assert torch.equal(model[1].running_mean, before)


@pytest.mark.parametrize("factorization", ["tucker", "auto"])
def test_latency_budget_keeps_layers_within_their_measured_share(factorization):
    model = make_cnn()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compressed, report = tt_conv.compress(model, factorization, {"latency": 0.7},
                                              input_shape=SHAPE, progress=False)
    x = torch.randn(SHAPE)
    with torch.no_grad():
        assert compressed(x).shape == model(x).shape
    rows = report.layers
    assert all(r.latency_before is not None and r.latency_after is not None for r in rows)
    factorized = [r for r in rows if r.factorization != "dense"]
    for row in factorized:
        # Kept only where its own measured time is below the dense layer's.
        assert row.latency_after < row.latency_before
        assert row.implementation in ("factorized", "reconstructed")
    totals = report.totals()
    assert totals["model_latency_before"] == report.model_latency_before > 0
    held = report.model_latency_after <= 0.7 * report.model_latency_before
    assert any("not held" in str(w.message) for w in caught) == (not held)
    text = str(report)
    assert "latency (ms)" in text and ("target 0.7: held" in text) == held


def test_measured_execution_choice_under_a_parameter_budget():
    model = make_cnn()
    compressed, report = tt_conv.compress(model, "tucker", 0.5, input_shape=SHAPE,
                                          progress=False)
    for row in report.layers:
        if row.factorization == "dense":
            continue
        layer = compressed.get_submodule(row.name)
        choice, times = B.measured_implementation(model.get_submodule(row.name), "tucker",
                                                  row.ranks, _input_shape(model, row.name))
        assert layer.implementation == row.implementation == choice
        assert row.latency_after == times[choice]


def _input_shape(model, name):
    shapes = {}
    module = model.get_submodule(name)

    def record(_, inputs):
        shapes["x"] = tuple(inputs[0].shape)

    handle = module.register_forward_pre_hook(record)
    with torch.no_grad():
        model(torch.zeros(SHAPE))
    handle.remove()
    return tuple(shapes["x"])


def test_cli_reads_a_latency_rank():
    from tt_conv.cli import parse_rank_argument

    assert parse_rank_argument("latency:0.5") == {"latency": 0.5}


def test_latency_plan_corrects_the_share_and_keeps_the_largest_that_held(monkeypatch):
    C = importlib.import_module("tt_conv.compress")  # the module, not the function
    measured = iter([0.30, 0.60, 0.48])  # seconds of a 1 s dense model, attempt by attempt
    dense = iter([1.0, 1.0, 1.0, 0.8])  # the dense model, measured again beside each
    monkeypatch.setattr(C, "measure_models_side_by_side",
                        lambda models, inputs: (next(dense), next(measured)))
    plan = C.LatencyPlan(fraction=0.5, model_before=1.0, conv_before=0.8, conv_fraction=0.3)
    probe = C.Probe(shape_inputs=torch.zeros(1), calibration=None, data_fit=False,
                    input_shapes={}, params_before=0, flops_before=None)
    # Held at 0.30: the 0.2 s outside the convolutions stays, the convolutions' 0.1 s grows
    # with the share, aiming at 0.95 of the target: 0.3 * (0.475 - 0.2) / (0.30 - 0.2).
    assert plan.again("first", None, probe)
    assert plan.conv_fraction == pytest.approx(0.825)
    assert plan.again("second", None, probe)         # over at 0.60: bisect
    assert plan.conv_fraction == pytest.approx(0.5625)
    assert not plan.again("third", None, probe)      # held at 0.48, within 10 %: stop
    assert (plan.result, plan.model_after, plan.dense_after, plan.held_share) == (
        "third", 0.48, 1.0, pytest.approx(0.5625))
    # A model 1 % over the target: scaling the share by target / measured (0.99) would
    # leave it over (0.2 + 0.99 * 0.303 = 0.5); the affine correction aims under.
    near = C.LatencyPlan(fraction=0.5, model_before=1.0, conv_before=0.8, conv_fraction=1.0)
    share = near.corrected_share(1.0, 0.505)
    assert 0.2 + share * (0.505 - 0.2) == pytest.approx(0.475)
    # Held or not is decided against the dense time measured beside it, not the first one:
    # 0.45 s is 0.45 of the first 1 s, but 0.5625 of the 0.8 s measured with it.
    late = C.LatencyPlan(fraction=0.5, model_before=1.0, conv_before=0.8, conv_fraction=0.4)
    measured = iter([0.45])
    assert late.again("late", None, probe)
    assert late.held_share is None and late.over_share == 0.4 and late.dense_after == 0.8


def test_a_corrected_share_below_the_least_ranks_keeps_the_model_measured(monkeypatch):
    # The first allocation is measured over the target, and the smaller share the plan tries
    # next is below what rank 1 everywhere allows: compress returns the model it measured
    # (with the warning that the target was not held) instead of failing after the fact.
    C = importlib.import_module("tt_conv.compress")
    real_plan = C.plan_global_budget
    # Every model, dense or compressed, "takes" the same time: always over the target.
    monkeypatch.setattr(C, "measure_model_seconds", lambda model, inputs: 1e-9)
    monkeypatch.setattr(C, "measure_models_side_by_side",
                        lambda models, inputs: [1e-9 for _ in models])
    plans = []

    def plan(jobs, fraction=None):
        plans.append(fraction)
        if len(plans) > 1:
            raise B.InfeasibleBudget("below the least ranks", "what rank 1 everywhere allows")
        return real_plan(jobs, 1.0)  # a first allocation that exists whatever the timings

    monkeypatch.setattr(C, "plan_global_budget", plan)
    with pytest.warns(UserWarning, match="the target was not held"):
        model, report = tt_conv.compress(make_cnn(), "tucker", {"latency": 0.5},
                                         input_shape=SHAPE, progress=False)
    assert len(plans) == 2 and plans[1] > 0
    assert report.model_latency_after == 1e-9
    x = torch.randn(SHAPE)
    assert model(x).shape == make_cnn()(x).shape


class _Probe(nn.Module):
    """One convolution whose forward records ``record(x, conv)`` in ``seen``."""

    def __init__(self, channels, record):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3)
        self.record = record
        self.seen = set()

    def forward(self, x):
        self.seen.add(self.record(x, self.conv))
        return self.conv(x)


def _autocast_probe():
    """Records the CPU autocast state its forward runs under."""
    return _Probe(3, lambda x, conv: torch.get_autocast_dtype("cpu")
                  if torch.is_autocast_enabled("cpu") else None)


def test_measurements_run_under_the_autocast_asked_for():
    probe = _autocast_probe()
    B.measure_seconds(probe, torch.randn(1, 3, 8, 8))
    assert probe.seen == {None}
    probe.seen.clear()
    with B.timed_under_autocast(torch.bfloat16):
        B.measure_seconds(probe, torch.randn(1, 3, 8, 8))
    assert probe.seen == {torch.bfloat16}
    probe.seen.clear()
    B.measure_seconds(probe, torch.randn(1, 3, 8, 8))  # the block's setting does not leak
    assert probe.seen == {None}
    assert B.check_autocast("bf16") is torch.bfloat16 and B.check_autocast("fp32") is None
    with pytest.raises(ValueError, match="autocast must be"):
        B.check_autocast("int8")


def test_conv_latency_is_cached_per_autocast():
    conv = nn.Conv2d(8, 8, 3, padding=1)
    plain = B.conv_latency(conv, None, None, (1, 8, 10, 10))
    before = len(B._LATENCY_CACHE)
    with B.timed_under_autocast(torch.bfloat16):
        B.conv_latency(conv, None, None, (1, 8, 10, 10))
    assert len(B._LATENCY_CACHE) == before + 1  # measured again, not the fp32 time
    assert B.conv_latency(conv, None, None, (1, 8, 10, 10)) == plain


def test_under_autocast_layers_are_timed_on_inputs_already_cast(monkeypatch):
    # Inside the model a layer receives what the layer before returned, in the autocast
    # dtype: its time must not include a cast of its input.
    seen = []
    monkeypatch.setattr(B, "measure_seconds", lambda module, example, **options: seen.append(
        (example.dtype, next(module.parameters()).dtype)) or 1e-3)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    with B.timed_under_autocast(torch.bfloat16):
        B.conv_latency(conv, None, None, (1, 8, 11, 13))
        B.conv_latency(conv, "tucker", (2, 2), (1, 8, 11, 13), "factorized")
    B.conv_latency(conv, None, None, (1, 8, 13, 11))
    assert seen == [(torch.bfloat16, torch.float32)] * 2 + [(torch.float32, torch.float32)]


def test_a_latency_budget_under_bf16_autocast_is_measured_under_it(monkeypatch):
    # What is timed, and under which autocast, not how fast this machine is: every
    # measurement (each layer, and the whole model beside the dense one) comes from a
    # stand-in proportional to the parameters, recording the autocast it ran under. A real
    # clock made 0.8 unreachable on a shared 2-core machine, and on a CPU without bf16
    # instructions the emulated whole model took 190 ms beside layers the stand-in timed at
    # 4 ms.
    seen = set()

    def timed(modules, example, **options):
        seen.add(B._TIMING_AUTOCAST.get())
        return [1e-4 + 1e-8 * sum(p.numel() for p in module.parameters()) for module in modules]

    monkeypatch.setattr(B, "measure_side_by_side", timed)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(128, 128, 3, padding=1)).eval()
    shape = (2, 64, 32, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, report = tt_conv.compress(model, "tucker", {"latency": 0.8}, input_shape=shape,
                                     autocast="bf16", progress=False)
    assert seen == {torch.bfloat16}
    assert report.latency_autocast == "bfloat16"
    assert report.to_dict()["totals"]["latency_autocast"] == "bfloat16"
    with B.timed_under_autocast(torch.bfloat16):  # the same (cached) times as the report's
        for row, channels in zip(report.layers, (64, 128, 128)):
            assert row.latency_before == B.conv_latency(model.get_submodule(row.name), None,
                                                        None, (2, channels, 32, 32))
    held = report.model_latency_after <= 0.8 * report.model_latency_before
    text = str(report)
    assert "under bfloat16 autocast" in text and ("target 0.8: held" in text) == held
    assert any("not held" in str(w.message) for w in caught) == (not held)
    with pytest.raises(ValueError, match="autocast must be"):
        tt_conv.compress(model, "tucker", 0.5, autocast="int8", progress=False)


def _layout_probe():
    """Records the memory layout of its input and weight."""
    return _Probe(8, lambda x, conv: (x.is_contiguous(memory_format=torch.channels_last),
                                      conv.weight.is_contiguous(
                                          memory_format=torch.channels_last)))


def test_a_whole_model_is_timed_channels_last_like_its_layers(monkeypatch):
    # Its layers are timed on channels-last inputs (example_input); the model must be too,
    # or NCHW's slower convolutions count as "other operations" (several times slower under
    # emulated bf16).
    model = _layout_probe()
    B.measure_model_seconds(model, (torch.randn(2, 8, 10, 10),))
    assert model.seen == set()  # a copy ran, not the model itself
    assert not model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    timed = []
    monkeypatch.setattr(B, "measure_side_by_side", lambda modules, example, **options:
                        timed.append((modules, example)) or [1.0] * len(modules))
    B.measure_model_seconds(model, (torch.randn(2, 8, 10, 10),))
    B.measure_models_side_by_side([model, _layout_probe()], (torch.randn(2, 8, 10, 10),))
    for modules, example in timed:
        for module in modules:
            module(*example)
            assert module.seen == {(True, True)}
    assert B.example_input((2, 8, 10, 10), "cpu", torch.float32).is_contiguous(
        memory_format=torch.channels_last)


def test_an_infeasible_latency_budget_is_explained_in_the_whole_models_terms():
    # A depthwise 7 x 7 convolution cannot shrink and takes most of the model's time: a
    # fifth of the model's latency is below what rank 1 everywhere allows. The message
    # states the whole-model target asked for, not the convolutions' internal share.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 1), nn.Conv2d(8, 192, 1),
                          nn.Conv2d(192, 192, 7, padding=3, groups=192),
                          nn.Conv2d(192, 8, 1)).eval()
    with pytest.raises(ValueError) as caught:
        tt_conv.compress(model, "tucker", {"latency": 0.2}, input_shape=(1, 8, 48, 48),
                         progress=False)
    message = str(caught.value)
    assert message.startswith("rank: a latency target of 0.2 x ")
    assert "leaves the selected convolutions" in message
    assert "other operations take" in message
    # Which of these sub-millisecond layers rank 1 does not speed up is the machine's call
    # (in a loaded run every one measured faster at rank 1); the floor is always said.
    assert "below what rank 1 everywhere allows (" in message
    assert "global latency target" not in message


def test_a_refused_global_budget_names_what_the_layers_that_cannot_shrink_keep():
    # Counted, not timed: the depthwise 7 x 7 convolution keeps its 192 x 49 weights and
    # 192 biases at any rank, and the floor says so.
    model = nn.Sequential(nn.Conv2d(8, 8, 1), nn.Conv2d(8, 192, 1),
                          nn.Conv2d(192, 192, 7, padding=3, groups=192),
                          nn.Conv2d(192, 8, 1)).eval()
    with pytest.raises(ValueError, match=r"of which 1 layer that cannot shrink keeps 9,600\)"):
        tt_conv.compress(model, "tucker", {"params": 0.01, "global": True}, progress=False)


def test_each_compress_call_measures_its_own_layer_times():
    # A latency budget weighs the dense model's time, measured in the call, against its
    # layers' times: kept from an earlier call, on a machine whose speed drifts, they would
    # misstate what the rest of the model takes.
    B._LATENCY_CACHE[("stale",)] = 1.0
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    tt_conv.compress(model, "tucker", 0.5, progress=False)
    assert ("stale",) not in B._LATENCY_CACHE


def test_models_measured_side_by_side_run_in_interleaved_rounds(monkeypatch):
    order = []

    class Named(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            order.append(self.name)
            return x

    times = B.measure_side_by_side([Named("a"), Named("b")], torch.zeros(1), min_seconds=0.0,
                                   rounds=3)
    assert len(times) == 2 and all(t > 0 for t in times)
    assert order == ["a", "a", "b", "b"] + ["a", "b"] * 3  # warm-ups, then alternating


@pytest.mark.parametrize("dense_s, compressed_s, warns", [(1.0, 1.5, True), (1.0, 0.5, False)])
def test_a_flop_budget_times_the_compressed_model_and_warns_when_it_is_slower(
        monkeypatch, dense_s, compressed_s, warns):
    # On mobile networks a third of the FLOPs ran at 0.6-0.9 of dense's speed: the report
    # gives both measured times, and a slower model is not left unsaid.
    C = importlib.import_module("tt_conv.compress")
    timed = []

    def side_by_side(models, inputs):
        timed.append(len(models))
        for m in models:
            m(*inputs)  # the real models, on the input shape
        return [dense_s, compressed_s]

    monkeypatch.setattr(C, "measure_models_side_by_side", side_by_side)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, report = tt_conv.compress(make_cnn(), "tucker", {"flops": 0.5, "global": True},
                                         input_shape=SHAPE, progress=False)
    slower = [w for w in caught if "slower than dense" in str(w.message)]
    assert bool(slower) == warns and timed == [2]
    assert (report.model_latency_before, report.model_latency_after) == (dense_s, compressed_s)
    assert "measured model latency" in str(report)
    if warns:
        assert "rank={'latency': f}" in str(slower[0].message)
        assert slower[0].filename == __file__  # points at the caller's compress call
    # In place there is no dense model left to time; without a shape nothing runs.
    timed.clear()
    tt_conv.compress(make_cnn(), "tucker", {"flops": 0.5, "global": True}, input_shape=SHAPE,
                     inplace=True, progress=False)
    tt_conv.compress(make_cnn(), "tucker", 0.5, progress=False)
    assert timed == []


def test_trial_allocations_are_measured_without_decomposing(monkeypatch):
    # Three allocations measured (held at 0.30 of dense, over at 0.95, held at 0.75, within
    # 10 % of 0.8): with one factorization the trial layers are built without decomposing,
    # and only the allocation kept is decomposed, once per layer. (Half of this small
    # model's latency is out of reach on some machines: its convolutions at rank 1 take
    # more than half of their time.)
    C = importlib.import_module("tt_conv.compress")
    ratios = iter([0.30, 0.95, 0.75])
    monkeypatch.setattr(C, "measure_models_side_by_side",
                        lambda models, inputs: (1.0, next(ratios)))
    decomposed = []
    real_init = tt_conv.FactorizedConv.init_from_kernel

    def counting_init(layer, kernel, **options):
        decomposed.append(tuple(layer.rank))
        return real_init(layer, kernel, **options)

    monkeypatch.setattr(tt_conv.FactorizedConv, "init_from_kernel", counting_init)
    model = make_cnn()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "built differently once decomposed"
        compressed, report = tt_conv.compress(model, "tucker", {"latency": 0.8},
                                              input_shape=SHAPE, progress=False)
    assert "3 allocation(s)" in " ".join(report.notes)
    rows = [row for row in report.layers if row.factorization == "tucker"]
    assert rows and sorted(decomposed) == sorted(row.ranks for row in rows)
    modules = dict(compressed.named_modules())
    dense = dict(model.named_modules())
    for row in rows:
        layer = modules[row.name]
        with torch.no_grad():
            error = (layer.reconstruct_kernel() - dense[row.name].weight).norm() / \
                dense[row.name].weight.norm()
        assert row.kernel_error == pytest.approx(float(error), rel=1e-4) and error < 1
        assert tuple(layer.rank) == row.ranks and layer.implementation == row.implementation


@pytest.mark.parametrize("refused_by", ["measurement", "allocation"])
def test_a_target_out_of_reach_is_measured_again_once_before_it_is_refused(monkeypatch,
                                                                              refused_by):
    # The dense model's first measurement came while the machine was slow. 100 s leaves
    # nothing of 0.9 of it to the convolutions (refused by the measurement itself); 9.95 x
    # the layers' own time leaves them 0.5 % of theirs, less than rank 1 needs (refused by
    # the first allocation). Measured again, dense model and layers alike, it is held.
    C = importlib.import_module("tt_conv.compress")
    real = C.measure_model_seconds
    real_latency = C.conv_latency
    calls, layer_times = [], []

    def slow_once(model, inputs):
        calls.append(model)
        if len(calls) == 1:
            return 100.0 if refused_by == "measurement" else 9.95 * sum(layer_times)
        return real(model, inputs)

    def counting(conv, factorization, ranks, shape, implementation=None):
        seconds = real_latency(conv, factorization, ranks, shape, implementation)
        if factorization is None:
            layer_times.append(seconds)
        return seconds

    monkeypatch.setattr(C, "measure_model_seconds", slow_once)
    monkeypatch.setattr(C, "conv_latency", counting)
    model = make_cnn()
    compressed, report = tt_conv.compress(model, "tucker", {"latency": 0.9},
                                          input_shape=SHAPE, progress=False)
    assert len(calls) == 2 and len(layer_times) == 2 * 3  # three convolutions, twice
    assert report.latency_target == 0.9 and report.model_latency_after is not None
    # A target still out of reach when measured again is refused as before.
    monkeypatch.setattr(C, "measure_model_seconds", lambda model, inputs: 100.0)
    with pytest.raises(ValueError, match="other operations"):
        tt_conv.compress(model, "tucker", {"latency": 0.9}, input_shape=SHAPE,
                         progress=False)


@pytest.mark.parametrize("confirmed", [0.79, 0.90])
def test_auto_trials_are_measured_as_tucker_and_its_choices_measured_again(monkeypatch,
                                                                           confirmed):
    # Under "auto" the trial allocations are built as the Tucker stand-in each allocation
    # priced, without decomposing; only the kept one is decomposed, every factorization
    # once per layer. Here CP is made to measure fastest and fit best, so every layer takes
    # it: the model is measured again (0.79 of dense holds the 0.8 target and is kept; 0.90
    # does not, and those layers are rebuilt as the Tucker layers that were measured).
    C = importlib.import_module("tt_conv.compress")
    F = importlib.import_module("tt_conv.factorize")
    ratios = iter([0.30, 0.95, 0.75, confirmed])
    monkeypatch.setattr(C, "measure_models_side_by_side",
                        lambda models, inputs: (1.0, next(ratios)))
    real_choice = F.measured_implementation

    def cp_fastest(conv, factorization, ranks, input_shape):
        choice, times = real_choice(conv, factorization, ranks, input_shape)
        if factorization == "cp":
            times = {how: 1e-9 for how in times}
        return choice, times

    monkeypatch.setattr(F, "measured_implementation", cp_fastest)
    monkeypatch.setattr(F.Candidate, "score",
                        property(lambda c: 0.0 if c.factorization == "cp" else c.kernel_error))
    decomposed = []
    real_init = tt_conv.FactorizedConv.init_from_kernel

    def counting_init(layer, kernel, **options):
        decomposed.append(layer.factorization)
        return real_init(layer, kernel, **options)

    monkeypatch.setattr(tt_conv.FactorizedConv, "init_from_kernel", counting_init)
    model = make_cnn()
    compressed, report = tt_conv.compress(model, "auto", {"latency": 0.8}, input_shape=SHAPE,
                                          progress=False)
    notes = " ".join(report.notes)
    assert "3 allocation(s)" in notes and next(ratios, None) is None
    rows = [row for row in report.layers if row.factorization != "dense"]
    held = confirmed <= 0.8
    assert rows and {row.factorization for row in rows} == {"cp" if held else "tucker"}
    # One decomposition per factorization and layer (three allocations measured), and the
    # Tucker layers rebuilt once more when CP's model is over the target.
    per_layer = {f: decomposed.count(f) for f in ("cp", "tucker", "tt")}
    assert per_layer["cp"] == len(rows) and per_layer["tt"] <= len(rows)
    assert per_layer["tucker"] == len(rows) * (1 if held else 2)
    assert ("kept" if held else "rebuilt as measured") in notes
    assert report.model_latency_after == (0.79 if held else 0.75)
    modules = dict(compressed.named_modules())
    for row in rows:
        assert modules[row.name].factorization == row.factorization
        with torch.no_grad():
            dense = model.get_submodule(row.name).weight
            error = (modules[row.name].reconstruct_kernel() - dense).norm() / dense.norm()
        assert row.kernel_error == pytest.approx(float(error), rel=1e-4)
