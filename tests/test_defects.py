"""One regression test per known defect of the peers (REFERENCE.md section 7).

Each test is named after the defect it guards against; tt-conv must not have any of them.
"""

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import tt_conv
from tt_conv.decompose import relative_error

FACTORIZATIONS = ("cp", "tucker", "tt")
LAYERS = {"cp": tt_conv.CPConv, "tucker": tt_conv.TuckerConv, "tt": tt_conv.TTConv}


def factorize(conv, factorization, rank=10**6, **kwargs):
    return tt_conv.FactorizedConv.from_conv(conv, factorization=factorization, rank=rank, **kwargs)


# ----------------------------------------------------------------- tensorly-torch 0.5.0


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_defect_parameters_left_uninitialised_by_constructor(factorization):
    torch.manual_seed(0)
    # torch.empty memory is arbitrary: fill it with NaN first to see that every entry is set.
    with torch.device("cpu"):
        original_empty = torch.empty

        def poisoned_empty(*args, **kwargs):
            return original_empty(*args, **kwargs).fill_(float("nan"))

        torch.empty = poisoned_empty
        try:
            layer = LAYERS[factorization](16, 32, 3, rank=0.3)
        finally:
            torch.empty = original_empty
    for name, parameter in layer.named_parameters():
        assert torch.isfinite(parameter).all(), name
    assert float(layer.reconstruct_kernel().detach().abs().max()) > 0


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_defect_groups_ignored(factorization):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1, groups=4)
    layer = factorize(conv, factorization)
    assert layer.groups == 4 and layer.reconstruct_kernel().shape == conv.weight.shape
    x = torch.randn(2, 8, 6, 6)
    assert relative_error(layer(x), conv(x)) <= 1e-4
    # Mixing across groups would make group 0's output depend on group 1's input.
    x2 = x.clone()
    x2[:, 2:] += 1.0
    assert torch.allclose(layer(x2)[:, :3], layer(x)[:, :3], atol=1e-6)


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_defect_only_first_stride_kept(factorization):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=(2, 1), padding=1)
    layer = factorize(conv, factorization)
    x = torch.randn(2, 4, 9, 9)
    assert layer(x).shape == conv(x).shape == (2, 6, 5, 9)
    assert relative_error(layer(x), conv(x)) <= 1e-4


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_defect_padding_same_fails_and_padding_mode_ignored(factorization, padding_mode):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding="same", padding_mode=padding_mode)
    layer = factorize(conv, factorization)
    x = torch.randn(2, 4, 7, 7)
    assert relative_error(layer(x), conv(x)) <= 1e-4
    assert layer.to_conv().padding_mode == padding_mode


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
@pytest.mark.parametrize("rank", [3, 100, 0.2, "tuple"])
def test_defect_stored_ranks_differ_from_decomposed_ones(factorization, rank):
    torch.manual_seed(0)
    if rank == "tuple":
        rank = {"cp": (50,), "tucker": (9, 9), "tt": (100, 2, 100)}[factorization]
    conv = nn.Conv2d(6, 8, 3, padding=1)
    layer = factorize(conv, factorization, rank=rank)
    # The decomposition produced exactly the ranks the layer says it has ...
    twin = LAYERS[factorization](6, 8, 3, padding=1, rank=rank)
    assert twin.rank == layer.rank
    # ... so its state_dict loads into a layer built with the same arguments.
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(1, 6, 5, 5)
    torch.testing.assert_close(twin(x), layer(x))


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_defect_decomposing_a_half_precision_conv_fails(factorization, dtype):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3).to(dtype)
    layer = factorize(conv, factorization, rank=0.5)
    assert all(p.dtype == dtype for p in layer.parameters())
    assert relative_error(layer.reconstruct_kernel(), conv.weight) < 1.0


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_defect_torch_compile_fullgraph_and_torchscript_fail(factorization):
    torch.manual_seed(0)
    layer = LAYERS[factorization](4, 6, 3, stride=(2, 1), padding=1, rank=2,
                                  implementation="factorized")
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x),
                               rtol=1e-4, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(layer)
    torch.testing.assert_close(scripted(x), layer(x))


def test_defect_float_tucker_rank_collapses_spatial_ranks():
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 32, 3)
    for fraction in (0.05, 0.1, 0.5):
        layer = tt_conv.TuckerConv.from_conv(conv, rank=fraction)
        # Tucker-2 keeps the spatial modes whole; the channel ranks are > 1.
        assert layer.core_tensor().shape[-2:] == (3, 3)
        assert min(layer.rank) > 1
        assert layer.reconstruct_kernel().shape == conv.weight.shape


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_defect_factorized_execution_slower_than_dense(factorization):
    # Not a timing (benchmarks/layers.py measures those): at 10x fewer parameters the layer
    # runs its factorized chain, which is nothing but standard convolutions doing a small
    # fraction of the dense conv's FLOPs.
    layer = LAYERS[factorization](128, 128, 3, padding=1, rank=0.1)
    assert layer.implementation == "factorized"
    x = torch.randn(1, 128, 16, 16)
    with FlopCounterMode(display=False) as counter:
        layer(x)
    total = counter.get_total_flops()
    by_op = counter.get_flop_counts()["Global"]
    conv_flops = sum(count for op, count in by_op.items() if "convolution" in str(op))
    assert conv_flops == total
    assert total <= 0.15 * layer.flops(x.shape, "dense")


def test_defect_import_switches_tensorly_backend_globally():
    script = textwrap.dedent(
        """
        import tensorly as tl
        tl.set_backend("numpy")
        import torch, tt_conv
        conv = torch.nn.Conv2d(4, 4, 3)
        for factorization in ("cp", "tucker", "tt"):
            tt_conv.FactorizedConv.from_conv(conv, factorization=factorization, rank=0.5)
        print(tl.get_backend())
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "numpy"


# ----------------------------------------------------------------- tensorly 0.10.0


def test_defect_tucker_rank_larger_than_dimension_returns_padded_wrong_result():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3)
    layer = tt_conv.TuckerConv.from_conv(conv, rank=(40, 40, 7, 7))
    assert layer.rank == (5, 3, 3, 3)
    assert relative_error(layer.reconstruct_kernel(), conv.weight) <= 1e-5


def test_defect_validate_cp_rank_returns_zero_for_small_fractions():
    conv = nn.Conv2d(64, 64, 3)
    layer = tt_conv.CPConv.from_conv(conv, rank=0.01)
    assert layer.rank[0] >= 1
    with pytest.raises(ValueError, match="below what rank 1 needs"):
        tt_conv.CPConv.from_conv(conv, rank=0.0001)


# ----------------------------------------------------------------- older compression scripts


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_defect_bias_none_crashes(factorization):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, bias=False)
    layer = factorize(conv, factorization)
    assert layer.bias is None
    x = torch.randn(1, 4, 6, 6)
    assert relative_error(layer(x), conv(x)) <= 1e-4
    assert layer.to_conv().bias is None


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_defect_dilation_and_asymmetric_padding_dropped(factorization):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, (2, 4), padding="same", dilation=(3, 1))
    layer = factorize(conv, factorization)
    assert layer.dilation == (3, 1)
    x = torch.randn(1, 4, 9, 10)
    assert layer(x).shape == conv(x).shape
    assert relative_error(layer(x), conv(x)) <= 1e-4


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_defect_grouped_convs_unsupported(factorization):
    torch.manual_seed(0)
    for conv in (nn.Conv2d(6, 6, 3, groups=3), nn.Conv2d(6, 12, 3, groups=6)):
        layer = factorize(conv, factorization)
        x = torch.randn(1, 6, 7, 7)
        assert relative_error(layer(x), conv(x)) <= 1e-4


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_defect_bias_lost_on_recompression(factorization):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, 3)
    once = factorize(conv, factorization, rank=0.5)
    twice = factorize(once, factorization, rank=0.25)
    torch.testing.assert_close(twice.bias, conv.bias)
