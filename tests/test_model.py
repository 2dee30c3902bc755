"""The stacked video-prediction network, its checkpoints and the release's checkpoints."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from applications.conv_tt_lstm import cli
from applications.conv_tt_lstm.complexity import measure_complexity
from applications.conv_tt_lstm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from applications.conv_tt_lstm.model import ArchitectureConfig, VideoPredictionNetwork, paper_config
from applications.conv_tt_lstm.nvlabs import load_nvlabs_checkpoint

SMALL = dict(image_channels=1, hidden_channels=(3, 4, 5), layers_per_block=2, skip_stride=1,
             kernel_size=3, order=2, steps=3, rank=2)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def randomize_(model, scale=0.3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * scale)
    return model


def frames_like(batch, time, channels=1, size=(8, 8), seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, time, channels, *size, generator=generator)


# ---------------------------------------------------------------------------- architecture


@pytest.mark.parametrize("cell,changes,expected", [
    ("convlstm", {}, 3_973_201),
    ("convttlstm", {}, 2_687_281),
    ("hoconvlstm", {}, 7_966_801),
    ("convttlstm", {"steps": 5}, 3_263_281),
    ("hoconvlstm", {"steps": 5}, 11_960_401),
])
def test_paper_parameter_counts(cell, changes, expected):
    with torch.device("meta"):
        model = VideoPredictionNetwork(paper_config(cell, **changes))
    assert n_params(model) == expected


def test_paper_skip_connections_feed_80_channels():
    config = paper_config()
    # block 3's first layer reads concat(out2, out0); the output layer concat(out3, out1)
    assert config.block_input_channels() == [1, 32, 48, 80, 80]
    with torch.device("meta"):
        model = VideoPredictionNetwork(config)
    assert model.blocks[3][0].in_channels == 80
    assert model.output.weight.shape == (1, 80, 1, 1)


def test_config_round_trips_through_json():
    config = paper_config("hoconvlstm", steps=5, patch_size=2, output_sigmoid=True)
    assert ArchitectureConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown architecture field"):
        ArchitectureConfig.from_dict({"cells": "convlstm"})
    with pytest.raises(ValueError, match="cell must be one of"):
        ArchitectureConfig(cell="gru")
    with pytest.raises(ValueError, match="steps must be >= order"):
        ArchitectureConfig(order=3, steps=2)


# ---------------------------------------------------------------------------- rollout


def reference_rollout(model, frames, future, teacher_forcing=False, ratio=1.0, generator=None):
    """Every step's output, by the rules of REFERENCE.md section 2, cells as black boxes."""
    config = model.config
    blocks, skip = config.blocks, config.skip_stride
    time = frames.shape[1]
    inputs = time - future if teacher_forcing else time
    states = {}
    outputs = []
    for t in range(inputs + future - 1):
        if t < inputs:
            x = frames[:, t]
        elif teacher_forcing and 0 < ratio < 1:
            use_truth = torch.rand(frames.shape[0], generator=generator) < ratio
            x = torch.where(use_truth.view(-1, 1, 1, 1), frames[:, t], outputs[-1])
        elif teacher_forcing and ratio == 1:
            x = frames[:, t]
        else:
            x = outputs[-1]
        block_out = []
        for b in range(blocks):
            if b > 0:
                x = block_out[b - 1]
                if skip and b - 1 >= skip:
                    x = torch.cat([x, block_out[b - 1 - skip]], 1)
            for l, cell in enumerate(model.blocks[b]):
                x, states[b, l] = cell(x, states.get((b, l)))
            block_out.append(x)
        top = block_out[-1]
        if skip and blocks - 1 >= skip:
            top = torch.cat([top, block_out[blocks - 1 - skip]], 1)
        y = F.conv2d(top, model.output.weight, model.output.bias)
        outputs.append(torch.sigmoid(y) if config.output_sigmoid else y)
    return torch.stack(outputs, 1)


@pytest.mark.parametrize("cell", ["convlstm", "hoconvlstm", "convttlstm"])
def test_rollout_follows_the_paper(cell):
    torch.manual_seed(0)
    model = randomize_(VideoPredictionNetwork(ArchitectureConfig(cell=cell, **SMALL)))
    frames = frames_like(2, 4)
    expected = reference_rollout(model, frames, future=3)
    got = model(frames, 3, all_outputs=True)
    assert got.shape == (2, 6, 1, 8, 8)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # At evaluation the future predictions come after the inputs.
    torch.testing.assert_close(model(frames, 3), expected[:, -3:], rtol=1e-4, atol=1e-5)


def test_teacher_forcing_and_scheduled_sampling_per_sample():
    model = randomize_(VideoPredictionNetwork(ArchitectureConfig(cell="convttlstm", **SMALL)))
    frames = frames_like(6, 7)  # 3 inputs + 4 future ground-truth frames
    tf = reference_rollout(model, frames, 4, teacher_forcing=True, ratio=1.0)
    torch.testing.assert_close(
        model(frames, 4, teacher_forcing=True, all_outputs=True), tf, rtol=1e-4, atol=1e-5)
    free = reference_rollout(model, frames[:, :3], 4)
    torch.testing.assert_close(
        model(frames, 4, teacher_forcing=True, sampling_ratio=0.0, all_outputs=True), free,
        rtol=1e-4, atol=1e-5)
    mixed_ref = reference_rollout(model, frames, 4, teacher_forcing=True, ratio=0.5,
                                  generator=torch.Generator().manual_seed(3))
    mixed = model(frames, 4, teacher_forcing=True, sampling_ratio=0.5, all_outputs=True,
                  generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(mixed, mixed_ref, rtol=1e-4, atol=1e-5)
    # Per sample: some samples followed the ground truth, others their own predictions.
    last = mixed[:, -1]
    differs_from_tf = (last - tf[:, -1]).flatten(1).abs().amax(1) > 1e-6
    differs_from_free = (last - free[:, -1]).flatten(1).abs().amax(1) > 1e-6
    assert differs_from_tf.any() and differs_from_free.any()


def test_patch_size_folds_pixels_into_channels():
    folded = ArchitectureConfig(cell="convttlstm", **{**SMALL, "patch_size": 2})
    plain = ArchitectureConfig(cell="convttlstm", **{**SMALL, "image_channels": 4})
    a = randomize_(VideoPredictionNetwork(folded))
    b = VideoPredictionNetwork(plain)
    b.load_state_dict(a.state_dict())
    frames = frames_like(2, 3, size=(8, 6))
    inner = F.pixel_unshuffle(frames.flatten(0, 1), 2).unflatten(0, (2, 3))
    expected = F.pixel_shuffle(b(inner, 2).flatten(0, 1), 2).unflatten(0, (2, 2))
    torch.testing.assert_close(a(frames, 2), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="divisible by patch_size=2"):
        a(frames_like(1, 2, size=(7, 8)), 1)


@pytest.mark.parametrize("cell", ["convlstm", "hoconvlstm", "convttlstm"])
def test_channels_last_changes_nothing_but_speed(cell):
    config = ArchitectureConfig(cell=cell, output_sigmoid=True, **SMALL)
    a = randomize_(VideoPredictionNetwork(config, channels_last=True))
    b = VideoPredictionNetwork(config, channels_last=False)
    b.load_state_dict(a.state_dict())
    frames = frames_like(2, 3)
    torch.testing.assert_close(a(frames, 2), b(frames, 2), rtol=1e-5, atol=1e-6)


def test_bad_rollout_arguments_are_named():
    model = VideoPredictionNetwork(ArchitectureConfig(**SMALL))
    with pytest.raises(ValueError, match="frames must be"):
        model(torch.rand(2, 1, 8, 8), 1)
    with pytest.raises(ValueError, match="1 channel"):
        model(torch.rand(2, 3, 2, 8, 8), 1)
    with pytest.raises(ValueError, match="future_frames must be"):
        model(torch.rand(2, 3, 1, 8, 8), 0)
    with pytest.raises(ValueError, match="time > future_frames"):
        model(torch.rand(2, 3, 1, 8, 8), 3, teacher_forcing=True)
    with pytest.raises(ValueError, match="sampling_ratio"):
        model(torch.rand(2, 3, 1, 8, 8), 1, teacher_forcing=True, sampling_ratio=1.5)


def test_distributed_data_parallel_gives_the_plain_gradients(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    config = ArchitectureConfig(cell="convttlstm", **SMALL)
    plain = randomize_(VideoPredictionNetwork(config))
    wrapped_model = VideoPredictionNetwork(config)
    wrapped_model.load_state_dict(plain.state_dict())
    frames = frames_like(2, 4)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        ddp = DistributedDataParallel(wrapped_model)
        ddp(frames, 2, teacher_forcing=True, all_outputs=True).square().mean().backward()
    finally:
        dist.destroy_process_group()
    plain(frames, 2, teacher_forcing=True, all_outputs=True).square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), wrapped_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


# ---------------------------------------------------------------------------- our checkpoints


def test_checkpoint_round_trip(tmp_path):
    model = randomize_(VideoPredictionNetwork(ArchitectureConfig(cell="hoconvlstm", **SMALL)))
    path = tmp_path / "sub" / "model.pt"
    save_checkpoint(path, model, epoch=7)
    assert sorted(os.listdir(path.parent)) == ["model.pt"]  # no temporary file left behind
    loaded, checkpoint = load_checkpoint(path)
    assert loaded.config == model.config and checkpoint["epoch"] == 7
    frames = frames_like(1, 3)
    torch.testing.assert_close(loaded(frames, 2), model(frames, 2))


def test_checkpoint_errors_name_the_problem(tmp_path):
    model = VideoPredictionNetwork(ArchitectureConfig(**SMALL))
    good = torch.load(_save(tmp_path, model), weights_only=True)
    with pytest.raises(CheckpointError, match="not a tt-conv checkpoint.*convert-nvlabs"):
        load_checkpoint({"model_state_dict": {}})
    broken = dict(good, state_dict=dict(good["state_dict"]))
    del broken["state_dict"]["output.bias"]
    broken["state_dict"]["blocks.0.0.tt.core_bias"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(broken)
    assert "missing keys: output.bias" in str(info.value)
    assert "blocks.0.0.tt.core_bias: expected shape (2,), got (3, 3)" in str(info.value)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nothing.pt")


def _save(tmp_path, model):
    path = tmp_path / "ours.pt"
    save_checkpoint(path, model)
    return path


# ---------------------------------------------------------------------------- release layout


def release_state_dict(config, conv3d=True, seed=0, scale=0.3):
    """Random weights in the public release's layout (REFERENCE.md section 3)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * scale

    k, rank, order = config.kernel_size, config.rank, config.order
    window = config.steps - order + 1
    inputs = config.block_input_channels()
    state = {}
    for b, hidden in enumerate(config.hidden_channels):
        for l in range(config.layers_per_block):
            cin = inputs[b] if l == 0 else hidden
            prefix = f"layers.b{b}l{l}."
            for i in range(order - 1):
                state[f"{prefix}layers.{i}.weight"] = rand(rank, rank, k, k)
                state[f"{prefix}layers.{i}.bias"] = rand(rank)
            state[f"{prefix}layers.{order - 1}.weight"] = rand(4 * hidden, cin + rank, k, k)
            state[f"{prefix}layers.{order - 1}.bias"] = rand(4 * hidden)
            for i in range(order):
                shape = (rank, hidden, k, k, window) if conv3d else (rank, window * hidden, k, k)
                state[f"{prefix}layers_.{i}.weight"] = rand(*shape)
                state[f"{prefix}layers_.{i}.bias"] = rand(rank)
    state["layers.output.weight"] = rand(config.image_channels, inputs[-1], 1, 1)
    state["layers.output.bias"] = rand(config.image_channels)
    return state


def release_predictions(state, config, frames, future):
    """The release's maths on its own weight layout: a transcription independent of ours.

    Window convolutions run as stored: Conv3d over the window's states stacked on a last
    axis (oldest first), or Conv2d over them concatenated on channels.
    """
    k, order, steps = config.kernel_size, config.order, config.steps
    window, pad = steps - order + 1, config.kernel_size // 2
    skip, blocks, layers = config.skip_stride, config.blocks, config.layers_per_block
    batch, inputs = frames.shape[0], frames.shape[1]
    size = frames.shape[3:]
    buffers = {(b, l): [torch.zeros(batch, h, *size)] * steps
               for b, h in enumerate(config.hidden_channels) for l in range(layers)}
    cells = {key: torch.zeros(batch, config.hidden_channels[key[0]], *size) for key in buffers}
    outputs = []
    for t in range(inputs + future - 1):
        x = frames[:, t] if t < inputs else outputs[-1]
        queue = []
        for b in range(blocks):
            for l in range(layers):
                p = f"layers.b{b}l{l}."
                past = buffers[b, l]
                train = None
                for i in range(order):
                    w, bias = state[f"{p}layers_.{i}.weight"], state[f"{p}layers_.{i}.bias"]
                    states = past[i:i + window]
                    if w.dim() == 5:
                        u = F.conv3d(torch.stack(states, -1), w, bias,
                                     padding=(pad, pad, 0)).squeeze(-1)
                    else:
                        u = F.conv2d(torch.cat(states, 1), w, bias, padding=pad)
                    if train is None:
                        train = u
                    else:
                        train = u + F.conv2d(train, state[f"{p}layers.{i - 1}.weight"],
                                             state[f"{p}layers.{i - 1}.bias"], padding=pad)
                gates = F.conv2d(torch.cat([x, train], 1), state[f"{p}layers.{order - 1}.weight"],
                                 state[f"{p}layers.{order - 1}.bias"], padding=pad)
                i_, f_, o_, g_ = torch.split(gates, gates.shape[1] // 4, dim=1)
                c = torch.sigmoid(f_) * cells[b, l] + torch.sigmoid(i_) * torch.tanh(g_)
                x = torch.sigmoid(o_) * torch.tanh(c)
                cells[b, l] = c
                buffers[b, l] = past[1:] + [x]
            queue.append(x)
            if skip and b >= skip:
                x = torch.cat([x, queue[b - skip]], 1)
        outputs.append(F.conv2d(x, state["layers.output.weight"], state["layers.output.bias"]))
    return torch.stack(outputs[-future:], 1)


@pytest.mark.parametrize("order,steps,conv3d", [
    (2, 3, True), (2, 3, False), (1, 2, True), (3, 3, False), (2, 4, True)])
def test_release_checkpoint_gives_the_release_predictions(tmp_path, order, steps, conv3d):
    config = ArchitectureConfig(**{**SMALL, "order": order, "steps": steps})
    state = release_state_dict(config, conv3d=conv3d)
    path = tmp_path / "release.pt"
    # As saved from DistributedDataParallel: wrapped, keys prefixed with "module.".
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    model = load_nvlabs_checkpoint(path)
    assert model.config == config
    frames = frames_like(2, 3)
    torch.testing.assert_close(model(frames, 3), release_predictions(state, config, frames, 3),
                               rtol=1e-4, atol=1e-5)


def test_release_paper_checkpoint_layout():
    config = paper_config()
    state = release_state_dict(config, scale=0.05)
    model = load_nvlabs_checkpoint(state)  # a bare state dict works too
    assert model.config == config and n_params(model) == 2_687_281
    frames = frames_like(1, 2, size=(8, 8))
    torch.testing.assert_close(model(frames, 2), release_predictions(state, config, frames, 2),
                               rtol=1e-4, atol=1e-5)


def test_bad_release_checkpoints_list_what_did_not_match():
    config = ArchitectureConfig(**SMALL)
    state = release_state_dict(config)
    missing = dict(state)
    del missing["layers.b1l0.layers_.1.bias"]
    del missing["layers.output.bias"]
    missing["layers.b9.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        load_nvlabs_checkpoint(missing)
    message = str(info.value)
    assert "unexpected key 'layers.b9.extra'" in message
    assert "missing key 'layers.output.bias'" in message

    missing = dict(state)
    del missing["layers.b1l0.layers_.1.bias"]
    with pytest.raises(CheckpointError, match=r"missing key layers\.b1l0\.layers_\.1\.bias"):
        load_nvlabs_checkpoint(missing)

    misshapen = dict(state)
    misshapen["layers.b0l1.layers.0.weight"] = torch.zeros(2, 2, 5, 5)
    misshapen["layers.b2l0.layers_.0.weight"] = torch.zeros(2, 7, 3, 3)
    with pytest.raises(CheckpointError) as info:
        load_nvlabs_checkpoint(misshapen)
    assert "layers.b0l1.layers.0.weight: expected shape (2, 2, 3, 3), got (2, 2, 5, 5)" \
        in str(info.value)
    assert "layers.b2l0.layers_.0.weight must be [R, H, k, k, L]" in str(info.value)

    with pytest.raises(CheckpointError, match="skip_stride=2 does not fit"):
        load_nvlabs_checkpoint(state, skip_stride=2)
    with pytest.raises(CheckpointError, match=r"rank=4 \(checkpoint: 2\)"):
        load_nvlabs_checkpoint(state, rank=4)
    assert load_nvlabs_checkpoint(state, output_sigmoid=True).config.output_sigmoid


# ---------------------------------------------------------------------------- commands


def test_convert_nvlabs_command(tmp_path, capsys):
    config = ArchitectureConfig(**SMALL)
    state = release_state_dict(config)
    source, target = tmp_path / "release.pt", tmp_path / "ours.pt"
    torch.save({"model_state_dict": state}, source)
    assert cli.main(["convert-nvlabs", str(source), str(target)]) == 0
    model, checkpoint = load_checkpoint(target)
    frames = frames_like(1, 3)
    torch.testing.assert_close(model(frames, 2), release_predictions(state, config, frames, 2),
                               rtol=1e-4, atol=1e-5)
    assert cli.main(["convert-nvlabs", str(source), str(target)]) == 2  # no silent overwrite
    torch.save({"model_state_dict": {"layers.output.weight": torch.zeros(1, 3, 1, 1)}}, source)
    assert cli.main(["convert-nvlabs", str(source), str(tmp_path / "x.pt"), "--force"]) == 2
    assert "missing key 'layers.output.bias'" in capsys.readouterr().err
    # Our own format is named as such, not as a release file with a stray entry.
    assert cli.main(["convert-nvlabs", str(target), str(tmp_path / "y.pt")]) == 2
    assert "is already a tt-conv checkpoint" in capsys.readouterr().err


def expected_flops(config, size, steps):
    """Forward FLOPs of one sample and sequence from the maths (2 per multiply-add).

    Conv-TT-LSTM also propagates its biases through the inner cores once per sequence
    (its stream at t = 0, one sample): (order - 1) rank x rank convolutions per cell.
    """
    k2, pixels = config.kernel_size ** 2, size[0] * size[1]
    inputs = config.block_input_channels()
    window = config.steps - config.order + 1
    macs = 0
    if config.cell == "convttlstm":
        cells = config.blocks * config.layers_per_block
        macs += cells * (config.order - 1) * config.rank ** 2 * k2 / steps
    for b, hidden in enumerate(config.hidden_channels):
        for l in range(config.layers_per_block):
            cin = inputs[b] if l == 0 else hidden
            if config.cell == "convlstm":
                macs += 4 * hidden * (cin + hidden) * k2
            elif config.cell == "hoconvlstm":
                macs += 4 * hidden * (cin + config.steps * hidden) * k2
            else:
                macs += 4 * hidden * (cin + config.rank) * k2                 # gates
                macs += config.order * window * config.rank * hidden * k2     # windows
                macs += (config.order - 1) * config.rank ** 2 * k2           # cores
    macs += inputs[-1] * config.image_channels
    return round(2 * macs * pixels * steps)


@pytest.mark.parametrize("cell", ["convlstm", "hoconvlstm", "convttlstm"])
def test_flop_counts_follow_the_maths(cell):
    config = ArchitectureConfig(cell=cell, **SMALL)
    result = measure_complexity(config, input_frames=3, future_frames=2, height=8, width=6,
                                backward=False)
    assert result.steps == 4
    assert result.forward_flops == expected_flops(config, (8, 6), 4)
    # The meta device counts what a real run counts.
    real = measure_complexity(config, input_frames=3, future_frames=2, height=8, width=6,
                              device="cpu")
    assert real.forward_flops == result.forward_flops
    assert real.training_flops > 2 * real.forward_flops


def test_compare_command_paper_defaults(tmp_path, capsys):
    path = tmp_path / "compare.json"
    # Three steps instead of 19 keep the test fast: counts scale with the steps.
    assert cli.main(["compare", "--json", str(path), "--no-backward", "--input-frames", "2",
                     "--future-frames", "2"]) == 0
    table = capsys.readouterr().out
    assert "| Conv-TT-LSTM | 2,687,281 |" in table
    assert "| full higher-order ConvLSTM | 7,966,801 |" in table
    payload = json.loads(path.read_text())
    results = {r["cell"]: r for r in payload["results"]}
    config = paper_config()
    for cell in ("convlstm", "hoconvlstm", "convttlstm"):
        assert results[cell]["forward_flops"] == expected_flops(
            config.replace(cell=cell), (64, 64), 3)
    assert payload["reductions_vs_convttlstm"]["hoconvlstm"]["parameters"] == \
        pytest.approx(7_966_801 / 2_687_281)
    assert cli.main(["compare", "--steps", "2", "--order", "3"]) == 2
    assert "steps must be >= order" in capsys.readouterr().err
