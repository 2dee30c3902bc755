"""Video decoding (PyAV), frame folders (Pillow), resizing and frame sampling."""

import pickle

import numpy as np
import pytest
from PIL import Image

from applications.conv_tt_lstm.data.video import (
    VideoDecodeError,
    list_frame_files,
    read_frame_folder,
    read_video,
    resize_frames,
    uniform_indices,
)
from _video_files import level_frames, write_video

LEVELS = np.arange(25) * 10  # frame t is flat at 10 t: identifiable after lossy coding


def frame_levels(frames):
    return frames.reshape(len(frames), -1).mean(axis=1)


def reference_indices(total, count):
    # Independent of the implementation: centres of `count` equal segments, in floats.
    return [int((i + 0.5) * total / count) for i in range(count)]


@pytest.fixture(scope="module")
def avi(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("avi") / "levels.avi", level_frames(LEVELS, 30, 40))


@pytest.fixture(scope="module")
def webm(tmp_path_factory):
    frames = np.zeros((9, 32, 48, 3), np.uint8)
    frames[:, :, :24] = (220, 30, 30)  # red left half
    frames[:, :, 24:] = (30, 30, 220)  # blue right half
    frames[:, :, :, 1] = (np.arange(9) * 25)[:, None, None]  # green encodes the frame number
    return write_video(tmp_path_factory.mktemp("webm") / "clip.webm", frames, codec="libvpx-vp9", fps=12)


def test_decodes_every_frame_of_an_mpeg4_avi_in_gray(avi):
    frames = read_video(avi)
    assert frames.dtype == np.uint8 and frames.shape == (25, 30, 40)
    np.testing.assert_allclose(frame_levels(frames), LEVELS, atol=2)


def test_decodes_vp9_webm_in_rgb(webm):
    frames = read_video(webm, color="rgb")
    assert frames.shape == (9, 32, 48, 3)
    left, right = frames[:, 16, 8].astype(int), frames[:, 16, 40].astype(int)
    assert np.all(np.abs(left[:, 0] - 220) < 12) and np.all(left[:, 2] < 50)
    assert np.all(np.abs(right[:, 2] - 220) < 12) and np.all(right[:, 0] < 50)
    np.testing.assert_allclose(left[:, 1], np.arange(9) * 25, atol=12)
    gray = read_video(webm, color="gray")
    assert gray.shape == (9, 32, 48)


@pytest.mark.parametrize("count", [1, 4, 6, 25, 40])
def test_samples_frames_evenly_over_the_whole_video(avi, count):
    frames = read_video(avi, n_frames=count)
    assert frames.shape == (count, 30, 40)
    expected = LEVELS[reference_indices(25, count)]
    np.testing.assert_allclose(frame_levels(frames), expected, atol=2)


def test_uniform_indices_match_the_float_formula_and_stay_in_range():
    for total in range(1, 60):
        for count in range(1, 45):
            indices = uniform_indices(total, count)
            assert indices.tolist() == reference_indices(total, count)
            assert indices.min() >= 0 and indices.max() < total
            assert np.all(np.diff(indices) >= 0)
    # Symmetric about the middle: the first and last picks are equally far from the ends.
    assert uniform_indices(100, 4).tolist() == [12, 37, 62, 87]
    with pytest.raises(ValueError, match="count must be an integer >= 1"):
        uniform_indices(10, 0)


def test_resize_antialiases_a_downscale():
    checker = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)[None]
    smooth = resize_frames(checker, 16, "bilinear")
    assert smooth.shape == (1, 16, 16)
    # An antialiased filter averages the stripes to mid-gray; point sampling would alias
    # to 0 or 255.
    assert np.all(np.abs(smooth.astype(int) - 127.5) <= 2)
    aliased = resize_frames(checker, 16, "nearest")
    assert set(np.unique(aliased)) <= {0, 255}


def test_box_filter_is_the_block_mean_for_an_integer_factor():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 32, 48), dtype=np.uint8)
    reduced = resize_frames(frames, (8, 12), "box")
    reference = frames.reshape(3, 8, 4, 12, 4).mean(axis=(2, 4))
    # Pillow filters rows, then columns, rounding to uint8 in between: within one level.
    assert np.max(np.abs(reduced - reference)) <= 1.0


def test_resize_keeps_rgb_channels_and_is_a_no_op_at_the_same_size():
    frames = np.zeros((2, 20, 30, 3), np.uint8)
    frames[..., 0] = 200
    out = resize_frames(frames, (10, 15))
    assert out.shape == (2, 10, 15, 3) and np.all(out[..., 0] == 200) and np.all(out[..., 1:] == 0)
    assert resize_frames(frames, (20, 30)) is frames
    with pytest.raises(ValueError, match="size must be a positive int"):
        resize_frames(frames, (0, 5))
    with pytest.raises(ValueError, match="resample must be one of"):
        resize_frames(frames, 8, "cubic")


def test_read_video_resizes_and_checks_its_arguments(avi):
    frames = read_video(avi, size=(12, 16), n_frames=5)
    assert frames.shape == (5, 12, 16)
    with pytest.raises(ValueError, match="color must be one of"):
        read_video(avi, color="grey")
    with pytest.raises(ValueError, match="n_frames|count must be"):
        read_video(avi, n_frames=0)


def test_missing_and_corrupt_videos_raise_errors_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.avi"):
        read_video(tmp_path / "nowhere.avi")
    junk = tmp_path / "person01_boxing_d1_uncomp.avi"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(VideoDecodeError, match="person01_boxing_d1_uncomp.avi") as caught:
        read_video(junk)
    assert caught.value.path == junk
    copy = pickle.loads(pickle.dumps(caught.value))  # crosses DataLoader worker boundaries
    assert copy.path == junk and str(copy) == str(caught.value)
    empty = tmp_path / "empty.webm"
    empty.write_bytes(b"")
    with pytest.raises(VideoDecodeError, match="empty.webm"):
        read_video(empty)


def write_frames(folder, levels, names):
    folder.mkdir(parents=True)
    for level, name in zip(levels, names):
        Image.fromarray(np.full((30, 40), level, np.uint8)).save(folder / name, quality=95)


def test_frame_folder_reads_in_numeric_order_and_ignores_other_files(tmp_path):
    levels = np.arange(12) * 20
    # Unpadded numbers: "image_10" must come after "image_9", not after "image_1".
    write_frames(tmp_path / "clip", levels, [f"image_{i + 1}.jpg" for i in range(12)])
    (tmp_path / "clip" / "Thumbs.db").write_bytes(b"\0" * 10)
    assert [p.name for p in list_frame_files(tmp_path / "clip")][8:11] == [
        "image_9.jpg", "image_10.jpg", "image_11.jpg",
    ]
    frames = read_frame_folder(tmp_path / "clip")
    assert frames.shape == (12, 30, 40)
    np.testing.assert_allclose(frame_levels(frames), levels, atol=1.5)
    sampled = read_frame_folder(tmp_path / "clip", n_frames=4, size=10, color="rgb")
    assert sampled.shape == (4, 10, 10, 3)
    np.testing.assert_allclose(sampled.mean(axis=(1, 2, 3)), levels[reference_indices(12, 4)], atol=1.5)


def test_frame_folder_errors_name_the_folder_or_frame(tmp_path):
    with pytest.raises(FileNotFoundError, match="frame folder not found"):
        read_frame_folder(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no frame files"):
        read_frame_folder(tmp_path / "empty")
    write_frames(tmp_path / "clip", [10, 20, 30], ["image_0001.jpg", "image_0002.jpg", "image_0003.jpg"])
    data = (tmp_path / "clip" / "image_0002.jpg").read_bytes()
    (tmp_path / "clip" / "image_0002.jpg").write_bytes(data[: len(data) // 3])  # truncated JPEG
    with pytest.raises(VideoDecodeError, match="image_0002.jpg"):
        read_frame_folder(tmp_path / "clip")
    write_frames(tmp_path / "twice", [1, 2], ["image_1.jpg", "image_01.jpg"])
    with pytest.raises(ValueError, match="frame number 1"):
        read_frame_folder(tmp_path / "twice")
