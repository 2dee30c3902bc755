"""At full rank a factorized layer computes exactly what the dense conv computes.

Every path is checked against torch's own ``nn.Conv1d/2d/3d``: the factorized chain, the
reconstructed kernel, the exported ``nn.Sequential`` and the exported dense conv.
"""

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import tt_conv

FACTORIZATIONS = ("cp", "tucker", "tt")
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
FULL_RANK = 10**6
CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def relative_error(a, b):
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-12))


def assert_all_paths_match(conv, factorization, x):
    reference = conv(x)
    layer = tt_conv.FactorizedConv.from_conv(conv, factorization=factorization, rank=FULL_RANK)
    outputs = {}
    for implementation in ("factorized", "reconstructed"):
        layer.set_implementation(implementation)
        outputs[implementation] = layer(x)
    outputs["sequential"] = layer.to_sequential()(x)
    outputs["to_conv"] = layer.to_conv()(x)
    for name, out in outputs.items():
        assert out.shape == reference.shape, name
        assert relative_error(out, reference) <= 1e-4, (name, relative_error(out, reference))


@st.composite
def conv_cases(draw):
    n_dim = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2, 3]))
    in_per_group = draw(st.integers(1, 3))
    out_per_group = draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(n_dim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(n_dim))
    padding_kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    if padding_kind == "same":
        stride = (1,) * n_dim
    else:
        stride = tuple(draw(st.integers(1, 3)) for _ in range(n_dim))
    if padding_kind == "int":
        padding = draw(st.integers(0, 2))
    elif padding_kind == "tuple":
        padding = tuple(draw(st.integers(0, 2)) for _ in range(n_dim))
    else:
        padding = padding_kind
    padding_mode = draw(st.sampled_from(PADDING_MODES))
    bias = draw(st.booleans())
    # Inputs large enough for the receptive field and for reflect padding (pad < size).
    reach = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    low = [max(r, 3) for r in reach]
    size = tuple(draw(st.integers(lo, lo + (4 if n_dim < 3 else 2))) for lo in low)
    factorization = draw(st.sampled_from(FACTORIZATIONS))
    conv = CONVS[n_dim](
        in_per_group * groups, out_per_group * groups, kernel, stride=stride, padding=padding,
        dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
    )
    return conv, factorization, size


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=conv_cases(), seed=st.integers(0, 2**16))
def test_full_rank_matches_dense_conv_for_any_geometry(case, seed):
    conv, factorization, size = case
    torch.manual_seed(seed)
    x = torch.randn(2, conv.in_channels, *size)
    assert_all_paths_match(conv, factorization, x)


@pytest.mark.parametrize(
    "n_dim,factorization,padding_mode",
    list(itertools.product((1, 2, 3), FACTORIZATIONS, PADDING_MODES)),
)
def test_every_padding_mode_in_every_dimension(n_dim, factorization, padding_mode):
    torch.manual_seed(0)
    conv = CONVS[n_dim](4, 6, 3, stride=2, padding=1, padding_mode=padding_mode)
    x = torch.randn(2, 4, *([7] * n_dim))
    assert_all_paths_match(conv, factorization, x)


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_asymmetric_same_padding_with_even_kernel_and_dilation(factorization):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, (4, 2), padding="same", dilation=(1, 3), padding_mode="zeros")
    assert_all_paths_match(conv, factorization, torch.randn(2, 4, 9, 8))
    conv = nn.Conv2d(4, 6, (2, 3), padding="same", padding_mode="reflect")
    assert_all_paths_match(conv, factorization, torch.randn(2, 4, 9, 8))


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_depthwise_and_strided_pointwise_convs(factorization):
    torch.manual_seed(0)
    depthwise = nn.Conv2d(6, 12, 3, padding=1, groups=6)
    assert_all_paths_match(depthwise, factorization, torch.randn(2, 6, 8, 8))
    downsample = nn.Conv2d(6, 10, 1, stride=2, bias=False)
    assert_all_paths_match(downsample, factorization, torch.randn(2, 6, 9, 9))


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_unbatched_input(factorization):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    layer = tt_conv.FactorizedConv.from_conv(conv, factorization=factorization, rank=FULL_RANK)
    x = torch.randn(3, 6, 6)
    for implementation in ("factorized", "reconstructed"):
        layer.set_implementation(implementation)
        assert relative_error(layer(x), conv(x)) <= 1e-4


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_output_shape_matches_the_computed_output(factorization):
    layer = tt_conv.FactorizedConv.class_for(factorization)(
        4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1), rank=2
    )
    x = torch.randn(3, 4, 11, 7)
    assert layer.output_shape(x.shape) == tuple(layer(x).shape)


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
@pytest.mark.parametrize("n_dim", [1, 2, 3])
def test_a_strided_pointwise_chain_subsamples_first(factorization, n_dim):
    # A strided 1 x 1 kernel only subsamples and mixes channels: the chain strides in its
    # first stage, so every later stage runs on the subsampled pixels, and flops() counts
    # what the forward does.
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    conv = CONVS[n_dim](16, 24, 1, stride=2, bias=True)
    layer = tt_conv.FactorizedConv.from_conv(conv, factorization=factorization, rank=0.5,
                                             implementation="factorized")
    specs = layer._chain_specs()
    assert specs[0].stride == (2,) * n_dim
    assert all(spec.stride == (1,) * n_dim for spec in specs[1:])
    x = torch.randn(2, 16, *[9] * n_dim)
    layer.eval()
    with torch.no_grad():
        layer(x)  # forms (and keeps) the products of merged 1 x 1 stages
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        y = layer(x)
    assert y.shape == conv(x).shape
    assert layer.flops(tuple(x.shape), "factorized") == counter.get_total_flops()
    full_rank = tt_conv.FactorizedConv.from_conv(conv, factorization=factorization,
                                                 rank=FULL_RANK)
    assert relative_error(full_rank(x), conv(x)) <= 1e-4


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_cp_filters_large_kernels_one_axis_at_a_time(padding_mode):
    # From 5 x 5 on, CP's chain runs one depthwise stage per spatial axis (each with that
    # axis' stride, padding and dilation); 3 x 3 keeps one k x k depthwise stage.
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 5, stride=(2, 1), padding=(2, 4), dilation=(1, 2),
                     padding_mode=padding_mode)
    layer = tt_conv.FactorizedConv.from_conv(conv, factorization="cp", rank=3,
                                             implementation="factorized")
    assert [spec.kernel_size for spec in layer._chain_specs()] == [(1, 1), (5, 1), (1, 5), (1, 1)]
    x = torch.randn(2, 6, 11, 10)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        layer(x)
    assert layer.flops(tuple(x.shape), "factorized") == counter.get_total_flops()
    assert_all_paths_match(conv, "cp", x)
    small = tt_conv.FactorizedConv.from_conv(nn.Conv2d(6, 8, 3, padding=1), factorization="cp",
                                             rank=3)
    assert [spec.kernel_size for spec in small._chain_specs()] == [(1, 1), (3, 3), (1, 1)]
