"""Rank selection: EVBMF, energy / error thresholds, TT-SVD, parameter and FLOP budgets."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import tt_conv
from tt_conv import FactorizedConv, decompose
from tt_conv import budget as B
from tt_conv import rank as R
from conftest import threads_fixture


_one_thread = threads_fixture(1)


def low_rank_plus_noise(L, M, signal, sigma, seed):
    """``U diag(signal) V^T + noise`` with orthonormal ``U``, ``V``."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(L, len(signal), generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(M, len(signal), generator=g, dtype=torch.float64)).Q
    s = torch.tensor(signal, dtype=torch.float64)
    return (u * s) @ v.T + sigma * torch.randn(L, M, generator=g, dtype=torch.float64)


# --------------------------------------------------------------------------- EVBMF maths


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.1, 0.01, 1 / 3000])
def test_evb_tau_is_the_root_and_at_least_the_shortcut(alpha):
    tau = R.evb_tau(alpha)
    assert abs(math.log1p(tau) + alpha * math.log1p(tau / alpha) - tau) < 1e-12 * (1 + tau)
    # The 2.5129 sqrt(alpha) shortcut is exact only for square matrices and too low otherwise.
    assert tau >= 2.5129 * math.sqrt(alpha) * (1 - 1e-4)


def test_evb_tau_for_square_matrices_is_the_published_constant():
    assert R.evb_tau(1.0) == pytest.approx(2.5129, abs=1e-4)
    # For thin matrices the shortcut is far off (12 % at alpha = 0.01).
    assert R.evb_tau(0.01) > 2.5129 * math.sqrt(0.01) * 1.12


def _free_energy(theta, gamma, L, M, sigma2):
    """Twice the VB free energy of one component, up to a constant (direct definition)."""
    mu_a, mu_b, log_sa, log_sb, log_ca, log_cb = theta
    sa, sb, ca, cb = np.exp([log_sa, log_sb, log_ca, log_cb])
    beta_a, beta_b = mu_a**2 + M * sa, mu_b**2 + L * sb
    return (M * math.log(ca / sa) + L * math.log(cb / sb) + beta_a / ca + beta_b / cb - (L + M)
            + (-2 * gamma * mu_a * mu_b + beta_a * beta_b) / sigma2)


@pytest.mark.parametrize("L, M", [(6, 10), (8, 8), (3, 40)])
@pytest.mark.parametrize("factor", [0.8, 1.3, 2.0])
def test_analytic_evb_solution_matches_numerical_minimisation(L, M, factor):
    """The shrunk value and the keep/discard decision agree with a brute-force minimum of
    the free energy over all variational and prior parameters."""
    sigma2 = 1.0
    tau = R.evb_tau(L / M)
    threshold = math.sqrt(M * sigma2 * (1 + tau) * (1 + (L / M) / tau))
    gamma = factor * threshold
    best = None
    for start in ([1.0, 1.0, 0, 0, 0, 0], [math.sqrt(gamma), math.sqrt(gamma), -3, -3, 1, 1]):
        result = minimize(_free_energy, start, args=(gamma, L, M, sigma2), method="Nelder-Mead",
                          options={"maxiter": 40000, "maxfev": 40000, "xatol": 1e-10,
                                   "fatol": 1e-12})
        if best is None or result.fun < best.fun:
            best = result
    # The null solution is the limit c_a, c_b -> 0 with free energy 0.
    numeric_estimate = best.x[0] * best.x[1] if best.fun < -1e-6 else 0.0
    s = np.zeros(L)
    s[0] = gamma
    result = R.evbmf_from_singular_values(s, (L, M), noise_variance=sigma2)
    analytic = result.estimates[0] if result.rank else 0.0
    assert (result.rank == 1) == (factor > 1)
    assert analytic == pytest.approx(numeric_estimate, rel=1e-3, abs=1e-3)
    if result.rank:
        z = gamma * analytic / sigma2
        predicted = M * math.log1p(z / M) + L * math.log1p(z / L) - z
        assert best.fun == pytest.approx(predicted, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("shape, signal, seed", [
    ((40, 120), [4.0, 3.0, 2.5, 2.0], 0),
    ((120, 40), [4.0, 3.0, 2.5, 2.0], 1),
    ((64, 64), [5.0, 4.0, 3.0, 2.5, 2.2, 2.0], 2),
    ((20, 500), [3.0, 2.0], 3),
])
def test_evbmf_recovers_the_rank_and_noise_of_low_rank_plus_noise(shape, signal, seed):
    L, M = shape
    sigma = 0.5
    # Signal singular values as multiples of the noise edge sigma (sqrt(L) + sqrt(M)).
    edge = sigma * (math.sqrt(L) + math.sqrt(M))
    matrix = low_rank_plus_noise(L, M, [c * edge for c in signal], sigma, seed)
    result = R.evbmf(matrix)
    assert result.rank == len(signal)
    assert result.noise_variance == pytest.approx(sigma**2, rel=0.1)
    assert torch.linalg.svdvals(matrix)[len(signal)] < result.threshold


def test_evbmf_on_pure_noise_keeps_nothing_and_on_zero_returns_zero():
    noise = torch.randn(50, 80, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert R.evbmf(noise).rank == 0
    assert R.evbmf(torch.zeros(5, 7)).rank == 0


def test_evbmf_of_an_exactly_low_rank_matrix_is_its_rank():
    matrix = low_rank_plus_noise(30, 50, [5.0, 3.0, 1.0], 0.0, 4)
    assert R.evbmf(matrix).rank == 3


def test_estimated_noise_variance_minimises_the_free_energy():
    matrix = low_rank_plus_noise(30, 70, [20.0, 15.0, 12.0], 0.7, 5)
    s = torch.linalg.svdvals(matrix).numpy()
    result = R.evbmf(matrix)
    grid = np.exp(np.linspace(math.log(1e-3), math.log(float((s**2).sum()) / (30 * 70)), 4000))
    energies = [R.evb_free_energy(s, (30, 70), v) for v in grid]
    assert R.evb_free_energy(s, (30, 70), result.noise_variance) <= min(energies) + 1e-6


def test_evbmf_refuses_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        R.evbmf(torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match="NaN"):
        R.evbmf(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="noise_variance"):
        R.evbmf(torch.eye(3), noise_variance=-1.0)


def test_weakened_rank():
    assert R.weakened_rank(64, 10, 1.0) == 10
    assert R.weakened_rank(64, 10, 0.0) == 64
    assert R.weakened_rank(64, 10, 0.5) == 37
    assert R.weakened_rank(64, 0, 1.0, min_rank=4) == 4
    assert R.weakened_rank(3, 0, 1.0, min_rank=8) == 3  # never above the full rank
    with pytest.raises(ValueError, match="weakening"):
        R.weakened_rank(64, 10, 1.5)


# --------------------------------------------------------------------------- kernels


def tucker_kernel(dims, ranks, sigma, seed):
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(*ranks, *dims[2:], generator=g, dtype=torch.float64)
    u = torch.linalg.qr(torch.randn(dims[0], ranks[0], generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(dims[1], ranks[1], generator=g, dtype=torch.float64)).Q
    kernel = decompose.mode_product(decompose.mode_product(core, u, 0), v, 1)
    kernel = kernel / kernel.norm() * 10
    return kernel + sigma * torch.randn(*dims, generator=g, dtype=torch.float64)


def tt_kernel(dims, ranks, sigma, seed):
    """A kernel (out, in, k, k) whose TT over (in, k, k, out) has the given inner ranks."""
    g = torch.Generator().manual_seed(seed)
    modes = R.tt_dims(dims)
    full = [1, *ranks, 1]
    cores = [torch.randn(full[j], modes[j], full[j + 1], generator=g, dtype=torch.float64)
             for j in range(len(modes))]
    tensor = cores[0]
    for core in cores[1:]:
        tensor = torch.tensordot(tensor, core, dims=([-1], [0]))
    tensor = tensor.reshape(modes)
    kernel = tensor.permute(-1, *range(len(modes) - 1))
    kernel = kernel / kernel.norm() * 10
    return kernel + sigma * torch.randn(*dims, generator=g, dtype=torch.float64)


def cp_kernel(dims, rank, sigma, seed):
    g = torch.Generator().manual_seed(seed)
    factors = [torch.randn(n, rank, generator=g, dtype=torch.float64) for n in dims]
    kernel = torch.einsum("ar,br,cr,dr->abcd", *factors)
    kernel = kernel / kernel.norm() * 10
    return kernel + sigma * torch.randn(*dims, generator=g, dtype=torch.float64)


def test_evbmf_rank_recovers_known_tucker_tt_and_cp_ranks_under_noise():
    sigma = 0.01
    assert R.evbmf_rank("tucker", tucker_kernel((48, 32, 3, 3), (7, 5), sigma, 0)) == (7, 5)
    assert R.evbmf_rank("tt", tt_kernel((40, 24, 3, 3), (6, 9, 8), sigma, 1)) == (6, 9, 8)
    assert R.evbmf_rank("cp", cp_kernel((40, 32, 3, 3), 6, sigma, 2)) == (6,)


def test_evbmf_rank_weakening_and_min_rank():
    kernel = tucker_kernel((48, 32, 3, 3), (7, 5), 0.01, 0)
    assert R.evbmf_rank("tucker", kernel, weakening=0.0) == (48, 32)
    assert R.evbmf_rank("tucker", kernel, weakening=0.5) == (28, 19)  # ceil(48 - 20.5), ...
    assert R.evbmf_rank("tucker", kernel, min_rank=10) == (10, 10)


def test_evbmf_rank_takes_the_largest_rank_over_groups():
    a = tucker_kernel((16, 12, 3, 3), (3, 2), 0.01, 3)
    b = tucker_kernel((16, 12, 3, 3), (5, 4), 0.01, 4)
    weight = torch.cat([a, b])  # a grouped conv: 2 groups of 16 outputs, 12 inputs each
    assert R.evbmf_rank("tucker", weight, groups=2) == (5, 4)


def test_energy_rank_keeps_the_requested_energy_and_no_less_rank():
    kernel = tucker_kernel((40, 24, 3, 3), (10, 6), 0.2, 5)
    for energy in (0.5, 0.9, 0.99):
        ranks = R.energy_rank("tucker", kernel, energy)
        for mode, r in zip((0, 1), ranks):
            s2 = torch.linalg.svdvals(R.unfold(kernel, (mode,))) ** 2
            kept = s2.cumsum(0) / s2.sum()
            assert kept[r - 1] >= energy - 1e-12
            assert r == 1 or kept[r - 2] < energy
    assert R.energy_rank("tucker", kernel, 1.0) == (40, 24)


def test_error_rank_guarantees_the_tucker_error():
    kernel = tucker_kernel((40, 24, 3, 3), (10, 6), 0.3, 6)
    for error in (0.05, 0.2, 0.5):
        ranks = R.error_rank("tucker", kernel, error)
        core, factors = decompose.tucker(kernel, ranks)
        approx = decompose.mode_product(decompose.mode_product(core, factors[0], 0), factors[1], 1)
        assert decompose.relative_error(approx, kernel) <= error


def test_tt_svd_rank_meets_the_error_and_finds_exact_ranks():
    kernel = tt_kernel((20, 12, 3, 3), (5, 7, 6), 0.0, 7)
    assert R.tt_svd_rank(kernel, 1e-8) == (5, 7, 6)
    noisy = tt_kernel((20, 12, 3, 3), (5, 7, 6), 0.3, 8)
    for error in (0.02, 0.1, 0.3):
        ranks = R.tt_svd_rank(noisy, error)
        tensor = noisy.permute(1, 2, 3, 0)
        cores = decompose.tensor_train_cores(tensor, ranks)
        approx = cores[0]
        for core in cores[1:]:
            approx = torch.tensordot(approx, core, dims=([-1], [0]))
        assert decompose.relative_error(approx.reshape(tensor.shape), tensor) <= error + 1e-12


# --------------------------------------------------------------------------- budgets


def _flops_of(layer, x):
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        layer(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt"])
@pytest.mark.parametrize("fraction", [0.05, 0.25, 0.6])
def test_parameter_budget_is_never_exceeded_and_is_the_largest(factorization, fraction):
    conv = nn.Conv2d(48, 40, 3, padding=1)
    ranks = B.layer_budget_rank(conv, factorization, fraction)
    layer = FactorizedConv.from_conv(conv, factorization=factorization, rank=ranks)
    kernel_budget = fraction * conv.weight.numel()
    assert layer.n_parameters - conv.out_channels <= kernel_budget
    # One more step along the family goes over.
    dims = tuple(conv.weight.shape)
    bigger = {"cp": lambda r: (r[0] + 1,),
              "tt": lambda r: tuple(x + 1 for x in r),
              "tucker": lambda r: (r[0] + 1, r[1] + 1)}[factorization](ranks)
    bigger = R.resolve_rank(factorization, dims, bigger)
    if bigger != ranks:
        assert R.n_factor_parameters(factorization, dims, bigger) > kernel_budget


@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt"])
@pytest.mark.parametrize("geometry", [
    dict(kernel_size=3, padding=1), dict(kernel_size=5, stride=2, padding=2),
    dict(kernel_size=3, dilation=2, padding=2, groups=4),
])
def test_flop_budget_holds_when_measured_by_flop_counter(factorization, geometry):
    conv = nn.Conv2d(32, 48, **geometry)
    x = torch.randn(2, 32, 20, 20)
    dense = _flops_of(conv, x)
    ranks = B.layer_budget_rank(conv, factorization, 0.3, metric="flops", input_shape=x.shape)
    layer = FactorizedConv.from_conv(conv, factorization=factorization, rank=ranks,
                                     implementation="factorized")
    measured = _flops_of(layer, x)
    assert measured == B.factorized_flops(conv, factorization, ranks, x.shape)
    assert measured <= 0.3 * dense


def test_budgets_below_rank_one_and_bad_arguments_are_refused():
    conv = nn.Conv2d(64, 64, 3)
    with pytest.raises(ValueError, match="rank 1"):
        B.layer_budget_rank(conv, "cp", 0.001)
    with pytest.raises(ValueError, match="rank 1"):
        B.layer_budget_rank(conv, "tucker", 0.001, metric="flops", input_shape=(1, 64, 8, 8))
    with pytest.raises(ValueError, match="input_shape"):
        B.layer_budget_rank(conv, "cp", 0.5, metric="flops")
    with pytest.raises(ValueError, match="metric"):
        B.layer_budget_rank(conv, "cp", 0.5, metric="bytes")
    with pytest.raises(ValueError, match="fraction"):
        B.layer_budget_rank(conv, "cp", 1.5)
    with pytest.raises(ValueError, match="energy"):
        R.energy_rank("cp", conv.weight, 0.0)


def test_budget_rank_is_unchanged_by_the_refactoring():
    # Values of the original implementation (issue 2), computed with it.
    assert R.budget_rank("tucker", (32, 16, 3, 3), 0.25 * 32 * 16 * 9) == (12, 6)
    assert R.budget_rank("cp", (64, 64, 3, 3), 0.25 * 64 * 64 * 9) == (68,)
    assert R.budget_rank("tt", (64, 32, 3, 3), 0.1 * 64 * 32 * 9) == (11, 11, 11)
    assert R.budget_rank("tucker", (48, 40, 5, 5), 0.1 * 48 * 40 * 25) == (13, 11)
    assert R.budget_rank("tt", (16, 8, 3), 0.3 * 16 * 8 * 3) == (3, 3)


# --------------------------------------------------------------------------- edge cases


def test_one_by_one_kernels():
    weight = tucker_kernel((64, 32, 1, 1), (6, 6), 0.01, 9)
    assert R.evbmf_rank("tucker", weight) == (6, 6)
    assert R.evbmf_rank("cp", weight) == (6,)
    # TT over (in, 1, 1, out): the spatial bonds cannot exceed the first rank.
    ranks = R.evbmf_rank("tt", weight)
    assert ranks == (6, 6, 6)
    assert R.energy_rank("cp", weight, 1.0) == (32,)  # = max_cp_rank, exact


def test_a_single_input_channel_caps_its_rank_at_one():
    weight = torch.randn(32, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    ranks = R.energy_rank("tucker", weight, 0.99)
    assert ranks[1] == 1 and 1 <= ranks[0] <= 9  # r_out <= r_in * 3 * 3
    assert R.evbmf_rank("tucker", weight, min_rank=50) == (9, 1)  # clipped, not 50
    assert R.evbmf_rank("tt", weight, min_rank=50) == (1, 3, 9)


def test_ranks_larger_than_a_dimension_are_clipped():
    weight = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    assert R.energy_rank("cp", weight, 1.0, min_rank=1000) == (R.max_cp_rank((8, 4, 3, 3)),)
    assert R.energy_rank("tucker", weight, 1.0, min_rank=1000) == (8, 4)
    assert R.tt_svd_rank(weight, 0.0, min_rank=1000) == R.clip_tt_rank((4, 3, 3, 8), (99,) * 3)


# --------------------------------------------------------------------------- rounded ranks


def test_ranks_round_to_the_channel_multiples_kernels_run_fastest():
    auto = {r: R.round_rank(r) for r in range(1, 100)}
    assert all(auto[r] == r for r in range(1, 12))            # small ranks as they are
    for r in range(12, 100):
        multiple = 8 if r < 40 else 16
        assert auto[r] % multiple == 0 and abs(auto[r] - r) <= multiple / 2
        assert abs(auto[r] - r) <= r / 3
    assert [R.round_rank(r, 16) for r in (1, 7, 8, 23, 24, 25)] == [16, 16, 16, 16, 32, 32]
    assert [R.round_rank(r, 1) for r in (1, 13, 66)] == [1, 13, 66]
    # Rounded, then clipped to the kernel: an RGB input keeps r_in = 3; a TT bond at most
    # r_{j-1} * n_{j-1}.
    assert R.rounded_ranks("tucker", (64, 3, 7, 7), (18, 3)) == (16, 3)
    assert R.rounded_ranks("tt", (64, 64, 3, 3), (30, 66, 30)) == (32, 64, 32)
    assert R.rounded_ranks("tt", (64, 64, 1, 1), (30, 30, 30)) == (32, 32, 32)
    assert R.rounded_ranks("cp", (20, 20, 3, 3), (57,)) == (64,)
    for bad in (0, -8, 2.5, True, "16"):
        with pytest.raises(ValueError, match="multiple_of"):
            R.round_rank(20, bad)


def _wide_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(64, 96, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(96, 128, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(128, 128, 1)).eval()


@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt"])
def test_a_global_flop_budget_rounds_its_ranks_and_still_holds(factorization):
    model, shape = _wide_cnn(), (1, 3, 16, 16)
    results = {}
    for multiple in ("auto", 16, 1):
        rank = {"flops": 0.3, "global": True}
        if multiple != "auto":
            rank["multiple_of"] = multiple
        _, report = tt_conv.compress(model, factorization, rank, input_shape=shape,
                                     progress=False)
        assert report.conv_flops_after <= 0.3 * report.conv_flops_before
        # What rounding leaves of the budget is spent, rank by rank (without that, Tucker
        # at multiples of 16 used 85 % of it): four layers, yet at least 95 % is used.
        assert report.conv_flops_after >= 0.95 * 0.3 * report.conv_flops_before
        results[multiple] = [row.ranks for row in report.layers if row.ranks is not None]
        assert results[multiple]
    limits = {1, 3, 9, 27}  # what an RGB input (and a TT bond over it) caps a rank at

    def rounded(r, multiple):
        return r in limits or r % multiple == 0

    # Ranks from 12 round to multiples of 8, those from 40 to multiples of 16 (40 itself is
    # a rounded 36-39).
    assert all(rounded(r, 8 if r <= 40 else 16) for ranks in results["auto"] for r in ranks
               if r >= 12)
    assert all(rounded(r, 16) for ranks in results[16] for r in ranks)
    # Exact ranks (multiple_of=1) are what the allocation without rounding gives, and here
    # some are off the multiples: rounding changed the allocation.
    assert any(r >= 12 and r % 8 for ranks in results[1] for r in ranks)


def test_a_parameter_budget_keeps_exact_ranks_unless_asked():
    model = _wide_cnn()
    _, exact = tt_conv.compress(model, "tucker", {"params": 0.2, "global": True},
                                progress=False)
    _, rounded = tt_conv.compress(model, "tucker",
                                  {"params": 0.2, "global": True, "multiple_of": 8},
                                  progress=False)
    assert any(r >= 12 and r % 8 for row in exact.layers for r in row.ranks or ())
    assert all(r % 8 == 0 or r == 3 for row in rounded.layers for r in row.ranks or ())
    assert rounded.conv_params_after <= 0.2 * rounded.conv_params_before
    with pytest.raises(ValueError, match="global budget"):
        tt_conv.parse_rank({"flops": 0.3, "multiple_of": 8})
    with pytest.raises(ValueError, match=r"rank\['multiple_of'\]"):
        tt_conv.parse_rank({"flops": 0.3, "global": True, "multiple_of": 0})


def test_the_fill_steps_to_the_next_multiple_of_any_size():
    # The fill raises a rank to the next value rounding leaves as it is (40 is not one: it
    # rounds to 48, though 36-39 round to it), multiples larger than any step of the
    # automatic rule included.
    assert [R.next_rounded_rank(r) for r in (5, 11, 12, 16, 39, 40, 48)] == \
        [6, 16, 16, 24, 48, 48, 64]
    assert R.next_rounded_rank(64, 64) == 128 and R.next_rounded_rank(3, 64) == 64
    # Multiples of 48: the fill steps a rank of 48 to 96 (it once looked 39 ranks ahead).
    _, report = tt_conv.compress(_wide_cnn(), "tucker",
                                 {"flops": 0.7, "global": True, "multiple_of": 48},
                                 input_shape=(1, 3, 16, 16), progress=False)
    assert report.conv_flops_after <= 0.7 * report.conv_flops_before
    assert any(96 in row.ranks for row in report.layers if row.ranks)
