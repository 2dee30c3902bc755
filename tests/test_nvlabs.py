"""Checkpoints of the paper's release, of any architecture its code builds.

The weights are random tensors laid out as the release stores them (REFERENCE.md section 3);
the expected predictions come from a transcription of the maths (sections 1 and 2) that
reads those tensors as stored: window convolutions as Conv3d over the window's states
stacked on a last axis (oldest first) or as Conv2d over them concatenated on channels, the
tensor train and the gates, ConvLSTM's one convolution of ``concat(x_t, h_{t-1})``, the skip
connections between blocks, the 1x1 output layer and its optional sigmoid.
"""

import pytest
import torch
import torch.nn.functional as F

from applications.conv_tt_lstm import cli
from applications.conv_tt_lstm.config import apply_overrides, preset
from applications.conv_tt_lstm.checkpoint import CheckpointError, load_checkpoint
from applications.conv_tt_lstm.inference import load_model
from applications.conv_tt_lstm.model import VideoPredictionNetwork, paper_config
from applications.conv_tt_lstm.nvlabs import load_nvlabs_checkpoint


def release_network(cell="convttlstm", image_channels=1, hidden=(4,), layers=(1,),
                    kernel=(3, 3), skip=None, order=2, steps=3, rank=2, conv3d=True,
                    bias=True, seed=0, scale=0.3):
    """A random state dict as the release saves it, and the description it was made from.

    The channel rules are the release's: block 0's first layer reads the image; block
    ``b > 0``'s first layer reads block ``b - 1``'s output, concatenated with block
    ``b - 1 - skip``'s when ``b - 1 >= skip``; the output layer likewise after the last block.
    """
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * scale

    def skipped(b):  # channels concatenated after block b
        return hidden[b - skip] if skip is not None and b >= skip else 0

    kh, kw = kernel
    window = steps - order + 1
    state = {}
    for b, (h, count) in enumerate(zip(hidden, layers)):
        for l in range(count):
            cin = h if l else (image_channels if b == 0 else hidden[b - 1] + skipped(b - 1))
            p = f"layers.b{b}l{l}."
            if cell == "convlstm":
                state[p + "conv.weight"] = rand(4 * h, cin + h, kh, kw)
                if bias:
                    state[p + "conv.bias"] = rand(4 * h)
                continue
            for i in range(order):
                cores_in, cores_out = (rank, rank) if i < order - 1 else (cin + rank, 4 * h)
                state[p + f"layers.{i}.weight"] = rand(cores_out, cores_in, kh, kw)
                shape = (rank, h, kh, kw, window) if conv3d else (rank, window * h, kh, kw)
                state[p + f"layers_.{i}.weight"] = rand(*shape)
                if bias:
                    state[p + f"layers.{i}.bias"] = rand(cores_out)
                    state[p + f"layers_.{i}.bias"] = rand(rank)
    last = len(hidden) - 1
    state["layers.output.weight"] = rand(image_channels, hidden[last] + skipped(last), 1, 1)
    state["layers.output.bias"] = rand(image_channels)
    description = dict(cell=cell, hidden=tuple(hidden), layers=tuple(layers), kernel=kernel,
                       skip=skip, order=order, steps=steps, window=window)
    return state, description


def release_predictions(state, net, frames, future, sigmoid=False):
    """The maths of REFERENCE.md sections 1-2 on the release's tensors, in float64."""
    state = {k: v.double() for k, v in state.items()}
    frames = frames.double()
    kh, kw = net["kernel"]
    pad = (kh // 2, kw // 2)
    batch, inputs = frames.shape[:2]
    size = frames.shape[3:]

    def conv(x, name, padding=pad):
        return F.conv2d(x, state[name + ".weight"], state.get(name + ".bias"), padding=padding)

    def window_conv(states, name):
        weight = state[name + ".weight"]
        if weight.dim() == 5:
            out = F.conv3d(torch.stack(states, -1), weight, state.get(name + ".bias"),
                           padding=(*pad, 0))
            return out.squeeze(-1)
        return conv(torch.cat(states, 1), name)

    cells = [(b, l) for b, count in enumerate(net["layers"]) for l in range(count)]
    memory = {key: net["steps"] if net["cell"] == "convttlstm" else 1 for key in cells}
    past = {(b, l): [torch.zeros(batch, net["hidden"][b], *size, dtype=torch.float64)]
            * memory[b, l] for b, l in cells}  # oldest first
    cell_state = {(b, l): torch.zeros(batch, net["hidden"][b], *size, dtype=torch.float64)
                  for b, l in cells}
    outputs = []
    for t in range(inputs + future - 1):
        x = frames[:, t] if t < inputs else outputs[-1]
        queue = []
        for b, count in enumerate(net["layers"]):
            for l in range(count):
                p = f"layers.b{b}l{l}."
                if net["cell"] == "convlstm":
                    gates = conv(torch.cat([x, past[b, l][-1]], 1), p + "conv")
                else:
                    order, window = net["order"], net["window"]
                    train = None
                    for i in range(order):  # core i + 1 sees past[i : i + window]
                        u = window_conv(past[b, l][i:i + window], p + f"layers_.{i}")
                        train = u if train is None else u + conv(train, p + f"layers.{i - 1}")
                    gates = conv(torch.cat([x, train], 1), p + f"layers.{order - 1}")
                i_, f_, o_, g_ = torch.split(gates, gates.shape[1] // 4, dim=1)
                c = torch.sigmoid(f_) * cell_state[b, l] + torch.sigmoid(i_) * torch.tanh(g_)
                x = torch.sigmoid(o_) * torch.tanh(c)
                cell_state[b, l] = c
                past[b, l] = past[b, l][1:] + [x]
            queue.append(x)
            if net["skip"] is not None and b >= net["skip"]:
                x = torch.cat([x, queue[b - net["skip"]]], 1)
        y = conv(x, "layers.output", padding=0)
        outputs.append(torch.sigmoid(y) if sigmoid else y)
    return torch.stack(outputs[-future:], 1)


def frames_like(batch, time, channels, size=(8, 8), seed=1):
    return torch.rand(batch, time, channels, *size, generator=torch.Generator().manual_seed(seed))


def assert_release_predictions(model, state, net, channels, sigmoid=False, future=3):
    frames = frames_like(2, 3, channels, size=(8, 7))
    with torch.no_grad():
        got = model(frames, future).double()
    expected = release_predictions(state, net, frames, future, sigmoid)
    relative = float((got - expected).norm() / expected.norm())
    assert relative < 1e-5, relative
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


ARCHITECTURES = {
    "tt-layers-2112-skip2-conv3d": dict(
        hidden=(3, 4, 5, 3), layers=(2, 1, 1, 2), skip=2, order=2, steps=3, rank=2),
    "tt-rgb-k5-noskip-conv2d-steps5": dict(
        image_channels=3, hidden=(4, 6), layers=(1, 3), kernel=(5, 5), order=3, steps=5,
        rank=3, conv3d=False),
    "tt-kernel-5x3-order1-nobias-skip1": dict(
        hidden=(3, 2), layers=(1, 2), kernel=(5, 3), skip=1, order=1, steps=2, rank=2,
        conv3d=False, bias=False),
    "tt-window1-skip3": dict(
        hidden=(2, 3, 4, 5), layers=(1, 1, 2, 1), skip=3, order=3, steps=3, rank=2),
    "convlstm-layers-213-skip1": dict(
        cell="convlstm", image_channels=2, hidden=(3, 4, 5), layers=(2, 1, 3), skip=1),
    "convlstm-kernel-3x5-one-block": dict(cell="convlstm", hidden=(4,), layers=(2,),
                                          kernel=(3, 5)),
    "convlstm-nobias-skip2-k5": dict(
        cell="convlstm", hidden=(2, 3, 3, 2), layers=(1, 2, 1, 1), kernel=(5, 5), skip=2,
        bias=False),
}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("wrapped", [False, True])
def test_release_checkpoint_of_any_architecture_gives_its_predictions(tmp_path, name, wrapped):
    options = ARCHITECTURES[name]
    sigmoid = wrapped  # half the cases were trained with an output sigmoid
    state, net = release_network(**options)
    channels = options.get("image_channels", 1)
    if wrapped:  # as saved from DistributedDataParallel, under "model_state_dict"
        path = tmp_path / "release.pt"
        torch.save({"model_state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
        model = load_nvlabs_checkpoint(path, output_sigmoid=True)
    else:
        model = load_nvlabs_checkpoint(state)
    config = model.config
    assert config.cell == net["cell"] and config.hidden_channels == net["hidden"]
    assert config.block_layers == net["layers"] and config.image_channels == channels
    assert config.skip_stride == (net["skip"] or 0) and config.output_sigmoid == sigmoid
    kernel = net["kernel"]
    assert config.kernel_size == (kernel[0] if kernel[0] == kernel[1] else kernel)
    if net["cell"] == "convttlstm":
        assert (config.order, config.steps, config.rank) == (
            net["order"], net["steps"], options["rank"])
    assert_release_predictions(model, state, net, channels, sigmoid)


def test_release_convlstm_paper_checkpoint():
    state, net = release_network("convlstm", hidden=(32, 48, 48, 32), layers=(3, 3, 3, 3),
                                 kernel=(5, 5), skip=2, scale=0.05)
    model = load_nvlabs_checkpoint(state)
    assert model.config == paper_config("convlstm")
    assert sum(p.numel() for p in model.parameters()) == 3_973_201
    frames = frames_like(1, 2, 1)
    with torch.no_grad():
        got = model(frames, 2).double()
    expected = release_predictions(state, net, frames, 2)
    assert float((got - expected).norm() / expected.norm()) < 1e-5


def test_converted_and_loaded_release_convlstm_checkpoints(tmp_path, capsys):
    state, net = release_network("convlstm", hidden=(3, 4), layers=(2, 1), skip=1)
    source, target = tmp_path / "release.pt", tmp_path / "ours.pt"
    torch.save({"model_state_dict": state}, source)
    assert cli.main(["convert-nvlabs", str(source), str(target), "--output-sigmoid"]) == 0
    assert "convlstm" in capsys.readouterr().out
    converted, _ = load_checkpoint(target)
    assert_release_predictions(converted, state, net, 1, sigmoid=True)
    loaded, info = load_model(source)
    assert info["layout"] == "release" and info["architecture"]["layers_per_block"] == [2, 1]
    assert_release_predictions(loaded, state, net, 1)


def test_networks_the_release_cannot_express_here_are_named():
    state, _ = release_network(hidden=(3, 4), layers=(1, 1))
    # The release's skip_stride=0 concatenates every block's output with itself.
    doubled = dict(state)
    doubled["layers.b1l0.layers.1.weight"] = torch.zeros(16, 6 + 2, 3, 3)
    doubled["layers.output.weight"] = torch.zeros(1, 8, 1, 1)
    with pytest.raises(CheckpointError, match="skip_stride=0 concatenates"):
        load_nvlabs_checkpoint(doubled)
    # One cell type per network: a ConvLSTM cell among Conv-TT-LSTM cells fits none.
    mixed = {k: v for k, v in state.items() if not k.startswith("layers.b1l0.")}
    mixed["layers.b1l0.conv.weight"] = torch.zeros(16, 3 + 4, 3, 3)
    mixed["layers.b1l0.conv.bias"] = torch.zeros(16)
    with pytest.raises(CheckpointError, match="cells disagree on cell"):
        load_nvlabs_checkpoint(mixed)
    # A gap in a block's layers.
    gap = dict(state)
    for key in [k for k in state if k.startswith("layers.b0l0.")]:
        gap[key.replace("b0l0", "b0l2")] = gap.pop(key)
    with pytest.raises(CheckpointError, match=r"missing cell layers\.b0l0"):
        load_nvlabs_checkpoint(gap)
    with pytest.raises(CheckpointError, match=r"layers_per_block=\(2, 2\) \(checkpoint: 1\)"):
        load_nvlabs_checkpoint(state, layers_per_block=(2, 2))
    assert load_nvlabs_checkpoint(state, layers_per_block=(1, 1)).config.layers_per_block == 1


def test_per_block_layer_counts_of_our_network():
    config = paper_config(layers_per_block=(2, 1, 1, 2))
    with torch.device("meta"):
        model = VideoPredictionNetwork(config)
    assert [len(block) for block in model.blocks] == [2, 1, 1, 2]
    assert config.to_dict()["layers_per_block"] == [2, 1, 1, 2]
    assert paper_config(layers_per_block=(3, 3, 3, 3)) == paper_config()
    with pytest.raises(ValueError, match="one count per block"):
        paper_config(layers_per_block=(2, 1))
    assert config.block_layers == (2, 1, 1, 2) and paper_config().block_layers == (3, 3, 3, 3)
    overridden = apply_overrides(preset("paper"), ["model.layers_per_block=2,1,1,2"])
    assert overridden.model == config
