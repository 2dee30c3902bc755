"""No NaN from convolutions that read memory they never wrote.

PyTorch's CPU channels-last convolution was seen (torch 2.14.1, issue 11) to return NaN now
and then for a Tucker stage of a pretrained 1-D network run as 2-D convolutions: input
``[128, 453, 191, 1]``, kernel ``[56, 453, 64, 1]``, when a NaN-filled buffer had just been
freed. The probe here fills and frees such buffers before every call, so memory a kernel
reads without writing holds NaN; factorized layers run stages with a spatial axis of size 1
contiguous, and every output must be finite and equal to the contiguous computation.
"""

import pytest
import torch
import torch.nn.functional as F

from tt_conv import ConvLSTMCell, ConvTTLSTMCell, FactorizedConv
from tt_conv.layers.base import has_unit_spatial_axis
from conftest import threads_fixture


_two_threads = threads_fixture(2)


def poison(*sizes):
    """Allocate, fill with NaN and free buffers of these sizes (in elements)."""
    for size in sizes:
        buffer = torch.full((int(size),), float("nan"))
        del buffer


def repeated(call, sizes, reps=4):
    """``call()`` ``reps`` times, each after poisoning; the outputs."""
    outputs = []
    for _ in range(reps):
        poison(*sizes)
        outputs.append(call())
    return outputs


# Unit-spatial shapes like the reported one (batch cut to keep the test fast), and ordinary
# image shapes.
SHAPES = [
    ((16, 453, 191, 1), (56, 453, 64, 1)),
    ((16, 64, 71, 1), (32, 64, 64, 1)),
    ((8, 32, 1, 50), (16, 32, 1, 9)),
    ((8, 16, 20, 20), (24, 16, 3, 3)),
]


@pytest.mark.parametrize("x_shape, w_shape", SHAPES)
def test_channels_last_convolution_probe(x_shape, w_shape):
    """The probe itself on plain F.conv2d: contiguous inputs always give finite outputs;
    channels-last ones are what factorized layers avoid for unit-spatial shapes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=g)
    w = torch.randn(w_shape, generator=g)
    reference = F.conv2d(x, w)
    sizes = (w.numel(), reference.numel(), x.numel())
    for y in repeated(lambda: F.conv2d(x, w), sizes):
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y, reference)
    if not has_unit_spatial_axis(x):
        x_last = x.contiguous(memory_format=torch.channels_last)
        for y in repeated(lambda: F.conv2d(x_last, w), sizes):
            assert torch.isfinite(y).all()
            torch.testing.assert_close(y, reference, rtol=1e-4, atol=1e-4)


# Layers whose stages have the reported geometry: the Tucker core stage of the first case is
# exactly the reported convolution ([16, 453, 191, 1] input, [56, 453, 64, 1] kernel).
LAYERS = [
    ("tucker", 1024, 128, (64, 1), (56, 453), (16, 1024, 191, 1)),
    ("tt", 1024, 128, (64, 1), (96, 48, 48), (16, 1024, 191, 1)),
    ("cp", 256, 128, (64, 1), 200, (16, 256, 191, 1)),
    ("tucker", 64, 32, (1, 9), (16, 24), (8, 64, 1, 50)),
]


@pytest.mark.parametrize("factorization, c_in, c_out, kernel, rank, x_shape", LAYERS)
def test_factorized_layers_give_finite_outputs_on_unit_spatial_inputs(
        factorization, c_in, c_out, kernel, rank, x_shape):
    torch.manual_seed(1)
    layer = FactorizedConv.class_for(factorization)(c_in, c_out, kernel, rank=rank,
                                                    implementation="factorized")
    x = torch.randn(x_shape).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        reference = F.conv2d(x.contiguous(), layer.reconstruct_kernel(), layer.bias)
        sizes = [w.numel() for w in layer.stage_weights()] + [reference.numel()]
        outputs = repeated(lambda: layer(x), sizes)
    for y in outputs:
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y, reference, rtol=1e-3,
                                   atol=1e-4 * float(reference.abs().max()))
        assert y.is_contiguous()  # the unit-spatial chain ran contiguous


def test_unit_spatial_detection():
    assert has_unit_spatial_axis(torch.zeros(2, 3, 5, 1))
    assert has_unit_spatial_axis(torch.zeros(2, 3, 1, 4, 4))
    assert not has_unit_spatial_axis(torch.zeros(2, 3, 5, 5))
    assert not has_unit_spatial_axis(torch.zeros(2, 3, 5))


@pytest.mark.parametrize("size", [(16, 16), (24, 1)])
@pytest.mark.parametrize("cell_class", [ConvLSTMCell, ConvTTLSTMCell])
def test_recurrent_cells_give_finite_outputs_with_channels_last_inputs(cell_class, size):
    torch.manual_seed(2)
    kwargs = dict(order=2, steps=3, rank=4) if cell_class is ConvTTLSTMCell else {}
    cell = cell_class(3, 8, kernel_size=3, **kwargs).eval()
    frames = torch.randn(5, 2, 3, *size)

    def rollout(channels_last):
        state = None
        outputs = []
        with torch.no_grad():
            for frame in frames:
                if channels_last:
                    frame = frame.contiguous(memory_format=torch.channels_last)
                h, state = cell(frame, state)
                outputs.append(h)
        return torch.stack(outputs)

    reference = rollout(False)
    sizes = [p.numel() for p in cell.parameters()] + [reference[0].numel() * 4]
    for y in repeated(lambda: rollout(True), sizes, reps=3):
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y, reference, rtol=1e-4, atol=1e-5)
