"""Batch norms folded into the convolutions before them (tt_conv.fold_batch_norms)."""

import warnings

import pytest
import timm
import torch
import torchvision
from torch import nn

import tt_conv
from tt_conv.decompose import relative_error


def with_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in evaluation mode with batch norms that do something (fresh ones are the
    identity up to eps)."""
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(torch.rand(m.num_features, generator=generator) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) * 1.5 + 0.5)
            if m.weight is not None:
                with torch.no_grad():
                    m.weight.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                    m.bias.copy_(torch.rand(m.num_features, generator=generator) - 0.5)
    return model.eval()


def outputs(model, x):
    with torch.no_grad():
        return model(x)


def n_norms(model):
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_a_resnet_folds_every_norm_after_a_convolution():
    torch.manual_seed(0)
    model = with_statistics(torchvision.models.resnet18())
    x = torch.randn(2, 3, 64, 64)
    folded, pairs = tt_conv.fold_batch_norms(model)
    assert len(pairs) == n_norms(model) == 20 and n_norms(folded) == 0
    assert ("conv1", "bn1") in pairs and ("layer2.0.downsample.0", "layer2.0.downsample.1") in pairs
    assert n_norms(model) == 20  # a copy was folded
    assert relative_error(outputs(folded, x), outputs(model, x)) < 1e-5
    assert all(folded.get_submodule(conv).bias is not None for conv, _ in pairs)


@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt"])
def test_factorized_layers_take_the_norm_in_their_output_factor(factorization):
    torch.manual_seed(0)
    model = with_statistics(nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 1, bias=False), nn.BatchNorm2d(32)))  # 1 x 1: merged stages
    compressed, _ = tt_conv.compress(model, factorization, 0.5, progress=False)
    assert sum(isinstance(m, tt_conv.FactorizedConv) for m in compressed.modules()) == 3
    x = torch.randn(2, 3, 16, 16)
    before = outputs(compressed, x)  # keeps inference weights, which the fold must renew
    ranks = {name: tuple(m.rank) for name, m in compressed.named_modules()
             if isinstance(m, tt_conv.FactorizedConv)}
    folded, pairs = tt_conv.fold_batch_norms(compressed, inplace=True)
    assert folded is compressed and len(pairs) == 3
    assert {name: tuple(m.rank) for name, m in folded.named_modules()
            if isinstance(m, tt_conv.FactorizedConv)} == ranks
    assert relative_error(outputs(folded, x), before) < 1e-5
    # Still trainable: the new biases are parameters.
    folded.train()
    folded(x).sum().backward()
    assert all(folded.get_submodule(conv).bias.grad is not None for conv, _ in pairs)


def test_timm_norm_with_activation_keeps_its_activation():
    torch.manual_seed(0)
    model = with_statistics(timm.create_model("efficientnet_b0"))
    x = torch.randn(1, 3, 96, 96)
    folded, pairs = tt_conv.fold_batch_norms(model)
    assert len(pairs) == n_norms(model) and n_norms(folded) == 0
    assert relative_error(outputs(folded, x), outputs(model, x)) < 1e-5
    stem = folded.get_submodule(pairs[0][1])
    assert isinstance(stem, nn.Sequential) and isinstance(stem[1], nn.SiLU)


class _Shared(nn.Module):
    """A conv whose output is used twice, a norm after a sum, and one after a conv."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.norm_a, self.norm_sum, self.norm_b = (nn.BatchNorm2d(4), nn.BatchNorm2d(4),
                                                   nn.BatchNorm2d(4))

    def forward(self, x):
        y = self.a(x)
        z = self.norm_a(y) + y
        return self.norm_b(self.b(self.norm_sum(z)))


def test_only_norms_that_read_a_convolution_alone_are_folded():
    model = with_statistics(_Shared())
    x = torch.randn(2, 3, 8, 8)
    folded, pairs = tt_conv.fold_batch_norms(model)
    assert pairs == [("b", "norm_b")]
    assert isinstance(folded.norm_a, nn.BatchNorm2d) and isinstance(folded.norm_sum,
                                                                     nn.BatchNorm2d)
    assert relative_error(outputs(folded, x), outputs(model, x)) < 1e-5


def test_what_cannot_be_folded_is_said():
    model = with_statistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    with pytest.raises(ValueError, match="training mode.*'1'.*model.eval"):
        tt_conv.fold_batch_norms(model.train())
    model.eval()
    # No running statistics: batch statistics at every call, nothing to fold.
    free = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    with pytest.warns(UserWarning, match="'1' keeps no running statistics"):
        _, pairs = tt_conv.fold_batch_norms(free)
    assert pairs == []
    # A convolution with its own forward (weight standardisation) keeps its norm.
    standardized = with_statistics(nn.Sequential(timm.layers.StdConv2d(3, 4, 3),
                                                 nn.BatchNorm2d(4)))
    with pytest.warns(UserWarning, match="'1' is left as it is: '0' \\(StdConv2d\\)"):
        _, pairs = tt_conv.fold_batch_norms(standardized)
    assert pairs == []

    # A re-parametrized convolution computes its weight in its forward: folding into the
    # stored tensors would be undone (weight norm) or wrong, so it is left too.
    normed = with_statistics(nn.Sequential(
        nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4)))
    with pytest.warns(UserWarning, match="'1' is left as it is: '0' \\(ParametrizedConv2d\\)"):
        _, pairs = tt_conv.fold_batch_norms(normed)
    assert pairs == []

    class Untraceable(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(ValueError, match="Untraceable cannot be traced by torch.fx"):
        tt_conv.fold_batch_norms(Untraceable())
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        tt_conv.fold_batch_norms("resnet")
