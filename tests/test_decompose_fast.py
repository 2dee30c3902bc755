"""The fast CP (structured / GEVD start, two-contraction ALS) and Tucker (Gram HOOI) paths."""

import math

import pytest
import tensorly as tl
import torch
from tensorly.decomposition import partial_tucker

from tt_conv import decompose as D
from conftest import threads_fixture


_one_thread = threads_fixture(1)


def cp_tensor(factors, weights=None):
    out = factors[0] if weights is None else factors[0] * weights
    for f in factors[1:]:
        out = (out.unsqueeze(-2) * f.reshape(*([1] * (out.dim() - 1)), *f.shape)).movedim(-1, -1)
    return out.sum(-1)


def random_cp(shape, rank, seed):
    g = torch.Generator().manual_seed(seed)
    factors = [torch.randn(n, rank, generator=g, dtype=torch.float64) for n in shape]
    return cp_tensor(factors)


@pytest.mark.parametrize("shape, rank", [
    ((16, 8, 3, 3), 5), ((32, 16, 3, 3), 12), ((64, 32, 3, 3), 20), ((64, 64, 3, 3), 64),
    ((16, 4, 3, 3), 6), ((8, 4, 5), 3), ((12, 6, 3, 3, 3), 4), ((6, 1, 3, 3), 2),
    ((20, 10, 1, 1), 4),
])
def test_cp_recovers_kernels_of_known_rank(shape, rank):
    tensor = random_cp(shape, rank, seed=sum(shape) + rank)
    weights, factors = D.cp(tensor.float(), rank)
    assert D.relative_error(cp_tensor(factors, weights), tensor) <= 1e-4


def test_cp_of_a_matrix_is_its_truncated_svd():
    matrix = torch.randn(40, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kernel = matrix.reshape(40, 24, 1, 1)
    s = torch.linalg.svdvals(matrix)
    for rank in (1, 5, 17):
        weights, factors = D.cp(kernel, rank)
        expected = math.sqrt(float((s[rank:] ** 2).sum() / (s**2).sum()))
        assert D.relative_error(cp_tensor(factors, weights), kernel) == pytest.approx(expected, rel=1e-9)


def test_orthogonal_terms_are_orthonormal_and_their_tail_is_the_error():
    tensor = torch.randn(12, 7, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    weights, vectors = D._orthogonal_terms(tensor.unsqueeze(0), 10**6)
    weights, vectors = weights[0], [v[0] for v in vectors]
    assert torch.allclose((weights**2).sum(), (tensor**2).sum())  # a complete expansion
    for keep in (1, 20, 100):
        approx = cp_tensor([v[:, :keep] for v in vectors], weights[:keep])
        tail = float((weights[keep:] ** 2).sum() / (tensor**2).sum())
        assert D.relative_error(approx, tensor) == pytest.approx(math.sqrt(tail), rel=1e-9)


def test_cp_is_never_worse_than_its_start_and_accepts_every_init():
    tensor = torch.randn(24, 16, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    start, _ = D._structured_init(tensor, 30, torch.Generator().manual_seed(0))
    start_error = D._cp_error(tensor, start)
    weights, factors = D.cp(tensor, 30)
    assert D.relative_error(cp_tensor(factors, weights), tensor) < start_error
    for init in ("svd", "random", (torch.ones(30, dtype=torch.float64), start)):
        weights, factors = D.cp(tensor, 30, init=init)
        assert D.relative_error(cp_tensor(factors, weights), tensor) < 0.95
    with pytest.raises(ValueError, match="init"):
        D.cp(tensor, 3, init="magic")


def test_tucker_matches_tensorly_hooi():
    tensor = torch.randn(40, 24, 3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    core, factors = D.tucker(tensor, [10, 6], tol=1e-10)
    for f in factors:
        assert torch.allclose(f.T @ f, torch.eye(f.shape[1], dtype=f.dtype), atol=1e-10)
    ours = D.relative_error(D.mode_product(D.mode_product(core, factors[0], 0), factors[1], 1),
                            tensor)
    with tl.backend_context("pytorch"):
        (c2, f2), _ = partial_tucker(tensor, rank=[10, 6], modes=[0, 1], n_iter_max=100, tol=1e-10)
        reference = D.relative_error(tl.tenalg.multi_mode_dot(c2, f2, modes=[0, 1]), tensor)
    assert ours <= reference + 1e-6


@pytest.mark.parametrize("mode, others", [(0, [1]), (1, [0]), (2, [0, 3]), (3, [2, 0, 1]),
                                          (1, [4, 0])])
def test_hooi_projected_unfolding_has_the_projected_unfoldings_gram(mode, others):
    # HOOI takes its subspaces from the Gram matrix of the projected unfolding, which the
    # contractions leave with its columns in another order: the Gram must be the same.
    g = torch.Generator().manual_seed(5)
    tensor = torch.randn(5, 4, 6, 3, 2, generator=g, dtype=torch.float64)
    factors = [torch.randn(n, 2, generator=g, dtype=torch.float64) for n in tensor.shape]
    reference = tensor
    for j in others:
        reference = D.mode_product(reference, factors[j].T, j)
    reference = D.unfold_mode(reference, mode)
    projected = D._projected_unfolding(tensor, mode, others, factors)
    assert projected.shape == reference.shape
    assert torch.allclose(projected @ projected.T, reference @ reference.T, atol=1e-12)


def test_leading_singular_without_right_vectors_keeps_the_left_ones():
    matrix = torch.randn(6, 40, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    u, s, v = D._leading_singular(matrix, 4)
    u2, s2, v2 = D._leading_singular(matrix, 4, right_vectors=False)
    assert v2 is None and torch.equal(u, u2) and torch.equal(s, s2)
    assert torch.allclose(s, torch.linalg.svdvals(matrix)[:4], atol=1e-12)
    # Rows the larger side: the left vectors come from the product, so they are returned.
    u3, s3, _ = D._leading_singular(matrix.T, 4, right_vectors=False)
    assert torch.allclose(u3.abs(), v.abs(), atol=1e-10)


def test_tucker_of_a_one_by_one_kernel_is_the_svd_truncation():
    matrix = torch.randn(30, 20, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    core, factors = D.tucker(matrix.reshape(30, 20, 1, 1), [7, 5])
    approx = D.mode_product(D.mode_product(core, factors[0], 0), factors[1], 1)
    s = torch.linalg.svdvals(matrix)
    expected = math.sqrt(float((s[5:] ** 2).sum() / (s**2).sum()))
    assert D.relative_error(approx.reshape(30, 20), matrix) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="clip"):
        D.tucker(matrix.reshape(30, 20, 1, 1), [31, 5])


def test_cp_is_at_least_as_accurate_as_tensorly_parafac():
    # The hand-written ALS replaces TensorLy's parafac for speed; it must not cost accuracy.
    from tensorly.decomposition import parafac

    generator = torch.Generator().manual_seed(3)
    tensor = torch.randn(16, 12, 3, 3, generator=generator, dtype=torch.float64)
    with tl.backend_context("pytorch"):
        ours = tl.cp_to_tensor(D.cp(tensor, 10))
        reference = tl.cp_to_tensor(parafac(tensor, 10, n_iter_max=150, tol=1e-8, init="svd"))
    ours_error = D.relative_error(ours, tensor)
    reference_error = D.relative_error(reference, tensor)
    assert ours_error <= reference_error * 1.02, (ours_error, reference_error)


# --------------------------------------------------------------------------- large kernels


def test_blocked_contractions_equal_the_unblocked_ones(monkeypatch):
    # Large kernels' ALS products are formed block by block; tiny blocks here force it.
    generator = torch.Generator().manual_seed(5)
    tensor = torch.randn(7, 6, 5, 4, generator=generator, dtype=torch.float64)
    factors = [torch.randn(n, 3, generator=generator, dtype=torch.float64) for n in tensor.shape]
    expected = torch.einsum("abcd,br,cr,dr->ar", tensor, *factors[1:])
    partial = torch.einsum("abcd,ar->bcdr", tensor, factors[0])
    unblocked = [D._contract_except(partial, factors[1:], keep) for keep in range(3)]
    monkeypatch.setattr(D, "_BLOCK_ELEMENTS", 40)
    assert torch.allclose(D._mttkrp_first(tensor.reshape(7, -1), factors[1:]), expected)
    for keep in range(3):
        assert torch.allclose(D._contract_except(partial, factors[1:], keep), unblocked[keep])


@pytest.mark.parametrize("shape, rank", [((40, 24, 9, 1), 7), ((1, 30, 12, 1, 5), 4)])
def test_cp_with_unit_modes_and_blocked_products_recovers_known_rank(monkeypatch, shape, rank):
    # Unit modes (a 1-D signal run through Conv2d) are folded away during ALS and come back
    # as rows of ones; blocks of a few hundred elements exercise the large-kernel path.
    monkeypatch.setattr(D, "_BLOCK_ELEMENTS", 300)
    tensor = random_cp(shape, rank, seed=sum(shape))
    weights, factors = D.cp(tensor.float(), rank)
    assert [f.shape for f in factors] == [(n, rank) for n in shape]
    assert D.relative_error(cp_tensor(factors, weights), tensor) <= 1e-4


def test_tucker_recovers_low_multilinear_rank_and_matches_tensorly_on_noisy_kernels():
    generator = torch.Generator().manual_seed(6)
    core = torch.randn(8, 6, 3, 3, generator=generator, dtype=torch.float64)
    u = torch.linalg.qr(torch.randn(64, 8, generator=generator, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(48, 6, generator=generator, dtype=torch.float64)).Q
    exact = D.mode_product(D.mode_product(core, u, 0), v, 1)
    c, (a, b) = D.tucker(exact, [8, 6])
    assert D.relative_error(D.mode_product(D.mode_product(c, a, 0), b, 1), exact) <= 1e-10
    noisy = exact + 0.5 * torch.randn(exact.shape, generator=generator, dtype=torch.float64)
    for ranks in ([8, 6], [20, 11]):
        c, (a, b) = D.tucker(noisy, ranks, tol=1e-12)
        ours = D.relative_error(D.mode_product(D.mode_product(c, a, 0), b, 1), noisy)
        with tl.backend_context("pytorch"):
            (c2, f2), _ = partial_tucker(noisy, rank=ranks, modes=[0, 1], n_iter_max=200,
                                         tol=1e-12)
            reference = D.relative_error(tl.tenalg.multi_mode_dot(c2, f2, modes=[0, 1]), noisy)
        assert ours <= reference + 1e-6, (ranks, ours, reference)


def test_slice_starts_know_their_error_and_find_filterwise_low_rank_kernels():
    # Every filter of rank 2, each with its own factors: 24 rank-one terms in all, which
    # the expansion of the slices along mode 0 finds exactly (one-hot along that mode).
    generator = torch.Generator().manual_seed(8)
    filters = [random_cp((20, 9), 2, seed=i) for i in range(12)]
    tensor = torch.stack(filters)  # (12, 20, 9)
    for split in (None, 0, 1):
        factors, error = D._structured_init(tensor, 24, generator, split)
        assert error == pytest.approx(D._cp_error(tensor, factors), abs=1e-6)
    assert D._structured_init(tensor, 24, generator, 0)[1] <= 1e-6
    weights, factors = D.cp(tensor.float(), 24)
    assert D.relative_error(cp_tensor(factors, weights), tensor) <= 1e-5


def _concentrated_kernel(shape, directions, noise, seed):
    """A kernel whose last mode holds nearly all its energy in ``directions`` directions."""
    generator = torch.Generator().manual_seed(seed)
    core = torch.randn(*shape[:-1], directions, generator=generator, dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(shape[-1], directions, generator=generator,
                                        dtype=torch.float64)).Q
    kernel = D.mode_product(core, basis, len(shape) - 1)
    spread = torch.randn(shape, generator=generator, dtype=torch.float64)
    return kernel + noise * spread * (kernel.norm() / spread.norm())


def test_compression_keeps_the_leading_directions_and_knows_what_it_leaves_out():
    kernel = _concentrated_kernel((20, 12, 16), 3, 0.01, seed=9)
    bases, core, outside = D._compression(kernel, 5)
    assert bases[0] is None and bases[1] is None  # flat spectra: kept whole
    assert bases[2].shape[0] == 16 and 3 <= bases[2].shape[1] <= 6
    assert outside == pytest.approx(float(kernel.norm() ** 2 - core.norm() ** 2), rel=1e-9)
    assert outside <= D._COMPRESSION_LOSS * float(kernel.norm() ** 2)
    # The error of factors in the subspace, measured on the projection plus what it left
    # out, is their error on the kernel itself.
    generator = torch.Generator().manual_seed(0)
    factors = [torch.randn(n, 5, generator=generator, dtype=torch.float64) for n in core.shape]
    expanded = factors[:2] + [bases[2] @ factors[2]]
    assert D._cp_error(core, factors, outside=outside) == pytest.approx(
        D.relative_error(cp_tensor(expanded), kernel), rel=1e-9)
    # A rank that could represent the projection exactly keeps more directions: twice
    # what it could represent.
    bases, core, _ = D._compression(kernel, 40)
    assert bases[2].shape[1] == 7 and D.max_cp_rank(core.shape) >= 80
    assert all(b is None for b in D._compression(kernel, 100)[0])  # 16 taps could not do
    # Nothing to gain: every mode whole.
    flat = torch.randn(20, 12, 16, generator=generator, dtype=torch.float64)
    bases, core, outside = D._compression(flat, 5)
    assert all(b is None for b in bases) and core is flat and outside == 0.0


def test_large_cp_runs_in_the_leading_subspace_and_finishes_on_the_kernel(monkeypatch):
    # Large enough (elements x rank over _SMALL_WORK, lowered here) for ALS to run on the
    # projection; the rank cannot fit the leading directions exactly, so what the
    # projection leaves out is a small part of the error.
    monkeypatch.setattr(D, "_SMALL_WORK", 1 << 20)
    kernel = _concentrated_kernel((48, 24, 32), 6, 0.01, seed=10)
    rank = 100
    assert kernel.numel() * rank > D._SMALL_WORK
    shapes = []
    als = D._cp_als

    def spy(tensor, *args):
        shapes.append(tuple(tensor.shape))
        return als(tensor, *args)

    monkeypatch.setattr(D, "_cp_als", spy)
    weights, factors = D.cp(kernel, rank)
    compressed = D.relative_error(cp_tensor(factors, weights), kernel)
    assert [f.shape for f in factors] == [(n, rank) for n in kernel.shape]
    # ALS ran on the projection (modes sorted by size, the 32 taps cut below 24) ...
    assert all(s[0] == 48 and s[1] == 24 and s[2] < 24 for s in shapes[:-1]), shapes
    assert shapes[-1] == (48, 24, 32)  # ... and its last stage on the kernel itself
    shapes.clear()
    monkeypatch.setattr(D, "_COMPRESSION_LOSS", 0.0)  # nothing may be left out
    weights, factors = D.cp(kernel, rank)
    assert all(s == (48, 32, 24) for s in shapes)
    assert compressed <= 1.01 * D.relative_error(cp_tensor(factors, weights), kernel)


@pytest.mark.parametrize("init", ["given", "structured", "svd", "random"])
def test_projected_cp_accepts_every_init_and_keeps_unit_modes(monkeypatch, init):
    # An exactly rank-5 kernel whose 32 taps span 3 directions, with a unit mode: ALS runs
    # on its projection (5 x 5 x 3: every mode spans only what the rank needs; the given
    # factors are projected too) and the factors come back whole, unit mode included.
    monkeypatch.setattr(D, "_SMALL_WORK", 1 << 10)
    generator = torch.Generator().manual_seed(11)
    a, b = (torch.randn(n, 5, generator=generator, dtype=torch.float64) for n in (48, 24))
    taps = torch.linalg.qr(torch.randn(32, 3, generator=generator, dtype=torch.float64)).Q
    c = taps @ torch.randn(3, 5, generator=generator, dtype=torch.float64)
    ones = torch.ones(1, 5, dtype=torch.float64)
    kernel = cp_tensor([a, b, ones, c])  # (48, 24, 1, 32)
    bases = D._compression(kernel.reshape(48, 24, 32), 5)[0]
    assert [basis.shape for basis in bases] == [(48, 5), (24, 5), (32, 3)]
    start = (torch.ones(5, dtype=torch.float64), [a, b, 2 * ones, c / 2]) if init == "given" \
        else init
    weights, factors = D.cp(kernel, 5, init=start)
    assert [f.shape for f in factors] == [(48, 5), (24, 5), (1, 5), (32, 5)]
    # Exact from the exact factors and from the orthogonal starts (which the same kernel
    # unprojected does not reach: 0.17 and 0.33); a random start may stall in a swamp, but
    # factors mapped back wrongly would be off by the kernel's whole size.
    bound = {"given": 1e-6, "structured": 1e-4, "svd": 1e-4, "random": 0.5}[init]
    assert D.relative_error(cp_tensor(factors, weights), kernel) <= bound


def test_als_factors_never_hold_subnormal_floats():
    # Components ALS drives towards zero shrink sweep after sweep into subnormal floats,
    # which Intel CPUs multiply on a slow path (a pretrained kernel's CP took twice as
    # long): entries below eps**2 of a factor's largest are zeroed, nothing else changes.
    from tt_conv.decompose import _flush_negligible

    factor = torch.tensor([[1.0, 3e-15], [2e-38, -0.5], [1e-44, 1e-13]])
    flushed = _flush_negligible(factor.clone())
    assert flushed.tolist() == [[1.0, 0.0], [0.0, -0.5], [0.0, pytest.approx(1e-13)]]
    torch.manual_seed(0)
    # A rank-2 kernel fitted at rank 6: the spare components decay towards zero.
    a, b, c = torch.randn(32, 2), torch.randn(24, 2), torch.randn(9, 2)
    kernel = torch.einsum("ir,jr,kr->ijk", a, b, c)
    weights, factors = D.cp(kernel, 6, n_iter_max=300)
    tiny = torch.finfo(torch.float32).tiny
    assert all(not ((f != 0) & (f.abs() < tiny)).any() for f in [weights, *factors])
    rebuilt = torch.einsum("r,ir,jr,kr->ijk", weights, *factors)
    assert float((rebuilt - kernel).norm() / kernel.norm()) < 1e-5


def test_als_returns_the_error_of_the_factors_it_returns():
    # The schedule compares stages by the error each returns instead of contracting the
    # kernel again: it must be the returned factors' own error, line-search step or not.
    tensor = torch.randn(20, 12, 9, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    start, _ = D._structured_init(tensor, 15, torch.Generator().manual_seed(0))
    for linesearch in (False, True):
        for n_iter in (0, 1, 7):
            factors, error = D._cp_als(tensor, start, n_iter, 1e-6, 1e-3, linesearch, 0.5)
            assert error == pytest.approx(D._cp_error(tensor, factors, outside=0.5), rel=1e-9)


def test_the_default_tolerance_is_looser_only_where_sweeps_are_costly(monkeypatch):
    tensor = torch.randn(16, 12, 6, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    tolerances = []
    als = D._cp_als

    def spy(tensor, factors, n_iter, l2, tol, *args):
        tolerances.append(tol)
        return als(tensor, factors, n_iter, l2, tol, *args)

    monkeypatch.setattr(D, "_cp_als", spy)

    def stage_tolerances(**options):
        tolerances.clear()
        D.cp(tensor, 10, ridge=(1e-3, 1e-7), **options)
        # Leave out the polishing stage's tighter tolerance (a thousandth of the stages').
        return {t for t in tolerances if not any(
            math.isclose(t, base * 1e-3) for base in (D._TOL, D._COSTLY_TOL, options.get("tol", 0)))}

    assert tensor.numel() * 10 <= D._COSTLY_WORK
    assert stage_tolerances() == {D._TOL}
    monkeypatch.setattr(D, "_COSTLY_WORK", tensor.numel() * 10 - 1)
    assert stage_tolerances() == {D._COSTLY_TOL}
    assert stage_tolerances(tol=1e-4) == {1e-4}  # a tolerance asked for holds everywhere
