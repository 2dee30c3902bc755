"""The dataset factory: splits, shapes, value range, determinism and errors naming the input."""

import json

import numpy as np
import pytest
import torch
from torch.utils.data import IterableDataset

from applications.conv_tt_lstm.data.factory import DatasetSpec, build_video_dataset, load_spec_digits, sample_shape
from applications.conv_tt_lstm.data.kth import KTH_ACTIONS
from applications.conv_tt_lstm.data.moving_mnist import MovingMnistFixed, prepare_moving_mnist
from applications.conv_tt_lstm.data.sequence_files import DatasetFileError, write_time_first_npy


def items(dataset):
    if isinstance(dataset, IterableDataset):
        return torch.stack(list(dataset))
    return torch.stack([dataset[i] for i in range(len(dataset))])


def test_generated_moving_mnist_splits_shapes_and_range():
    spec = DatasetSpec(input_frames=3, future_frames=4, lengths={"train": 5, "val": 3, "test": 2})
    train, val, test = (build_video_dataset(spec, s) for s in ("train", "val", "test"))
    assert isinstance(train, IterableDataset) and len(train) == 5
    for dataset, n in ((train, 5), (val, 3), (test, 2)):
        frames = items(dataset)
        assert frames.shape == (n, 7, 1, 64, 64) and frames.dtype == torch.float32
        assert frames.min() >= 0 and frames.max() <= 1 and frames.max() > 0.9
    assert sample_shape(train) == sample_shape(test) == (7, 1, 64, 64)
    # Train and val draw from the training digits, test from the disjoint test digits.
    digits = load_spec_digits(spec)
    assert val.digits is digits.train and test.digits is digits.test
    assert len(digits.train) == 4000 and len(digits.test) == 1000


def test_generated_moving_mnist_is_deterministic_and_seeded():
    spec = DatasetSpec(input_frames=2, future_frames=2, image_size=48, digits=3,
                       lengths={"train": 4, "val": 4, "test": 4}, seed=5)
    for split in ("train", "val", "test"):
        first, again = items(build_video_dataset(spec, split)), items(build_video_dataset(spec, split))
        torch.testing.assert_close(first, again, rtol=0, atol=0)
        assert first.shape == (4, 4, 1, 48, 48)
        other = items(build_video_dataset(spec.replace(seed=6), split))
        assert not torch.equal(first, other)
    # The fixed splits are the generator's sequences for (seed, split, index).
    reference = MovingMnistFixed(load_spec_digits(DatasetSpec()), 4, "val", seed=5, n_frames=4, n_digits=3, canvas_size=48)
    torch.testing.assert_close(items(build_video_dataset(spec, "val")), items(reference), rtol=0, atol=0)
    # Each epoch its own training sequences; DDP ranks split the epoch between them.
    epoch0, epoch1 = (items(build_video_dataset(spec, "train", epoch=e)) for e in (0, 1))
    assert not torch.equal(epoch0, epoch1)
    halves = [items(build_video_dataset(spec, "train", rank=r, world_size=2)) for r in (0, 1)]
    torch.testing.assert_close(torch.cat(halves), epoch0, rtol=0, atol=0)


@pytest.fixture(scope="module")
def prepared_mnist(tmp_path_factory):
    out = tmp_path_factory.mktemp("mm")
    prepare_moving_mnist(out, load_spec_digits(DatasetSpec()), sizes={"train": 3, "val": 2, "test": 7},
                         n_frames=12, seed=3, progress=False)
    return out


def test_prepared_folder_and_files(prepared_mnist, tmp_path):
    spec = DatasetSpec(data_root=prepared_mnist, input_frames=4, future_frames=6, seed=3)
    test = build_video_dataset(spec, "test")
    frames = items(test)
    assert frames.shape == (7, 10, 1, 64, 64)
    # The file holds the generator's test sequences (first 10 of their 12 frames).
    reference = items(MovingMnistFixed(load_spec_digits(DatasetSpec()), 7, "test", seed=3, n_frames=12))[:, :10]
    torch.testing.assert_close(frames, reference, rtol=0, atol=0)
    assert len(build_video_dataset(spec, "train")) == 3 and len(build_video_dataset(spec, "val")) == 2
    # A length picks evenly spaced sequences, first and last included.
    subset = build_video_dataset(spec.replace(lengths={"test": 3}), "test")
    torch.testing.assert_close(items(subset), reference[[0, 3, 6]], rtol=0, atol=0)
    # One file serves any split: the npz, or a time-first npy like mnist_test_seq.npy.
    single = build_video_dataset(spec.replace(data_root=prepared_mnist / "moving-mnist-val.npz"), "test")
    assert len(single) == 2
    uint8 = np.rint(reference.numpy()[:, :, 0] * 255).astype(np.uint8)  # (N, T, H, W)
    npy = write_time_first_npy(tmp_path / "mnist_test_seq.npy", uint8.transpose(1, 0, 2, 3))
    torch.testing.assert_close(items(build_video_dataset(spec.replace(data_root=npy), "test")),
                               reference, rtol=0, atol=0)


def test_prepared_data_errors_name_the_path_and_the_option(prepared_mnist, tmp_path):
    spec = DatasetSpec(data_root=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"--data-root.*nowhere.*prepare moving-mnist"):
        build_video_dataset(spec, "test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no moving-mnist-test\.npz in data_root .*empty.*prepare"):
        build_video_dataset(spec.replace(data_root=tmp_path / "empty"), "test")
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"this is not a zip file at all")
    with pytest.raises(DatasetFileError, match=r"broken\.npz: not an npz"):
        build_video_dataset(spec.replace(data_root=broken), "test")
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((4, 2, 8), np.uint8))
    with pytest.raises(DatasetFileError, match=r"wrong\.npy: expected a 4-D array"):
        build_video_dataset(spec.replace(data_root=wrong), "test")
    long = DatasetSpec(data_root=prepared_mnist, input_frames=10, future_frames=30)
    with pytest.raises(DatasetFileError, match=r"12 frames.*10 \+ 30 = 40.*--future-frames"):
        build_video_dataset(long, "test")
    with pytest.raises(DatasetFileError, match=r"64 x 64, but the frame size asked for is 32 "
                       r"\(train: data.frame_size, evaluate: --image-size\).*ask for 64"):
        build_video_dataset(DatasetSpec(data_root=prepared_mnist, image_size=32, future_frames=2), "test")


def test_spec_rejects_bad_arguments():
    with pytest.raises(ValueError, match="dataset name must be one of"):
        DatasetSpec(name="ucf101")
    with pytest.raises(ValueError, match="future_frames must be an integer >= 1, got 0"):
        DatasetSpec(future_frames=0)
    with pytest.raises(ValueError, match=r"lengths may only name .*\['tset'\]"):
        DatasetSpec(lengths={"tset": 3})
    with pytest.raises(ValueError, match="split must be one of"):
        build_video_dataset(DatasetSpec(), "validation")
    with pytest.raises(ValueError, match="image_size 16 is smaller than the 28 x 28"):
        build_video_dataset(DatasetSpec(image_size=16, lengths={"val": 1}), "val")


def write_prepared_kth(root, size=(16, 16), frames=25):
    """A prepared KTH folder as ``prepare kth`` writes it: one .npy per video and kth.json."""
    videos = []
    rng = np.random.default_rng(0)
    for person in (1, 2, 16, 17, 25):
        for action in KTH_ACTIONS:
            relative = f"{action}/person{person:02d}_{action}_d1.npy"
            (root / action).mkdir(parents=True, exist_ok=True)
            np.save(root / relative, rng.integers(0, 256, (frames,) + size, dtype=np.uint8))
            videos.append({"person": person, "action": action, "scenario": 1,
                           "frames": frames, "path": relative})
    (root / "kth.json").write_text(json.dumps(
        {"dataset": "kth", "size": list(size), "resample": "bilinear", "videos": videos, "failed": []}))
    return root


def test_kth_splits_protocols_and_errors(tmp_path):
    root = write_prepared_kth(tmp_path / "kth")
    spec = DatasetSpec(name="kth", data_root=root, input_frames=10, future_frames=10)
    train, test = build_video_dataset(spec, "train"), build_video_dataset(spec, "test")
    assert {v.person for v in train.videos} == {1, 2, 16} and {v.person for v in test.videos} == {17, 25}
    frames = items(test)
    assert frames.shape[1:] == (20, 1, 16, 16) and frames.min() >= 0 and frames.max() <= 1
    # One window of 20 in 25 frames per slow action, (25 - 20) // 3 + 1 = 2 per fast one.
    assert len(test) == 2 * (4 * 1 + 2 * 2)
    window = test.window(0)
    expected = np.load(window.video.path)[window.start: window.start + 20] / 255.0
    np.testing.assert_allclose(frames[0, :, 0].numpy(), expected, atol=1e-6)
    val = build_video_dataset(spec.replace(kth_val_persons=(16,)), "val")
    assert {v.person for v in val.videos} == {16}
    assert {v.person for v in build_video_dataset(spec.replace(kth_val_persons=(16,)), "train").videos} == {1, 2}
    with pytest.raises(ValueError, match=r"kth_val_persons \(--kth-val-persons\)"):
        build_video_dataset(spec, "val")
    with pytest.raises(ValueError, match="KTH needs data_root"):
        build_video_dataset(spec.replace(data_root=None), "test")
    with pytest.raises(ValueError, match="no window of 40 frames"):
        build_video_dataset(spec.replace(future_frames=30), "test")
    with pytest.raises(DatasetFileError, match=r"16 x 16, but the frame size asked for"):
        build_video_dataset(spec.replace(image_size=128), "test")
    with pytest.raises(FileNotFoundError, match="prepare kth"):
        build_video_dataset(spec.replace(data_root=tmp_path / "none"), "test")
    assert len(build_video_dataset(spec.replace(lengths={"test": 5}), "test")) == 5
