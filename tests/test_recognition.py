"""Early activity recognition: the walls-touched task, the classifiers, training, evaluation."""

import contextlib
import io
import json
import math
import shutil

import numpy as np
import pytest
import torch

from applications.conv_tt_lstm import cli
from applications.conv_tt_lstm.recognition.config import RecognitionConfig, apply_overrides, preset
from applications.conv_tt_lstm.recognition.evaluate import accuracy_by_fraction, frames_seen
from applications.conv_tt_lstm.complexity import parameter_counts as count_parameters
from applications.conv_tt_lstm.recognition.model import ClassifierConfig, build_classifier
from applications.conv_tt_lstm.data.walls import (
    N_CLASSES, WallTouchFixed, WallTouchStream, generate_wall_clip, shrink_digits,
)
from applications.conv_tt_lstm.recognition.config import RecognitionOptimConfig
from applications.conv_tt_lstm.recognition.model import load_classifier
from applications.conv_tt_lstm.recognition.task import sequence_cross_entropy, train_recognizer
from _video_files import level_frames, write_video

SQUARES = np.full((3, 6, 6), 255, np.uint8)  # the digit's box is all ink: walls are visible


def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(argv)
    return status, out.getvalue(), err.getvalue()


# ------------------------------------------------------------------------- synthetic task


def walls_in_frames(frames):
    """The label from the pixels alone: which canvas borders the box's ink reaches."""
    return (int(frames[:, 0, :].any()) | int(frames[:, -1, :].any()) << 1
            | int(frames[:, :, 0].any()) << 2 | int(frames[:, :, -1].any()) << 3)


def test_labels_are_the_walls_the_box_touches_in_the_frames():
    dataset = WallTouchFixed(SQUARES, 300, "val", seed=3, n_frames=12, n_turns=2, canvas_size=20)
    labels = []
    for index in range(len(dataset)):
        clip = dataset.clip(index)
        assert clip.label == walls_in_frames(clip.frames)
        labels.append(clip.label)
        # Bounces (a coordinate clamped to 0 or 1) are wall contacts.
        for axis, (low, high) in enumerate(((1, 2), (4, 8))):
            if np.any(clip.trajectory[:, axis] == 0.0):
                assert clip.label & low
            if np.any(clip.trajectory[:, axis] == 1.0):
                assert clip.label & high
        # Moving MNIST motion: 0.1 per frame along each axis' speed, except where clamped.
        steps = np.abs(np.diff(clip.trajectory, axis=0))
        assert np.all(np.linalg.norm(steps, axis=1) <= 0.1 + 1e-12)
        assert len(clip.turns) == 2 and all(1 <= t <= 10 for t in clip.turns)
    assert len(set(labels)) >= 8  # opposite walls need a crossing: rarer


def test_turns_change_the_direction_only_at_the_turn_frames():
    rng = np.random.default_rng(0)
    clip = generate_wall_clip(SQUARES, rng, n_frames=30, n_turns=1, canvas_size=200)
    velocity = np.diff(clip.trajectory, axis=0)  # velocity[t]: frame t -> t + 1
    inside = np.all((clip.trajectory > 0) & (clip.trajectory < 1), axis=1)
    turn = clip.turns[0]
    for t in range(1, len(velocity)):
        if inside[t] and inside[t + 1] and t != turn:  # no clamp, no turn: the same step
            np.testing.assert_allclose(velocity[t], velocity[t - 1], atol=1e-12)
    assert not np.allclose(velocity[turn], velocity[turn - 1])


def test_the_label_is_undecidable_from_a_prefix():
    # What a prefix shows (the walls touched so far) names the label far less often early.
    dataset = WallTouchFixed(SQUARES, 400, "val", n_frames=12, n_turns=1, canvas_size=20)
    hits = {n: 0 for n in (3, 6, 12)}
    for index in range(len(dataset)):
        clip = dataset.clip(index)
        for n in hits:
            hits[n] += walls_in_frames(clip.frames[:n]) == clip.label
    assert hits[12] == 400
    assert hits[3] < 0.3 * 400 and hits[3] < hits[6] < hits[12]


def test_synthetic_sets_are_deterministic_and_streams_split_over_ranks_and_workers():
    digits = shrink_digits(np.random.default_rng(0).integers(0, 256, (20, 28, 28), dtype=np.uint8), 2)
    assert digits.shape == (20, 14, 14)
    a = WallTouchFixed(digits, 5, "val", seed=7, n_frames=6, canvas_size=24)
    b = WallTouchFixed(digits, 5, "val", seed=7, n_frames=6, canvas_size=24)
    torch.testing.assert_close(a[3][0], b[3][0])
    assert a[3][1] == b[3][1]
    c = WallTouchFixed(digits, 5, "test", seed=7, n_frames=6, canvas_size=24)
    assert not torch.equal(a[3][0], c[3][0])
    whole = WallTouchStream(digits, 10, seed=7, n_frames=6, canvas_size=24)
    ranks = [WallTouchStream(digits, 10, seed=7, n_frames=6, canvas_size=24, rank=r, world_size=2)
             for r in range(2)]
    shares = [list(r.indices(w, 2)) for r in ranks for w in range(2)]
    assert sorted(sum(shares, [])) == list(range(10))
    assert all(not set(x) & set(y) for i, x in enumerate(shares) for y in shares[i + 1:])
    for index in (0, 7):  # a clip is the same whichever rank makes it
        owner = ranks[index // 5]
        np.testing.assert_array_equal(owner.clip(index).frames, whole.clip(index).frames)
    assert not np.array_equal(whole.clip(0).frames, whole.for_epoch(1).clip(0).frames)
    with pytest.raises(ValueError, match="n_turns"):
        generate_wall_clip(digits, np.random.default_rng(0), n_frames=3, n_turns=2, canvas_size=24)


# ------------------------------------------------------------------------------ models


def tiny(model, **changes):
    values = dict(model=model, n_classes=5, encoder_channels=(4, 6), hidden_channels=(5, 7),
                  kernel_size=3, order=2, steps=3, rank=2)
    values.update(changes)
    return ClassifierConfig(**values)


@pytest.mark.parametrize("model", ["convttlstm", "convlstm", "hoconvlstm", "conv3d"])
def test_logits_at_every_step_depend_only_on_the_prefix(model):
    torch.manual_seed(0)
    net = build_classifier(tiny(model)).eval()
    frames = torch.rand(2, 6, 1, 16, 16)
    logits = net(frames)
    assert logits.shape == (2, 6, 5)
    changed = frames.clone()
    changed[:, 4:] = torch.rand(2, 2, 1, 16, 16)
    after = net(changed)
    torch.testing.assert_close(after[:, :4], logits[:, :4])
    assert not torch.allclose(after[:, 4:], logits[:, 4:])
    # Scoring a prefix is running the model on the prefix alone.
    torch.testing.assert_close(net(frames[:, :3])[:, -1], logits[:, 2], rtol=1e-5, atol=1e-6)


def test_parameter_counts_follow_the_architecture():
    counts = count_parameters(build_classifier(tiny("convlstm")))
    encoder = (1 * 4 * 9 + 4) + (4 * 6 * 9 + 6)
    cells = (4 * 5 * (6 + 5) * 9 + 4 * 5) + (4 * 7 * (5 + 7) * 9 + 4 * 7)
    head = 2 * 7 * 5 + 5
    assert counts == {"total": encoder + cells + head, "encoder": encoder, "cells": cells,
                      "head": head}
    conv3d = count_parameters(build_classifier(tiny("conv3d", temporal_kernel=2)))
    assert conv3d["convs"] == (6 * 5 * 2 * 9 + 5) + (5 * 7 * 2 * 9 + 7)
    tt = count_parameters(build_classifier(tiny("convttlstm")))
    assert tt["total"] == sum(p.numel() for p in build_classifier(tiny("convttlstm")).parameters())
    assert tt["cells"] < count_parameters(build_classifier(tiny("hoconvlstm")))["cells"]


def test_bad_frames_and_configs_are_named():
    net = build_classifier(tiny("convlstm"))
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.rand(1, 2, 1, 10, 10))
    with pytest.raises(ValueError, match="1 channel"):
        net(torch.rand(1, 2, 3, 16, 16))
    with pytest.raises(ValueError, match="model must be one of"):
        tiny("lstm")


# ---------------------------------------------------------------------------- training


def tiny_config(tmp_path, name="run", **overrides):
    base = preset("quick")
    settings = [f"run.runs_dir={tmp_path}", f"run.name={name}", "run.steps=2",
                "run.progress=false", "run.checkpoint_every=0", "run.val_batch_size=8",
                "data.n_frames=4", "data.frame_size=20", "data.digit_scale=4", "data.val_clips=8",
                "data.batch_size=2", "data.num_workers=0", "model.encoder_channels=4,4",
                "model.hidden_channels=4",
                "model.rank=2", "model.order=2", "model.steps=2"]
    settings += [f"{k}={v}" for k, v in overrides.items()]
    return apply_overrides(base, settings)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("model", ["convttlstm", "convlstm", "conv3d"])
def test_two_training_steps_on_the_synthetic_task(tmp_path, model):
    config = tiny_config(tmp_path, **{"model.model": model})
    result = train_recognizer(config)
    saved = torch.load(result.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert saved["training"]["step"] == 2
    torch.manual_seed(config.run.seed)
    initial = build_classifier(config.model).state_dict()
    moved = [k for k, v in saved["state_dict"].items() if not torch.equal(v, initial[k])]
    assert moved  # the optimiser changed the weights
    log = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if e["kind"] == "train"] == [1] and log[-1]["kind"] == "end"
    assert all(math.isfinite(e["loss"]) for e in log if e["kind"] == "train")
    assert [row["frames"] for row in result.summary["fractions"]] == [1, 2, 3, 4]


def test_bf16_training_steps_run_in_bfloat16(tmp_path):
    config = tiny_config(tmp_path, **{"run.precision": "bf16", "run.steps": 2})
    result = train_recognizer(config)
    model, _ = load_classifier(result.run_dir / "checkpoints" / "last.pt")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.rand(1, 4, 1, 20, 20)).dtype == torch.bfloat16
    assert math.isfinite(result.summary["fractions"][-1]["loss"])


def test_fp16_on_cpu_is_a_clear_error(tmp_path):
    status, _, err = run_cli(["recognize", "--precision", "fp16", "--device", "cpu",
                              "--runs-dir", str(tmp_path), "--no-progress"])
    assert status == 2 and "--precision fp16" in err and "CUDA" in err and "bf16" in err


@pytest.mark.parametrize("loss, last_weight", [("all", 1.0), ("all", 3.0), ("ramp", 1.0),
                                                ("ramp", 2.0), ("last", 1.0)])
def test_sequence_loss_weights_the_steps_as_documented(loss, last_weight):
    torch.manual_seed(0)
    logits, labels = torch.randn(5, 4, 6), torch.randint(0, 6, (5,))
    # Each step's cross-entropy by hand: -log softmax of the label, averaged over clips.
    per_step = [-(logits[:, t].log_softmax(-1)[torch.arange(5), labels]).mean()
                for t in range(4)]
    weights = {"all": [1.0, 1.0, 1.0, last_weight], "ramp": [1.0, 2.0, 3.0, 4.0 * last_weight],
               "last": [0.0, 0.0, 0.0, 1.0]}[loss]
    expected = sum(w * c for w, c in zip(weights, per_step)) / sum(weights)
    optim = RecognitionOptimConfig(loss=loss, last_weight=last_weight)
    assert sequence_cross_entropy(logits, labels, optim).item() == pytest.approx(
        expected.item(), rel=1e-5)


def test_resume_continues_exactly(tmp_path):
    settings = {"run.cosine": "false", "run.checkpoint_every": 2}
    straight = train_recognizer(tiny_config(tmp_path, "straight", **{**settings, "run.steps": 4}))
    train_recognizer(tiny_config(tmp_path, "resumed", **{**settings, "run.steps": 2}))
    with pytest.raises(ValueError, match="--resume auto"):
        train_recognizer(tiny_config(tmp_path, "resumed", **{**settings, "run.steps": 4}))
    resumed = train_recognizer(tiny_config(tmp_path, "resumed", **{**settings, "run.steps": 4,
                                                                    "run.resume": "auto"}))
    a = torch.load(straight.run_dir / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(resumed.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert b["training"]["step"] == 4
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=0)
    steps = [json.loads(line)["step"] for line in (resumed.run_dir / "log.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [1]  # the interrupted run's log, continued (log_every 10: only step 1)
    ends = [json.loads(line) for line in (resumed.run_dir / "log.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "end"]
    assert [e["step"] for e in ends] == [2, 4]  # the first run did end at step 2


# -------------------------------------------------------------------------- evaluation


def test_accuracy_by_fraction_scores_what_each_prefix_alone_predicts():
    torch.manual_seed(1)
    net = build_classifier(tiny("convlstm", n_classes=6)).eval()
    frames = torch.rand(10, 8, 1, 16, 16)
    labels = torch.arange(10) % 6
    summary = accuracy_by_fraction(net, [(frames[:5], labels[:5]), (frames[5:], labels[5:])],
                                   (0.25, 0.5, 1.0), top_k=5)
    assert summary["clips"] == 10 and summary["top_k"] == 5 and summary["n_frames"] == 8
    for row in summary["fractions"]:
        n = frames_seen(row["fraction"], 8)
        logits = net(frames[:, :n])[:, -1]  # the model run on the prefix only
        top1 = (logits.argmax(-1) == labels).float().mean().item()
        top5 = (logits.topk(5).indices == labels[:, None]).any(-1).float().mean().item()
        assert row["frames"] == n and row["top1"] == pytest.approx(top1)
        assert row["topk"] == pytest.approx(top5)
    assert [frames_seen(f, 10) for f in (0.25, 0.5, 0.75, 1.0)] == [2, 5, 7, 10]


def test_cli_trains_then_evaluates_by_fractions(tmp_path):
    common = ["--runs-dir", str(tmp_path), "--name", "cli", "--no-progress", "--steps", "2",
              "--set", "data.num_workers=0",
              "--batch-size", "2", "--frames", "4", "--model", "convlstm",
              "--set", "data.frame_size=20", "--set", "data.digit_scale=4",
              "--set", "data.val_clips=6", "--set", "model.hidden_channels=4",
              "--set", "model.encoder_channels=4,4"]
    status, out, err = run_cli(["recognize"] + common)
    assert status == 0, err
    assert "| 25 % | 1 / 4 |" in out and "| 100 % | 4 / 4 |" in out and "parameters" in out
    run_dir = tmp_path / "cli"
    for name in ("recognition.json", "recognition.md", "accuracy_vs_fraction.png", "config.json"):
        assert (run_dir / name).is_file()
    status, out, err = run_cli(["recognize", "evaluate", "--run", str(run_dir), "--split", "val",
                                "--fractions", "0.5,1", "--no-progress"])
    assert status == 0, err
    summary = json.loads((run_dir / "recognition-val.json").read_text())
    assert [row["frames"] for row in summary["fractions"]] == [2, 4]
    assert summary["clips"] == 6 and summary["top_k"] == 5 and summary["split"] == "val"
    table = (run_dir / "recognition-val.md").read_text()
    assert "| 50 % | 2 / 4 |" in table and "top-5" in table
    assert (run_dir / "accuracy_vs_fraction-val.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------ KTH and SSV2


KTH_SPECS = [(p, a) for p in (2, 5, 18) for a in ("boxing", "walking", "running")]


@pytest.fixture(scope="module")
def kth_prepared(tmp_path_factory):
    raw = tmp_path_factory.mktemp("kth_raw")
    for index, (person, action) in enumerate(KTH_SPECS):
        levels = (10 * index + 3 * np.arange(14)) % 250
        write_video(raw / action / f"person{person:02d}_{action}_d1_uncomp.avi",
                    level_frames(levels, 24, 32))
    out = tmp_path_factory.mktemp("kth_out")
    status, _, err = run_cli(["prepare", "kth", "--raw", str(raw), "--out", str(out),
                              "--size", "16", "--no-progress"])
    assert status == 0, err
    return out


def test_two_training_steps_on_prepared_kth(kth_prepared, tmp_path):
    config = tiny_config(tmp_path, **{"data.dataset": "kth", "data.root": str(kth_prepared),
                                      "data.frame_size": 16, "data.n_frames": 6,
                                      "data.kth_stride": 4, "data.val_clips": 0})
    from applications.conv_tt_lstm.data.factory import build_clip_source

    source = build_clip_source(config.data, "test")
    assert source.n_classes == 6 and source.frame_shape == (1, 16, 16)
    labels = sorted({int(source.dataset[i][1]) for i in range(len(source.dataset))})
    assert labels == [0, 4, 5]  # boxing, running, walking (KTH's order)
    assert len(source.dataset) == 3 * 3  # person 18: 3 videos x windows at 0, 4, 8 of 14 frames
    result = train_recognizer(config)
    assert result.step == 2 and result.summary["clips"] == 9
    assert json.loads((result.run_dir / "config.json").read_text())["model"]["n_classes"] == 6


LABELS = {"Moving something up": "1", "Pushing something from left to right": "0",
          "Putting something on something": "2"}
CLIPS = {"train": [("11", "Moving [something] up"), ("12", "Putting [something] on [something]"),
                   ("13", "Pushing [something] from left to right"), ("14", "Moving [something] up")],
         "validation": [("21", "Putting [something] on [something]"), ("22", "Moving [something] up")]}


@pytest.fixture(scope="module")
def ssv2_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("ssv2")
    for split, clips in CLIPS.items():
        entries = [{"id": i, "label": t.replace("[", "").replace("]", ""), "template": t,
                    "placeholders": ["x"]} for i, t in clips]
        (root / f"something-something-v2-{split}.json").write_text(json.dumps(entries))
        for clip_id, _ in clips:
            frames = np.zeros((8, 24, 32, 3), np.uint8)
            frames[..., 0] = (np.arange(8) * 20)[:, None, None]
            frames[..., 1] = int(clip_id) * 5
            write_video(root / "20bn-something-something-v2" / f"{clip_id}.webm", frames,
                        codec="libvpx-vp9", fps=12)
    (root / "something-something-v2-labels.json").write_text(json.dumps(LABELS))
    return root


def test_two_training_steps_on_ssv2_with_a_corrupt_video_reported_and_skipped(ssv2_tree, tmp_path):
    root = tmp_path / "ssv2"
    shutil.copytree(ssv2_tree, root)
    (root / "20bn-something-something-v2" / "12.webm").write_bytes(b"\x1aE\xdf\xa3" + b"\0" * 300)
    config = tiny_config(tmp_path, **{"data.dataset": "ssv2", "data.root": str(root),
                                      "data.frame_size": 16, "data.n_frames": 4,
                                      "data.eval_split": "validation", "data.val_clips": 0})
    with pytest.warns(RuntimeWarning, match="corrupt video of clip 12"):
        result = train_recognizer(config)
    assert result.step == 2 and result.summary["clips"] == 2
    saved = json.loads((result.run_dir / "config.json").read_text())
    assert saved["model"]["n_classes"] == 3 and saved["model"]["image_channels"] == 3
    failures = [json.loads(line) for line in
                (result.run_dir / "ssv2-failures.jsonl").read_text().splitlines()]
    assert {(f["id"], f["kind"]) for f in failures} == {("12", "corrupt")}
    assert failures[0]["file"].endswith("12.webm")
    report = json.loads((result.run_dir / "recognition.json").read_text())
    assert {f["id"] for f in report["video_failures"]} == {"12"}


def test_config_round_trip_and_bad_overrides():
    config = preset("ssv2")
    assert RecognitionConfig.from_dict(config.to_dict()) == config
    assert config.model.n_classes == 174
    with pytest.raises(ValueError, match="run.fractions"):
        apply_overrides(config, ["run.fractions=0,1"])
    with pytest.raises(ValueError, match="no field"):
        apply_overrides(config, ["model.nothing=1"])
    status, _, err = run_cli(["recognize", "--dataset", "kth", "--print-config"])
    assert status == 2 and "--data-root" in err
