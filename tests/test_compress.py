"""Whole-model compression: selection, budgets, calibration, the report, export, bad input."""

import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import tt_conv
from tt_conv import FactorizedConv, calibrate, decompose
from tt_conv.profile import conv_modules, count_parameters
from conftest import threads_fixture


_one_thread = threads_fixture(1)


def make_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 48, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 10),
    ).eval()


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model, saved):
    now = model.state_dict()
    assert now.keys() == saved.keys()
    for k in saved:
        assert torch.equal(now[k], saved[k]), k


def conv_flops(model, x):
    """FLOPs of the convolutions only, measured by torch.utils.flop_counter."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    counts = counter.get_flop_counts()["Global"]
    return sum(v for op, v in counts.items() if "convolution" in str(op))


X = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- basics


@pytest.mark.parametrize("factorization", ["tucker", "cp", "tt"])
def test_compress_copies_factorizes_and_reports(factorization):
    model = make_cnn()
    saved = state(model)
    compressed, report = tt_conv.compress(model, factorization, 0.3, input_shape=(1, 3, 16, 16),
                                          progress=False)
    assert compressed is not model
    assert_same_state(model, saved)
    assert all(not isinstance(m, FactorizedConv) for m in model.modules())
    convs = dict(conv_modules(compressed))
    assert [r.name for r in report.layers] == ["0", "3", "7", "9"]
    for row in report.layers:
        layer = convs[row.name]
        assert count_parameters(layer) == row.params_after
        if row.factorization == "dense":
            assert type(layer) is nn.Conv2d and row.note
            continue
        assert isinstance(layer, FactorizedConv) and layer.factorization == factorization
        assert tuple(layer.rank) == row.ranks
        original = dict(model.named_modules())[row.name]
        assert row.kernel_error == pytest.approx(
            decompose.relative_error(layer.reconstruct_kernel(), original.weight))
        # The kernel part keeps at most 30 % of the dense kernel.
        bias = 0 if layer.bias is None else layer.bias.numel()
        assert row.params_after - bias <= 0.3 * original.weight.numel()
        assert row.flops_after == layer.flops((1, *_input_shape_of(model, row.name)[1:]))
    assert report.conv_params_after < report.conv_params_before
    assert report.model_params_after == count_parameters(compressed)
    assert report.model_flops_before == _total_flops(model, torch.zeros(1, 3, 16, 16))
    assert report.model_flops_after == _total_flops(compressed, torch.zeros(1, 3, 16, 16))
    assert compressed(X).shape == model(X).shape


def _input_shape_of(model, name):
    return tt_conv.profile.conv_input_shapes(model, torch.zeros(1, 3, 16, 16))[name]


def _total_flops(model, x):
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def test_the_factorized_layers_take_the_mode_of_the_model():
    for training in (False, True):
        model = make_cnn().train(training)
        compressed, _ = tt_conv.compress(model, "tt", 0.5, progress=False)
        assert {m.training for m in compressed.modules()} == {training}


def test_inplace_modifies_and_returns_the_model():
    model = make_cnn()
    compressed, _ = tt_conv.compress(model, "tucker", 0.5, inplace=True, progress=False)
    assert compressed is model
    assert any(isinstance(m, FactorizedConv) for m in model.modules())


def test_full_rank_compression_keeps_outputs_for_every_geometry():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
        nn.Conv2d(8, 8, 3, padding=1, groups=4, padding_mode="reflect"),
        nn.Conv2d(8, 6, (1, 3), padding="same", bias=False),
    ).eval()
    x = torch.randn(2, 4, 12, 10)
    for factorization in ("tucker", "cp", "tt"):
        compressed, report = tt_conv.compress(model, factorization, 10**6, progress=False)
        # Explicit ranks beyond the kernel are clipped, and layers that do not shrink stay
        # dense: either way the function is unchanged.
        torch.testing.assert_close(compressed(x), model(x), rtol=1e-4, atol=1e-5)
        assert all(r.factorization == "dense" and "left dense" in r.note for r in report.layers)


def test_one_and_three_dimensional_convolutions():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv1d(6, 12, 5, padding=2), nn.ReLU(), nn.Conv1d(12, 12, 3))
    compressed, report = tt_conv.compress(model, "cp", 0.4, progress=False)
    assert compressed(torch.randn(2, 6, 20)).shape == (2, 12, 18)
    model3 = nn.Sequential(nn.Conv3d(4, 8, 3, padding=1))
    compressed3, _ = tt_conv.compress(model3, "tt", 0.4, progress=False)
    assert isinstance(compressed3[0], FactorizedConv)
    assert compressed3(torch.randn(1, 4, 6, 6, 6)).shape == (1, 8, 6, 6, 6)


# --------------------------------------------------------------------------- selection


def test_include_exclude_and_overrides():
    model = make_cnn()
    compressed, report = tt_conv.compress(
        model, "tucker", 0.3, exclude=["0"], overrides={"9": {"factorization": "cp", "rank": 0.2}},
        progress=False)
    rows = {r.name: r for r in report.layers}
    assert rows["0"].factorization == "dense" and "not selected" in rows["0"].note
    assert rows["3"].factorization == "tucker"
    assert rows["9"].factorization == "cp"
    assert rows["9"].params_after - 48 <= 0.2 * 48 * 32
    _, report = tt_conv.compress(model, "tucker", 0.3, include=["3", "7"], progress=False)
    assert [r.name for r in report.layers if r.factorization != "dense"] == ["3", "7"]


def test_patterns_that_match_nothing_warn_and_selecting_nothing_fails():
    model = make_cnn()
    with pytest.warns(UserWarning, match="'features.*'"):
        tt_conv.compress(model, "tucker", 0.3, exclude=["features.*"], progress=False)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="leave none"):
        tt_conv.compress(model, "tucker", 0.3, include=["nope"], progress=False)


# --------------------------------------------------------------------------- budgets


@pytest.mark.parametrize("factorization", ["tucker", "cp", "tt", "auto"])
def test_global_parameter_budget_holds_exactly(factorization):
    model = make_cnn()
    before = sum(count_parameters(m) for _, m in conv_modules(model))
    compressed, report = tt_conv.compress(model, factorization, {"params": 0.2, "global": True},
                                          progress=False)
    after = sum(count_parameters(m) for _, m in conv_modules(compressed))
    assert after == report.conv_params_after <= 0.2 * before
    assert 0 < report.shared_energy < 1


@pytest.mark.parametrize("rank", [{"params": 0.25, "global": True},
                                  {"flops": 0.25, "global": True}])
def test_a_global_cp_budget_is_used_where_the_unfoldings_cap_the_ranks(rank):
    # 32 x 32 x 16 kernels (long 1-D filters, like a pitch network's): every unfolding has
    # rank <= 32, but a quarter of the parameters buys CP rank 50. The shared energy reaches
    # 1 at rank 32 (15.8 % of the parameters); the CP ranks then grow into the budget.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 32, (16, 1)), nn.ReLU(),
                          nn.Conv2d(32, 32, (16, 1), bias=False))
    shape = (1, 32, 40, 1)
    _, report = tt_conv.compress(model, "cp", rank, input_shape=shape, progress=False)
    metric = "params" if "params" in rank else "flops"
    before, after = (getattr(report, f"conv_{metric}_{w}") for w in ("before", "after"))
    assert 0.23 * before < after <= 0.25 * before
    assert all(row.ranks[0] > 32 for row in report.layers)


def test_global_and_per_layer_flop_budgets_hold_when_measured():
    model = make_cnn()
    x = torch.zeros(1, 3, 16, 16)
    dense = conv_flops(model, x)
    compressed, report = tt_conv.compress(model, "cp", {"flops": 0.3, "global": True},
                                          input_shape=x.shape, progress=False)
    assert conv_flops(compressed, x) == report.conv_flops_after <= 0.3 * dense
    compressed, report = tt_conv.compress(model, "tucker", {"flops": 0.5}, input_shape=x.shape,
                                          progress=False)
    for row in report.layers:
        if row.factorization != "dense":
            assert row.flops_after <= 0.5 * row.flops_before
    with pytest.raises(ValueError, match="input_shape"):
        tt_conv.compress(model, "tucker", {"flops": 0.5}, progress=False)


def test_budgets_below_rank_one_name_the_layer():
    model = make_cnn()
    # Since issue 11 such layers stay dense by default; strict=True raises as before.
    with pytest.raises(ValueError, match="layer '0'.*rank 1"):
        tt_conv.compress(model, "tucker", 0.01, strict=True, progress=False)
    _, report = tt_conv.compress(model, "tucker", 0.01, progress=False)
    first = report.layers[0]
    assert first.factorization == "dense" and "rank 1" in first.note
    with pytest.raises(ValueError, match="global"):
        tt_conv.compress(model, "tucker", {"params": 0.001, "global": True}, progress=False)


@pytest.mark.parametrize("spec", ["evbmf", {"evbmf": 0.5, "min_rank": 2}, {"energy": 0.8},
                                  {"error": 0.3}])
def test_data_driven_ranks(spec):
    model = make_cnn()
    compressed, report = tt_conv.compress(model, "tt", spec, progress=False)
    assert compressed(X).shape == (8, 10)
    assert len(report.layers) == 4


def test_auto_keeps_the_most_accurate_factorization():
    model = make_cnn()
    _, report = tt_conv.compress(model, "auto", 0.3, calibration=X, progress=False)
    for row in report.layers:
        if row.factorization == "dense":
            continue
        scores = dict(part.split() for part in
                      row.note.split("errors: ")[1].rstrip(")").split(", "))
        best = min(float(v) for v in scores.values())
        assert float(scores[row.factorization]) <= best * (1 + 1e-2)  # printed to 3 digits
        assert float(scores[row.factorization]) == pytest.approx(row.output_error, rel=1e-2)
    with pytest.raises(ValueError, match="auto"):
        tt_conv.compress(model, "auto", 4, progress=False)


# --------------------------------------------------------------------------- calibration


def test_calibration_measures_output_errors_against_the_original():
    model = make_cnn()
    compressed, report = tt_conv.compress(model, "tucker", 0.3, calibration=X, fit="kernel",
                                          progress=False)
    # With kernel fitting the first layer sees the original input: its error is direct.
    first = report.layers[0]
    layer = compressed[0]
    with torch.no_grad():
        expected = decompose.relative_error(layer(X), model[0](X))
    assert first.output_error == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():
        assert report.model_output_error == pytest.approx(
            decompose.relative_error(compressed(X), model(X)), rel=1e-5)


def test_data_fit_lowers_the_output_error():
    model = make_cnn()
    batch = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    _, kernel_fit = tt_conv.compress(model, "cp", {"params": 0.2, "global": True},
                                     calibration=batch, fit="kernel", progress=False)
    _, data_fit = tt_conv.compress(model, "cp", {"params": 0.2, "global": True},
                                   calibration=batch, fit="data", progress=False)
    assert data_fit.model_output_error < kernel_fit.model_output_error
    assert any("data-aware" in n for n in data_fit.notes)


def test_refit_is_the_least_squares_optimum():
    torch.manual_seed(4)
    conv = nn.Conv2d(8, 12, 3, padding=1, groups=2)
    x = torch.randn(16, 8, 10, 10)
    target = conv(x).detach() + 0.1 * torch.randn(16, 12, 10, 10)
    for factorization in ("cp", "tucker", "tt"):
        layer = FactorizedConv.from_conv(conv, factorization=factorization, rank=0.3)
        with torch.no_grad():
            before = decompose.relative_error(layer(x), target)
        calibrate.refit_output_stage(layer, x, target, ridge=0.0)
        with torch.no_grad():
            after = decompose.relative_error(layer(x), target)
            # Independent least squares on the activations entering the last stage.
            z = layer.to_sequential()[:-1](x)
            best = 0.0
            for g in range(2):
                zg = z[:, g * z.shape[1] // 2:(g + 1) * z.shape[1] // 2]
                zg = torch.cat([zg.transpose(0, 1).reshape(zg.shape[1], -1),
                                torch.ones(1, zg.numel() // zg.shape[1])]).double()
                yg = target[:, g * 6:(g + 1) * 6].transpose(0, 1).reshape(6, -1).double()
                solution = torch.linalg.lstsq(zg.T, yg.T).solution
                best += float(((zg.T @ solution - yg.T) ** 2).sum())
        assert after <= before
        assert after == pytest.approx(math.sqrt(best) / float(target.double().norm()), rel=1e-4)


def test_calibration_from_a_dataloader_of_pairs():
    model = make_cnn()
    data = torch.utils.data.TensorDataset(X, torch.zeros(len(X), dtype=torch.long))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    _, report = tt_conv.compress(model, "tucker", 0.3, calibration=loader, progress=False)
    assert report.input_shape == (4, 3, 16, 16)
    assert all(r.output_error is not None for r in report.layers)


# --------------------------------------------------------------------------- report


def test_report_formats(tmp_path):
    model = make_cnn()
    _, report = tt_conv.compress(model, "cp", 0.3, input_shape=(1, 3, 16, 16), calibration=X,
                                 progress=False)
    text = str(report)
    for row in report.layers:
        assert row.name in text.split("\n", 3)[3]
    assert "total (convs)" in text and "x smaller" in text
    data = report.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["totals"]["conv_params_after"] == report.conv_params_after
    assert len(data["layers"]) == 4 and data["layers"][1]["ranks"] == list(report.layers[1].ranks)
    markdown = report.to_markdown(tmp_path / "r.md")
    assert (tmp_path / "r.md").read_text() == markdown
    assert markdown.count("\n|") >= 6
    report.to_json(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == data


# --------------------------------------------------------------------------- export


def test_export_gives_plain_modules_with_the_same_outputs(tmp_path):
    model = make_cnn()
    compressed, _ = tt_conv.compress(model, "cp", 0.3, progress=False)
    exported = tt_conv.export(compressed)
    assert any(isinstance(m, FactorizedConv) for m in compressed.modules())
    assert not any(isinstance(m, FactorizedConv) for m in exported.modules())
    # CP layers fold the spatial factors of 1x1 axes into the input projection on export.
    assert count_parameters(exported) <= count_parameters(compressed)
    with torch.no_grad():
        torch.testing.assert_close(exported(X), compressed(X), rtol=1e-4, atol=1e-5)
    path = tmp_path / "exported.pt"
    torch.save(exported, path)
    torch.save(X, tmp_path / "x.pt")
    torch.save(exported(X).detach(), tmp_path / "y.pt")
    # Load and run in a fresh interpreter where tt_conv cannot be imported.
    script = (
        "import sys; sys.modules['tt_conv'] = None\n"
        "import torch\n"
        f"m = torch.load({str(path)!r}, weights_only=False)\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r}); y = torch.load({str(tmp_path / 'y.pt')!r})\n"
        "with torch.no_grad(): assert torch.allclose(m(x), y, atol=1e-6)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.strip() == "ok", result.stderr


# --------------------------------------------------------------------------- bad input


def test_bad_input():
    with pytest.raises(ValueError, match="no nn.Conv"):
        tt_conv.compress(nn.Sequential(nn.Linear(3, 4)), progress=False)
    with pytest.raises(TypeError, match="nn.Module"):
        tt_conv.compress("model.pt")
    model = make_cnn()
    with torch.no_grad():
        model[3].weight[0, 0, 0, 0] = float("nan")
    saved = state(model)
    with pytest.raises(ValueError, match="layer '3'.*NaN"):
        tt_conv.compress(model, "tucker", 0.3, progress=False)
    with pytest.raises(ValueError, match="layer '3'.*NaN"):
        tt_conv.compress(model, "tucker", 0.3, inplace=True, progress=False)
    assert all(torch.equal(a, b) or torch.isnan(a).any()
               for a, b in zip(model.state_dict().values(), saved.values()))
    assert not any(isinstance(m, FactorizedConv) for m in model.modules())
    model = make_cnn()
    with pytest.raises(ValueError, match="factorization"):
        tt_conv.compress(model, "svd", progress=False)
    with pytest.raises(ValueError, match="calibration"):
        tt_conv.compress(model, calibration=torch.zeros(2, 5, 16, 16), progress=False)
    with pytest.raises(ValueError, match="fit='data'"):
        tt_conv.compress(model, fit="data", progress=False)


@pytest.mark.parametrize("rank, message", [
    ({"energy": 0.9, "global": True}, "global"),
    ({"params": 0.2, "flops": 0.2}, "exactly one"),
    ({"ranks": 3}, "unknown"),
    ("half", "evbmf"),
    (1.5, r"\(0, 1\]"),
    ({"evbmf": 2.0}, "weakening"),
    (True, "rank"),
])
def test_bad_rank_specs(rank, message):
    with pytest.raises((ValueError, TypeError), match=message):
        tt_conv.parse_rank(rank)


def test_data_fit_with_grouped_strided_and_padded_convolutions():
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, stride=(2, 1), padding=(1, 2), dilation=(1, 2)), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=4, padding_mode="reflect"), nn.ReLU(),
        nn.Conv2d(8, 6, (1, 3), padding="same", bias=False),
    ).eval()
    x = torch.randn(16, 4, 12, 10)
    for factorization in ("tucker", "cp", "tt"):
        compressed, report = tt_conv.compress(model, factorization, 0.5, calibration=x,
                                              fit="data", progress=False)
        assert compressed(x).shape == model(x).shape
        assert all(r.output_error is not None and math.isfinite(r.output_error)
                   for r in report.layers)
        assert report.model_output_error < 1.0


def test_recompressing_a_compressed_model_keeps_biases():
    model = make_cnn()
    once, _ = tt_conv.compress(model, "tucker", 0.5, progress=False)
    twice, report = tt_conv.compress(once, "cp", 0.5, progress=False)
    assert twice[0].factorization == "cp"
    assert torch.equal(twice[0].bias, once[0].bias)
    assert report.layers[0].params_before == count_parameters(once[0])


# --------------------------------------------------------------------------- issue 11


def _bn_cnn(seed=0):
    """Convs each followed by ReLU and BatchNorm with uneven running statistics, as in a
    trained network (a BN re-amplifies low-variance channels)."""
    torch.manual_seed(seed)
    layers = []
    for c_in, c_out in ((3, 24), (24, 32), (32, 32)):
        bn = nn.BatchNorm2d(c_out)
        with torch.no_grad():
            bn.running_var.copy_(torch.logspace(-3, 0, c_out))
            bn.running_mean.uniform_(-0.1, 0.1)
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), bn]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5)).eval()


@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt"])
def test_calibration_is_never_worse_than_none_on_held_out_samples(factorization):
    model = _bn_cnn()
    batch = torch.randn(32, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    held = batch[24:]  # the quarter compress holds out
    plain, _ = tt_conv.compress(model, factorization, 0.25, progress=False)
    calibrated, report = tt_conv.compress(model, factorization, 0.25, calibration=batch,
                                          fit="data", progress=False)
    with torch.no_grad():
        reference = model(held)
        without = decompose.relative_error(plain(held), reference)
        with_data = decompose.relative_error(calibrated(held), reference)
    assert torch.isfinite(calibrated(batch)).all()
    assert with_data <= without * (1 + 1e-6)
    assert report.model_output_error == pytest.approx(with_data, rel=1e-5)
    assert "held-out" in report.measured_on
    assert all("fit:" in r.note for r in report.layers if r.factorization != "dense")


def test_calibration_does_not_change_the_ranks():
    model = _bn_cnn()
    batch = torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(6))
    for rank in ("evbmf", {"energy": 0.8}, {"params": 0.3, "global": True}):
        _, plain = tt_conv.compress(model, "tucker", rank, progress=False)
        _, calibrated = tt_conv.compress(model, "tucker", rank, calibration=batch,
                                         fit="data", progress=False)
        assert [r.ranks for r in plain.layers] == [r.ranks for r in calibrated.layers]


def test_refit_refuses_too_few_samples_and_never_worsens_held_out_channels():
    torch.manual_seed(7)
    conv = nn.Conv2d(16, 24, 3, padding=1)
    layer = FactorizedConv.from_conv(conv, factorization="tucker", rank=(12, 12))
    x = torch.randn(1, 16, 2, 2)
    with pytest.raises(ValueError, match="underdetermined.*at least"):
        calibrate.refit_output_stage(layer, x, conv(x).detach())
    x = torch.randn(24, 16, 6, 6)
    target = conv(x).detach()
    fit, held = slice(0, 16), slice(16, 24)
    with torch.no_grad():
        before = decompose.relative_error(layer(x[held]), target[held])
    result = calibrate.refit_output_stage(layer, x[fit], target[fit],
                                          held_out=(x[held], target[held]))
    with torch.no_grad():
        after = decompose.relative_error(layer(x[held]), target[held])
    assert after <= before + 1e-9
    assert result.held_out_after == pytest.approx(after, rel=1e-4)
    assert result.ridge in calibrate.RIDGES


def test_evbmf_keeps_a_similar_share_for_cp_as_for_tucker():
    torch.manual_seed(8)
    # A trained-like kernel: low Tucker rank plus noise, not a sum of few rank-one terms.
    core = torch.randn(12, 10, 3, 3)
    kernel = torch.einsum("abkl,oa,nb->onkl", core, torch.randn(64, 12), torch.randn(48, 10))
    kernel = kernel + 0.01 * torch.randn(64, 48, 3, 3)
    dims = tuple(kernel.shape)
    tucker = tt_conv.rank.evbmf_rank("tucker", kernel)
    cp_bound = tt_conv.rank.evbmf_rank("cp", kernel)
    cp = tt_conv.rank.evbmf_rank("cp", kernel, match_tucker=True)
    share = tt_conv.rank.n_factor_parameters
    assert share("cp", dims, cp) <= share("tucker", dims, tucker) < share("cp", dims, (cp[0] + 1,))
    assert cp[0] > cp_bound[0]


def test_report_says_growth_as_growth():
    from tt_conv.report import CompressionReport, LayerReport

    row = LayerReport("c", (8, 8, 3, 3), "tt", (2, 2, 2), 584, 100, 361e9, 374e9)
    text = str(CompressionReport([row], "tt", "x", 584, 100))
    assert "1.04x larger" in text and "0.97x" not in text


def test_no_import_cycles_and_no_function_local_imports_in_the_library():
    import ast
    from pathlib import Path

    root = Path(tt_conv.__file__).parent
    graph = {}
    for path in root.rglob("*.py"):
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        module = module.removesuffix(".__init__")
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
                edges.add(target)
        for function in ast.walk(tree):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(function):
                    if isinstance(node, ast.ImportFrom) and (
                            node.level or (node.module or "").startswith("tt_conv")):
                        raise AssertionError(f"{module}.{function.name} imports {node.module} "
                                             f"inside a function")
        graph[module] = {e for e in edges if e != "tt_conv"}

    def resolve(name):
        while name and name not in graph:
            name = name.rpartition(".")[0]
        return name

    state = {}

    def visit(node, stack):
        state[node] = "active"
        for target in sorted(graph[node]):
            target = resolve(target)
            if not target or target == node:
                continue
            if state.get(target) == "active":
                raise AssertionError("import cycle: " + " -> ".join(stack + [node, target]))
            if target not in state:
                visit(target, stack + [node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state and node != "tt_conv":
            visit(node, [])


def test_calibration_by_default_measures_and_changes_nothing():
    model = _bn_cnn()
    batch = torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(9))
    plain, _ = tt_conv.compress(model, "tucker", 0.3, progress=False)
    calibrated, report = tt_conv.compress(model, "tucker", 0.3, calibration=batch,
                                          progress=False)
    with torch.no_grad():
        torch.testing.assert_close(calibrated(batch), plain(batch))
    assert all(r.output_error is not None for r in report.layers)
