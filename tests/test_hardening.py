"""Bad arguments every command shares get messages, not tracebacks (issue 14, items 8-10)."""

import pytest
import torch

from applications.conv_tt_lstm import cli
from applications.conv_tt_lstm.checkpoint import save_checkpoint
from applications.conv_tt_lstm.model import ArchitectureConfig, VideoPredictionNetwork
from applications.conv_tt_lstm.training.distributed import choose_device

TINY = dict(hidden_channels=(4,), layers_per_block=1, kernel_size=3, order=2, steps=2, rank=2,
            skip_stride=0, patch_size=4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, VideoPredictionNetwork(ArchitectureConfig(**TINY)))
    return path


def run(capsys, argv):
    status = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return status, err


BAD_DEVICES = ["gpu", "mps", "banana", "meta", "cuda:x"] + \
    ([] if torch.cuda.is_available() else ["cuda", "cuda:1"])


@pytest.mark.parametrize("device", BAD_DEVICES)
def test_one_device_check_for_every_command(tmp_path, capsys, checkpoint, device):
    with pytest.raises(ValueError, match=rf"--device {device}: .*"):
        choose_device(device)
    frames = tmp_path / "frames.npy"
    import numpy as np

    np.save(frames, np.zeros((4, 16, 16), dtype=np.uint8))
    commands = [
        ["train", "--preset", "quick", "--steps", "1", "--runs-dir", tmp_path],
        ["recognize", "--preset", "quick", "--steps", "1", "--runs-dir", tmp_path],
        ["predict", checkpoint, frames, "--future-frames", "1", "--out", tmp_path / "p"],
        ["evaluate", checkpoint, "--image-size", "16", "--sequences", "2", "--input-frames",
         "2", "--future-frames", "1", "--out", tmp_path / "e"],
    ]
    for argv in commands:
        status, err = run(capsys, argv + ["--device", device])
        assert status == 2 and f"--device {device}:" in err, (argv, err)


@pytest.mark.parametrize("override, message", [
    ("run.runs_dir=none", "this field cannot be none"),
    ("optim.lr=inf", "optim.lr must be a finite number > 0, got inf"),
    ("optim.lr=nan", "optim.lr must be a finite number > 0, got nan"),
    ("optim.clip_grad_norm=nan", "optim.clip_grad_norm must be a finite number >= 0"),
    ("optim.weight_decay=inf", "optim.weight_decay must be a finite number >= 0"),
])
def test_overrides_of_the_wrong_type_or_not_finite_are_refused(tmp_path, capsys, override,
                                                               message):
    status, err = run(capsys, ["train", "--preset", "quick", "--runs-dir", tmp_path, "--set",
                               override, "--print-config"])
    assert status == 2 and message in err


def test_an_optional_path_override_stays_a_path(tmp_path, capsys):
    from applications.conv_tt_lstm.config import apply_overrides, preset

    config = apply_overrides(preset("quick"), ["data.root=5"])
    assert config.data.root == "5"
    status, err = run(capsys, ["train", "--preset", "quick", "--runs-dir", tmp_path, "--steps",
                               "1", "--set", "data.root=5", "--set", "data.dataset=moving-mnist"])
    assert status == 2 and "5" in err


def test_evaluate_and_predict_out_on_an_existing_file(tmp_path, capsys, checkpoint):
    import numpy as np

    taken = tmp_path / "taken"
    taken.write_text("keep me")
    frames = tmp_path / "frames.npy"
    np.save(frames, np.zeros((4, 16, 16), dtype=np.uint8))
    for argv in (["evaluate", checkpoint, "--image-size", "16", "--sequences", "2",
                  "--input-frames", "2", "--future-frames", "1", "--out", taken],
                 ["predict", checkpoint, frames, "--future-frames", "1", "--out", taken]):
        status, err = run(capsys, argv)
        assert status == 2 and f"--out {taken}: is a file" in err
    assert taken.read_text() == "keep me"


def test_prepare_kth_without_a_usable_video_fails(tmp_path, capsys):
    raw = tmp_path / "raw" / "boxing"
    raw.mkdir(parents=True)
    (raw / "person01_boxing_d1_uncomp.avi").write_bytes(b"not a video")
    status, err = run(capsys, ["prepare", "kth", "--raw", tmp_path / "raw", "--out",
                               tmp_path / "out", "--no-progress"])
    assert status == 2 and "no usable KTH video" in err
