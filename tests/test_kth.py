"""KTH action: names, `prepare kth` on tiny AVI and JPEG trees, the dataset's split and windows."""

import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from applications.conv_tt_lstm import cli
from applications.conv_tt_lstm.data.kth import (
    KTHDataset,
    KTHName,
    load_kth_index,
    parse_kth_name,
    prepare_kth,
)
from applications.conv_tt_lstm.data.sequence_files import DatasetFileError
from _video_files import level_frames, write_video

ACTIONS = ["boxing", "handwaving", "jogging", "running", "walking"]
PERSONS = [3, 16, 17, 21]  # two on each side of the train / test boundary (16 | 17)
SIZE = 24


def video_length(person, action, scenario):
    if (person, action) == (16, "running"):
        return 20  # shorter than any window: yields none
    return 31 + (7 * person + 11 * ACTIONS.index(action) + 5 * scenario) % 40


def video_levels(person, action, scenario):
    """Frame t of a video is flat at a level unique within the video (a ramp)."""
    base = (29 * person + 53 * ACTIONS.index(action) + 17 * scenario) % 100
    return (base + 2 * np.arange(video_length(person, action, scenario))) % 250


SPECS = [(p, a, 1) for p in PERSONS for a in ACTIONS] + [(3, "boxing", 2)]
CORRUPT = "person18_walking_d2_uncomp"
REJECTED = {
    "boxing/person26_boxing_d1_uncomp.avi": "person '26'",
    "boxing/person3_boxing_d2_uncomp.avi": "person '3'",
    "boxing/person03_swimming_d1_uncomp.avi": "action 'swimming'",
    "boxing/person03_boxing_d5_uncomp.avi": "scenario d5",
    "boxing/person03_boxing_d1.avi": "does not follow",
    "walking/person03_boxing_d3_uncomp.avi": "inside the folder walking/",
}


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """A tiny KTH tree as extracted from the per-action zips: {action}/personXX_..._uncomp.avi."""
    root = tmp_path_factory.mktemp("kth_raw")
    for person, action, scenario in SPECS:
        frames = level_frames(video_levels(person, action, scenario), 30, 40)
        write_video(root / action / f"person{person:02d}_{action}_d{scenario}_uncomp.avi", frames)
    rng = np.random.default_rng(0)
    (root / "walking" / f"{CORRUPT}.avi").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    for name in REJECTED:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"not decoded: the name is rejected first")
    (root / "00sequences.txt").write_text("the distribution's frame-range list; not a video\n")
    return root


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("kth_out")
    capture = {}
    import contextlib
    import io

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        capture["status"] = cli.main(
            ["prepare", "kth", "--raw", str(raw), "--out", str(out), "--size", str(SIZE), "--no-progress"]
        )
    capture["out"], capture["err"] = stdout.getvalue(), stderr.getvalue()
    return out, capture


# ------------------------------------------------------------------------------- names


def test_parse_kth_name_strictly():
    assert parse_kth_name("person07_handclapping_d3_uncomp") == KTHName(7, "handclapping", 3)
    assert KTHName(7, "handclapping", 3).stem == "person07_handclapping_d3_uncomp"
    assert KTHName(7, "handclapping", 3).prepared_path == "handclapping/person07_handclapping_d3.npy"
    for stem, reason in [
        ("person00_boxing_d1_uncomp", "person '00'"),
        ("person26_boxing_d1_uncomp", "person '26'"),
        ("person007_boxing_d1_uncomp", "person '007'"),
        ("person07_Boxing_d1_uncomp", "action 'Boxing'"),
        ("person07_boxing_d0_uncomp", "scenario d0"),
        ("person07_boxing_d1", "does not follow"),
        ("person07_boxing_d1_uncomp.avi", "does not follow"),
    ]:
        with pytest.raises(ValueError, match=reason):
            parse_kth_name(stem)


# --------------------------------------------------------------------------- prepare kth


def test_prepare_writes_every_good_video_and_an_index(prepared):
    out, capture = prepared
    assert capture["status"] == 0, capture["err"]
    index = json.loads((out / "kth.json").read_text())
    assert index["size"] == [SIZE, SIZE] and index["layout"] == "avi"
    entries = {(v["person"], v["action"], v["scenario"]): v for v in index["videos"]}
    assert sorted(entries) == sorted(SPECS)
    for spec, entry in entries.items():
        person, action, scenario = spec
        assert entry["frames"] == video_length(*spec)
        assert entry["path"] == f"{action}/person{person:02d}_{action}_d{scenario}.npy"
        assert entry["source"] == f"{action}/person{person:02d}_{action}_d{scenario}_uncomp.avi"
        frames = np.load(out / entry["path"])
        assert frames.dtype == np.uint8 and frames.shape == (video_length(*spec), SIZE, SIZE)
        np.testing.assert_allclose(frames.mean(axis=(1, 2)), video_levels(*spec), atol=3)
    assert index["counts"]["written"] == len(SPECS) and index["counts"]["kept"] == 0
    assert index["counts"]["frames"] == sum(video_length(*s) for s in SPECS)
    assert f"{len(SPECS)} videos" in capture["out"] and f"{len(SPECS)} written" in capture["out"]


def test_a_corrupt_video_is_reported_by_name_and_skipped(prepared):
    out, capture = prepared
    index = json.loads((out / "kth.json").read_text())
    assert [f["name"] for f in index["failed"]] == [CORRUPT]
    assert index["failed"][0]["source"] == f"walking/{CORRUPT}.avi"
    assert "cannot decode" in index["failed"][0]["error"]
    assert CORRUPT in capture["err"] and "failed to decode" in capture["err"]
    assert not (out / "walking" / "person18_walking_d2.npy").exists()
    assert index["counts"]["failed"] == 1


def test_names_that_do_not_fit_are_reported_and_missing_videos_listed(prepared):
    out, capture = prepared
    index = json.loads((out / "kth.json").read_text())
    rejected = {r["path"]: r["reason"] for r in index["rejected"]}
    assert set(rejected) == set(REJECTED)
    for path, reason in REJECTED.items():
        assert reason in rejected[path]
        assert path in capture["err"]
    found = len(SPECS) + 1  # the corrupt one was found, not missing
    assert len(index["missing"]) == 600 - found
    assert "person01_boxing_d1_uncomp" in index["missing"] and CORRUPT not in index["missing"]
    assert f"{600 - found} of the 600" in capture["out"]


def test_rerun_keeps_complete_files_and_redoes_a_damaged_one(prepared, raw, tmp_path, capsys):
    source, _ = prepared
    out = tmp_path / "out"
    shutil.copytree(source, out)
    target = out / "jogging" / "person17_jogging_d1.npy"
    untouched = out / "boxing" / "person03_boxing_d1.npy"
    before = untouched.stat().st_mtime_ns
    good = np.load(target)
    # A copy cut short under the final name, and a temporary left by a killed run.
    target.write_bytes(target.read_bytes()[:-100])
    (out / "jogging" / ".person21_jogging_d1.npy.abc123.tmp.npy").write_bytes(b"partial")
    args = ["prepare", "kth", "--raw", str(raw), "--out", str(out), "--size", str(SIZE), "--no-progress"]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert f"1 written, {len(SPECS) - 1} already done" in captured.out
    assert CORRUPT in captured.err  # still reported on every run
    np.testing.assert_array_equal(np.load(target), good)
    assert untouched.stat().st_mtime_ns == before
    assert not list(out.rglob("*.tmp.npy"))
    index = json.loads((out / "kth.json").read_text())
    assert index["counts"]["stale_temporaries_removed"] == 1
    # Another size into the same folder is refused rather than mixed in.
    assert cli.main(args[:-3] + ["--size", "120", "--no-progress"]) == 2
    assert "already holds KTH prepared with size [24, 24]" in capsys.readouterr().err


def test_strict_mode_fails_on_a_skipped_video(prepared, raw, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(prepared[0], out)
    args = ["prepare", "kth", "--raw", str(raw), "--out", str(out), "--size", str(SIZE),
            "--no-progress", "--strict"]
    assert cli.main(args) == 1


def write_jpeg_video(root, person, action, scenario, levels):
    folder = root / action / f"person{person:02d}_{action}_d{scenario}_uncomp"
    folder.mkdir(parents=True)
    for t, level in enumerate(levels):
        image = Image.fromarray(np.full((30, 40, 3), level, np.uint8))  # RGB JPEGs are common
        image.save(folder / f"image_{t + 1:04d}.jpg", quality=95)


def test_prepare_reads_the_jpeg_frames_layout(tmp_path, capsys):
    raw = tmp_path / "frames"
    specs = {(5, "boxing", 1): 33, (20, "jogging", 4): 12, (17, "running", 3): 40}
    for (person, action, scenario), length in specs.items():
        write_jpeg_video(raw, person, action, scenario, (np.arange(length) * 6) % 250)
    out = tmp_path / "out"
    status = cli.main(["prepare", "kth", "--raw", str(raw), "--out", str(out), "--size", "16x20",
                       "--no-progress", "--workers", "2"])
    assert status == 0, capsys.readouterr().err
    index = load_kth_index(out)
    assert index.size == (16, 20)
    got = {(v.person, v.action, v.scenario): v for v in index.videos}
    assert {k: v.frames for k, v in got.items()} == specs
    frames = np.load(got[(17, "running", 3)].path)
    assert frames.shape == (40, 16, 20)
    np.testing.assert_allclose(frames.mean(axis=(1, 2)), (np.arange(40) * 6) % 250, atol=2)
    assert json.loads((out / "kth.json").read_text())["layout"] == "jpeg"


def test_both_layouts_in_one_folder_need_a_choice(raw, tmp_path, capsys):
    mixed = tmp_path / "mixed"
    shutil.copytree(raw / "jogging", mixed / "jogging")
    write_jpeg_video(mixed, 5, "boxing", 1, [10, 20, 30])
    out = tmp_path / "out"
    assert cli.main(["prepare", "kth", "--raw", str(mixed), "--out", str(out), "--no-progress"]) == 2
    assert "both AVI files" in capsys.readouterr().err
    index = prepare_kth(mixed, out, size=8, layout="jpeg", progress=False)
    assert [v["person"] for v in index["videos"]] == [5]
    assert cli.main(["prepare", "kth", "--raw", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert "KTH raw folder not found" in capsys.readouterr().err


def test_prepare_rejects_bad_arguments(raw, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["prepare", "kth", "--raw", str(raw), "--out", str(tmp_path), "--size", "0"])
    assert "expected a size like 128" in capsys.readouterr().err
    with pytest.raises(ValueError, match="resample must be one of"):
        prepare_kth(raw, tmp_path / "o", resample="cubic")
    with pytest.raises(ValueError, match="workers must be an integer >= 1"):
        prepare_kth(raw, tmp_path / "o", workers=0)


# ------------------------------------------------------------------------------- dataset


def expected_windows(persons, window, strides):
    """Window count per action, by brute force over every start frame."""
    counts = dict.fromkeys(["boxing", "handclapping", "handwaving", "jogging", "running", "walking"], 0)
    for spec in SPECS:
        person, action, _ = spec
        if person in persons:
            length = video_length(*spec)
            counts[action] += sum(
                1 for start in range(length) if start % strides[action] == 0 and start + window <= length
            )
    return counts


def strides_for(window):
    return {a: (3 if a in ("jogging", "running") else window) for a in
            ["boxing", "handclapping", "handwaving", "jogging", "running", "walking"]}


def test_dataset_splits_by_person(prepared):
    out, _ = prepared
    train, test = KTHDataset(out, "train"), KTHDataset(out, "test")
    assert train.persons == tuple(range(1, 17)) and test.persons == tuple(range(17, 26))
    assert {v.person for v in train.videos} == {3, 16}
    assert {v.person for v in test.videos} == {17, 21}
    val = KTHDataset(out, "val", val_persons=[3])
    train_minus = KTHDataset(out, "train", val_persons=[3])
    assert {v.person for v in val.videos} == {3} and {v.person for v in train_minus.videos} == {16}
    assert len(val) + len(train_minus) == len(train)
    with pytest.raises(ValueError, match="val_persons must be training persons 1-16, got \\[17\\]"):
        KTHDataset(out, "val", val_persons=[17])
    with pytest.raises(ValueError, match="split 'val' needs val_persons"):
        KTHDataset(out, "val")
    assert {v.person for v in KTHDataset(out, "test", persons=[21]).videos} == {21}


@pytest.mark.parametrize("protocol, window", [("10->20", 30), ("10->40", 50), ((5, 5), 10)])
def test_window_counts_follow_the_per_action_strides(prepared, protocol, window):
    out, _ = prepared
    for split, persons in (("train", range(1, 17)), ("test", range(17, 26))):
        dataset = KTHDataset(out, split, protocol=protocol)
        expected = expected_windows(set(persons), window, strides_for(window))
        assert dataset.windows_per_action() == expected
        assert len(dataset) == sum(expected.values())
        assert dataset.n_frames == window


def test_strides_can_be_overridden(prepared):
    out, _ = prepared
    everywhere_two = KTHDataset(out, "train", strides=2)
    two = dict.fromkeys(strides_for(30), 2)
    assert everywhere_two.windows_per_action() == expected_windows({3, 16}, 30, two)
    custom = KTHDataset(out, "train", strides={"boxing": 1})
    table = strides_for(30) | {"boxing": 1}
    assert custom.windows_per_action() == expected_windows({3, 16}, 30, table)
    with pytest.raises(ValueError, match="unknown actions \\['swimming'\\]"):
        KTHDataset(out, "train", strides={"swimming": 2})
    with pytest.raises(ValueError, match="stride of boxing must be an integer >= 1"):
        KTHDataset(out, "train", strides={"boxing": 0})
    with pytest.raises(ValueError, match="protocol must be one of"):
        KTHDataset(out, "train", protocol="10->30")


def test_items_are_the_right_frames_as_floats(prepared):
    out, _ = prepared
    dataset = KTHDataset(out, "test", protocol="10->20")
    for index in (0, len(dataset) // 2, len(dataset) - 1):
        item = dataset[index]
        assert item.dtype == torch.float32 and item.shape == (30, 1, SIZE, SIZE)
        assert 0.0 <= item.min() and item.max() <= 1.0
        where = dataset.window(index)
        spec = (where.video.person, where.video.action, where.video.scenario)
        levels = video_levels(*spec)[where.start : where.start + 30]
        np.testing.assert_allclose(item.mean(dim=(1, 2, 3)).numpy() * 255, levels, atol=3)
    # Jogging windows of one video step by 3 frames.
    jogging = [dataset.window(i) for i in range(len(dataset)) if dataset.window(i).video.action == "jogging"]
    first_video = [w.start for w in jogging if w.video == jogging[0].video]
    assert first_video[:3] == [0, 3, 6]
    copy = pickle.loads(pickle.dumps(dataset))  # what a DataLoader worker receives
    torch.testing.assert_close(copy[5], dataset[5])
    assert dataset.frame_shape == (1, SIZE, SIZE)


def test_dataset_errors_for_a_missing_or_malformed_folder(prepared, tmp_path):
    with pytest.raises(FileNotFoundError, match="KTH prepared folder not found.*prepare kth"):
        KTHDataset(tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="holds no kth.json"):
        KTHDataset(tmp_path)
    out = tmp_path / "copy"
    shutil.copytree(prepared[0], out)
    index_text = (out / "kth.json").read_text()
    (out / "kth.json").write_text(index_text[:50])
    with pytest.raises(DatasetFileError, match="unreadable KTH index"):
        KTHDataset(out)
    broken = json.loads(index_text)
    del broken["videos"][0]["frames"]
    (out / "kth.json").write_text(json.dumps(broken))
    with pytest.raises(DatasetFileError, match="malformed KTH index.*frames"):
        KTHDataset(out)
    (out / "kth.json").write_text(index_text)
    first = out / json.loads(index_text)["videos"][0]["path"]
    first.write_bytes(first.read_bytes()[:-10])
    with pytest.raises(DatasetFileError, match="truncated"):
        KTHDataset(out)
    first.unlink()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        KTHDataset(out)
