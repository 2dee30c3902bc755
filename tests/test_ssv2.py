"""Something-Something V2: labels from templates, lazy VP9 decoding, sampling, cache, failures."""

import json
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from applications.conv_tt_lstm.data.sequence_files import DatasetFileError
from applications.conv_tt_lstm.data.ssv2 import (
    UNLABELLED,
    MissingLabelError,
    SomethingSomethingV2,
    read_labels,
    template_key,
)
from applications.conv_tt_lstm.data.video import VideoDecodeError
from _video_files import write_video

# Synthetic templates in the dataset's style; the class indices deliberately not in order.
LABELS = {
    "Moving something up": "3",
    "Pushing something from left to right": "0",
    "Putting something on something": "4",
    "Pretending to pick something up": "1",
    "Tearing something that is not tearable": "2",
}
TRAIN = [  # id, template, frames
    ("101", "Moving [something] up", 7),
    ("102", "Putting [something] on [something]", 30),
    ("103", "Pushing [something] from left to right", 16),
    ("104", "Tearing [something that is not tearable]", 11),
    ("105", "Pretending to pick [something] up", 25),
]
VALIDATION = [("201", "Putting [something] on [something]", 13), ("202", "Moving [something] up", 9)]
TEST = [("301", None, 10), ("302", None, 14)]


def clip_frames(clip_id, length):
    """RGB frames: red encodes the frame number, green the clip, blue stays at 40."""
    frames = np.zeros((length, 48, 64, 3), np.uint8)
    frames[..., 0] = (np.arange(length) * 8)[:, None, None]
    frames[..., 1] = int(clip_id) % 100 * 2
    frames[..., 2] = 40
    return frames


def annotation(clip_id, template):
    if template is None:
        return {"id": clip_id}
    return {"id": clip_id, "label": template.replace("[", "").replace("]", "").lower(),
            "template": template, "placeholders": ["a thing"] * template.count("[")}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("ssv2")
    videos = root / "20bn-something-something-v2"
    for split, clips in (("train", TRAIN), ("validation", VALIDATION), ("test", TEST)):
        (root / f"something-something-v2-{split}.json").write_text(
            json.dumps([annotation(i, t) for i, t, _ in clips])
        )
        for clip_id, _, length in clips:
            write_video(videos / f"{clip_id}.webm", clip_frames(clip_id, length), codec="libvpx-vp9", fps=12)
    (root / "something-something-v2-labels.json").write_text(json.dumps(LABELS))
    return root


def sampled(length, count):
    # Independent of the implementation: centres of `count` equal segments.
    return [int((i + 0.5) * length / count) for i in range(count)]


def test_templates_map_to_their_class_indices(tree):
    dataset = SomethingSomethingV2(tree, "train", n_frames=4, size=16)
    assert dataset.n_classes == 5
    assert dataset.classes[0] == "Pushing something from left to right"
    assert [clip.id for clip in dataset.clips] == [c[0] for c in TRAIN]
    for clip, (_, template, _) in zip(dataset.clips, TRAIN):
        assert clip.label == int(LABELS[template.replace("[", "").replace("]", "")])
    assert [clip.label for clip in dataset.clips] == [3, 4, 0, 2, 1]
    key = template_key("Tearing [something that is not tearable]")
    assert key == "Tearing something that is not tearable"
    assert [c.label for c in SomethingSomethingV2(tree, "validation", n_frames=2, size=8).clips] == [4, 3]


def test_test_split_has_no_labels(tree):
    dataset = SomethingSomethingV2(tree, "test", n_frames=3, size=8)
    assert [clip.label for clip in dataset.clips] == [UNLABELLED, UNLABELLED]
    frames, label = dataset[1]
    assert label == -1 and frames.shape == (3, 3, 8, 8)


@pytest.mark.parametrize("count", [4, 12, 40])
def test_clips_are_sampled_evenly_at_the_chosen_size(tree, count):
    dataset = SomethingSomethingV2(tree, "train", n_frames=count, size=(20, 24))
    for index, (clip_id, _, length) in enumerate(TRAIN):
        frames, label = dataset[index]
        assert frames.dtype == torch.float32 and frames.shape == (count, 3, 20, 24)
        assert 0.0 <= frames.min() and frames.max() <= 1.0
        assert label == dataset.clips[index].label
        red = frames[:, 0].mean(dim=(1, 2)).numpy() * 255
        np.testing.assert_allclose(red, np.array(sampled(length, count)) * 8, atol=6)
        green = frames[:, 1].mean().item() * 255
        assert abs(green - int(clip_id) % 100 * 2) < 6


def test_gray_clips_have_one_channel(tree):
    frames, _ = SomethingSomethingV2(tree, "train", n_frames=5, size=12, color="gray")[1]
    assert frames.shape == (5, 1, 12, 12)


def test_batches_collate(tree):
    dataset = SomethingSomethingV2(tree, "train", n_frames=4, size=16)
    frames, labels = next(iter(DataLoader(dataset, batch_size=3)))
    assert frames.shape == (3, 4, 3, 16, 16) and labels.tolist() == [3, 4, 0]


def test_cache_stores_decoded_clips_and_serves_them(tree, tmp_path):
    root = tmp_path / "ssv2"
    shutil.copytree(tree, root)
    cache = tmp_path / "cache"
    dataset = SomethingSomethingV2(root, "train", n_frames=6, size=16, cache_dir=cache)
    first, _ = dataset[2]
    entry = cache / "6f_16x16_rgb_bilinear" / "103.npy"
    stored = np.load(entry)
    assert stored.dtype == np.uint8 and stored.shape == (6, 16, 16, 3)
    torch.testing.assert_close(first, torch.from_numpy(stored).permute(0, 3, 1, 2).float() / 255)
    assert not list(cache.rglob("*.tmp.npy"))
    # The video is gone bad, the cached clip is still served: the cache is really read.
    (root / "20bn-something-something-v2" / "103.webm").write_bytes(b"junk" * 100)
    again, _ = dataset[2]
    torch.testing.assert_close(again, first)
    # A damaged cache entry is decoded again and replaced.
    dataset[0]
    damaged = cache / "6f_16x16_rgb_bilinear" / "101.npy"
    good = np.load(damaged)
    damaged.write_bytes(damaged.read_bytes()[:60])
    dataset[0]
    np.testing.assert_array_equal(np.load(damaged), good)
    # Another setting uses another folder.
    SomethingSomethingV2(root, "train", n_frames=6, size=8, color="gray", cache_dir=cache)[0]
    assert (cache / "6f_8x8_gray_bilinear" / "101.npy").is_file()


def test_missing_videos_are_left_out_and_reported(tree, tmp_path):
    root = tmp_path / "ssv2"
    shutil.copytree(tree, root)
    (root / "20bn-something-something-v2" / "104.webm").unlink()
    with pytest.warns(RuntimeWarning, match="1 of 5 videos missing.*104"):
        dataset = SomethingSomethingV2(root, "train", n_frames=3, size=8)
    assert len(dataset) == 4 and "104" not in [c.id for c in dataset.clips]
    assert dataset.missing == ("104",)
    assert dataset.report()["missing"] == ["104"]
    with pytest.raises(FileNotFoundError, match="1 of 5 train videos missing.*104.webm"):
        SomethingSomethingV2(root, "train", n_frames=3, size=8, on_error="raise")


def test_a_corrupt_video_is_replaced_counted_and_reported(tree, tmp_path):
    root = tmp_path / "ssv2"
    shutil.copytree(tree, root)
    (root / "20bn-something-something-v2" / "102.webm").write_bytes(b"\x1aE\xdf\xa3" + b"\0" * 500)
    log = tmp_path / "failures.jsonl"
    dataset = SomethingSomethingV2(root, "train", n_frames=3, size=8, failure_log=log)
    with pytest.warns(RuntimeWarning, match="corrupt video of clip 102"):
        frames, label = dataset[1]
    # The next clip (103, class 0) stands in for it.
    assert label == 0
    torch.testing.assert_close(frames, dataset[2][0])
    with pytest.warns(RuntimeWarning):
        epoch = [dataset[i][1] for i in range(len(dataset))]
    assert epoch == [3, 0, 0, 2, 1]
    report = dataset.report()
    assert [(f["id"], f["kind"]) for f in report["failed"]] == [("102", "corrupt")]
    assert report["failed"][0]["file"].endswith("102.webm") and report["clips"] == 5
    strict = SomethingSomethingV2(root, "train", n_frames=3, size=8, on_error="raise")
    with pytest.raises(VideoDecodeError, match="102.webm"):
        strict[1]


def test_a_clip_without_a_class_is_an_error_naming_it(tree, tmp_path):
    root = tmp_path / "ssv2"
    shutil.copytree(tree, root)
    entries = [annotation(i, t) for i, t, _ in TRAIN]
    entries[3]["template"] = "Spinning [something] that quickly stops spinning"
    (root / "something-something-v2-train.json").write_text(json.dumps(entries))
    with pytest.raises(MissingLabelError, match="clip 104 has template") as caught:
        SomethingSomethingV2(root, "train")
    assert caught.value.clip_id == "104"
    del entries[3]["template"]
    (root / "something-something-v2-train.json").write_text(json.dumps(entries))
    with pytest.raises(MissingLabelError, match="clip 104 has no \"template\""):
        SomethingSomethingV2(root, "train")


def test_malformed_or_missing_files_are_clear_errors(tree, tmp_path):
    with pytest.raises(FileNotFoundError, match="folder not found"):
        SomethingSomethingV2(tmp_path / "none")
    root = tmp_path / "ssv2"
    shutil.copytree(tree, root)
    (root / "something-something-v2-validation.json").unlink()
    with pytest.raises(FileNotFoundError, match="annotation file not found.*validation.json"):
        SomethingSomethingV2(root, "validation")
    labels = root / "something-something-v2-labels.json"
    labels.write_text(json.dumps({"Moving something up": "0", "Pushing something": "2"}))
    with pytest.raises(DatasetFileError, match="class indices must be 0..1"):
        read_labels(labels)
    labels.write_text("[1, 2]")
    with pytest.raises(DatasetFileError, match="expected a JSON object"):
        read_labels(labels)
    with pytest.raises(ValueError, match="split must be one of"):
        SomethingSomethingV2(tree, "val")
    with pytest.raises(ValueError, match="on_error must be one of"):
        SomethingSomethingV2(tree, on_error="skip")
