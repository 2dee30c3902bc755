"""Inference convolutions with weights prepacked for oneDNN (tt_conv.layers._packed): the
same outputs as ``F.conv2d``, checked when packed, never under a FLOP counter, and formed
again with the kept weights."""

import copy
import io

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import tt_conv
from tt_conv.decompose import relative_error
from tt_conv.layers import _packed

needs_onednn = pytest.mark.skipif(not _packed._AVAILABLE,
                                  reason="this PyTorch has no oneDNN prepacked convolution")


def _layer(factorization, implementation, **conv):
    torch.manual_seed(0)
    options = dict(padding=1) | conv
    return tt_conv.FactorizedConv.from_conv(nn.Conv2d(16, 24, 3, **options),
                                            factorization=factorization, rank=0.5,
                                            implementation=implementation).eval()


def _input(batch=2, size=8):
    return torch.randn(batch, 16, size, size).contiguous(memory_format=torch.channels_last)


@needs_onednn
@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt"])
@pytest.mark.parametrize("implementation", ["factorized", "reconstructed"])
@pytest.mark.parametrize("conv", [{}, {"stride": 2}, {"groups": 4, "dilation": 2,
                                                      "padding": 2}])
@pytest.mark.parametrize("autocast", [False, True])
def test_kept_weights_run_prepacked_with_the_plain_convolutions_output(
        factorization, implementation, conv, autocast):
    layer = _layer(factorization, implementation, **conv)
    x = _input()
    with torch.no_grad():
        reference = layer.to_conv()(x.contiguous())
    context = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with torch.no_grad(), context:
        first = layer(x)
        packed = dict(layer._packs._packed)
        second = layer(x)
    assert packed and not layer._packs._refused  # every stage ran prepacked
    assert dict(layer._packs._packed).keys() == packed.keys()  # and was packed once
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    tolerance = 2e-2 if autocast else 1e-5
    assert first.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert relative_error(second.float().contiguous(), reference) < tolerance
    # Another batch size packs again; the outputs stay those of the plain convolution.
    x8 = _input(batch=5)
    with torch.no_grad(), context:
        y8 = layer(x8)
        reference8 = layer.to_conv()(x8.contiguous())
    assert len(layer._packs._packed) > len(packed)
    assert relative_error(y8.float().contiguous(), reference8.float()) < tolerance


@needs_onednn
def test_changed_factors_are_packed_again():
    layer = _layer("tucker", "factorized")
    x = _input()
    with torch.no_grad():
        layer(x)
        packs = layer._packs
        for p in layer.parameters():
            p.mul_(2)
        y = layer(x)
        reference = layer.to_conv()(x.contiguous())
    assert layer._packs is not packs
    assert relative_error(y.contiguous(), reference) < 1e-5


@needs_onednn
def test_a_packed_result_that_differs_from_the_plain_convolution_is_refused(monkeypatch):
    layer = _layer("cp", "factorized")
    x = _input()
    wrong = _packed.convolve_packed
    monkeypatch.setattr(_packed, "convolve_packed", lambda *a: wrong(*a) * 1.5)
    with torch.no_grad():
        y = layer(x)
        again = layer(x)
        reference = layer.to_conv()(x.contiguous())
    assert relative_error(y.contiguous(), reference) < 1e-5
    assert relative_error(again.contiguous(), reference) < 1e-5
    assert layer._packs._refused and not layer._packs._packed


def test_without_the_operator_the_layer_runs_plain_convolutions(monkeypatch):
    monkeypatch.setattr(_packed, "_AVAILABLE", False)
    layer = _layer("tt", "factorized")
    x = _input()
    with torch.no_grad():
        y = layer(x)
        reference = layer.to_conv()(x.contiguous())
    assert layer._packs is None or not layer._packs._packed
    assert relative_error(y.contiguous(), reference) < 1e-5


@pytest.mark.parametrize("implementation", ["factorized", "reconstructed"])
def test_a_flop_counter_sees_every_convolution(implementation):
    # The prepacked operator is not aten.convolution: under a dispatch mode (a FLOP counter,
    # a profiler's op counts) the layer runs the plain convolutions it counts.
    layer = _layer("tucker", implementation)
    x = _input()
    with torch.no_grad():
        layer(x)  # packed
        with FlopCounterMode(display=False) as counter:
            layer(x)
    assert counter.get_total_flops() == layer.flops(tuple(x.shape))


def test_nchw_activations_and_training_run_plain_convolutions():
    layer = _layer("cp", "factorized")
    x = torch.randn(2, 16, 8, 8)
    layer.train()
    y = layer(x)
    assert layer._packs is None
    y.sum().backward()  # training keeps autograd through plain convolutions
    layer.eval()
    with torch.no_grad():
        layer.set_implementation("reconstructed")
        layer(x)  # contiguous input: the reconstructed conv keeps PyTorch's own path
    assert layer._packs is None or not layer._packs._packed


@needs_onednn
def test_a_packed_layer_copies_pickles_and_scripts():
    layer = _layer("tt", "factorized")
    x = _input()
    with torch.no_grad():
        y = layer(x)
    assert layer._packs._packed
    for other in (copy.deepcopy(layer), torch.jit.script(layer)):
        with torch.no_grad():
            assert relative_error(other(x).contiguous(), y.contiguous()) < 1e-5
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert relative_error(loaded(x).contiguous(), y.contiguous()) < 1e-5


@needs_onednn
def test_under_a_torch_function_mode_every_stage_calls_conv2d():
    # A TorchFunctionMode (tt_conv.equivalent's tracer is one) sees F.conv2d, not the
    # prepacked operator: under one, the layer runs the calls it would see.
    from torch.overrides import TorchFunctionMode

    class CountConv2d(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.nn.functional.conv2d:
                CountConv2d.calls += 1
            return func(*args, **(kwargs or {}))

    layer = _layer("tt", "factorized")
    x = _input()
    with torch.no_grad():
        layer(x)  # packed
        assert layer._packs._packed
        with CountConv2d():
            layer(x)
    assert CountConv2d.calls == len(layer._executed_specs())
