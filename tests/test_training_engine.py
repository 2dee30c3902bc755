"""Training engine pieces: schedules, precision, RNG capture, sampler, activation checkpointing."""

import random

import numpy as np
import pytest
import torch

import tt_conv
from applications.conv_tt_lstm.config import ScheduleConfig
from applications.conv_tt_lstm.model import ArchitectureConfig, VideoPredictionNetwork
from applications.conv_tt_lstm.training.checkpoints import capture_rng_state, restore_rng_state
from applications.conv_tt_lstm.training.distributed import (
    DistContext, ResumableDistributedSampler, wrap_model,
)
from applications.conv_tt_lstm.precision import PrecisionError, resolve_precision
from applications.conv_tt_lstm.training.schedules import TrainingSchedule


def test_plateau_rule_of_the_release():
    config = ScheduleConfig(sampling="plateau", plateau_patience=2, plateau_decrement=0.25,
                            lr_decay="plateau", lr_decay_delay=1, lr_decay_every=2,
                            lr_decay_factor=0.5)
    schedule = TrainingSchedule(config, base_lr=1.0, min_lr=0.0, total_steps=100)
    ratios, lrs = [], []
    for loss in [5, 4, 4, 4, 3, 3, 3, 3, 3]:
        schedule.end_of_round(loss)
        ratios.append(schedule.sampling_ratio(0))
        lrs.append(schedule.lr(0))
    # No improvement for 2 rounds after round 2 -> r falls from round 4 on, every round,
    # improvements or not; 1 round after that lr halves, then every 2 rounds.
    assert ratios == [1, 1, 1, 0.75, 0.5, 0.25, 0, 0, 0]
    assert lrs == [1, 1, 1, 1, 0.5, 0.5, 0.25, 0.25, 0.125]
    again = TrainingSchedule(config, 1.0, 0.0, 100)
    again.load_state_dict(schedule.state_dict())
    assert again.state_dict() == schedule.state_dict()


def test_linear_sampling_and_cosine_lr():
    config = ScheduleConfig(sampling="linear", linear_start=10, linear_end=30,
                            sampling_start=1.0, sampling_end=0.2, lr_decay="cosine",
                            warmup_steps=4)
    schedule = TrainingSchedule(config, base_lr=1.0, min_lr=0.1, total_steps=104)
    assert [schedule.sampling_ratio(s) for s in (0, 10, 20, 30, 99)] == \
        pytest.approx([1.0, 1.0, 0.6, 0.2, 0.2])
    assert [schedule.lr(s) for s in (0, 3)] == pytest.approx([0.25, 1.0])
    assert schedule.lr(4) == pytest.approx(1.0)
    assert schedule.lr(54) == pytest.approx(0.55)
    assert schedule.lr(104) == pytest.approx(0.1)


def test_precisions_on_cpu():
    assert resolve_precision("fp32", torch.device("cpu")).make_scaler() is None
    bf16 = resolve_precision("bf16", torch.device("cpu"))
    with bf16.autocast():
        y = torch.nn.functional.linear(torch.randn(2, 3), torch.randn(4, 3))
    assert y.dtype == torch.bfloat16
    with pytest.raises(PrecisionError, match="--precision fp16"):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(PrecisionError, match="--precision fp8"):
        resolve_precision("fp8", torch.device("cpu"))


def test_rng_state_round_trip():
    generator = torch.Generator().manual_seed(3)
    state = capture_rng_state({"g": generator})
    first = (random.random(), np.random.rand(), torch.rand(1).item(),
             torch.rand(1, generator=generator).item())
    random.random(), np.random.rand(), torch.rand(3), torch.rand(3, generator=generator)
    restore_rng_state(state, {"g": generator})
    again = (random.random(), np.random.rand(), torch.rand(1).item(),
             torch.rand(1, generator=generator).item())
    assert first == again


def test_resumable_sampler_skips_into_the_epoch():
    data = list(range(11))
    for rank in (0, 1):
        context = DistContext(rank=rank, world_size=2)
        whole = list(ResumableDistributedSampler(data, context, seed=4, epoch=2))
        tail = ResumableDistributedSampler(data, context, seed=4, epoch=2, start=3)
        assert list(tail) == whole[3:] and len(tail) == len(whole) - 3


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = VideoPredictionNetwork(ArchitectureConfig(hidden_channels=(4, 4), layers_per_block=1,
                                                      skip_stride=0, kernel_size=3, rank=2,
                                                      patch_size=2))
    frames = torch.rand(2, 6, 1, 8, 8)
    grads = []
    for checkpointed in (False, True):
        model.zero_grad()
        out = model(frames, 3, teacher_forcing=True, sampling_ratio=0.5, all_outputs=True,
                    generator=torch.Generator().manual_seed(1), checkpoint_steps=checkpointed)
        (out - frames[:, 1:]).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_wrap_model_compiles_every_cell_in_place_and_keeps_the_parameter_names():
    model = VideoPredictionNetwork(ArchitectureConfig(hidden_channels=(4, 4), layers_per_block=1,
                                                      skip_stride=0, kernel_size=3, rank=2))
    names = list(model.state_dict())
    assert wrap_model(model, DistContext(), compile=True) is model
    assert list(model.state_dict()) == names  # checkpoints unchanged
    cells = [m for m in model.modules() if isinstance(m, tt_conv.recurrent.RECURRENT_CELLS)]
    assert len(cells) == 2 and all(c._compiled_call_impl is not None for c in cells)
    assert model._compiled_call_impl is None  # the loops over time stay in Python


def test_a_shortened_schedule_spans_the_new_length_and_survives_a_checkpoint():
    config = ScheduleConfig(sampling="linear", linear_start=10, linear_end=280,
                            lr_decay="cosine", warmup_steps=50)
    schedule = TrainingSchedule(config, 2e-3, 1e-4, 700)
    schedule.shorten(350)
    assert schedule.total_steps == 350
    assert (schedule.config.linear_start, schedule.config.linear_end,
            schedule.config.warmup_steps) == (5, 140, 25)
    assert schedule.sampling_ratio(140) == 0.0 and schedule.sampling_ratio(72) > 0.0
    assert schedule.lr(349) == pytest.approx(1e-4, rel=1e-3)  # the cosine ends with the run
    restored = TrainingSchedule(config, 2e-3, 1e-4, 700)
    restored.load_state_dict(schedule.state_dict())
    assert [restored.lr(s) for s in range(350)] == [schedule.lr(s) for s in range(350)]
    assert restored.config == schedule.config
    with pytest.raises(ValueError, match="1..350"):
        schedule.shorten(351)


def test_a_schedule_never_shortened_follows_a_longer_run_when_resumed():
    config = ScheduleConfig(sampling="linear", linear_end=8, lr_decay="cosine")
    state = TrainingSchedule(config, 1e-2, 0.0, 40).state_dict()
    assert "total_steps" not in state
    longer = TrainingSchedule(config, 1e-2, 0.0, 80)
    longer.load_state_dict(state)
    assert longer.total_steps == 80 and longer.config == config and not longer.shortened
