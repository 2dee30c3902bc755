"""Conversion between tt-conv layers and tensorly-torch's FactorizedConv.

tensorly-torch is imported only through ``tt_conv.interop`` (importing it directly would
switch TensorLy's backend for the whole test session); its layers run under a local
``tensorly.backend_context("pytorch")``, as the interop's documentation says they must.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tensorly as tl
import torch
import torch.nn.functional as F
from torch import nn

import tt_conv
from tt_conv.interop import from_tltorch, import_tltorch, reduce_tt, reduce_tucker, to_tltorch
from tt_conv.rank import clip_tt_rank, clip_tucker_rank, max_cp_rank

tltorch = import_tltorch()

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
FUNCTIONAL = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
# Per-axis geometry that differs between axes, so a library keeping only axis 0's value fails.
KERNEL = (3, 2, 3)
STRIDE = (2, 1, 3)
PADDING = (1, 0, 2)
DILATION = (1, 2, 1)
INPUT = (11, 9, 10)


def relative_error(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def tltorch_forward(layer, x):
    with tl.backend_context("pytorch"):
        return layer(x)


def tltorch_kernel(layer):
    """The kernel as tensorly-torch itself reconstructs it, in (out, in, *k) order."""
    with tl.backend_context("pytorch"):
        tensor = layer.weight.to_tensor()
    return tensor.movedim(-1, 0) if isinstance(layer.weight, tltorch.TTTensor) else tensor


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def geometry(n_dim):
    return dict(kernel_size=KERNEL[:n_dim], stride=STRIDE[:n_dim], padding=PADDING[:n_dim],
                dilation=DILATION[:n_dim])


def make_input(n_dim, channels=6, batch=2):
    return torch.randn(batch, channels, *INPUT[:n_dim])


# --------------------------------------------------------------------------- ours -> tensorly-torch -> ours


@pytest.mark.parametrize("n_dim", [1, 2, 3])
@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt"])
@pytest.mark.parametrize("implementation", ["factorized", "reconstructed"])
def test_round_trip_from_ours(factorization, n_dim, implementation):
    torch.manual_seed(0)
    cls = {"cp": tt_conv.CPConv, "tucker": tt_conv.TuckerConv, "tt": tt_conv.TTConv}
    ours = cls[factorization](6, 8, bias=implementation == "factorized", rank=0.5,
                              implementation=implementation, **geometry(n_dim))
    x = make_input(n_dim)
    expected = ours(x)

    theirs = to_tltorch(ours)
    assert isinstance(theirs, tltorch.FactorizedConv)
    assert theirs.implementation == implementation
    # Their own reconstruction of the kernel, and their own forward pass, agree with ours.
    assert relative_error(tltorch_kernel(theirs), ours.reconstruct_kernel()) < 1e-5
    assert relative_error(tltorch_forward(theirs, x), expected) < 1e-4
    reference = FUNCTIONAL[n_dim](x, tltorch_kernel(theirs), theirs.bias, STRIDE[:n_dim],
                                  PADDING[:n_dim], DILATION[:n_dim])
    assert relative_error(reference, expected) < 1e-4

    # Parameter counts: CP gains its weight vector, Tucker-2 identity spatial factors.
    extra = {"cp": ours.rank[0], "tucker": sum(k * k for k in ours.kernel_size), "tt": 0}
    assert n_params(theirs) == ours.n_parameters + extra[factorization]

    back = from_tltorch(theirs, tucker_form="tucker2")
    assert type(back) is type(ours)
    assert back.rank == ours.rank
    assert back.implementation == implementation
    assert back.n_parameters == ours.n_parameters
    assert (back.stride, back.padding, back.dilation) == (ours.stride, ours.padding, ours.dilation)
    assert relative_error(back(x), expected) < 1e-4
    if factorization != "cp":  # CP factors are rebalanced, the others come back as they were
        for a, b in zip(back._factor_tensors(), ours._factor_tensors()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_tucker2_default_form_from_tltorch_is_full_tucker_with_identity_factors():
    torch.manual_seed(0)
    ours = tt_conv.TuckerConv(6, 8, 3, rank=(4, 3), padding=1)
    back = from_tltorch(to_tltorch(ours))
    assert back.full_tucker and back.rank == (4, 3, 3, 3)
    assert back.n_parameters == ours.n_parameters + 2 * 9
    for factor in back.spatial_factors:
        torch.testing.assert_close(factor[0], torch.eye(3))
    x = make_input(2)
    assert relative_error(back(x), ours(x)) < 1e-5


@pytest.mark.parametrize(
    "spatial_rank", [(3, 3), (2, 3)]
)
def test_full_tucker_and_float64_round_trip(spatial_rank):
    torch.manual_seed(0)
    rank = (4, 3, *spatial_rank)
    ours = tt_conv.TuckerConv(5, 7, (3, 3), rank=rank, stride=(1, 2), padding=(2, 1),
                              dtype=torch.float64)
    theirs = to_tltorch(ours)
    assert tuple(theirs.weight.rank) == rank
    assert n_params(theirs) == ours.n_parameters
    assert all(p.dtype == torch.float64 for p in theirs.parameters())
    back = from_tltorch(theirs)
    assert back.rank == ours.rank and back.core.dtype == torch.float64
    x = torch.randn(2, 5, 9, 8, dtype=torch.float64)
    assert relative_error(tltorch_forward(theirs, x), ours(x)) < 1e-12
    assert relative_error(back(x), ours(x)) < 1e-12


def test_same_and_valid_padding_convert_when_symmetric():
    torch.manual_seed(0)
    for padding, expected in (("same", (1, 2)), ("valid", (0, 0))):
        ours = tt_conv.CPConv(4, 6, (3, 5), padding=padding, rank=5)
        theirs = to_tltorch(ours)
        assert theirs.padding.tolist() == list(expected)
        x = torch.randn(1, 4, 8, 9)
        assert relative_error(tltorch_forward(theirs, x), ours(x)) < 1e-4
    # An even kernel dilated by 2 pads (1, 1): symmetric, so it converts too.
    ours = tt_conv.TTConv(4, 6, 2, padding="same", dilation=2, rank=3)
    x = torch.randn(1, 4, 8, 9)
    assert relative_error(tltorch_forward(to_tltorch(ours), x), ours(x)) < 1e-4


def test_state_dict_loads_into_tltorch_layer_built_with_same_arguments():
    torch.manual_seed(0)
    ours = tt_conv.TTConv(6, 8, 3, rank=(3, 4, 5), padding=1, stride=(2, 1))
    theirs = to_tltorch(ours)
    fresh = tltorch.FactorizedConv(6, 8, 3, order=2, stride=(2, 1), padding=1, bias=True,
                                   factorization="tt", rank=list(theirs.weight.rank))
    fresh.load_state_dict(theirs.state_dict())
    x = make_input(2)
    assert relative_error(tltorch_forward(fresh, x), ours(x)) < 1e-4


# --------------------------------------------------------------------------- tensorly-torch -> ours -> tensorly-torch


def tltorch_layer(factorization, n_dim, rank, implementation="factorized", bias=True,
                  in_channels=6, out_channels=8):
    layer = tltorch.FactorizedConv(in_channels, out_channels, order=n_dim, bias=bias,
                                   factorization=factorization, rank=rank,
                                   implementation=implementation, **geometry(n_dim))
    # tensorly-torch leaves its parameters uninitialised: draw them.
    layer.weight.normal_(0, 0.1)
    if bias:
        with torch.no_grad():
            layer.bias.normal_()
    return layer


def tltorch_rank(factorization, n_dim):
    if factorization == "cp":
        return 5
    if factorization == "tucker":
        return (4, 3, *((2,) * n_dim))
    return [1, 3, *((2,) * n_dim), 1]


@pytest.mark.parametrize("n_dim", [1, 2, 3])
@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt"])
def test_round_trip_from_tltorch(factorization, n_dim):
    torch.manual_seed(1)
    theirs = tltorch_layer(factorization, n_dim, tltorch_rank(factorization, n_dim),
                           bias=n_dim != 2)
    x = make_input(n_dim)
    expected = tltorch_forward(theirs, x)

    ours = from_tltorch(theirs)
    assert ours.factorization == factorization
    assert ours.implementation == "factorized"
    assert relative_error(ours(x), expected) < 1e-4
    assert relative_error(ours.reconstruct_kernel(), tltorch_kernel(theirs)) < 1e-5
    weights = theirs.weight.rank if factorization == "cp" else 0
    assert ours.n_parameters == n_params(theirs) - weights
    if factorization == "tucker":
        assert ours.full_tucker and ours.rank == tuple(theirs.weight.rank)
    if factorization == "tt":
        assert ours.rank == tuple(theirs.weight.rank[1:-1])

    again = to_tltorch(ours)
    assert relative_error(tltorch_forward(again, x), expected) < 1e-4
    if factorization != "cp":
        for a, b in zip(again.weight.parameters(), theirs.weight.parameters()):
            torch.testing.assert_close(a, b)


def test_tucker2_form_absorbs_spatial_factors():
    torch.manual_seed(2)
    theirs = tltorch_layer("tucker", 2, (4, 3, 2, 1))
    ours = from_tltorch(theirs, tucker_form="tucker2", implementation="reconstructed")
    assert not ours.full_tucker and ours.rank == (4, 3)
    assert ours.implementation == "reconstructed"
    x = make_input(2)
    assert relative_error(ours(x), tltorch_forward(theirs, x)) < 1e-4


@pytest.mark.parametrize("implementation", ["reconstructed", "mobilenet"])
def test_implementations_map(implementation):
    theirs = tltorch_layer("cp", 2, 4, implementation=implementation)
    ours = from_tltorch(theirs)
    expected = "reconstructed" if implementation == "reconstructed" else "factorized"
    assert ours.implementation == expected
    x = make_input(2)
    assert relative_error(ours(x), tltorch_forward(theirs, x)) < 1e-4


def test_oversized_ranks_are_reduced_exactly():
    torch.manual_seed(3)
    x = torch.randn(2, 3, 9, 8)
    # tensorly-torch accepts ranks beyond the kernel's; the conversion keeps the kernel.
    cases = [("tucker", (20, 9, 3, 3)), ("tt", [1, 30, 30, 30, 1]), ("cp", 40)]
    for factorization, rank in cases:
        theirs = tltorch_layer(factorization, 2, rank, in_channels=3, out_channels=4)
        ours = from_tltorch(theirs)
        dims = (4, 3, 3, 2)
        if factorization == "tucker":
            assert ours.rank == clip_tucker_rank(dims, rank) == (4, 3, 3, 2)
        elif factorization == "tt":
            assert ours.rank == clip_tt_rank((3, 3, 2, 4), rank[1:-1]) == (3, 8, 4)
        else:
            assert ours.rank == (max_cp_rank(dims),)
        assert relative_error(ours(x), tltorch_forward(theirs, x)) < 1e-4


def test_reductions_keep_the_tensor():
    torch.manual_seed(4)
    core = torch.randn(7, 2, 3, dtype=torch.float64)
    factors = [torch.randn(5, 7, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64),
               torch.randn(6, 3, dtype=torch.float64)]
    with tl.backend_context("pytorch"):
        full = tl.tucker_to_tensor((core, factors))
        reduced_core, reduced = reduce_tucker(core, factors)
        assert tuple(reduced_core.shape) == clip_tucker_rank((5, 4, 6), (7, 2, 3)) == (5, 2, 3)
        torch.testing.assert_close(tl.tucker_to_tensor((reduced_core, reduced)), full)

        cores = [torch.randn(1, 2, 6, dtype=torch.float64), torch.randn(6, 3, 9, dtype=torch.float64),
                 torch.randn(9, 2, 1, dtype=torch.float64)]
        reduced_cores = reduce_tt(cores)
        ranks = tuple(c.shape[0] for c in reduced_cores[1:])
        assert ranks == clip_tt_rank((2, 3, 2), (6, 9)) == (2, 2)
        torch.testing.assert_close(tl.tt_to_tensor(reduced_cores), tl.tt_to_tensor(cores))


# --------------------------------------------------------------------------- what cannot convert


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(groups=2), "groups=2"),
        (dict(padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
        (dict(padding="same", kernel_size=(2, 3)), "pads symmetrically"),
    ],
)
def test_to_tltorch_refuses_what_tltorch_cannot_represent(kwargs, message):
    args = dict(in_channels=4, out_channels=6, kernel_size=3, rank=0.5)
    args.update(kwargs)
    for cls in (tt_conv.CPConv, tt_conv.TuckerConv, tt_conv.TTConv):
        with pytest.raises(ValueError, match=message):
            to_tltorch(cls(**args))


def test_to_tltorch_refuses_other_modules_and_implementations():
    with pytest.raises(TypeError, match="Conv2d"):
        to_tltorch(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="implementation"):
        to_tltorch(tt_conv.CPConv(3, 4, 3, rank=2), implementation="mobilenet")


def test_from_tltorch_refuses_what_it_cannot_convert():
    with pytest.raises(TypeError, match="tltorch.FactorizedConv, got Conv2d"):
        from_tltorch(nn.Conv2d(3, 4, 3))
    joint = tltorch.FactorizedConv(4, 6, 3, order=2, n_layers=2, factorization="cp", rank=3)
    with pytest.raises(ValueError, match="n_layers=2"):
        from_tltorch(joint)
    dense = tltorch.FactorizedConv(4, 6, 3, order=2, factorization="Dense", rank=None,
                                   implementation="reconstructed")
    with pytest.raises(TypeError, match="DenseTensor"):
        from_tltorch(dense)
    with pytest.raises(ValueError, match="tucker_form"):
        from_tltorch(tltorch_layer("tucker", 2, (3, 3, 2, 2)), tucker_form="tucker3")


def test_tensor_hooks():
    layer = tltorch_layer("tt", 2, [1, 3, 2, 2, 1])
    with tl.backend_context("pytorch"):
        tltorch.tensor_dropout(layer.weight, p=0.5, min_dim=1)
    with pytest.warns(UserWarning, match="tensor dropout"):
        ours = from_tltorch(layer)
    layer.eval()
    x = make_input(2)
    assert relative_error(ours(x), tltorch_forward(layer, x)) < 1e-4

    lasso = tltorch_layer("cp", 2, 4)
    with tl.backend_context("pytorch"):
        tltorch.tensor_lasso(factorization="cp", penalty=0.01).apply(lasso.weight)
    with pytest.raises(ValueError, match="hooks"):
        from_tltorch(lasso)


# --------------------------------------------------------------------------- TensorLy's backend


def test_backend_is_unchanged_after_using_interop_in_fresh_process():
    script = textwrap.dedent(
        """
        import sys, threading
        import tensorly as tl
        import torch
        import tt_conv
        assert "tltorch" not in sys.modules, "tt_conv imported tensorly-torch eagerly"
        before = tl.get_backend()
        ours = tt_conv.CPConv(4, 6, 3, rank=3)
        theirs = tt_conv.interop.to_tltorch(ours)
        assert "tltorch" in sys.modules
        back = tt_conv.interop.from_tltorch(theirs)
        seen = []
        thread = threading.Thread(target=lambda: seen.append(tl.get_backend()))
        thread.start(); thread.join()
        print(before, tl.get_backend(), seen[0])
        """
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["numpy", "numpy", "numpy"]


def test_backend_context_of_caller_is_kept():
    before = tl.get_backend()
    other = "numpy" if before == "pytorch" else "pytorch"
    with tl.backend_context(other):
        to_tltorch(tt_conv.TTConv(3, 4, 3, rank=2))
        from_tltorch(tltorch_layer("cp", 2, 3))
        assert tl.get_backend() == other
    assert tl.get_backend() == before
