"""The run's thread policy (training/threads.py) and ``run.precision="auto"``."""

import os

import pytest
import torch

from applications.conv_tt_lstm import precision as precision_module
from applications.conv_tt_lstm.precision import PrecisionError, fast_precision, resolve_precision
from applications.conv_tt_lstm.training import threads as threads_module
from applications.conv_tt_lstm.training.threads import ThreadPolicy, available_cores


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


class FakeMachine:
    """What /proc reports, and this process's CPU time, under the test's control."""

    def __init__(self, monkeypatch, cores=4, others_now=0):
        self.busy_ticks, self.own_seconds, self.clock, self.others_now = 0, 0.0, 0.0, others_now
        monkeypatch.setattr(threads_module, "available_cores", lambda: cores)
        monkeypatch.setattr(threads_module, "_busy_ticks", lambda: self.busy_ticks)
        monkeypatch.setattr(threads_module, "_others_running_now", lambda: self.others_now)
        monkeypatch.setattr(threads_module.time, "monotonic", lambda: self.clock)
        monkeypatch.setattr(threads_module.os, "times",
                            lambda: os.times_result((self.own_seconds, 0, 0, 0, 0)))
        self.hz = os.sysconf("SC_CLK_TCK")

    def run(self, seconds, own_cores, other_cores):
        """``seconds`` pass with this process on ``own_cores`` and others on ``other_cores``."""
        self.clock += seconds
        self.own_seconds += own_cores * seconds
        self.busy_ticks += round((own_cores + other_cores) * seconds * self.hz)


def test_fixed_count_is_used_and_never_changed(monkeypatch):
    machine = FakeMachine(monkeypatch, cores=4, others_now=3)
    policy = ThreadPolicy(3)
    assert torch.get_num_threads() == 3 and not policy.adaptive
    machine.run(60, own_cores=3, other_cores=4)
    assert policy.update() == 3
    assert policy.describe() == "3 CPU threads (fixed)"


def test_adaptive_starts_on_the_cores_other_processes_leave_free(monkeypatch):
    FakeMachine(monkeypatch, cores=4, others_now=0)
    assert ThreadPolicy(0).threads == 4
    FakeMachine(monkeypatch, cores=4, others_now=2)
    assert ThreadPolicy(0).threads == 2
    FakeMachine(monkeypatch, cores=4, others_now=9)
    policy = ThreadPolicy(0)
    assert policy.threads == 1 and torch.get_num_threads() == 1
    assert policy.describe() == "1 CPU thread (adaptive)"


def test_adaptive_follows_a_job_that_starts_and_ends_during_the_run(monkeypatch):
    machine = FakeMachine(monkeypatch, cores=2)
    policy = ThreadPolicy(0, recheck_seconds=10)
    assert policy.threads == 2
    machine.run(5, own_cores=2, other_cores=0)
    assert policy.update() == 2  # too soon to look again
    # A 2-thread job starts: the 2 cores are shared, this process gets about one of them.
    machine.run(10, own_cores=1.0, other_cores=1.0)
    assert policy.update() == 1 and torch.get_num_threads() == 1
    machine.run(20, own_cores=1.0, other_cores=1.0)
    assert policy.update() == 1
    # The job ends.
    machine.run(20, own_cores=1.0, other_cores=0.0)
    assert policy.update() == 2 and torch.get_num_threads() == 2


def test_adaptive_ignores_a_light_background_job(monkeypatch):
    machine = FakeMachine(monkeypatch, cores=2)
    policy = ThreadPolicy(0, recheck_seconds=1)
    machine.run(30, own_cores=1.8, other_cores=0.2)
    assert policy.update() == 2


def test_processes_of_one_machine_share_its_cores(monkeypatch):
    machine = FakeMachine(monkeypatch, cores=16, others_now=15)
    policy = ThreadPolicy(0, processes_per_machine=4)
    assert policy.threads == 4 and not policy.adaptive
    machine.run(60, own_cores=4, other_cores=12)
    assert policy.update() == 4


def test_negative_threads_are_refused():
    with pytest.raises(ValueError, match="run.threads"):
        ThreadPolicy(-1)


def test_the_real_machine_readings_are_sane():
    assert 1 <= available_cores() <= (os.cpu_count() or 1)
    policy = ThreadPolicy(0)
    assert 1 <= policy.threads <= available_cores()
    if os.path.exists("/proc/stat"):
        assert threads_module._busy_ticks() >= 0
        assert threads_module._others_running_now() >= 0


@pytest.mark.parametrize("fast", [True, False])
def test_auto_precision_is_bf16_only_where_the_cpu_has_bf16_hardware(monkeypatch, fast):
    monkeypatch.setattr(precision_module, "cpu_has_fast_bf16", lambda: fast)
    expected = "bf16" if fast else "fp32"
    assert fast_precision("cpu") == expected
    assert resolve_precision("auto", "cpu").name == expected


def test_auto_precision_on_this_cpu_matches_its_hardware():
    has = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert resolve_precision("auto", "cpu").name == ("bf16" if has else "fp32")


def test_unknown_precision_names_the_choices():
    with pytest.raises(PrecisionError, match="auto"):
        resolve_precision("fp8", "cpu")
