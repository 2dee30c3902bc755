"""Evaluation plumbing (batches, per-frame indexing, baselines, DDP) and the evaluate command."""

import json
import math

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from skimage.metrics import structural_similarity

from applications.conv_tt_lstm import cli
from applications.conv_tt_lstm.data.factory import DatasetSpec, build_video_dataset
from applications.conv_tt_lstm.evaluation import (
    ShardSampler,
    evaluate,
    evaluate_predictors,
    evaluation_loader,
    first_batch_predictions,
    trivial_predictor_summaries,
)
from applications.conv_tt_lstm.metrics import FrameMetrics, LpipsMetric
from applications.conv_tt_lstm.checkpoint import save_checkpoint
from applications.conv_tt_lstm.model import ArchitectureConfig, VideoPredictionNetwork

TINY = dict(hidden_channels=(4, 4), layers_per_block=1, kernel_size=3, order=2, steps=2, rank=2,
            skip_stride=0, patch_size=4)


@pytest.fixture(scope="module")
def sequences():
    """Six real Moving MNIST sequences of 3 + 4 frames, 32 x 32: [6, 7, 1, 32, 32]."""
    spec = DatasetSpec(input_frames=3, future_frames=4, image_size=32, lengths={"test": 6})
    dataset = build_video_dataset(spec, "test")
    return torch.stack([dataset[i] for i in range(len(dataset))])


def tiny_model(seed=0, **changes):
    torch.manual_seed(seed)
    model = VideoPredictionNetwork(ArchitectureConfig(**{**TINY, **changes}))
    with torch.no_grad():  # outputs away from 0 so that clamping and the metrics do something
        model.output.bias.fill_(0.2)
    return model


def reference_curves(prediction, truth):
    """Per-frame means over sequences, computed sample by sample with numpy / scikit-image."""
    p = np.clip(prediction.numpy().astype(np.float64), 0, 1)[:, :, 0]
    t = truth.numpy().astype(np.float64)[:, :, 0]
    mse = ((p - t) ** 2).mean(axis=(2, 3))
    ssim = np.array([[structural_similarity(t[b, i], p[b, i], data_range=1.0)
                      for i in range(p.shape[1])] for b in range(p.shape[0])])
    return {"mse": mse.mean(0), "mse_sum": (mse * t[0, 0].size).mean(0),
            "mae": np.abs(p - t).mean(axis=(2, 3)).mean(0),
            "psnr": (10 * np.log10(1 / mse)).mean(0), "ssim": ssim.mean(0)}


def check_summary(summary, reference, n_sequences):
    assert summary["n_sequences"] == n_sequences
    for name, curve in reference.items():
        np.testing.assert_allclose(summary["metrics"][name]["per_frame"], curve, rtol=1e-5, atol=1e-5,
                                   err_msg=name)
        assert math.isclose(summary["metrics"][name]["mean"], curve.mean(), rel_tol=1e-5, abs_tol=1e-6)


def test_unequal_batches_average_per_sequence_and_frame(sequences):
    inputs, truth = sequences[:, :3], sequences[:, 3:]
    def predictor(batch_inputs, future):
        # Each future frame a different guess: the last input shifted by i + 1 pixels, dimmed.
        assert future == 4 and batch_inputs.shape[1] == 3
        return torch.stack([torch.roll(batch_inputs[:, -1], i + 1, dims=-1) * (1.4 - 0.2 * i)
                            for i in range(4)], 1)

    expected = reference_curves(predictor(inputs, 4), truth)
    batches = [sequences[0:4], sequences[4:5], sequences[5:6]]  # 4 + 1 + 1: a plain mean of
    # batch means would weigh the last two sequences 4 times too much.
    summary = evaluate_predictors({"guess": predictor}, batches, input_frames=3, future_frames=4,
                                  metrics=FrameMetrics())["guess"]
    check_summary(summary, expected, 6)
    assert summary["n_future_frames"] == 4 and summary["input_frames"] == 3
    # Curves really differ per frame, so an indexing slip would show.
    assert np.ptp(expected["mse"]) > 0.1 * expected["mse"].mean()


def test_trivial_predictors_against_numpy(sequences):
    loader = [sequences[:5], sequences[5:]]
    summaries = trivial_predictor_summaries(loader, input_frames=3, future_frames=4, metrics=FrameMetrics())
    frames = sequences.numpy().astype(np.float64)[:, :, 0]
    truth, last = frames[:, 3:], frames[:, 2:3]
    black_mse = (truth ** 2).mean(axis=(2, 3)).mean(0)
    last_mse = ((truth - last) ** 2).mean(axis=(2, 3)).mean(0)
    np.testing.assert_allclose(summaries["black_frame"]["metrics"]["mse"]["per_frame"], black_mse, rtol=1e-6)
    np.testing.assert_allclose(summaries["last_frame"]["metrics"]["mse"]["per_frame"], last_mse, rtol=1e-6)
    np.testing.assert_allclose(summaries["black_frame"]["metrics"]["mae"]["per_frame"],
                               truth.mean(axis=(2, 3)).mean(0), rtol=1e-6)
    assert summaries["black_frame"]["n_sequences"] == summaries["last_frame"]["n_sequences"] == 6
    # Frames outside the protocol (here an 8th frame) are ignored.
    longer = torch.cat([sequences, sequences[:, :1]], 1)
    again = trivial_predictor_summaries([longer], input_frames=3, future_frames=4, metrics=FrameMetrics())
    assert again["last_frame"]["metrics"]["mse"]["per_frame"] == pytest.approx(list(last_mse), rel=1e-6)


def test_evaluate_runs_the_model_in_eval_mode_and_restores_it(sequences):
    model = tiny_model()
    model.train()
    with torch.no_grad():
        direct = model(sequences[:, :3], 4)
    loader = evaluation_loader(torch.utils.data.TensorDataset(sequences), 4)  # batches of 4 and 2
    result = evaluate(model, loader, input_frames=3, future_frames=4, metrics=FrameMetrics(), trivial=True)
    assert model.training
    assert set(result) == {"model", "last_frame", "black_frame"}
    check_summary(result["model"], reference_curves(direct, sequences[:, 3:]), 6)
    assert result["model"]["precision"] == "fp32"
    # bf16 autocast is a real reduced-precision path: close to fp32, not identical.
    bf16 = evaluate(model, loader, input_frames=3, future_frames=4, metrics=FrameMetrics(), precision="bf16")
    assert bf16["precision"] == "bf16"
    assert bf16["metrics"]["mse"]["mean"] == pytest.approx(result["model"]["metrics"]["mse"]["mean"], rel=0.05)
    one = evaluate(model, loader, input_frames=3, future_frames=4, metrics=FrameMetrics(), max_batches=1)
    assert one["n_sequences"] == 4
    inputs, truth, prediction = first_batch_predictions(model, loader, input_frames=3, future_frames=4,
                                                        max_samples=3)
    assert inputs.shape == (3, 3, 1, 32, 32) and truth.shape == prediction.shape == (3, 4, 1, 32, 32)
    torch.testing.assert_close(prediction, direct[:3].clamp(0, 1))


class MeanFeatureDistance(torch.nn.Module):
    """A stand-in perceptual network with lpips.LPIPS's call convention (the real LPIPS is
    checked against the lpips package in test_metrics.py; here only the plumbing)."""

    def forward(self, x, y):
        assert x.shape[1] == 3 and x.min() >= -1 and x.max() <= 1  # [-1, 1], gray repeated
        return (x - y).abs().mean(dim=(1, 2, 3), keepdim=True)


def test_lpips_flows_through_when_available(sequences):
    metrics = FrameMetrics(lpips=LpipsMetric(MeanFeatureDistance(), chunk=5))
    summaries = trivial_predictor_summaries([sequences[:4], sequences[4:]], input_frames=3, future_frames=4,
                                            metrics=metrics)
    frames = sequences.numpy().astype(np.float64)[:, :, 0]
    expected = (2 * np.abs(frames[:, 3:] - frames[:, 2:3])).mean(axis=(2, 3)).mean(0)
    np.testing.assert_allclose(summaries["last_frame"]["metrics"]["lpips"]["per_frame"], expected, rtol=1e-5)
    assert "lpips_x1e3" in summaries["black_frame"]["metrics"]


def test_errors_name_the_problem(sequences):
    with pytest.raises(ValueError, match=r"7 frames, but input_frames \+ future_frames = 3 \+ 10 = 13"):
        trivial_predictor_summaries([sequences], input_frames=3, future_frames=10, metrics=FrameMetrics())
    with pytest.raises(ValueError, match="gave no batches"):
        trivial_predictor_summaries([], input_frames=3, future_frames=4, metrics=FrameMetrics())
    with pytest.raises(ValueError, match="precision 'fp16' needs a CUDA device"):
        evaluate(tiny_model(), [sequences], input_frames=3, future_frames=4, metrics=FrameMetrics(),
                 precision="fp16")
    with pytest.raises(ValueError, match=r"predictor 'bad' returned \(6, 1, 1, 32, 32\)"):
        evaluate_predictors({"bad": lambda x, n: x[:, :1]}, [sequences], input_frames=3, future_frames=4,
                            metrics=FrameMetrics())


def test_shards_cover_every_sequence_once():
    shards = [list(ShardSampler(7, rank, 3)) for rank in range(3)]
    assert sorted(sum(shards, [])) == list(range(7)) and [len(s) for s in shards] == [3, 2, 2]


def test_distributed_evaluation_equals_one_process(tmp_path, sequences):
    model = tiny_model()
    save_checkpoint(tmp_path / "tiny.pt", model)
    data = sequences[:5, :5].clone()
    single = evaluate(model, [data], input_frames=3, future_frames=2, metrics=FrameMetrics(), trivial=True)
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    from _evaluate_ddp_worker import evaluate_worker

    mp.start_processes(evaluate_worker, args=(str(tmp_path / "init"), str(tmp_path / "tiny.pt"), data, queue),
                       nprocs=2, start_method="spawn")
    results = sorted((queue.get() for _ in range(2)), key=lambda r: r[0])
    assert [shard for _, shard, _ in results] == [3, 2]
    for _, _, summaries in results:
        for name in single:
            assert summaries[name]["n_sequences"] == 5
            for metric, values in single[name]["metrics"].items():
                np.testing.assert_allclose(summaries[name]["metrics"][metric]["per_frame"],
                                           values["per_frame"], rtol=1e-5, err_msg=f"{name} {metric}")


# ------------------------------------------------------------------------------- command


def test_evaluate_command_writes_every_output(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))  # no LPIPS weights there
    model = tiny_model()
    save_checkpoint(tmp_path / "tiny.pt", model, step=7)
    out = tmp_path / "eval"
    status = cli.main(["evaluate", str(tmp_path / "tiny.pt"), "--image-size", "32", "--sequences", "6",
                       "--input-frames", "3", "--future-frames", "4", "--batch-size", "4",
                       "--figure-samples", "2", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert status == 0
    assert "alexnet" in printed and str(tmp_path / "empty-hub") in printed  # says where to put them
    assert "| black frame |" in printed
    results = json.loads((out / "metrics.json").read_text())
    assert set(results) == {"model", "last_frame", "black_frame"}
    assert "lpips" not in results["model"]["metrics"]
    assert any("alexnet" in note for note in results["model"]["notes"])
    assert results["model"]["checkpoint_layout"] == "tt-conv" and results["model"]["n_sequences"] == 6
    # The numbers are the model's on the same generated sequences, measured independently.
    spec = DatasetSpec(input_frames=3, future_frames=4, image_size=32, lengths={"test": 6})
    dataset = build_video_dataset(spec, "test")
    frames = torch.stack([dataset[i] for i in range(6)])
    with torch.no_grad():
        direct = model.eval()(frames[:, :3], 4)
    check_summary(results["model"], reference_curves(direct, frames[:, 3:]), 6)
    markdown = (out / "metrics.md").read_text()
    assert "repeat last input frame" in markdown and "data_range=1" in markdown
    for name in ("curves.png", "predictions.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] > 100
    with Image.open(out / "predictions.gif") as gif:
        assert gif.n_frames == 3 + 4


def test_evaluate_command_errors(tmp_path, capsys):
    save_checkpoint(tmp_path / "tiny.pt", tiny_model())
    checkpoint = str(tmp_path / "tiny.pt")
    cases = [
        (["evaluate", str(tmp_path / "missing.pt")], "checkpoint file not found"),
        (["evaluate", checkpoint, "--precision", "fp16", "--device", "cpu"], "needs a CUDA device"),
        (["evaluate", checkpoint, "--dataset", "kth"], "KTH needs data_root"),
        (["evaluate", checkpoint, "--data-root", str(tmp_path / "nowhere")], "--data-root"),
        (["evaluate", checkpoint, "--image-size", "30", "--sequences", "1"],
         "not divisible by the model's patch_size 4; choose an --image-size divisible by it"),
    ]
    # Prepared frames have their own size: --image-size would not help, so it is not hinted.
    from applications.conv_tt_lstm.data.sequence_files import write_sequences_npz
    write_sequences_npz(tmp_path / "odd.npz", np.zeros((2, 7, 30, 30, 1), np.uint8))
    cases.append((["evaluate", checkpoint, "--data-root", str(tmp_path / "odd.npz"),
                   "--input-frames", "3", "--future-frames", "4"],
                  "not divisible by the model's patch_size 4; prepare the frames at a size"))
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        assert message in capsys.readouterr().err


def test_evaluate_command_takes_a_release_checkpoint(tmp_path, capsys):
    from test_model import release_state_dict

    config = ArchitectureConfig(hidden_channels=(3,), layers_per_block=1, kernel_size=3, order=1, steps=1,
                                rank=2, skip_stride=0)
    torch.save({"model_state_dict": release_state_dict(config)}, tmp_path / "release.pt")
    status = cli.main(["evaluate", str(tmp_path / "release.pt"), "--image-size", "32", "--sequences", "2",
                       "--input-frames", "2", "--future-frames", "2", "--no-lpips", "--out",
                       str(tmp_path / "e"), "--no-progress", "--ssim-data-range", "2"])
    assert status == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert results["model"]["checkpoint_layout"] == "release" and results["model"]["n_sequences"] == 2
    assert "data_range=2" in results["model"]["conventions"]["ssim"]
    with pytest.raises(ValueError, match="2 sequences cannot be shared by 3 ranks"):
        evaluation_loader(torch.utils.data.TensorDataset(torch.zeros(2, 4)), 1, rank=0, world_size=3)
