"""Compression of the CNNs people bring: real timm and torchvision architectures, depthwise
layers, conv subclasses and wrapped convs, lazy convs, hooks, 1-D and 3-D nets.

Every architecture is compressed at rank 0.25 without excludes, must run, export to plain
PyTorch with the same outputs, and list each layer it kept dense with the reason; a conv
subclass must be compressed as the convolution its forward really computes.
"""

import copy
import math
import warnings
from functools import partial

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

import tt_conv  # noqa: E402
from tt_conv import FactorizedConv  # noqa: E402
from tt_conv.equivalent import plain_equivalent  # noqa: E402
from tt_conv.profile import conv_modules, count_parameters  # noqa: E402
from conftest import threads_fixture  # noqa: E402


_one_thread = threads_fixture(1)


def _resnetv2_bit():
    from timm.layers import GroupNormAct, StdConv2d
    from timm.models.resnetv2 import ResNetV2

    return ResNetV2(layers=(1, 1, 1, 1), channels=(32, 64, 96, 128), stem_chs=16,
                    conv_layer=partial(StdConv2d, eps=1e-8),
                    norm_layer=partial(GroupNormAct, num_groups=8), num_classes=10)


ARCHITECTURES = {
    # name: (builder, input shape)
    "timm test_resnet": (lambda: timm.create_model("test_resnet"), (2, 3, 48, 48)),
    "timm test_efficientnet": (lambda: timm.create_model("test_efficientnet"), (2, 3, 48, 48)),
    "timm test_convnext": (lambda: timm.create_model("test_convnext"), (2, 3, 48, 48)),
    "timm test_nfnet (ScaledStdConv2d)": (lambda: timm.create_model("test_nfnet"), (2, 3, 48, 48)),
    "timm test_vit (conv patch embedding)": (lambda: timm.create_model("test_vit"), (1, 3, 160, 160)),
    "timm mobilenetv3_small_050": (lambda: timm.create_model("mobilenetv3_small_050"),
                                   (2, 3, 48, 48)),
    "timm ghostnet_050": (lambda: timm.create_model("ghostnet_050"), (2, 3, 48, 48)),
    "timm ResNetV2 / BiT (StdConv2d)": (_resnetv2_bit, (2, 3, 48, 48)),
    "torchvision squeezenet1_1": (lambda: torchvision.models.squeezenet1_1(weights=None),
                                  (2, 3, 48, 48)),
    "torchvision shufflenet_v2_x0_5": (
        lambda: torchvision.models.shufflenet_v2_x0_5(weights=None), (2, 3, 48, 48)),
}
SLOW_TO_FACTORIZE = {
    # Covered with the fastest factorization only (CP-ALS / HOOI on their kernels take
    # seconds each; the others are covered above).
    "timm regnetx_002 (grouped)": (lambda: timm.create_model("regnetx_002"), (2, 3, 48, 48)),
    "timm resnet10t (ResNet-D stem, avg-pool downsampling)": (
        lambda: timm.create_model("resnet10t"), (2, 3, 48, 48)),
    "timm tf_mobilenetv3_small_minimal_100 (Conv2dSame)": (
        lambda: timm.create_model("tf_mobilenetv3_small_minimal_100"), (2, 3, 48, 48)),
}

_BUILT = {}


def built(name):
    if name not in _BUILT:
        make, shape = {**ARCHITECTURES, **SLOW_TO_FACTORIZE}[name]
        torch.manual_seed(0)
        model = make().eval()
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        _BUILT[name] = (model, x)
    return _BUILT[name]


def check_compressed(model, x, factorization, rank=0.25):
    before = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # layers left dense warn; checked below
        compressed, report = tt_conv.compress(model, factorization, rank, progress=False)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # the original is untouched
    with torch.no_grad():
        y = compressed(x)
        exported = tt_conv.export(compressed)
        torch.testing.assert_close(exported(x), y, rtol=1e-4, atol=1e-5 * float(y.abs().max()))
    assert torch.isfinite(y).all()
    assert not any(isinstance(m, FactorizedConv) for m in exported.modules())
    names = [name for name, _ in conv_modules(model)]
    assert [row.name for row in report.layers] == names  # every conv has its row
    modules = dict(compressed.named_modules())
    for row in report.layers:
        if row.factorization == "dense":
            assert row.note, f"{row.name} kept dense without a reason"
            assert not isinstance(modules[row.name], FactorizedConv)
        else:
            layer = modules[row.name]
            bias = 0 if layer.bias is None else layer.bias.numel()
            assert row.params_after - bias <= rank * math.prod(row.kernel_shape)
    assert report.totals()["layers_factorized"] > 0
    return compressed, report


@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt", "auto"])
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_real_architectures_compress_at_a_quarter_run_and_export(name, factorization):
    model, x = built(name)
    check_compressed(model, x, factorization)


@pytest.mark.parametrize("name", list(SLOW_TO_FACTORIZE))
def test_more_architectures_compress_with_tt(name):
    model, x = built(name)
    _, report = check_compressed(model, x, "tt")
    if "Conv2dSame" in name:
        same = [r for r in report.layers if "depends on the input size" in r.note]
        assert same  # its stride-2 convs pad by the input size: kept dense, said why


def test_depthwise_layers_stay_dense_and_pointwise_layers_compress():
    model, x = built("timm mobilenetv3_small_050")
    _, report = tt_conv.compress(model, "tucker", 0.25, progress=False)
    modules = dict(model.named_modules())
    for row in report.layers:
        conv = modules[row.name]
        if conv.groups == conv.in_channels == conv.out_channels and conv.groups > 1:
            assert row.factorization == "dense" and "depthwise" in row.note
        elif conv.kernel_size == (1, 1) and conv.in_channels >= 16 and conv.out_channels >= 16:
            assert row.factorization == "tucker"
    with pytest.raises(ValueError, match=r"layer 'blocks\.0\.0\.conv_dw'.*depthwise.*strict"):
        tt_conv.compress(model, "tucker", 0.25, strict=True, progress=False)


@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt", "auto"])
def test_global_budget_takes_what_depthwise_layers_cannot_give_from_the_others(factorization):
    model, x = built("timm test_efficientnet")
    convs = dict(conv_modules(model))
    before = sum(count_parameters(m) for m in convs.values())
    compressed, report = tt_conv.compress(model, factorization, {"params": 0.3, "global": True},
                                          progress=False)
    after = sum(count_parameters(m) for _, m in conv_modules(compressed))
    assert after == report.conv_params_after <= 0.3 * before
    dense = [r for r in report.layers if r.factorization == "dense"]
    assert all(r.note for r in dense)
    assert torch.isfinite(compressed(x)).all()


# --------------------------------------------------------------------------- conv subclasses


def _standardized(weight, eps):
    mean = weight.mean(dim=(1, 2, 3), keepdim=True)
    var = weight.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
    return (weight - mean) / torch.sqrt(var + eps)


def _twin(model, kernels):
    """A copy of ``model`` whose convolutions are plain nn.Conv2d with the given kernels."""
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if name in kernels:
            plain = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size,
                              module.stride, module.padding, module.dilation, module.groups,
                              bias=module.bias is not None)
            with torch.no_grad():
                plain.weight.copy_(kernels[name])
                if module.bias is not None:
                    plain.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent) if parent else twin, child, plain)
    return twin


def _small_net(conv):
    torch.manual_seed(3)
    return nn.Sequential(conv(3, 16, 3, padding=1), nn.ReLU(), conv(16, 24, 3, padding=1),
                         nn.ReLU(), conv(24, 24, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()


def _subclass_cases():
    from timm.layers import ScaledStdConv2d, StdConv2d

    def weight_norm(*args, **kwargs):
        return torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(*args, **kwargs))

    def old_weight_norm(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.nn.utils.weight_norm(nn.Conv2d(*args, **kwargs))

    def spectral(*args, **kwargs):
        return torch.nn.utils.parametrizations.spectral_norm(nn.Conv2d(*args, **kwargs))

    return {
        "StdConv2d": (partial(StdConv2d, eps=1e-6),
                      lambda m: _standardized(m.weight.detach(), 1e-6)),
        "ScaledStdConv2d": (partial(ScaledStdConv2d, eps=1e-6),
                            lambda m: _standardized(m.weight.detach(), 1e-6)
                            * m.gain.detach() * m.scale),
        "parametrizations.weight_norm": (weight_norm, lambda m: (
            m.parametrizations.weight.original0 * m.parametrizations.weight.original1
            / m.parametrizations.weight.original1.flatten(1).norm(dim=1)[:, None, None, None]
        ).detach()),
        "weight_norm (hook)": (old_weight_norm, lambda m: (
            m.weight_g * m.weight_v / m.weight_v.flatten(1).norm(dim=1)[:, None, None, None]
        ).detach()),
        "parametrizations.spectral_norm": (spectral, lambda m: m.weight.detach()),
    }


@pytest.mark.parametrize("case", list(_subclass_cases()))
@pytest.mark.parametrize("factorization", ["tucker", "cp", "tt"])
def test_conv_subclasses_compress_as_the_convolution_they_compute(case, factorization):
    conv, effective = _subclass_cases()[case]
    model = _small_net(conv)
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    convs = {name: m for name, m in model.named_modules() if name in ("0", "2", "4")}
    # The kernel the library finds is the one computed here by hand from the definition.
    kernels = {}
    for name, module in convs.items():
        found = plain_equivalent(module).conv
        torch.testing.assert_close(found.weight, effective(module), rtol=1e-4, atol=1e-6)
        kernels[name] = found.weight.detach()
    # A plain-conv twin holding those kernels computes what the model computes ...
    twin = _twin(model, kernels)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), rtol=1e-4, atol=1e-5)
    # ... and the compressed model is the compressed twin (same decompositions).
    compressed, report = tt_conv.compress(model, factorization, 0.95, progress=False)
    twin_compressed, _ = tt_conv.compress(twin, factorization, 0.95, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(compressed(x), twin_compressed(x), rtol=1e-4, atol=1e-5)
    factorized = [r for r in report.layers if r.factorization != "dense"]
    assert factorized and all("baked in" in r.note for r in factorized)
    # The original is untouched (its parametrizations and hooks still in place).
    with torch.no_grad():
        torch.testing.assert_close(model(x), twin(x), rtol=1e-4, atol=1e-5)


def test_every_conv_of_subclass_networks_has_an_exact_plain_equivalent():
    for name in ("timm test_nfnet (ScaledStdConv2d)", "timm ResNetV2 / BiT (StdConv2d)"):
        model, _ = built(name)
        for conv_name, module in conv_modules(model):
            found = plain_equivalent(module)
            assert found.conv is not None, (conv_name, found.reason)
            x = torch.randn(2, module.in_channels, 9, 9)
            with torch.no_grad():
                torch.testing.assert_close(found.conv(x), module(x), rtol=1e-4, atol=1e-5)
            assert type(found.conv) in (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _Shifted(nn.Conv2d):
    """A conv subclass whose forward does more than a convolution."""

    def forward(self, x):
        return super().forward(x) + 1.0


def test_convs_that_compute_something_else_stay_dense_with_a_warning():
    from timm.layers import Conv2dSame

    torch.manual_seed(4)
    hooked = nn.Conv2d(8, 8, 3, padding=1)
    hooked.register_forward_hook(lambda module, args, output: output * 2)
    model = nn.Sequential(Conv2dSame(3, 8, 3, stride=2), nn.ReLU(), hooked, nn.ReLU(),
                          _Shifted(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3)).eval()
    x = torch.randn(2, 3, 16, 16)
    with pytest.warns(UserWarning) as caught:
        compressed, report = tt_conv.compress(model, "tucker", 0.5, progress=False)
    messages = " ".join(str(w.message) for w in caught)
    rows = {r.name: r for r in report.layers}
    for name, cls, why in (("0", "Conv2dSame", "depends on the input size"),
                           ("2", "Conv2d", "forward hook"), ("4", "_Shifted", "applies")):
        assert f"layer {name!r} ({cls})" in messages
        assert rows[name].factorization == "dense" and why in rows[name].note
        assert compressed[int(name)] is not model[int(name)]  # a copy, kept as it was
        assert type(compressed[int(name)]) is type(model[int(name)])
    assert rows["6"].factorization == "tucker"
    with torch.no_grad():
        assert torch.isfinite(compressed(x)).all()


def test_lazy_convolutions():
    torch.manual_seed(5)
    model = nn.Sequential(nn.LazyConv2d(16, 3, padding=1), nn.ReLU(), nn.LazyConv2d(32, 3))
    with pytest.warns(UserWarning, match="lazy"):
        _, report = tt_conv.compress(model, "tucker", 0.25, progress=False)
    assert all(r.factorization == "dense" and "lazy" in r.note for r in report.layers)
    compressed, report = tt_conv.compress(model, "tucker", 0.25, input_shape=(1, 8, 10, 10),
                                          progress=False)
    assert all(r.factorization == "tucker" for r in report.layers)
    assert isinstance(model[0], nn.modules.lazy.LazyModuleMixin)  # the original untouched
    assert compressed(torch.randn(2, 8, 10, 10)).shape == (2, 32, 8, 8)


@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt", "auto"])
def test_one_and_three_dimensional_networks(factorization):
    torch.manual_seed(6)
    net1 = nn.Sequential(nn.Conv1d(4, 32, 7, padding=3), nn.BatchNorm1d(32), nn.ReLU(),
                         nn.Conv1d(32, 32, 5, stride=2, groups=32), nn.Conv1d(32, 48, 1),
                         nn.ReLU(), nn.Conv1d(48, 48, 3, dilation=2)).eval()
    net3 = nn.Sequential(nn.Conv3d(3, 16, 3, padding=1), nn.BatchNorm3d(16), nn.ReLU(),
                         nn.Conv3d(16, 24, (1, 3, 3), stride=(1, 2, 2)), nn.ReLU(),
                         nn.Conv3d(24, 24, 3, groups=24), nn.Conv3d(24, 32, 1)).eval()
    for net, x in ((net1, torch.randn(2, 4, 40)), (net3, torch.randn(2, 3, 6, 12, 12))):
        check_compressed(net, x, factorization)


class _WithUnusedBranch(nn.Module):
    """An auxiliary conv head that runs only in training mode, as Inception v3's does."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(16, 16, 3, padding=1))
        self.aux = nn.Conv2d(16, 32, 3)

    def forward(self, x):
        y = self.features(x)
        if self.training:
            return y, self.aux(y)
        return y


def test_convolutions_that_do_not_run_on_the_calibration_batch():
    torch.manual_seed(7)
    model = _WithUnusedBranch().eval()
    x = torch.randn(16, 3, 10, 10)
    compressed, report = tt_conv.compress(model, "tucker", 0.5, calibration=x, fit="data",
                                          progress=False)
    rows = {r.name: r for r in report.layers}
    assert rows["aux"].factorization == "tucker" and "did not run" in rows["aux"].note
    assert compressed(x).shape == model(x).shape
