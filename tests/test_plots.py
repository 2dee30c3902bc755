"""Figures: per-frame curves, prediction grid and GIF, written atomically."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from applications.conv_tt_lstm import plots
from applications.conv_tt_lstm.metrics import FrameMetrics, MetricAccumulator


@pytest.fixture(scope="module")
def sequences():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.rand(3, 4, 1, 16, 16, generator=generator)
    truth = torch.rand(3, 5, 1, 16, 16, generator=generator)
    prediction = (truth + 0.1 * torch.randn(truth.shape, generator=generator)).clamp(0, 1)
    return inputs, truth, prediction


def summary_of(truth, prediction):
    totals = MetricAccumulator()
    totals.update(FrameMetrics()(prediction, truth))
    return totals.summary(FrameMetrics())


def test_metric_curves_png(tmp_path, sequences):
    _, truth, prediction = sequences
    one = summary_of(truth, prediction)
    path = plots.plot_metric_curves(tmp_path / "curves.png", one, title="t")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 3 * image.height  # 3 panels, no LPIPS
    compared = plots.plot_metric_curves(tmp_path / "two.png", {"a": one, "b": summary_of(truth, truth * 0.5)})
    with Image.open(compared) as image:
        pixels = np.asarray(image.convert("RGB"))
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # something was drawn
    with pytest.raises(ValueError, match="none of"):
        plots.plot_metric_curves(tmp_path / "none.png", one, curves=[("lpips_x1e3", "LPIPS")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "two.png"]


def test_prediction_grid_png(tmp_path, sequences):
    inputs, truth, prediction = sequences
    path = plots.save_prediction_grid(tmp_path / "grid.png", inputs, truth, prediction, max_samples=2)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > image.height / 2
    # One sequence without a batch axis, numpy input.
    single = plots.save_prediction_grid(tmp_path / "one.png", inputs[0].numpy(), truth[0], prediction[0])
    with Image.open(single) as small, Image.open(path) as large:
        assert small.height < large.height
    with pytest.raises(ValueError, match="truth and prediction shapes differ"):
        plots.save_prediction_grid(tmp_path / "bad.png", inputs, truth, prediction[:, :3])
    with pytest.raises(ValueError, match=r"C = 1 or 3"):
        plots.save_prediction_grid(tmp_path / "bad.png", inputs.repeat(1, 1, 2, 1, 1), truth, prediction)
    assert not (tmp_path / "bad.png").exists()


def test_prediction_gif_frames_and_content(tmp_path, sequences):
    inputs, truth, prediction = sequences
    scale = 2
    path = plots.save_prediction_gif(tmp_path / "p.gif", inputs, truth, prediction, max_samples=2,
                                     fps=5, scale=scale)
    with Image.open(path) as image:
        assert image.format == "GIF" and image.info["duration"] == 200
        frames = [np.asarray(f.convert("RGB")).astype(int) for f in ImageSequence.Iterator(image)]
    assert len(frames) == 4 + 5
    cell, gap, bar = 16 * scale, 2 * scale, 3 * scale
    assert frames[0].shape == (2 * (bar + cell) + gap, 2 * cell + gap, 3)
    # Frame 6 (a future frame) of sample 2: left panel truth, right panel prediction.
    top = bar + cell + gap + bar
    left = frames[6][top : top + cell : scale, 0:cell:scale, 0]
    right = frames[6][top : top + cell : scale, cell + gap : 2 * cell + gap : scale, 0]
    assert np.abs(left - np.rint(truth[1, 2, 0].numpy() * 255)).mean() < 3  # palette rounding
    assert np.abs(right - np.rint(prediction[1, 2, 0].numpy() * 255)).mean() < 3
    # Both panels show the input during the input frames; the bar turns from green to red.
    first = frames[1][top : top + cell : scale, 0:cell:scale, 0]
    assert np.abs(first - np.rint(inputs[1, 1, 0].numpy() * 255)).mean() < 3
    assert frames[1][0, 0, 1] > frames[1][0, 0, 0] and frames[6][0, 0, 0] > frames[6][0, 0, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.gif"]
