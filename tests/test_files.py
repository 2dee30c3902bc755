"""The one atomic-write path and the one guarded load (tt_conv.files), used by every command.

A full disk is made for real where the kernel allows it (a 256 KiB tmpfs in a user and
mount namespace, ``unshare -rm``); the translation of the errors is also checked on its own.
"""

import errno
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tt_conv.files import (
    FileWriteError,
    atomic_path,
    atomic_torch_save,
    load_tensors,
    pickled_globals,
    remove_stale_temporaries,
    write_text_atomic,
)

ROOT = Path(__file__).resolve().parents[1]


def temporaries(folder):
    return sorted(p.name for p in Path(folder).iterdir() if ".tmp" in p.name)


def test_failure_removes_the_temporary_and_keeps_the_target(tmp_path):
    target = tmp_path / "out.txt"
    write_text_atomic(target, "old")
    with pytest.raises(KeyError):
        with atomic_path(target) as temporary:
            temporary.write_text("half")
            raise KeyError("writer failed")
    assert target.read_text() == "old" and temporaries(tmp_path) == []


@pytest.mark.parametrize("failure, words", [
    (OSError(errno.ENOSPC, "No space left on device"), "the disk is full"),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4096"),
     "the write stopped short"),
    (RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
     "the write stopped short"),
    (PermissionError(errno.EACCES, "Permission denied"), "Permission denied"),
])
def test_write_failures_name_the_file_and_the_cause(tmp_path, failure, words):
    target = tmp_path / "checkpoint.pt"
    atomic_torch_save({"step": 1}, target)
    with pytest.raises(FileWriteError) as caught:
        with atomic_path(target):
            raise failure
    message = str(caught.value)
    assert str(target) in message and words in message and "was not changed" in message
    assert "free in" in message or isinstance(failure, PermissionError)
    assert isinstance(caught.value, OSError) and temporaries(tmp_path) == []
    assert load_tensors(target) == {"step": 1}


def test_other_exceptions_pass_through_unchanged(tmp_path):
    with pytest.raises(ValueError, match="not a write failure"):
        with atomic_path(tmp_path / "x"):
            raise ValueError("not a write failure")


def test_results_respect_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        write_text_atomic(tmp_path / "private", "x")
        os.umask(0o002)
        atomic_torch_save({"a": 1}, tmp_path / "shared.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "private").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "shared.pt").st_mode) == 0o664


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temporaries_of_killed_writers_are_removed(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    stale = [f".last.pt.{dead}.k3j4.tmp.pt", ".last.pt.abcd1234.tmp.pt"]  # old names had no id
    live = f".last.pt.{alive}.x9y8.tmp.pt"
    other = f".best.pt.{dead}.zz11.tmp.pt"
    for name in stale + [live, other]:
        (tmp_path / name).write_bytes(b"\0" * 1000)
    atomic_torch_save({"step": 2}, tmp_path / "last.pt")  # the next save of the same file
    assert temporaries(tmp_path) == sorted([live, other])
    # A run's start clears the whole folder (every target), still sparing live writers.
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == [other]
    assert temporaries(tmp_path) == [live]


def test_a_killed_save_leaves_nothing_after_the_next_run_starts(tmp_path):
    """A writer killed by SIGKILL half-way through torch.save, then the run's next start."""
    from applications.conv_tt_lstm.training import checkpoints as ckpt

    folder = ckpt.checkpoint_dir(tmp_path)
    script = textwrap.dedent(f"""
        import os, signal, torch
        from tt_conv.files import atomic_path
        with atomic_path({str(folder / "last.pt")!r}) as temporary:
            torch.save(torch.zeros(1000), temporary)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run([sys.executable, "-c", script], env={**os.environ,
                            "PYTHONPATH": str(ROOT)}, capture_output=True, timeout=120)
    assert result.returncode == -9
    assert len(temporaries(folder)) == 1 and not (folder / "last.pt").exists()
    ckpt.start_run(tmp_path, "auto", overwrite=False)
    assert temporaries(folder) == []


# ------------------------------------------------------------------------------ reading


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_refused_files_are_described_without_running_them(tmp_path):
    marker = tmp_path / "marker"
    cases = {
        "empty.pt": (b"", "is empty (0 bytes)"),
        "random.pt": (bytes(range(256)) * 8, "is not a torch.save file"),
    }
    for name, (content, words) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=r"checkpoint .*" + words.replace("(", r"\(")
                           .replace(")", r"\)")) as caught:
            load_tensors(tmp_path / name)
        assert "weights_only" not in str(caught.value)
    torch.save({"weights": torch.ones(2), "payload": _Payload(marker)}, tmp_path / "evil.pt")
    assert pickled_globals(tmp_path / "evil.pt") == ["builtins.exec"]
    with pytest.raises(ValueError, match=r"holds Python objects.*builtins\.exec.*run code"):
        load_tensors(tmp_path / "evil.pt")
    assert not marker.exists()
    torch.save({"weights": torch.ones(2)}, tmp_path / "good.pt")
    assert pickled_globals(tmp_path / "good.pt") == []
    assert torch.equal(load_tensors(tmp_path / "good.pt")["weights"], torch.ones(2))


# ----------------------------------------------------------------------- a real full disk


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


FULL_DISK_SCRIPT = r"""
set -e
mount -t tmpfs -o size=256k tmpfs "$DISK"
cd "$DISK"
"$PYTHON" - <<'EOF'
import os, sys, torch
from torch import nn
from tt_conv.files import FileWriteError, atomic_torch_save
from tt_conv.cli import main

atomic_torch_save({"step": 1}, "last.pt")
try:
    atomic_torch_save({"w": torch.zeros(200_000)}, "last.pt")  # 800 kB on a 256 kB disk
    print("NO ERROR")
except FileWriteError as error:
    print("MESSAGE", error)
print("TEMPORARIES", sorted(n for n in os.listdir(".") if ".tmp" in n))
print("KEPT", torch.load("last.pt", weights_only=True))
model = os.environ["MODEL"]
torch.save(nn.Sequential(nn.Conv2d(64, 64, 3), nn.Conv2d(64, 64, 3)), model)
with open("filler", "wb") as handle:  # leave about 16 kB
    handle.write(b"\0" * (os.statvfs(".").f_bavail * os.statvfs(".").f_frsize - 16384))
status = main(["compress", model, "--trust-pickle", "--rank", "0.5", "--out", "small.pt",
               "--quiet"])
print("LEFT", sorted(n for n in os.listdir(".") if n != "filler"), os.statvfs(".").f_bavail)
print("COMPRESS", status)
EOF
"""


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="no user namespaces to mount a small tmpfs")
def test_a_real_full_disk_is_named_and_loses_nothing(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DISK": str(disk), "PYTHON": sys.executable,
           "MODEL": str(tmp_path / "model.pt")}
    result = subprocess.run(["unshare", "-rm", "sh", "-c", FULL_DISK_SCRIPT], env=env,
                            capture_output=True, text=True, timeout=300)
    out = result.stdout
    assert "MESSAGE cannot write last.pt:" in out, (out, result.stderr)
    assert "the disk is full" in out and "last.pt was not changed" in out
    assert "TEMPORARIES []" in out and "KEPT {'step': 1}" in out
    assert "COMPRESS 2" in out and "LEFT ['last.pt']" in out
    assert "error: cannot write small.pt:" in result.stderr and "disk is full" in result.stderr
    assert "Traceback" not in result.stderr


APPLICATION_FULL_DISK_SCRIPT = r"""
set -e
mount -t tmpfs -o size=256k tmpfs "$DISK"
"$PYTHON" - <<'EOF'
import os
from applications.conv_tt_lstm.cli import main

with open(os.path.join(os.environ["DISK"], "filler"), "wb") as handle:  # leave about 8 kB
    vfs = os.statvfs(os.environ["DISK"])
    handle.write(b"\0" * (vfs.f_bavail * vfs.f_frsize - 8192))
for name, argv in (
        ("PREDICT", ["predict", os.environ["CKPT"], os.environ["FRAMES"], "--future-frames",
                     "2", "--no-progress", "--out", os.environ["DISK"] + "/pred"]),
        ("EVALUATE", ["evaluate", os.environ["CKPT"], "--image-size", "32", "--sequences", "2",
                      "--input-frames", "3", "--future-frames", "2", "--no-progress",
                      "--no-lpips", "--out", os.environ["DISK"] + "/eval"])):
    print(name, main(argv), flush=True)
EOF
"""


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="no user namespaces to mount a small tmpfs")
def test_predict_and_evaluate_on_a_real_full_disk_say_so(tmp_path):
    import numpy as np

    from applications.conv_tt_lstm.checkpoint import save_checkpoint
    from applications.conv_tt_lstm.model import ArchitectureConfig, VideoPredictionNetwork

    save_checkpoint(tmp_path / "tiny.pt", VideoPredictionNetwork(ArchitectureConfig(
        hidden_channels=(4,), layers_per_block=1, kernel_size=3, order=2, steps=2, rank=2,
        skip_stride=0, patch_size=4)))
    np.save(tmp_path / "frames.npy", np.random.default_rng(0).integers(
        0, 256, (1, 3, 32, 32), dtype=np.uint8))
    disk = tmp_path / "disk"
    disk.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DISK": str(disk), "PYTHON": sys.executable,
           "CKPT": str(tmp_path / "tiny.pt"), "FRAMES": str(tmp_path / "frames.npy")}
    result = subprocess.run(["unshare", "-rm", "sh", "-c", APPLICATION_FULL_DISK_SCRIPT],
                            env=env, capture_output=True, text=True, timeout=300)
    assert "PREDICT 2" in result.stdout and "EVALUATE 2" in result.stdout, (
        result.stdout, result.stderr)
    assert result.stderr.count("the disk is full") == 2, result.stderr
    assert "error: cannot write " in result.stderr and "pred/predictions.npy" in result.stderr
    assert "eval/metrics.json was not written" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------ JSON lines


def test_json_lines_cut_last_line_is_ignored_and_corruption_is_named(tmp_path):
    from tt_conv.files import JSONLinesError, read_json_lines

    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "kind": "tr')  # a killed write
    with pytest.warns(UserWarning, match=r"log .*log\.jsonl: its last line \(3\) was cut short"):
        assert read_json_lines(log) == [{"step": 1}, {"step": 2}]
    log.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(JSONLinesError, match=r"log\.jsonl, line 2: not valid JSON"):
        read_json_lines(log)
    log.write_text('{"step": 1}\n\n{"step": 2}')  # complete, no final newline: kept
    assert read_json_lines(log) == [{"step": 1}, {"step": 2}]
