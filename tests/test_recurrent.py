"""ConvTT and the three recurrent cells against loop-by-loop transcriptions of the maths.

The references below follow REFERENCE.md section 1 literally: raw past hidden states in a
buffer, one convolution per window slot, the tensor-train recursion, then the LSTM gates.
The cells under test instead cache projections and fuse convolutions, so agreement in
float64 checks that those rewrites are exact.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import tt_conv
from tt_conv import ConvLSTMCell, ConvTT, ConvTTLSTMCell, HigherOrderConvLSTMCell, LSTMState

CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
SPATIAL = {1: (7,), 2: (5, 6), 3: (3, 4, 5)}
KERNELS = {1: (3,), 2: (3, 3), 3: (3, 1, 3)}


def conv(x, weight, bias=None):
    pad = [k // 2 for k in weight.shape[2:]]
    return CONVS[weight.dim() - 2](x, weight, bias, padding=pad)


def lstm_reference(gates, c):
    hidden = c.shape[1]
    i = gates[:, 0 * hidden:1 * hidden]
    f = gates[:, 1 * hidden:2 * hidden]
    o = gates[:, 2 * hidden:3 * hidden]
    g = gates[:, 3 * hidden:4 * hidden]
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def tt_reference(tt, past):
    """T_P of ConvTT from raw states ``past`` (oldest first), one conv per window slot."""
    order, steps, rank = tt.order, tt.steps, tt.rank
    window = steps - order + 1
    kernel = tuple(tt.window_weight.shape[2:])
    # The documented parameter layouts: window kernels in blocks (d, core) with
    # d = window - 1 - j; inner cores stacked along the output channels.
    w = tt.window_weight.view(window, order, rank, tt.in_channels, *kernel)
    b = tt.window_bias.view(order, rank)
    k = tt.core_weight.view(order - 1, rank, rank, *kernel)
    kb = tt.core_bias.view(order - 1, rank)
    shape = (1, rank) + (1,) * (past[0].dim() - 2)
    train = None
    for l in range(1, order + 1):  # cores numbered from 1 as in the paper
        # core l's window is h_{t-N+l-1} .. h_{t-N+l+L-2}; past[0] is h_{t-N}
        u = b[l - 1].view(shape)
        for j in range(window):
            u = u + conv(past[l - 1 + j], w[window - 1 - j, l - 1])
        if l == 1:
            train = u
        else:
            train = u + conv(train, k[l - 2], kb[l - 2])
    return train


def convtt_lstm_reference(cell, xs):
    """Hidden states of a ConvTTLSTMCell over inputs ``xs``, by the maths of section 1."""
    batch, spatial = xs[0].shape[0], xs[0].shape[2:]
    zeros = xs[0].new_zeros((batch, cell.hidden_channels, *spatial))
    past = [zeros] * cell.steps
    c, hs = zeros, []
    for x in xs:
        train = tt_reference(cell.tt, past)
        gates = conv(torch.cat([x, train], 1), cell.tt.output_weight, cell.tt.output_bias)
        h, c = lstm_reference(gates, c)
        past = past[1:] + [h]
        hs.append(h)
    return hs


def higher_order_reference(cell, xs):
    """Full higher-order ConvLSTM: one kernel block per past state, summed."""
    batch, spatial = xs[0].shape[0], xs[0].shape[2:]
    hidden, cin = cell.hidden_channels, cell.in_channels
    zeros = xs[0].new_zeros((batch, hidden, *spatial))
    past = [zeros] * cell.steps  # h_{t-N} .. h_{t-1}
    c, hs = zeros, []
    for x in xs:
        gates = conv(x, cell.weight[:, :cin], cell.bias)
        for j in range(1, cell.steps + 1):  # h_{t-j} meets kernel block j
            block = cell.weight[:, cin + (j - 1) * hidden:cin + j * hidden]
            gates = gates + conv(past[-j], block)
        h, c = lstm_reference(gates, c)
        past = past[1:] + [h]
        hs.append(h)
    return hs


def rollout(cell, xs, state=None):
    hs = []
    for x in xs:
        h, state = cell(x, state)
        hs.append(h)
    return hs, state


def randomize_(module, scale=0.4):
    """Large random weights, so every term of the maths matters in the comparison."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, scale)
    return module


def inputs(n_dim, steps, batch=2, channels=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, *SPATIAL[n_dim], generator=generator,
                        dtype=torch.float64) for _ in range(steps)]


ORDER_STEPS = [(p, n) for p in range(1, 5) for n in range(p, 6)]


@pytest.mark.parametrize("order,steps", ORDER_STEPS)
def test_convtt_lstm_cell_matches_the_maths(order, steps):
    torch.manual_seed(order * 10 + steps)
    cell = randomize_(ConvTTLSTMCell(2, 3, 3, order, steps, rank=2, dtype=torch.float64))
    xs = inputs(2, steps + 3)
    got, _ = rollout(cell, xs)
    for t, (a, b) in enumerate(zip(got, convtt_lstm_reference(cell, xs))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"step {t}")


@pytest.mark.parametrize("n_dim", [1, 2, 3])
@pytest.mark.parametrize("order,steps", [(1, 2), (2, 4), (3, 3)])
def test_convtt_lstm_cell_every_spatial_rank(n_dim, order, steps):
    torch.manual_seed(n_dim)
    cell = randomize_(ConvTTLSTMCell(2, 3, KERNELS[n_dim], order, steps, rank=2,
                                     dtype=torch.float64))
    assert cell.n_dim == n_dim
    xs = inputs(n_dim, steps + 2)
    got, _ = rollout(cell, xs)
    for a, b in zip(got, convtt_lstm_reference(cell, xs)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n_dim", [1, 2, 3])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_higher_order_cell_matches_the_maths(n_dim, steps):
    torch.manual_seed(steps)
    cell = randomize_(HigherOrderConvLSTMCell(2, 3, KERNELS[n_dim], steps,
                                              dtype=torch.float64))
    xs = inputs(n_dim, steps + 2)
    got, _ = rollout(cell, xs)
    for a, b in zip(got, higher_order_reference(cell, xs)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n_dim", [1, 2, 3])
def test_convlstm_cell_matches_the_classic_equations(n_dim):
    torch.manual_seed(1)
    cell = randomize_(ConvLSTMCell(2, 3, KERNELS[n_dim], dtype=torch.float64))
    xs = inputs(n_dim, 4)
    w_x, w_h = cell.weight[:, :2], cell.weight[:, 2:]
    h = xs[0].new_zeros((2, 3, *SPATIAL[n_dim]))
    c = h
    got, _ = rollout(cell, xs)
    for x, out in zip(xs, got):
        gates = conv(x, w_x, cell.bias) + conv(h, w_h)
        h, c = lstm_reference(gates, c)
        torch.testing.assert_close(out, h, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("order,steps", [(1, 1), (2, 3), (3, 5)])
def test_convtt_module_on_its_own(order, steps):
    torch.manual_seed(0)
    tt = randomize_(ConvTT(3, 5, order, steps, rank=2, kernel_size=3, dtype=torch.float64))
    states = inputs(2, steps, channels=3)
    expected = conv(tt_reference(tt, states), tt.output_weight, tt.output_bias)
    torch.testing.assert_close(tt(states), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tt(torch.stack(states, 1)), expected, rtol=1e-10, atol=1e-12)
    # With an extra input read by the last core beside T_P.
    tt_x = randomize_(ConvTT(3, 5, order, steps, rank=2, kernel_size=3, input_channels=2,
                             dtype=torch.float64))
    x = inputs(2, 1, channels=2, seed=1)[0]
    expected = conv(torch.cat([x, tt_reference(tt_x, states)], 1), tt_x.output_weight,
                    tt_x.output_bias)
    torch.testing.assert_close(tt_x(states, x), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("order,steps", [(1, 1), (1, 3), (2, 2), (2, 4), (3, 5)])
def test_convtt_stream_equals_the_module_on_the_last_states(order, steps):
    torch.manual_seed(0)
    tt = randomize_(ConvTT(3, 4, order, steps, rank=2, kernel_size=3, dtype=torch.float64))
    states = inputs(2, steps + 2, channels=3)
    stream = tt.initial_stream(states[0])
    zeros = [torch.zeros_like(states[0])] * steps
    for t, state in enumerate(states):
        window = (zeros + states[:t])[-steps:]  # the last `steps` states, zeros before t=0
        torch.testing.assert_close(tt.stream_output(stream), tt(window), rtol=1e-10,
                                   atol=1e-12, msg=f"step {t}")
        stream = tt.stream_update(stream, state)


def test_convtt_parameter_count_matches_its_formula():
    cin, cout, order, steps, rank, k, extra = 6, 10, 3, 5, 4, 3, 2
    tt = ConvTT(cin, cout, order, steps, rank, k, input_channels=extra)
    window = steps - order + 1
    expected = (order * (rank * cin * k * k * window + rank)
                + (order - 1) * (rank * rank * k * k + rank)
                + cout * (extra + rank) * k * k + cout)
    assert sum(p.numel() for p in tt.parameters()) == expected
    assert tt.projection_channels == order * window * rank


@pytest.mark.parametrize("channels_last", [False, True])
def test_lstm_update_and_its_gradient_equal_the_gate_equations(channels_last):
    torch.manual_seed(0)
    gates = torch.randn(2, 12, 4, 5, dtype=torch.float64)
    c = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    if channels_last:
        gates = gates.contiguous(memory_format=torch.channels_last)
        c = c.contiguous(memory_format=torch.channels_last)
    gates.requires_grad_()
    c.requires_grad_()
    got, want = tt_conv.lstm_update(gates, c), lstm_reference(gates, c)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    # The hand-written backward against autograd through the reference.
    weights = [torch.randn_like(t) for t in want]
    grads = [torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, out)), (gates, c))
             for out in (got, want)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(tt_conv.lstm_update, (gates, c))


@pytest.mark.parametrize("n_dim", [2, 3])
def test_channels_last_state_gives_the_same_outputs(n_dim):
    torch.manual_seed(0)
    cell = randomize_(ConvTTLSTMCell(4, 5, KERNELS[n_dim], 2, 3, 2))
    xs = [x.float() for x in inputs(n_dim, 4, channels=4)]
    state = cell.initial_state(xs[0], channels_last=True)
    assert state.cell.stride(1) == 1
    fmt = torch.channels_last if n_dim == 2 else torch.channels_last_3d
    got, _ = rollout(cell, [x.contiguous(memory_format=fmt) for x in xs], state)
    want, _ = rollout(cell, xs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_initial_state_is_shaped_for_the_input():
    cell = ConvTTLSTMCell(2, 3, 3, 2, 4, rank=5)
    x = torch.randn(7, 2, 6, 8)
    state = cell.initial_state(x)
    assert isinstance(state, LSTMState)
    assert state.cell.shape == (7, 3, 6, 8) and float(state.cell.abs().sum()) == 0.0
    # The tensor-train stream of all-zero past states: T_P, the inner cores' values and
    # window - 1 = 2 partial window sums.
    assert [m.shape for m in state.memory] == [(7, 5, 6, 8), (7, 5, 6, 8)] + [(7, 10, 6, 8)] * 2
    from_shape = cell.initial_state((7, 2, 6, 8), dtype=torch.float64)
    assert from_shape.cell.shape == (7, 3, 6, 8) and from_shape.cell.dtype == torch.float64
    assert [m.shape for m in from_shape.memory] == [m.shape for m in state.memory]
    ho = HigherOrderConvLSTMCell(2, 3, 3, steps=4).initial_state(x)
    assert [m.shape for m in ho.memory] == [(7, 3, 6, 8)] * 4
    assert all(float(m.abs().sum()) == 0.0 for m in ho.memory)
    # state=None means the initial state.
    h1, s1 = cell(x)
    h2, s2 = cell(x, state)
    torch.testing.assert_close(h1, h2)


def _cells(n_dim=2):
    k = KERNELS[n_dim]
    return [ConvLSTMCell(2, 3, k), HigherOrderConvLSTMCell(2, 3, k, 3),
            ConvTTLSTMCell(2, 3, k, 2, 3, 2)]


def checkpointing_gradients(cell, xs, **tolerance):
    """Assert that per-step activation checkpointing gives the plain gradients."""
    def loss(use_checkpoint):
        state = None
        total = 0
        for x in xs:
            if use_checkpoint:
                h, state = checkpoint(cell, x, state, use_reentrant=False)
            else:
                h, state = cell(x, state)
            total = total + h.square().sum()
        return total

    want = torch.autograd.grad(loss(False), [*cell.parameters(), *xs])
    got = torch.autograd.grad(loss(True), [*cell.parameters(), *xs])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tolerance)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_activation_checkpointing_gives_the_same_gradients(index):
    torch.manual_seed(0)
    cell = _cells()[index]
    checkpointing_gradients(cell, [x.float().requires_grad_() for x in inputs(2, 4)])


@pytest.mark.parametrize("index", [0, 1, 2])
def test_torch_compile_traces_the_cell_without_graph_breaks(index):
    torch.manual_seed(0)
    cell = _cells()[index]
    torch._dynamo.reset()
    # aot_eager traces forward and backward like inductor but skips code generation, so
    # it checks compatibility (fullgraph: no graph breaks) in a second.
    compiled = torch.compile(cell, backend="aot_eager", fullgraph=True)
    xs = [x.float() for x in inputs(2, 3)]
    want, state_want = rollout(cell, xs)
    got, state_got = rollout(compiled, xs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    sum(h.sum() for h in got).backward()
    assert all(p.grad is not None for p in cell.parameters())


def test_bf16_autocast_runs_and_stays_close():
    torch.manual_seed(0)
    cell = ConvTTLSTMCell(4, 8, 3, 3, 3, 4)
    xs = [x.float() for x in inputs(2, 4, channels=4)]
    want, _ = rollout(cell, xs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, state = rollout(cell, xs)
    assert state.cell.dtype == torch.float32  # the cell state accumulates in fp32
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b, rtol=0.05, atol=0.05)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="steps must be >= order"):
        ConvTT(3, 4, order=3, steps=2, rank=2, kernel_size=3)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        ConvTTLSTMCell(2, 3, 4, 2, 2, 2)
    with pytest.raises(ValueError, match="rank must be a positive int"):
        ConvTT(3, 4, 1, 1, 0, 3)
    cell = ConvLSTMCell(2, 3, 3)
    with pytest.raises(ValueError, match=r"x must be \[batch, 2"):
        cell(torch.randn(1, 5, 4, 4))
    tt = ConvTT(3, 4, 2, 3, 2, 3)
    with pytest.raises(ValueError, match="expected 3 states, got 2"):
        tt([torch.randn(1, 3, 4, 4)] * 2)
    with pytest.raises(ValueError, match=r"states\[1\] must be"):
        tt([torch.randn(1, 3, 4, 4), torch.randn(1, 2, 4, 4), torch.randn(1, 3, 4, 4)])
