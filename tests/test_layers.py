"""Factorized layers: recovery of known factors, ranks, initialisation, dtypes, FLOPs, export."""

import math
import warnings

import pytest
import tensorly as tl
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import tt_conv
from tt_conv.decompose import relative_error
from tt_conv.rank import n_factor_parameters

FACTORIZATIONS = ("cp", "tucker", "tt")
LAYERS = {"cp": tt_conv.CPConv, "tucker": tt_conv.TuckerConv, "tt": tt_conv.TTConv}


def conv_with_kernel(kernel, bias=True):
    n_dim = kernel.dim() - 2
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[n_dim - 1](
        kernel.shape[1], kernel.shape[0], tuple(kernel.shape[2:]), bias=bias
    )
    with torch.no_grad():
        conv.weight.copy_(kernel)
    return conv


# ----------------------------------------------------------------- recovery of known factors


@pytest.mark.parametrize("spatial", [(3,), (3, 3), (3, 2, 3)])
def test_cp_kernel_of_known_rank_is_recovered(spatial):
    torch.manual_seed(0)
    rank = 4
    shape = (10, 7, *spatial)
    factors = [torch.randn(n, rank, dtype=torch.float64) for n in shape]
    with tl.backend_context("pytorch"):
        kernel = tl.cp_to_tensor((torch.ones(rank, dtype=torch.float64), factors))
    conv = conv_with_kernel(kernel.float())
    layer = tt_conv.CPConv.from_conv(conv, rank=rank)
    assert layer.rank == (rank,)
    assert relative_error(layer.reconstruct_kernel(), conv.weight) <= 1e-4


@pytest.mark.parametrize("spatial", [(3,), (3, 3), (2, 3, 3)])
def test_tucker2_and_full_tucker_kernels_of_known_rank_are_recovered(spatial):
    torch.manual_seed(0)
    shape = (10, 8, *spatial)
    with tl.backend_context("pytorch"):
        # Tucker-2: channel modes of rank (4, 3), spatial modes whole.
        core = torch.randn(4, 3, *spatial, dtype=torch.float64)
        kernel = tl.tucker_to_tensor((core, [torch.randn(10, 4, dtype=torch.float64),
                                             torch.randn(8, 3, dtype=torch.float64)]
                                      + [torch.eye(k, dtype=torch.float64) for k in spatial]))
        conv = conv_with_kernel(kernel.float())
        layer = tt_conv.TuckerConv.from_conv(conv, rank=(4, 3))
        assert layer.rank == (4, 3) and not layer.full_tucker
        assert relative_error(layer.reconstruct_kernel(), conv.weight) <= 1e-4
        # Full Tucker: the spatial modes have rank 2 too.
        ranks = (4, 3, *([2] * len(spatial)))
        core = torch.randn(*ranks, dtype=torch.float64)
        factors = [torch.randn(n, r, dtype=torch.float64) for n, r in zip(shape, ranks)]
        conv = conv_with_kernel(tl.tucker_to_tensor((core, factors)).float())
    layer = tt_conv.TuckerConv.from_conv(conv, rank=ranks)
    assert layer.rank == ranks and layer.full_tucker
    assert relative_error(layer.reconstruct_kernel(), conv.weight) <= 1e-4


@pytest.mark.parametrize("spatial", [(3,), (3, 3), (3, 2, 3)])
def test_tt_kernel_of_known_rank_is_recovered(spatial):
    torch.manual_seed(0)
    modes = (7, *spatial, 10)  # (in, k..., out)
    ranks = [1] + [3 if i % 2 else 2 for i in range(len(modes) - 1)] + [1]
    cores = [torch.randn(ranks[j], n, ranks[j + 1], dtype=torch.float64)
             for j, n in enumerate(modes)]
    with tl.backend_context("pytorch"):
        tensor = tl.tt_to_tensor(cores)
    kernel = tensor.permute(-1, *range(len(modes) - 1))  # (out, in, k...)
    conv = conv_with_kernel(kernel.float().contiguous())
    layer = tt_conv.TTConv.from_conv(conv, rank=tuple(ranks[1:-1]))
    assert layer.rank == tuple(ranks[1:-1])
    assert relative_error(layer.reconstruct_kernel(), conv.weight) <= 1e-4


def test_lower_rank_gives_larger_but_finite_error():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3)
    errors = {}
    for factorization in FACTORIZATIONS:
        for fraction in (0.1, 0.5):
            layer = tt_conv.FactorizedConv.from_conv(conv, factorization=factorization,
                                                     rank=fraction)
            errors[factorization, fraction] = relative_error(layer.reconstruct_kernel(),
                                                             conv.weight)
        assert 0 < errors[factorization, 0.5] < errors[factorization, 0.1] < 1.0


# ----------------------------------------------------------------- ranks


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
@pytest.mark.parametrize("shape", [(64, 32, 3, 3), (16, 16, 5), (8, 4, 3, 3, 3), (128, 64, 1, 1)])
@pytest.mark.parametrize("fraction", [0.02, 0.1, 0.25, 0.5, 1.0])
def test_float_rank_never_exceeds_the_budget(factorization, shape, fraction):
    kernel_params = math.prod(shape)
    try:
        layer = LAYERS[factorization](shape[1], shape[0], shape[2:], rank=fraction)
    except ValueError as error:
        assert "rank 1" in str(error)
        return
    weight_params = layer.n_parameters - shape[0]
    assert weight_params == n_factor_parameters(factorization, shape, layer.rank)
    assert weight_params <= fraction * kernel_params


def test_float_rank_uses_the_budget():
    # The largest CP rank that fits: one more term would not.
    shape = (64, 32, 3, 3)
    layer = tt_conv.CPConv(32, 64, 3, rank=0.1)
    (r,) = layer.rank
    budget = 0.1 * math.prod(shape)
    assert n_factor_parameters("cp", shape, (r,)) <= budget < n_factor_parameters("cp", shape, (r + 1,))
    # Tucker-2 keeps both channel ranks in proportion to the channel counts.
    tucker = tt_conv.TuckerConv(32, 64, 3, rank=0.1)
    r_out, r_in = tucker.rank
    assert 1.5 <= r_out / r_in <= 2.5


def test_explicit_ranks_are_clipped_and_stored():
    assert tt_conv.TuckerConv(4, 6, 3, rank=100).rank == (6, 4)
    assert tt_conv.TuckerConv(4, 6, 3, rank=(5, 2)).rank == (5, 2)
    assert tt_conv.TTConv(4, 6, 3, rank=100).rank == (4, 12, 6)
    assert tt_conv.TTConv(4, 6, 3, rank=(1, 2, 3, 2, 1)).rank == (2, 3, 2)
    assert tt_conv.CPConv(4, 6, 3, rank=1000).rank == (4 * 3 * 3,)
    # A 1x1 conv with more outputs than inputs: r_out cannot exceed in * 1 * 1.
    assert tt_conv.TuckerConv(4, 16, 1, rank=100).rank == (4, 4)


# ----------------------------------------------------------------- initialisation


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
@pytest.mark.parametrize("rank", [0.1, 0.5])
def test_initial_kernel_has_the_scale_of_torch_default_init(factorization, rank):
    torch.manual_seed(0)
    layer = LAYERS[factorization](64, 64, 3, rank=rank)
    reference = nn.Conv2d(64, 64, 3)
    std = float(layer.reconstruct_kernel().detach().std())
    expected = float(reference.weight.std())
    assert abs(std / expected - 1) < 0.2, (std, expected)
    bound = 1 / math.sqrt(64 * 9)
    assert float(layer.bias.abs().max()) <= bound
    assert all(torch.isfinite(p).all() for p in layer.parameters())


# ----------------------------------------------------------------- dtypes, devices, state


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_double_precision_convs_compress(factorization, dtype):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1).to(dtype)
    layer = tt_conv.FactorizedConv.from_conv(conv, factorization=factorization, rank=10**6)
    assert all(p.dtype == dtype for p in layer.parameters())
    tolerance = 1e-10 if dtype == torch.float64 else 2e-2
    assert relative_error(layer.reconstruct_kernel(), conv.weight) <= tolerance
    x = torch.randn(2, 8, 6, 6, dtype=dtype)
    assert layer(x).dtype == dtype


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_state_dict_round_trip_into_a_layer_with_the_same_arguments(factorization):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, (3, 2), stride=(2, 1), groups=2, padding=1)
    layer = tt_conv.FactorizedConv.from_conv(conv, factorization=factorization, rank=0.3)
    fresh = LAYERS[factorization](8, 12, (3, 2), stride=(2, 1), groups=2, padding=1, rank=0.3)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(2, 8, 7, 7)
    torch.testing.assert_close(fresh(x), layer(x))


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_bf16_autocast_forward_and_backward(factorization):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    layer = tt_conv.FactorizedConv.from_conv(conv, factorization=factorization, rank=0.5,
                                             implementation="factorized")
    x = torch.randn(2, 8, 10, 10)
    reference = layer(x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert relative_error(y.float(), reference) < 0.05
    y.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


def test_gradients_flow_to_every_factor_on_both_paths():
    torch.manual_seed(0)
    for factorization in FACTORIZATIONS:
        for implementation in ("factorized", "reconstructed"):
            layer = LAYERS[factorization](4, 6, 3, padding=1, rank=2,
                                          implementation=implementation)
            layer(torch.randn(2, 4, 5, 5)).sum().backward()
            for name, p in layer.named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, (factorization, name)


# ----------------------------------------------------------------- FLOPs and parameters


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
@pytest.mark.parametrize("geometry", [
    dict(in_channels=8, out_channels=12, kernel_size=3, padding=1),
    dict(in_channels=8, out_channels=12, kernel_size=(3, 1), stride=(2, 1), groups=4,
         padding_mode="reflect", padding=(1, 0)),
    dict(in_channels=6, out_channels=4, kernel_size=(3, 3, 2), padding="same", n_dim=3),
    dict(in_channels=6, out_channels=4, kernel_size=(5,), dilation=2),
])
def test_flops_match_torch_flop_counter(factorization, geometry):
    torch.manual_seed(0)
    geometry = dict(geometry)
    rank = (2, 2, 2, 2, 2) if factorization == "tucker" and geometry.get("n_dim") == 3 else 3
    layer = LAYERS[factorization](**geometry, rank=rank)
    n_dim = len(layer.kernel_size)
    x = torch.randn(2, layer.in_channels, *([9] * n_dim))
    for implementation in ("factorized", "reconstructed"):
        layer.set_implementation(implementation)
        with FlopCounterMode(display=False) as counter:
            layer(x)  # under autograd: the kernel or the merged 1 x 1 weights formed again
        assert layer.flops(x.shape, autograd=True) == counter.get_total_flops(), implementation
        layer.eval()
        with torch.no_grad():
            layer(x)  # forms the weights it keeps
            with FlopCounterMode(display=False) as counter:
                layer(x)
        layer.train()
        assert layer.flops(x.shape) == counter.get_total_flops(), implementation
    dense = layer.to_conv()
    with FlopCounterMode(display=False) as counter:
        dense(x)
    assert layer.flops(x.shape, "dense") == counter.get_total_flops()


def test_parameter_counts():
    layer = tt_conv.TuckerConv(32, 64, 3, rank=(8, 4))
    assert layer.n_parameters == 64 * 8 + 32 * 4 + 8 * 4 * 9 + 64
    assert layer.dense_parameters == 64 * 32 * 9 + 64
    layer = tt_conv.CPConv(32, 64, 3, groups=2, bias=False, rank=5)
    assert layer.n_parameters == 2 * 5 * (32 + 16 + 3 + 3)
    layer = tt_conv.TTConv(32, 64, 3, rank=(4, 5, 6))
    assert layer.n_parameters == 32 * 4 + 4 * 3 * 5 + 5 * 3 * 6 + 6 * 64 + 64


def test_auto_picks_the_cheaper_implementation():
    # 10x fewer parameters on a large 3x3 conv: the factorized chain is far cheaper.
    layer = tt_conv.TuckerConv(128, 128, 3, padding=1, rank=0.1)
    assert layer.implementation == "factorized"
    # Nearly full rank: running the chain would cost more than one dense conv.
    layer = tt_conv.TuckerConv(32, 32, 3, padding=1, rank=(32, 32))
    assert layer.implementation == "reconstructed"
    assert layer.estimated_cost("factorized") > layer.estimated_cost("reconstructed")


# ----------------------------------------------------------------- export


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_exports_run_without_tt_conv_modules(factorization):
    torch.manual_seed(0)
    layer = LAYERS[factorization](6, 8, 3, stride=2, padding=1, padding_mode="circular",
                                  groups=2, rank=2)
    sequential = layer.to_sequential()
    dense = layer.to_conv()
    modules = list(sequential.modules()) + list(dense.modules())
    assert all(type(m).__module__.startswith("torch.nn") for m in modules)
    # CP's depthwise stage is exported per axis: its separable vectors, not their product.
    assert sum(p.numel() for p in sequential.parameters()) == layer.n_parameters
    x = torch.randn(2, 6, 9, 9)
    torch.testing.assert_close(sequential(x), layer(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dense(x), layer(x), rtol=1e-4, atol=1e-5)


def test_refactorizing_a_factorized_layer_keeps_geometry_and_bias():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
    tucker = tt_conv.TuckerConv.from_conv(conv, rank=10**6)
    cp = tt_conv.CPConv.from_conv(tucker, rank=10**6)
    torch.testing.assert_close(cp.bias, conv.bias)
    x = torch.randn(1, 8, 7, 7)
    torch.testing.assert_close(cp(x), conv(x), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------- compile and script


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_torch_compile_fullgraph(factorization):
    torch.manual_seed(0)
    layer = LAYERS[factorization](4, 6, 3, padding=1, padding_mode="reflect", rank=2,
                                  implementation="factorized")
    x = torch.randn(2, 4, 8, 8)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
@pytest.mark.parametrize("implementation", ["factorized", "reconstructed"])
def test_torchscript(factorization, implementation):
    torch.manual_seed(0)
    layer = LAYERS[factorization](4, 6, (3, 1), padding=(1, 0), groups=2, rank=2,
                                  implementation=implementation)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is deprecated upstream
        scripted = torch.jit.script(layer)
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(scripted(x), layer(x))
    torch.testing.assert_close(scripted(x[0]), layer(x[0]))


# ----------------------------------------------------------------- bad input


def test_bad_rank_values_are_refused():
    for bad in (0, -3, 0.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="rank"):
            tt_conv.TuckerConv(4, 4, 3, rank=bad)
    with pytest.raises(TypeError, match="rank"):
        tt_conv.CPConv(4, 4, 3, rank="big")
    with pytest.raises(ValueError, match="CP rank"):
        tt_conv.CPConv(4, 4, 3, rank=(2, 3))
    with pytest.raises(ValueError, match="Tucker rank"):
        tt_conv.TuckerConv(4, 4, 3, rank=(2, 3, 4))
    with pytest.raises(ValueError, match="TT rank"):
        tt_conv.TTConv(4, 4, 3, rank=(2, 3))
    with pytest.raises(ValueError, match="rank 1"):
        tt_conv.TuckerConv(64, 64, 3, rank=0.001)


def test_unknown_factorization_and_modules_are_refused():
    conv = nn.Conv2d(4, 4, 3)
    with pytest.raises(ValueError, match="factorization must be one of"):
        tt_conv.FactorizedConv.from_conv(conv, factorization="svd")
    with pytest.raises(ValueError, match="factorization is required"):
        tt_conv.FactorizedConv.from_conv(conv)
    with pytest.raises(ValueError, match="makes 'cp' layers"):
        tt_conv.CPConv.from_conv(conv, factorization="tt")
    with pytest.raises(TypeError, match="ConvTranspose2d is not supported yet"):
        tt_conv.TuckerConv.from_conv(nn.ConvTranspose2d(4, 4, 3))
    with pytest.raises(TypeError, match="expected nn.Conv1d, nn.Conv2d, nn.Conv3d"):
        tt_conv.TuckerConv.from_conv(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="not initialised yet"):
        tt_conv.TuckerConv.from_conv(nn.LazyConv2d(4, 3))
    with pytest.raises(TypeError, match="abstract"):
        tt_conv.FactorizedConv(4, 4, 3, rank=2)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_kernels_are_refused(value):
    conv = nn.Conv2d(4, 4, 3)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = value
    with pytest.raises(ValueError, match="NaN or inf"):
        tt_conv.CPConv.from_conv(conv, rank=2)


def test_bad_geometry_and_inputs_are_refused():
    with pytest.raises(ValueError, match="divisible by groups"):
        tt_conv.CPConv(4, 6, 3, groups=4, rank=2)
    with pytest.raises(ValueError, match="padding='same' is not supported for strided"):
        tt_conv.CPConv(4, 6, 3, stride=2, padding="same", rank=2)
    with pytest.raises(ValueError, match="padding_mode"):
        tt_conv.CPConv(4, 6, 3, padding_mode="mirror", rank=2)
    with pytest.raises(ValueError, match="stride"):
        tt_conv.CPConv(4, 6, 3, stride=(1, 2, 3), rank=2)
    with pytest.raises(ValueError, match="implementation"):
        tt_conv.CPConv(4, 6, 3, rank=2, implementation="fast")
    layer = tt_conv.TTConv(4, 6, 3, rank=2)
    with pytest.raises(ValueError, match="input has 5 channels, expected in_channels=4"):
        layer(torch.randn(1, 5, 8, 8))
    with pytest.raises(ValueError, match="expected a 4-D"):
        layer(torch.randn(1, 1, 4, 8, 8))
    with pytest.raises(ValueError, match="kernel has shape"):
        layer.init_from_kernel(torch.randn(6, 4, 5, 5))


@pytest.mark.parametrize("n_dim,memory_format", [(2, torch.channels_last),
                                                 (3, torch.channels_last_3d)])
def test_a_model_moves_to_channels_last_with_every_factorization(n_dim, memory_format):
    torch.manual_seed(0)
    layers = [LAYERS[f](4, 4, 3, padding=1, rank=r, n_dim=n_dim)
              for f in FACTORIZATIONS for r in (2, (2, 2) + (2,) * n_dim if f == "tucker" else 3)]
    model = nn.Sequential(*layers)
    x = torch.randn(2, 4, *([5] * n_dim))
    reference = model(x)
    model.to(memory_format=memory_format)
    torch.testing.assert_close(model(x.contiguous(memory_format=memory_format)), reference,
                               rtol=1e-4, atol=1e-5)


def test_meta_layers_are_not_drawn(monkeypatch):
    FactorizedConv = tt_conv.FactorizedConv
    # The budgets build hundreds of parameter-free (meta) layers to count FLOPs: drawing
    # their random factors cost 4 ms each and gave nothing.
    calls = []
    monkeypatch.setattr(FactorizedConv, "reset_parameters", lambda self: calls.append(self))
    FactorizedConv.class_for("tucker")(32, 32, 3, rank=(8, 8), device="meta")
    FactorizedConv.class_for("cp")(32, 32, 3, rank=4, device="meta")
    assert calls == []
    FactorizedConv.class_for("tt")(32, 32, 3, rank=4)
    assert len(calls) == 1
