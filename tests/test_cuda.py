"""CUDA checks (``pytest -m cuda``; skipped without a GPU). benchmarks/gpu_check.py runs them."""

import pytest
import torch

import tt_conv
from tt_conv import ConvTTLSTMCell, pointwise

from test_recurrent import convtt_lstm_reference, inputs, randomize_, rollout

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_cell_on_cuda_matches_the_maths_in_float64(mode):
    if mode == "compiled" and not pointwise.compiler_available("cuda"):
        pytest.skip("no Triton for inductor")
    torch.manual_seed(0)
    cell = randomize_(ConvTTLSTMCell(2, 3, 3, 3, 3, rank=2, dtype=torch.float64,
                                     pointwise=mode)).cuda()
    xs = [x.cuda() for x in inputs(2, 5)]
    got, _ = rollout(cell, xs)
    for a, b in zip(got, convtt_lstm_reference(cell, xs)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_training_step_on_cuda(precision):
    from applications.conv_tt_lstm.model import ArchitectureConfig, VideoPredictionNetwork

    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    torch.manual_seed(0)
    config = ArchitectureConfig(hidden_channels=(8, 8), layers_per_block=1, kernel_size=3)
    model = VideoPredictionNetwork(config).cuda()
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    frames = torch.rand(2, 6, 1, 16, 16, device="cuda")
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    for _ in range(2):
        with torch.autocast("cuda", dtype=dtype):
            outputs = model(frames, 3, teacher_forcing=True, all_outputs=True)
        loss = (outputs.float() - frames[:, 1:]).square().mean()
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    assert torch.isfinite(loss)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    tt_conv.set_pointwise(model, "eager")
