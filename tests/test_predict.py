"""The predict command and its readers: npz / npy / frame folders, our and the release's checkpoints."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from applications.conv_tt_lstm import cli
from applications.conv_tt_lstm.data.sequence_files import write_sequences_npz
from applications.conv_tt_lstm.inference import InputFramesError, fit_frames, load_model, read_input_frames
from applications.conv_tt_lstm.checkpoint import save_checkpoint
from applications.conv_tt_lstm.model import ArchitectureConfig, VideoPredictionNetwork
from test_model import release_predictions, release_state_dict

TINY = dict(hidden_channels=(4, 4), layers_per_block=1, kernel_size=3, order=2, steps=2, rank=2,
            skip_stride=0, patch_size=4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = VideoPredictionNetwork(ArchitectureConfig(**TINY))
    with torch.no_grad():
        model.output.bias.fill_(0.3)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, model)
    return path, model.eval()


def frames_uint8(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def predict(argv):
    return cli.main(["predict", *map(str, argv), "--no-progress"])


def expected(model, frames, future):
    with torch.no_grad():
        return model(torch.as_tensor(frames, dtype=torch.float32), future).clamp(0, 1).numpy()


def test_predict_from_release_npz_writes_frames_gif_and_json(tmp_path, checkpoint, capsys):
    path, model = checkpoint
    data = frames_uint8((3, 5, 16, 16, 1))  # the release's layout (N, T, H, W, C)
    write_sequences_npz(tmp_path / "in.npz", data)
    out = tmp_path / "out"
    assert predict([path, tmp_path / "in.npz", "--future-frames", 4, "--out", out, "--batch-size", 2]) == 0
    prediction = np.load(out / "predictions.npy")
    reference = expected(model, np.moveaxis(data, -1, 2) / 255.0, 4)
    np.testing.assert_allclose(prediction, reference, atol=1e-5)
    assert prediction.shape == (3, 4, 1, 16, 16) and prediction.dtype == np.float32
    pngs = sorted((out / "frames").rglob("*.png"))
    assert len(pngs) == 12 and pngs[0].relative_to(out / "frames").as_posix() == "seq0000/frame_0006.png"
    np.testing.assert_array_equal(np.asarray(Image.open(pngs[0])), np.rint(prediction[0, 0, 0] * 255))
    with Image.open(out / "predictions.gif") as gif:
        assert gif.n_frames == 5 + 4
    info = json.loads((out / "predict.json").read_text())
    assert info["sequences"] == 3 and info["input_frames"] == 5 and info["checkpoint_layout"] == "tt-conv"


@pytest.mark.parametrize("layout, shape, transform", [
    ("THW", (6, 16, 16), lambda a: a[None, :, None]),
    ("NTHW", (2, 6, 16, 16), lambda a: a[:, :, None]),
    ("NTCHW", (2, 6, 1, 16, 16), lambda a: a),
])
def test_plain_arrays_in_uint8_and_float(tmp_path, checkpoint, layout, shape, transform):
    path, model = checkpoint
    data = frames_uint8(shape)
    np.save(tmp_path / "u8.npy", data)
    np.save(tmp_path / "f32.npy", data.astype(np.float32) / 255)
    for name in ("u8.npy", "f32.npy"):
        frames = read_input_frames(tmp_path / name)
        np.testing.assert_allclose(frames, transform(data) / 255.0, atol=1e-7)
    # --input-frames K: the first K frames go in, the next ones are drawn as the truth.
    assert predict([path, tmp_path / "u8.npy", "--future-frames", 2, "--input-frames", 4,
                    "--out", tmp_path / "o"]) == 0
    reference = expected(model, transform(data)[:, :4] / 255.0, 2)
    np.testing.assert_allclose(np.load(tmp_path / "o" / "predictions.npy"), reference, atol=1e-5)


def test_time_first_mnist_test_seq_layout(tmp_path):
    data = frames_uint8((5, 3, 16, 16))  # (T, N, H, W)
    np.save(tmp_path / "mnist_test_seq.npy", data)
    frames = read_input_frames(tmp_path / "mnist_test_seq.npy")
    np.testing.assert_array_equal(frames, np.transpose(data, (1, 0, 2, 3))[:, :, None] / np.float32(255))


def test_folder_of_rgb_pngs_becomes_gray(tmp_path, checkpoint):
    path, model = checkpoint
    rgb = frames_uint8((11, 16, 16, 3), seed=2)
    folder = tmp_path / "frames"
    folder.mkdir()
    for t, frame in enumerate(rgb):  # frame_10 must come after frame_9
        Image.fromarray(frame).save(folder / f"frame_{t}.png")
    (folder / "notes.txt").write_text("ignored")
    frames = fit_frames(read_input_frames(folder), model.config)
    gray = np.stack([np.asarray(Image.fromarray(f).convert("L")) for f in rgb]) / 255.0
    np.testing.assert_allclose(frames[0, :, 0].numpy(), gray, atol=1 / 255)  # Pillow rounds to 8 bits
    assert predict([path, folder, "--future-frames", 3, "--out", tmp_path / "o"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "o" / "predictions.npy"), expected(model, frames, 3), atol=1e-5)
    with Image.open(tmp_path / "o" / "predictions.gif") as gif:  # no truth: inputs, then predictions
        assert gif.n_frames == 11 + 3
    # --size resizes; 20 x 20 suits patch size 4.
    assert predict([path, folder, "--future-frames", 1, "--size", 20, 20, "--out", tmp_path / "r"]) == 0
    assert np.load(tmp_path / "r" / "predictions.npy").shape == (1, 1, 1, 20, 20)


def test_release_checkpoint_through_predict(tmp_path):
    config = ArchitectureConfig(hidden_channels=(4, 6), layers_per_block=2, kernel_size=3, order=2,
                                steps=3, rank=3, skip_stride=0)
    state = release_state_dict(config, conv3d=True)
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "release.pt")
    data = frames_uint8((2, 4, 12, 12))
    np.save(tmp_path / "in.npy", data)
    assert predict([tmp_path / "release.pt", tmp_path / "in.npy", "--future-frames", 3, "--out", tmp_path / "o"]) == 0
    frames = torch.from_numpy(data[:, :, None] / np.float32(255))
    reference = release_predictions(state, config, frames, 3).clamp(0, 1).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "o" / "predictions.npy"), reference, atol=1e-5)
    model, info = load_model(tmp_path / "release.pt")
    assert info["layout"] == "release" and info["architecture"]["steps"] == 3


def test_clear_errors(tmp_path, checkpoint, capsys):
    path, _ = checkpoint
    np.save(tmp_path / "odd.npy", frames_uint8((1, 3, 18, 18)))
    np.save(tmp_path / "loud.npy", np.full((3, 16, 16), 2.0, np.float32))
    np.save(tmp_path / "two.npy", frames_uint8((2, 3, 3, 16, 3)))
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    cases = [
        ([path, tmp_path / "odd.npy"], "frame size 18 x 18 is not divisible by the model's patch_size 4; "
                                       "resize the frames, e.g. --size 16 16"),
        ([path, tmp_path / "loud.npy"], "float frames must lie in [0, 1], found values in [2, 2]"),
        ([path, tmp_path / "two.npy"], "pass --layout NTCHW or NTHWC"),
        ([path, tmp_path / "empty"], "no .png/.jpg/.jpeg frame images"),
        ([path, tmp_path / "junk.npy"], "not a readable .npy / .npz file"),
        ([path, tmp_path / "missing.npy"], "input not found"),
        ([path, tmp_path / "odd.npy", "--size", 16, 16, "--input-frames", 5], "--input-frames 5, but"),
        ([tmp_path / "odd.npy", tmp_path / "odd.npy"], "odd.npy is not a torch.save file"),
        ([tmp_path / "empty", tmp_path / "odd.npy"], "is a folder; give the checkpoint file itself"),
        ([path, tmp_path / "odd.npy", "--release-output-sigmoid"], "applies to release checkpoints only"),
    ]
    for argv, message in cases:
        assert predict([*argv, "--future-frames", 2, "--out", tmp_path / "o"]) == 2, argv
        assert message in capsys.readouterr().err, argv
    with pytest.raises(InputFramesError, match="model takes 1"):
        fit_frames(np.zeros((1, 2, 2, 8, 8), np.float32), ArchitectureConfig(**TINY))


def test_sixteen_bit_png_frames_are_read_exactly(tmp_path, checkpoint):
    """16-bit gray PNGs must not become 0/255 frames: every level survives to the model."""
    path, model = checkpoint
    rng = np.random.default_rng(3)
    levels = rng.integers(0, 65536, (5, 16, 16)).astype(np.uint16)
    folder = tmp_path / "deep"
    folder.mkdir()
    for t, frame in enumerate(levels):
        Image.fromarray(frame).save(folder / f"frame_{t}.png")
    frames = read_input_frames(folder)
    np.testing.assert_array_equal(np.rint(frames[0, :, 0] * 65535).astype(np.uint16), levels)
    assert len(np.unique(frames)) > 1000  # not binarised
    out = tmp_path / "out"
    assert predict([path, folder, "--future-frames", 2, "--out", out]) == 0
    np.testing.assert_allclose(np.load(out / "predictions.npy"),
                               expected(model, frames, 2), atol=1e-6)
    # An 8-bit frame among 16-bit ones is scaled exactly (255 -> 65535).
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(folder / "frame_5.png")
    assert float(read_input_frames(folder)[0, 5].min()) == 1.0


def _write_16_bit_rgb_png(path, rgb):
    """A 16-bit RGB PNG (Pillow cannot write one), encoded by PyAV's PNG encoder."""
    import av

    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = rgb.shape[1], rgb.shape[0], "rgb48be"
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb48le").reformat(format="rgb48be")
    path.write_bytes(b"".join(bytes(p) for p in codec.encode(frame) + codec.encode(None)))


def test_sixteen_bit_rgb_png_frames_are_read_exactly(tmp_path, checkpoint):
    """Pillow reads 16-bit RGB PNGs as 8-bit RGB, silently: they are decoded exactly."""
    path, model = checkpoint
    levels = np.random.default_rng(4).integers(0, 65536, (3, 8, 8, 3)).astype(np.uint16)
    folder = tmp_path / "deep-rgb"
    folder.mkdir()
    for t, frame in enumerate(levels):
        _write_16_bit_rgb_png(folder / f"frame_{t}.png", frame)
    frames = read_input_frames(folder)
    assert frames.shape == (1, 3, 3, 8, 8)
    np.testing.assert_array_equal(
        np.rint(frames[0].transpose(0, 2, 3, 1) * 65535).astype(np.uint16), levels)
    # An 8-bit gray frame among them: repeated into RGB and scaled exactly (255 -> 65535).
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(folder / "frame_3.png")
    assert float(read_input_frames(folder)[0, 3].min()) == 1.0
    out = tmp_path / "out"
    assert predict([path, folder, "--future-frames", 2, "--out", out]) == 0


@pytest.mark.parametrize("suffix, codec", [(".mp4", "libx264"), (".avi", "mpeg4"),
                                           (".webm", "libvpx-vp9"), (".mkv", "mpeg4")])
def test_predict_on_a_video_file(tmp_path, checkpoint, suffix, codec):
    """A video decoded with PyAV, grayscaled, resized with --size; PNGs, GIF and mp4 out."""
    import av

    from _video_files import level_frames, write_video

    path, model = checkpoint
    levels = [20, 60, 100, 140, 180, 220]
    video = write_video(tmp_path / f"clip{suffix}", level_frames(levels, 24, 32), codec=codec)
    out = tmp_path / "out"
    assert predict([path, video, "--future-frames", 2, "--out", out, "--size", 16, 16]) == 0
    prediction = np.load(out / "predictions.npy")
    assert prediction.shape == (1, 2, 1, 16, 16)
    frames = read_input_frames(video, video_color="gray")
    assert frames.shape == (1, 6, 1, 24, 32)
    np.testing.assert_allclose(frames[0, :, 0].mean(axis=(1, 2)) * 255, levels, atol=3)
    fitted = fit_frames(frames, ArchitectureConfig(**TINY), (16, 16))
    np.testing.assert_allclose(prediction, expected(model, fitted, 2), atol=1e-6)
    assert sorted(p.name for p in (out / "frames" / "seq0000").iterdir()) == \
        ["frame_0007.png", "frame_0008.png"]
    assert (out / "predictions.gif").is_file()
    with av.open(str(out / "predictions.mp4")) as container:
        decoded = [f.to_ndarray(format="gray") for f in container.decode(video=0)]
    assert len(decoded) == 6 + 2 and decoded[0].shape == (16, 16)


def test_predict_on_a_sixteen_bit_video_keeps_every_level(tmp_path, checkpoint):
    from _video_files import write_lossless_video

    path, model = checkpoint
    rng = np.random.default_rng(5)
    levels = rng.integers(0, 65536, (4, 16, 16)).astype(np.uint16)
    video = write_lossless_video(tmp_path / "deep.mkv", levels, pix_fmt="gray16le",
                                 frame_format="gray16le")
    frames = read_input_frames(video, video_color="gray")
    np.testing.assert_array_equal(np.rint(frames[0, :, 0] * 65535).astype(np.uint16), levels)
    assert predict([path, video, "--future-frames", 1, "--out", tmp_path / "o"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "o" / "predictions.npy"),
                               expected(model, frames, 1), atol=1e-6)


def test_a_file_of_another_suffix_is_read_by_its_content(tmp_path, checkpoint, capsys):
    """An array is an array and a video a video whatever the name; anything else says so."""
    from _video_files import level_frames, write_video

    video = write_video(tmp_path / "clip.mp4", level_frames([30, 90, 150, 210], 16, 16),
                        codec="libx264")
    as_mp4 = read_input_frames(video, video_color="gray")
    for name in ("clip.data", "clip"):
        (tmp_path / name).write_bytes(video.read_bytes())
        np.testing.assert_array_equal(read_input_frames(tmp_path / name, video_color="gray"),
                                      as_mp4)
    array = frames_uint8((2, 3, 16, 16))
    with open(tmp_path / "frames.bin", "wb") as handle:
        np.save(handle, array)
    np.testing.assert_array_equal(read_input_frames(tmp_path / "frames.bin"),
                                  array[:, :, None] / np.float32(255))
    (tmp_path / "junk.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    path, _ = checkpoint
    assert predict([path, tmp_path / "junk.bin", "--future-frames", 1,
                    "--out", tmp_path / "o"]) == 2
    err = capsys.readouterr().err
    assert "junk.bin: neither an .npy / .npz array nor a video FFmpeg can decode" in err
    assert "allow_pickle" not in err


def test_frames_are_resized_to_the_checkpoints_training_size(tmp_path, capsys):
    """A checkpoint that records its training frames (ours do) gets frames of that size."""
    torch.manual_seed(0)
    model = VideoPredictionNetwork(ArchitectureConfig(**TINY)).eval()
    save_checkpoint(tmp_path / "trained.pt", model, frame_shape=[1, 16, 16])
    np.save(tmp_path / "big.npy", frames_uint8((1, 3, 24, 32)))
    assert predict([tmp_path / "trained.pt", tmp_path / "big.npy", "--future-frames", 2,
                    "--out", tmp_path / "auto"]) == 0
    assert "note: resized the 24 x 32 frames to 16 x 16, the checkpoint's training frames" in \
        capsys.readouterr().out
    assert predict([tmp_path / "trained.pt", tmp_path / "big.npy", "--future-frames", 2,
                    "--out", tmp_path / "given", "--size", 16, 16]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "auto" / "predictions.npy"),
                                  np.load(tmp_path / "given" / "predictions.npy"))
    assert json.loads((tmp_path / "auto" / "predict.json").read_text())["notes"]
    # --size still chooses (8 x 8 fits patch size 4), and no note is made.
    assert predict([tmp_path / "trained.pt", tmp_path / "big.npy", "--future-frames", 1,
                    "--out", tmp_path / "small", "--size", 8, 8]) == 0
    assert np.load(tmp_path / "small" / "predictions.npy").shape == (1, 1, 1, 8, 8)
    assert "note:" not in capsys.readouterr().out


def test_a_sixteen_bit_rgb_video_keeps_every_level_for_an_rgb_model(tmp_path):
    from _video_files import write_lossless_video

    rng = np.random.default_rng(6)
    levels = rng.integers(0, 65536, (4, 16, 16, 3)).astype(np.uint16)
    video = write_lossless_video(tmp_path / "deep_rgb.mkv", levels, pix_fmt="gbrp16le",
                                 frame_format="rgb48le")  # 16-bit planar RGB
    frames = read_input_frames(video, video_color="rgb")
    np.testing.assert_array_equal(
        np.rint(frames[0].transpose(0, 2, 3, 1) * 65535).astype(np.uint16), levels)
    torch.manual_seed(0)
    model = VideoPredictionNetwork(ArchitectureConfig(**TINY, image_channels=3)).eval()
    save_checkpoint(tmp_path / "rgb.pt", model)
    assert predict([tmp_path / "rgb.pt", video, "--future-frames", 1, "--out", tmp_path / "o"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "o" / "predictions.npy"),
                               expected(model, frames, 1), atol=1e-6)
