"""What a factorized layer convolves with: merged 1 x 1 stages, and weights kept outside
autograd (formed again when the factors change, cast once under autocast)."""

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import tt_conv
from tt_conv.decompose import relative_error

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class CountOps(TorchDispatchMode):
    """Counts the convolutions and matrix products a call runs."""

    def __init__(self):
        super().__init__()
        self.convolutions = self.products = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "convolution":
            self.convolutions += 1
        elif name in ("mm", "bmm", "matmul", "addmm", "baddbmm"):
            self.products += 1
        return func(*args, **(kwargs or {}))


def dense_output(layer, x):
    """``layer``'s output computed by a plain convolution with its reconstructed kernel."""
    with torch.no_grad():
        return layer.to_conv()(x)


def run(layer, x):
    """``layer``'s output in inference (evaluation mode, no gradients) and what it ran."""
    layer.eval()
    with torch.no_grad(), CountOps() as ops:
        y = layer(x)
    return y, ops


@pytest.mark.parametrize("n_dim", [1, 2, 3])
@pytest.mark.parametrize("factorization, stages", [("cp", 2), ("tucker", 2), ("tt", 2)])
@pytest.mark.parametrize("stride, groups", [(1, 1), (2, 1), (1, 2)])
def test_a_pointwise_kernel_runs_two_convolutions(factorization, stages, n_dim, stride, groups):
    # Tucker's (in -> r1 -> r2 -> out) and TT's (in -> r1 -> r2 -> r3 -> out) chains of a
    # 1 x 1 kernel hold consecutive 1 x 1 stages: they run as one, with the same output.
    torch.manual_seed(0)
    conv = CONVS[n_dim](16, 24, 1, stride=stride, groups=groups)
    layer = tt_conv.FactorizedConv.from_conv(conv, factorization=factorization, rank=0.5,
                                             implementation="factorized")
    x = torch.randn(2, 16, *[7] * n_dim)
    y, ops = run(layer, x)
    assert ops.convolutions == stages
    assert relative_error(y, dense_output(layer, x)) < 1e-5
    assert len(layer.stage_weights()) == len(layer._chain_specs())  # the factors are unchanged
    # to_sequential keeps the factor structure (CP folds its unit-axis factors).
    sequential = layer.to_sequential()
    assert sum(p.numel() for p in sequential.parameters()) <= layer.n_parameters
    assert relative_error(sequential(x), y) < 1e-5


def test_merging_is_chosen_by_cost_and_stays_out_of_explicit_padding():
    # A wide middle stage is worth merging; a narrow rank between wide sides is not
    # (in -> r -> out through a small r costs less than the in -> out product).
    torch.manual_seed(0)
    narrow = tt_conv.TuckerConv(256, 256, 1, rank=(8, 8))
    assert narrow._runs in ([(0, 2), (2, 3)], [(0, 1), (1, 3)])
    # TT of a 3 x 1 kernel: in -> r1 (1 x 1), r1 -> r2 (3 x 1), r2 -> r3 (the unit axis,
    # 1 x 1), r3 -> out: the last two merge.
    tall = tt_conv.TTConv(16, 16, (3, 1), padding=(1, 0), rank=(4, 4, 4))
    assert tall._runs == [(0, 1), (1, 2), (2, 4)]
    # With explicit padding (reflect) the first stage stays apart: the padding goes
    # before the second stage.
    padded = tt_conv.TTConv(16, 16, 1, padding=1, padding_mode="reflect", rank=(4, 4, 4))
    assert padded._runs[0] == (0, 1)
    x = torch.randn(2, 16, 6, 6)
    for layer in (narrow, tall, padded):
        x = torch.randn(2, layer.in_channels, 6, 6)
        assert relative_error(run(layer, x)[0], dense_output(layer, x)) < 1e-5


@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt"])
@pytest.mark.parametrize("implementation", ["factorized", "reconstructed"])
def test_weights_are_kept_outside_autograd_and_formed_again_when_the_factors_change(
        factorization, implementation):
    torch.manual_seed(0)
    layer = tt_conv.FactorizedConv.from_conv(nn.Conv2d(8, 12, 1), factorization=factorization,
                                             rank=0.5, implementation=implementation)
    x = torch.randn(2, 8, 5, 5)
    first, ops = run(layer, x)
    again, ops_again = run(layer, x)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert ops_again.products == 0  # no kernel rebuilt, no stages merged
    assert ops_again.convolutions == (1 if implementation == "reconstructed" else 2)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        layer(x)
    assert counter.get_total_flops() == layer.flops(tuple(x.shape))
    # In training mode (a no-grad pass that updates statistics, say) nothing is kept.
    layer.train()
    with torch.no_grad(), CountOps() as ops:
        layer(x)
    assert ops.products > 0 or factorization == "cp" and implementation == "factorized"
    assert run(layer, x)[1].products == 0  # back in evaluation mode: the kept weights

    # Changed in place (an optimiser step), loaded, moved: the output follows.
    with torch.no_grad():
        next(iter(layer.parameters())).mul_(2)
    assert relative_error(run(layer, x)[0], dense_output(layer, x)) < 1e-5
    other = tt_conv.FactorizedConv.from_conv(nn.Conv2d(8, 12, 1), factorization=factorization,
                                             rank=tuple(layer.rank),
                                             implementation=implementation)
    layer.load_state_dict(other.state_dict())
    assert relative_error(run(layer, x)[0], dense_output(other, x)) < 1e-5
    layer.double()
    y = run(layer, x.double())[0]
    assert y.dtype == torch.float64
    assert relative_error(y, dense_output(layer, x.double())) < 1e-10
    # A change through .data bypasses the version counter: forget_kept_weights says so.
    with torch.no_grad():
        next(iter(layer.parameters())).data.mul_(3)
    layer.forget_kept_weights()
    assert relative_error(run(layer, x.double())[0], dense_output(layer, x.double())) < 1e-10
    y = run(layer, x.double())[0]
    # A copy starts without what the original kept, and computes the same.
    clone = copy.deepcopy(layer)
    assert clone._inference_cache is None
    torch.testing.assert_close(run(clone, x.double())[0], y)


@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt"])
def test_under_autograd_the_weights_are_formed_on_every_call(factorization):
    torch.manual_seed(0)
    layer = tt_conv.FactorizedConv.from_conv(nn.Conv2d(8, 12, 1), factorization=factorization,
                                             rank=0.5, implementation="factorized")
    x = torch.randn(2, 8, 5, 5)
    layer.eval()
    with torch.no_grad():
        layer(x)  # keeps weights
    layer(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    reference = copy.deepcopy(layer)  # starts without the kept weights (__getstate__)
    with torch.no_grad():
        for p in layer.parameters():
            p.sub_(0.1 * p.grad)
            p.grad = None
    loss = layer(x).square().sum()  # the stepped factors, not the kept weights
    assert relative_error(layer(x), dense_output(layer, x)) < 1e-5
    assert not torch.equal(loss, reference(x).square().sum())


@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt"])
@pytest.mark.parametrize("implementation", ["factorized", "reconstructed"])
def test_under_bf16_autocast_the_weights_are_cast_once_and_kept_apart(factorization,
                                                                      implementation):
    torch.manual_seed(0)
    layer = tt_conv.FactorizedConv.from_conv(nn.Conv2d(8, 12, 3, padding=1),
                                             factorization=factorization, rank=0.5,
                                             implementation=implementation)
    x = torch.randn(2, 8, 6, 6)
    # What autocast makes of the float32 weights (formed under autograd, a reconstructed
    # kernel would be rebuilt in bf16: formed outside autocast here, as the layer keeps it).
    if implementation == "reconstructed":
        kernel = layer.reconstruct_kernel().detach()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = nn.functional.conv2d(x, kernel, layer.bias, padding=1)
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = layer(x)
    layer.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        kept = layer(x)
        again = layer(x)
    assert kept.dtype == torch.bfloat16
    torch.testing.assert_close(kept, expected.detach(), rtol=0, atol=0)
    torch.testing.assert_close(again, kept, rtol=0, atol=0)
    weights, bias = layer._inference_cache[1]
    assert all(w.dtype == torch.bfloat16 for w in weights) and bias.dtype == torch.bfloat16
    # Outside autocast the float32 weights are formed again, not the bf16 ones reused.
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == torch.float32
    assert relative_error(y, dense_output(layer, x)) < 1e-5


@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt"])
def test_export_as_executed_runs_the_merged_chain(factorization):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 1),
                          nn.ReLU(), nn.Conv2d(32, 16, (3, 1), padding=(1, 0))).eval()
    compressed, _ = tt_conv.compress(model, factorization, 0.5, progress=False)
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        reference = compressed(x)
    for as_executed in (False, True):
        plain = tt_conv.export(compressed, as_executed=as_executed)
        assert not any(isinstance(m, tt_conv.FactorizedConv) for m in plain.modules())
        with torch.no_grad(), CountOps() as ops:
            y = plain(x)
        assert relative_error(y, reference) < 1e-5
        executed = sum(len(m._runs) for m in compressed.modules()
                       if isinstance(m, tt_conv.FactorizedConv))
        if as_executed:
            assert ops.convolutions == executed
        else:
            assert ops.convolutions >= executed
    pointwise = compressed[2]
    assert len(pointwise.to_sequential(as_executed=True)) == 2
    assert len(pointwise.to_sequential()) == len(pointwise._chain_specs())


class ConvWeights(TorchDispatchMode):
    """The weight of every convolution a call runs, with its input."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "convolution":
            self.calls.append((args[0], args[1]))
        return func(*args, **(kwargs or {}))


def _laid_out_as(weight, x):
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    if x.dim() in formats and x.is_contiguous(memory_format=formats[x.dim()]) \
            and not x.is_contiguous():
        return weight.is_contiguous(memory_format=formats[x.dim()])
    return weight.is_contiguous()


@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt"])
@pytest.mark.parametrize("implementation", ["factorized", "reconstructed"])
@pytest.mark.parametrize("n_dim, channels_last", [(1, False), (2, False), (2, True),
                                                  (3, True)])
@pytest.mark.parametrize("mode", ["inference", "bf16 inference", "training"])
def test_every_convolution_reads_its_weight_in_the_activations_layout(
        factorization, implementation, n_dim, channels_last, mode):
    # The products that form a chain's weights and a reconstructed kernel are transposed
    # views; a convolution given one reorders it on every call (a TT layer's reconstructed
    # 512 x 512 x 3 x 3 kernel ran 8x slower than the dense layer's).
    torch.manual_seed(0)
    conv = CONVS[n_dim](8, 12, 3, padding=1)
    layer = tt_conv.FactorizedConv.from_conv(conv, factorization=factorization, rank=0.5,
                                             implementation=implementation)
    x = torch.randn(2, 8, *[6] * n_dim)
    if channels_last:
        x = x.contiguous(memory_format={2: torch.channels_last,
                                        3: torch.channels_last_3d}[n_dim])
    layer.train(mode == "training")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16 inference")
    with torch.set_grad_enabled(mode == "training"), autocast, ConvWeights() as seen:
        y = layer(x)
        again = layer(x)
    assert len(seen.calls) >= 2
    for activation, weight in seen.calls:
        assert _laid_out_as(weight, activation), (tuple(weight.shape), weight.stride())
    torch.testing.assert_close(again, y, rtol=0, atol=0)
    reference = dense_output(layer, x.contiguous())
    tolerance = 2e-2 if mode == "bf16 inference" else 1e-5
    assert relative_error(y.float().contiguous(), reference) < tolerance


def test_a_stage_with_a_unit_spatial_axis_runs_contiguous_with_a_contiguous_weight():
    # Where channels-last activations with a spatial axis of size 1 run contiguous (see
    # _forward_factorized), a channels-last weight would bring the channels-last path back.
    torch.manual_seed(0)
    layer = tt_conv.FactorizedConv.from_conv(nn.Conv2d(8, 12, 3, padding=1, stride=2),
                                             factorization="tt", rank=0.5,
                                             implementation="factorized").eval()
    x = torch.randn(2, 8, 2, 2).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), ConvWeights() as seen:
        y = layer(x)
    unit = [(a, w) for a, w in seen.calls if 1 in a.shape[2:]]
    assert unit, "the strided chain should reach a 1 x 1 activation"
    assert all(a.is_contiguous() and w.is_contiguous() for a, w in unit)
    assert relative_error(y, dense_output(layer, x.contiguous())) < 1e-5
