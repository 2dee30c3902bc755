"""The compiled (fused) pointwise kernels of the recurrent cells, and their eager fallback.

Every compiled test runs in float64 on channels-last 2-D states with the same tensor-train
shapes, so the whole file compiles only a handful of kernel signatures (seconds each).
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import tt_conv
from tt_conv import ConvLSTMCell, ConvTTLSTMCell, HigherOrderConvLSTMCell, pointwise

from test_recurrent import (
    checkpointing_gradients, convtt_lstm_reference, higher_order_reference, inputs,
    lstm_reference, randomize_, rollout,
)

needs_compiler = pytest.mark.skipif(not pointwise.compiler_available("cpu"),
                                    reason="no C++ compiler for inductor")


def channels_last(xs):
    return [x.contiguous(memory_format=torch.channels_last) for x in xs]


@needs_compiler
def test_compiled_lstm_step_and_its_gradient_equal_the_gate_equations():
    torch.manual_seed(0)
    gates = torch.randn(2, 12, 4, 5, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    c = torch.randn(2, 3, 4, 5, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    got = pointwise.lstm_update(gates, c, "compiled")
    want = lstm_reference(gates, c)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    weights = [torch.randn_like(t) for t in want]
    grads = [torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, out)), (gates, c))
             for out in (got, want)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # The gate gradient keeps the layout the gate convolution's backward wants.
    assert grads[0][0].stride(1) == 1


@needs_compiler
@pytest.mark.parametrize("order,steps", [(3, 3), (2, 4)])
def test_compiled_convtt_lstm_cell_matches_the_maths(order, steps):
    torch.manual_seed(order)
    cell = randomize_(ConvTTLSTMCell(2, 3, 3, order, steps, rank=2, dtype=torch.float64,
                                     pointwise="compiled"))
    xs = channels_last(inputs(2, steps + 3))
    got, state = rollout(cell, xs)
    # The fused sums keep the stream channels-last, the layout its convolutions read.
    assert all(m.stride(1) == 1 for m in state.memory if m.shape[1] > 1)
    want = convtt_lstm_reference(cell, xs)
    for t, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"step {t}")
    # Gradients through the compiled kernels equal those through the eager ones.
    compiled_grads = torch.autograd.grad(sum(h.square().sum() for h in got),
                                         list(cell.parameters()))
    tt_conv.set_pointwise(cell, "eager")
    eager, _ = rollout(cell, xs)
    eager_grads = torch.autograd.grad(sum(h.square().sum() for h in eager),
                                      list(cell.parameters()))
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@needs_compiler
@pytest.mark.parametrize("kind", ["convlstm", "hoconvlstm"])
def test_compiled_baseline_cells_match_the_maths(kind):
    torch.manual_seed(1)
    if kind == "convlstm":
        cell = ConvLSTMCell(2, 3, 3, dtype=torch.float64, pointwise="compiled")
    else:
        cell = HigherOrderConvLSTMCell(2, 3, 3, 3, dtype=torch.float64, pointwise="compiled")
    randomize_(cell)
    xs = channels_last(inputs(2, 4))
    got, _ = rollout(cell, xs)
    for a, b in zip(got, higher_order_reference(cell, xs)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@needs_compiler
def test_compiled_kernels_under_activation_checkpointing():
    torch.manual_seed(0)
    cell = randomize_(ConvTTLSTMCell(2, 3, 3, 3, 3, rank=2, dtype=torch.float64,
                                     pointwise="compiled"))
    xs = [x.requires_grad_() for x in channels_last(inputs(2, 4))]
    checkpointing_gradients(cell, xs, rtol=1e-10, atol=1e-12)


@needs_compiler
@pytest.mark.parametrize("compiled", ["pointwise", "cells"])
def test_compiled_kernels_under_distributed_data_parallel(tmp_path, compiled):
    """``pointwise``: the fused kernels; ``cells``: every cell compiled whole, in place, as
    ``train --compile`` does (through dynamo and AOTAutograd; ``aot_eager`` keeps the test
    fast, inductor's code generation is torch's own)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from applications.conv_tt_lstm.model import ArchitectureConfig, VideoPredictionNetwork

    config = ArchitectureConfig(cell="convttlstm", hidden_channels=(3, 3), layers_per_block=1,
                                skip_stride=1, kernel_size=3, order=3, steps=3, rank=2)
    plain = randomize_(VideoPredictionNetwork(config, dtype=torch.float64))
    tt_conv.set_pointwise(plain, "eager")
    wrapped = VideoPredictionNetwork(config, dtype=torch.float64)
    wrapped.load_state_dict(plain.state_dict())
    if compiled == "pointwise":
        tt_conv.set_pointwise(wrapped, "compiled")
    else:
        tt_conv.compile_cells(wrapped, backend="aot_eager")
    frames = torch.rand(2, 4, 1, 5, 6, dtype=torch.float64)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        ddp = DistributedDataParallel(wrapped)
        ddp(frames, 2, teacher_forcing=True, all_outputs=True).square().mean().backward()
    finally:
        dist.destroy_process_group()
    plain(frames, 2, teacher_forcing=True, all_outputs=True).square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), wrapped.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_bf16_autocast_keeps_the_stream_in_bf16_and_the_cell_state_in_fp32():
    cell = ConvTTLSTMCell(2, 4, 3, 3, 3, 2, pointwise="eager")
    x = torch.randn(1, 2, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, state = cell(x)
    assert h.dtype == torch.bfloat16 and state.cell.dtype == torch.float32
    assert all(m.dtype == torch.bfloat16 for m in state.memory)


def test_the_mode_is_checked_and_set_on_a_whole_model():
    with pytest.raises(ValueError, match="pointwise must be one of"):
        ConvLSTMCell(2, 3, 3, pointwise="fast")
    model = torch.nn.Sequential(ConvTTLSTMCell(2, 3, 3, 2, 2, 2), ConvLSTMCell(3, 3, 3))
    tt_conv.set_pointwise(model, "eager")
    assert model[0].pointwise == model[0].tt.pointwise == model[1].pointwise == "eager"
    with pytest.raises(ValueError, match="pointwise must be one of"):
        tt_conv.set_pointwise(model, "fast")


def test_a_failing_compilation_falls_back_to_eager_with_a_warning(monkeypatch):
    from torch._dynamo.exc import BackendCompilerFailed

    def broken(*args):
        # Built without its constructor, whose signature differs between torch versions.
        error = BackendCompilerFailed.__new__(BackendCompilerFailed)
        Exception.__init__(error, "C++ compile error: no compiler here")
        raise error

    monkeypatch.setattr(pointwise, "_compiled_lstm_forward", broken)
    monkeypatch.setattr(pointwise, "_BROKEN", {})
    monkeypatch.setattr(pointwise, "_compiler_check", lambda device: None)
    pointwise._warn_once.cache_clear()
    gates, c = torch.randn(2, 12, 3, 3), torch.randn(2, 3, 3, 3)
    with pytest.warns(RuntimeWarning, match="failed.*runs unfused"):
        got = pointwise.lstm_update(gates, c, "compiled")
    for a, b in zip(got, lstm_reference(gates, c)):
        torch.testing.assert_close(a, b)
    # The device type stays eager for the rest of the process.
    assert not pointwise.compiler_available("cpu")
    pointwise._warn_once.cache_clear()


def test_without_a_compiler_auto_runs_eager_and_compiled_is_refused():
    # A fresh interpreter whose inductor would call a C++ compiler that does not exist.
    script = textwrap.dedent("""
        import warnings, torch
        from tt_conv import ConvTTLSTMCell, pointwise
        assert not pointwise.compiler_available("cpu")
        cell = ConvTTLSTMCell(2, 3, 3, 3, 3, 2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            h, _ = cell(torch.randn(1, 2, 4, 4))
        assert any("no C++ compiler" in str(w.message) for w in caught), caught
        try:
            pointwise.lstm_update(torch.randn(1, 4, 2, 2), torch.randn(1, 1, 2, 2), "compiled")
        except RuntimeError as error:
            assert "no C++ compiler" in str(error)
        else:
            raise AssertionError("compiled mode without a compiler did not fail")
        print("ok")
    """)
    env = dict(os.environ, CXX="/nonexistent/c++", TT_CONV_POINTWISE="auto",
               PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]
