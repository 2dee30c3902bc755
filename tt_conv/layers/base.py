"""The :class:`FactorizedConv` base: geometry, execution, export and the ``from_conv`` factory.

A factorized convolution holds low-rank factors of its kernel and runs one of two ways:

* ``"factorized"``: a chain of small standard convolutions (the *stages*), from a pointwise
  projection of the input channels, through convolutions over the spatial axes, to a
  pointwise projection to the output channels (which adds the bias);
* ``"reconstructed"``: the dense kernel is rebuilt from the factors and one convolution runs.

Subclasses (:class:`~tt_conv.CPConv`, :class:`~tt_conv.TuckerConv`,
:class:`~tt_conv.TTConv`) say what their factors are, how they rebuild a kernel and what
their stages are; everything else (geometry, padding, export, FLOPs) lives here once, for
1-D, 2-D and 3-D alike.
"""


import contextlib
import math
from typing import Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import decompose as _decompose
from .._geometry import (
    PADDING_MODES,
    as_tuple,
    conv_flops,
    conv_nd,
    is_channels_last,
    output_size,
    padding_pairs,
    torch_pad_argument,
)
from .._checks import check_factorization, check_finite
from ..rank import resolve_rank
from ._chain import merge_flops, merge_stage_weights, merged_specs, pointwise_runs
from ._packed import PackedConvs

IMPLEMENTATIONS = ("auto", "factorized", "reconstructed")

_CONV_TYPES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_PAD_MODULES = {
    "reflect": (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d),
    "replicate": (nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d),
    "circular": (nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d),
}

# Cost model for implementation="auto", in multiply-add equivalents per output position.
# Reading or writing one activation costs about as much as a few multiply-adds on a CPU or
# GPU, and depthwise convolutions reach a small fraction of the throughput of dense ones.
_ACTIVATION_COST = 8.0
_DEPTHWISE_PENALTY = 4.0
_NOMINAL_SIZE = 32


class StageSpec:
    """Static geometry of one convolution in the factorized chain."""

    __slots__ = ("kernel_size", "stride", "padding", "dilation", "groups", "in_channels",
                 "out_channels")

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups):
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = tuple(kernel_size)
        self.stride = tuple(stride)
        self.padding = tuple(padding)
        self.dilation = tuple(dilation)
        self.groups = groups

    @property
    def depthwise(self) -> bool:
        return self.groups == self.in_channels == self.out_channels and self.groups > 1


class FactorizedConv(nn.Module):
    """Base class of the factorized convolutions; a drop-in for ``nn.Conv1d/2d/3d``.

    Do not instantiate it directly: use :class:`~tt_conv.CPConv`,
    :class:`~tt_conv.TuckerConv`, :class:`~tt_conv.TTConv`, or
    :meth:`FactorizedConv.from_conv` to factorize a trained convolution.

    Parameters
    ----------
    in_channels, out_channels : int
        As in :class:`torch.nn.Conv2d`.
    kernel_size : int or tuple of int
        A tuple's length sets the number of spatial dimensions (1, 2 or 3); an int uses
        ``n_dim``.
    stride, padding, dilation, groups, bias, padding_mode
        Exactly as in :class:`torch.nn.Conv2d`, per axis; ``padding`` may be ``"same"``
        (unstrided only, as in PyTorch; even kernels pad one more after) or ``"valid"``.
    rank : int, tuple of int or float
        An int or tuple gives explicit ranks (clipped to what the kernel allows; the ranks
        used are in :attr:`rank`); a float in ``(0, 1]`` is the fraction of the dense
        kernel's parameters the factors may use, never exceeded. See :mod:`tt_conv.rank`.
    implementation : {"auto", "factorized", "reconstructed"}
        How :meth:`forward` runs; ``"auto"`` picks the cheaper by an estimate of compute and
        memory traffic, once, at construction. Both give the same output.
    n_dim : int, optional
        Number of spatial dimensions when ``kernel_size`` is an int (default 2).
    device, dtype
        Where and in which dtype to create the parameters.

    Notes
    -----
    Grouped convolutions are factorized group by group: every factor carries a leading
    ``groups`` axis, the pointwise stages are grouped convolutions and the spatial stages
    keep the groups apart, so the layer computes exactly what a grouped convolution with the
    reconstructed kernel computes. A depthwise convolution (``in_channels == groups``) has
    channel modes of size 1 in each group, so only its spatial modes can be reduced.
    """

    factorization: str = ""
    _registry: Dict[str, Type["FactorizedConv"]] = {}
    # Properties TorchScript must not compile (forward never uses them).
    __jit_unused_properties__ = [
        "group_kernel_shape", "weight_shape", "n_parameters", "dense_parameters", "full_tucker",
    ]
    # Attributes the forward pass reads, typed for TorchScript.
    _group_shape: List[int]
    _weight_shape: List[int]
    _pad: List[int]
    _pad_mode: str
    _explicit_pad: bool
    _pointwise_kernel: bool
    _conv_padding: List[int]
    _factorized: bool
    _stage_stride: List[List[int]]
    _stage_padding: List[List[int]]
    _stage_dilation: List[List[int]]
    _stage_groups: List[int]
    _chain_groups: List[int]
    _runs: List[Tuple[int, int]]
    _merging: bool
    _channels_last_chain: bool
    #: Whether the factorized chain runs on channels-last activations (2-D and 3-D).
    channels_last_chain = True

    def __init_subclass__(cls, factorization: Optional[str] = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if factorization is not None:
            cls.factorization = factorization
            FactorizedConv._registry[factorization] = cls

    @staticmethod
    def class_for(factorization: str) -> Type["FactorizedConv"]:
        """The layer class of a factorization (``"cp"`` -> :class:`~tt_conv.CPConv`, ...)."""
        return FactorizedConv._registry[check_factorization(factorization)]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Union[int, Sequence[int]],
        stride: Union[int, Sequence[int]] = 1,
        padding: Union[str, int, Sequence[int]] = 0,
        dilation: Union[int, Sequence[int]] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        rank,
        implementation: str = "auto",
        n_dim: Optional[int] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if type(self) is FactorizedConv:
            raise TypeError(
                "FactorizedConv is abstract: use CPConv, TuckerConv, TTConv or "
                "FactorizedConv.from_conv(conv, factorization=...)"
            )
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("groups", groups)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must both be "
                f"divisible by groups ({groups})"
            )
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        if isinstance(kernel_size, int) and not isinstance(kernel_size, bool):
            n_dim = 2 if n_dim is None else n_dim
        else:
            try:
                inferred = len(kernel_size)  # type: ignore[arg-type]
            except TypeError:
                raise TypeError(
                    f"kernel_size must be an int or a tuple of ints, got {kernel_size!r}"
                ) from None
            if n_dim is not None and n_dim != inferred:
                raise ValueError(f"kernel_size {kernel_size!r} does not have n_dim={n_dim} axes")
            n_dim = inferred
        if n_dim not in (1, 2, 3):
            raise ValueError(f"only 1-D, 2-D and 3-D convolutions are supported, got n_dim={n_dim}")
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")

        self.n_dim = n_dim
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = as_tuple(kernel_size, n_dim, "kernel_size")
        self.stride = as_tuple(stride, n_dim, "stride")
        self.dilation = as_tuple(dilation, n_dim, "dilation")
        self.padding = padding if isinstance(padding, str) else as_tuple(padding, n_dim, "padding", 0)
        self.groups = groups
        self.padding_mode = padding_mode

        self._weight_shape = [out_channels, in_channels // groups, *self.kernel_size]
        self._group_shape = [out_channels // groups, in_channels // groups, *self.kernel_size]
        pairs = padding_pairs(self.padding, self.kernel_size, self.stride, self.dilation)
        self._pad_pairs = pairs
        # Symmetric zero padding goes to the convolutions; anything else is one F.pad call.
        self._explicit_pad = padding_mode != "zeros" or any(a != b for a, b in pairs)
        self._pad = torch_pad_argument(pairs)
        self._pad_mode = "constant" if padding_mode == "zeros" else padding_mode
        self._conv_padding = [0] * n_dim if self._explicit_pad else [a for a, _ in pairs]
        # A 1 x 1 kernel without padding only mixes channels (and subsamples, if strided).
        self._pointwise_kernel = (all(k == 1 for k in self.kernel_size)
                                  and all(p == (0, 0) for p in pairs))

        self.rank = resolve_rank(self.factorization, self.group_kernel_shape, rank)
        factory = {"device": device, "dtype": dtype}
        self._make_factors(**factory)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        if not any(p.is_meta for p in self.parameters()):
            # Meta tensors hold no values: drawing them only costs time (PyTorch runs its
            # Python reference of normal_ there; the budgets' FLOP counts build hundreds).
            self.reset_parameters()

        chain = self._chain_specs()
        # Consecutive 1 x 1 stages run as one convolution where that is cheaper (see
        # _chain); the explicit padding goes before the second stage, which stays apart.
        self._runs = pointwise_runs(chain, _ACTIVATION_COST, first_alone=self._explicit_pad)
        self._merging = any(stop - start > 1 for start, stop in self._runs)
        self._chain_groups = [s.groups for s in chain]
        self._inference_cache = None
        self._packs = None  # PackedConvs of the kept weights, made on first use
        stages = self._executed_specs()
        self._stage_stride = [list(s.stride) for s in stages]
        self._stage_padding = [list(s.padding) for s in stages]
        self._stage_dilation = [list(s.dilation) for s in stages]
        self._stage_groups = [s.groups for s in stages]
        self._channels_last_chain = type(self).channels_last_chain
        self.set_implementation(implementation)

    # ------------------------------------------------------------------ subclass interface

    def _make_factors(self, device=None, dtype=None) -> None:
        """Create the factor parameters.

        Every factor is stored with at most 3 dimensions, ``(groups, rows, columns)``:
        ``Module.to(memory_format=torch.channels_last)`` converts every 4-D and 5-D
        parameter of a model and refuses the ones of the other rank, so factors shaped like
        conv weights would break it for the whole model.
        """
        raise NotImplementedError

    def _factor_tensors(self) -> List[torch.Tensor]:
        """The tensors whose product is the kernel (used to scale the initialisation)."""
        raise NotImplementedError

    def _n_summed_terms(self) -> int:
        """How many products each kernel entry sums (used to scale the initialisation)."""
        raise NotImplementedError

    def _group_kernels(self) -> torch.Tensor:
        """The kernel of every group, ``(groups, out/groups, in/groups, *kernel_size)``."""
        raise NotImplementedError

    def _reconstruction_flops(self) -> int:
        """FLOPs of :meth:`reconstruct_kernel` as ``torch.utils.flop_counter`` counts them."""
        raise NotImplementedError

    def _stage_weight_flops(self) -> int:
        """FLOPs spent forming the executed stage weights (the merged 1 x 1 products)."""
        return merge_flops(self._chain_specs(), self._runs)

    def _stage_specs(self) -> List[StageSpec]:
        raise NotImplementedError

    def _chain_specs(self) -> List[StageSpec]:
        """:meth:`_stage_specs` as the chain runs them.

        A strided 1 x 1 kernel without padding subsamples its input, which commutes with
        every stage of its chain (all 1 x 1): the stride goes to the first stage, so the
        later ones run on the subsampled pixels (a ResNet's strided 1 x 1 shortcut ran its
        first stage on four times the pixels it needed).
        """
        stages = self._stage_specs()
        if not (self._pointwise_kernel and any(s > 1 for s in self.stride)):
            return stages
        ones = (1,) * self.n_dim
        return [StageSpec(s.in_channels, s.out_channels, s.kernel_size,
                          self.stride if i == 0 else ones, s.padding, s.dilation, s.groups)
                for i, s in enumerate(stages)]

    def stage_weights(self) -> List[torch.Tensor]:
        """The weights of the factorized chain's convolutions, in execution order."""
        raise NotImplementedError

    def _executed_specs(self) -> List[StageSpec]:
        """The convolutions the factorized forward runs: :meth:`_chain_specs` with each
        run of merged pointwise stages as one."""
        return merged_specs(self._chain_specs(), self._runs, StageSpec)

    def _decompose_group(self, kernel: torch.Tensor, **options) -> List[torch.Tensor]:
        """Factors of one group's kernel, in the order of :meth:`_factor_tensors`."""
        raise NotImplementedError

    # ------------------------------------------------------------------ derived geometry

    @property
    def group_kernel_shape(self) -> Tuple[int, ...]:
        """Shape of one group's kernel, ``(out/groups, in/groups, *kernel_size)``."""
        return tuple(self._group_shape)

    @property
    def weight_shape(self) -> Tuple[int, ...]:
        """Shape of the dense kernel, as ``nn.ConvNd.weight``."""
        return tuple(self._weight_shape)

    def _axis_tuple(self, axis: int, value: int, default: int) -> List[int]:
        out = [default] * self.n_dim
        out[axis] = value
        return out

    def _spatial_stage(self, axis: int, in_channels: int, out_channels: int, groups: int,
                       ) -> StageSpec:
        """A stage convolving along one spatial axis only, with that axis' geometry."""
        return StageSpec(
            in_channels, out_channels,
            self._axis_tuple(axis, self.kernel_size[axis], 1),
            self._axis_tuple(axis, self.stride[axis], 1),
            self._axis_tuple(axis, self._conv_padding[axis], 0),
            self._axis_tuple(axis, self.dilation[axis], 1),
            groups,
        )

    def _full_stage(self, in_channels: int, out_channels: int, groups: int) -> StageSpec:
        """A stage with the layer's whole spatial geometry."""
        return StageSpec(in_channels, out_channels, self.kernel_size, self.stride,
                         self._conv_padding, self.dilation, groups)

    def _pointwise_stage(self, in_channels: int, out_channels: int, groups: int) -> StageSpec:
        ones = [1] * self.n_dim
        return StageSpec(in_channels, out_channels, ones, ones, [0] * self.n_dim, ones, groups)

    def _pointwise_shape(self) -> List[int]:
        return [1] * self.n_dim

    # ------------------------------------------------------------------ parameters

    def reset_parameters(self) -> None:
        """Random factors whose kernel has the scale of PyTorch's default conv init.

        PyTorch draws kernels uniformly in ``±1/sqrt(fan_in)`` (standard deviation
        ``1/sqrt(3 fan_in)``); each factor here is Gaussian with the standard deviation that
        gives the reconstructed kernel that same variance. The bias is drawn as PyTorch does.
        """
        fan_in = self.in_channels // self.groups * math.prod(self.kernel_size)
        variance = 1.0 / (3.0 * fan_in)
        factors = self._factor_tensors()
        std = (variance / self._n_summed_terms()) ** (1.0 / (2 * len(factors)))
        with torch.no_grad():
            for factor in factors:
                factor.normal_(0.0, std)
            if self.bias is not None:
                bound = 1.0 / math.sqrt(fan_in)
                self.bias.uniform_(-bound, bound)

    @property
    def n_parameters(self) -> int:
        """Number of parameters, factors and bias."""
        return sum(p.numel() for p in self.parameters())

    @property
    def dense_parameters(self) -> int:
        """Parameters of the equivalent dense convolution (kernel and bias)."""
        bias = self.out_channels if self.bias is not None else 0
        return math.prod(self.weight_shape) + bias

    def reconstruct_kernel(self) -> torch.Tensor:
        """The dense kernel, shaped as ``nn.ConvNd.weight``; differentiable."""
        return self._group_kernels().reshape(self._weight_shape)

    def init_from_kernel(self, kernel: torch.Tensor, **options) -> "FactorizedConv":
        """Set the factors to a decomposition of a dense kernel.

        Parameters
        ----------
        kernel : torch.Tensor
            Shaped as ``nn.ConvNd.weight``, any floating dtype and device.
        **options
            Passed to the decomposition (e.g. ``n_iter_max``, ``random_state``,
            ``precision`` for CP; see :mod:`tt_conv.decompose`).

        Returns
        -------
        FactorizedConv
            ``self``.
        """
        if tuple(kernel.shape) != self.weight_shape:
            raise ValueError(
                f"kernel has shape {tuple(kernel.shape)}, expected {self.weight_shape} for this "
                f"layer"
            )
        check_finite(kernel, "kernel")
        groups = kernel.reshape(self.groups, *self.group_kernel_shape)
        per_group = [self._decompose_group(groups[g], **options) for g in range(self.groups)]
        with torch.no_grad():
            for i, target in enumerate(self._factor_tensors()):
                stacked = torch.stack([factors[i] for factors in per_group])
                if stacked.numel() != target.numel():  # pragma: no cover - a subclass bug
                    raise RuntimeError(
                        f"decomposition gave a factor of shape {tuple(stacked.shape)}, "
                        f"expected {tuple(target.shape)} elements"
                    )
                # Factors are stored at most 3-D (see _make_factors), so reshape.
                target.copy_(stacked.reshape(target.shape).to(dtype=target.dtype,
                                                              device=target.device))
        return self

    # ------------------------------------------------------------------ execution

    def set_implementation(self, implementation: str) -> None:
        """Choose how :meth:`forward` runs: ``"auto"``, ``"factorized"`` or ``"reconstructed"``."""
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}"
            )
        if implementation == "auto":
            implementation = (
                "factorized" if self.estimated_cost("factorized")
                < self.estimated_cost("reconstructed") else "reconstructed"
            )
        self.implementation = implementation
        self._factorized = implementation == "factorized"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batched = x.dim() == self.n_dim + 2
        if not batched:
            if x.dim() != self.n_dim + 1:
                raise ValueError(
                    f"expected a {self.n_dim + 2}-D (batched) or {self.n_dim + 1}-D input for a "
                    f"{self.n_dim}-D convolution, got shape {list(x.shape)}"
                )
            x = x.unsqueeze(0)
        if x.size(1) != self.in_channels:
            raise ValueError(
                f"input has {x.size(1)} channels, expected in_channels={self.in_channels}"
            )
        if self._factorized:
            y = self._forward_factorized(x)
        else:
            y = self._forward_reconstructed(x)
        return y if batched else y.squeeze(0)

    def _forward_factorized(self, x: torch.Tensor) -> torch.Tensor:
        if self._channels_last_chain and not has_unit_spatial_axis(x):
            # oneDNN (CPU) and cuDNN run pointwise and depthwise convolutions far faster on
            # channels-last activations; the values are the same whatever the layout.
            if x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            elif x.dim() == 5:
                x = x.contiguous(memory_format=torch.channels_last_3d)
        weights, last_bias, kept = self._executed_weights(is_channels_last(x))
        last = len(weights) - 1
        for i, weight in enumerate(weights):
            # The first stage is pointwise and bias-free, so padding after it is exact for
            # every padding mode and touches the fewest channels.
            if i == 1 and self._explicit_pad:
                x = F.pad(x, self._pad, mode=self._pad_mode)
            if has_unit_spatial_axis(x):
                # Channels-last activations with a spatial axis of size 1 are where PyTorch's
                # CPU convolution was seen to read memory it never wrote (NaN outputs now
                # and then; see docs/user_guide/layers.rst): such stages run contiguous, and
                # so do their weights (a channels-last weight would choose that path again).
                x = x.contiguous()
            # Kept in the chain's input layout; a stage whose input came out in the other
            # one (a strided or 3-D convolution may not keep channels-last) gets a copy.
            weight = laid_out([weight], is_channels_last(x))[0]
            bias = last_bias if i == last else None
            y: Optional[torch.Tensor] = None
            if kept and not torch.jit.is_scripting():
                y = self._packed_conv(i, x, weight, bias, self._stage_stride[i],
                                      self._stage_padding[i], self._stage_dilation[i],
                                      self._stage_groups[i])
            x = y if y is not None else conv_nd(
                x, weight, bias, self._stage_stride[i], self._stage_padding[i],
                self._stage_dilation[i], self._stage_groups[i])
        return x

    def _executed_weights(self, channels_last: bool = False
                          ) -> Tuple[List[torch.Tensor], Optional[torch.Tensor], bool]:
        """The factorized chain's weights and the bias of its last stage, laid out for
        channels-last activations or contiguous ones, and whether they are the kept ones."""
        if torch.jit.is_scripting():
            return self._formed_weights(), self.bias, False
        return self._kept(False, channels_last)

    def _reconstructed_weights(self, channels_last: bool = False
                               ) -> Tuple[torch.Tensor, Optional[torch.Tensor], bool]:
        """The reconstructed kernel and the bias, and whether they are the kept ones."""
        if torch.jit.is_scripting():
            return self.reconstruct_kernel(), self.bias, False
        weights, bias, kept = self._kept(True, channels_last)
        return weights[0], bias, kept

    @torch.jit.unused
    def _packed_conv(self, stage: int, x: torch.Tensor, weight: torch.Tensor,
                     bias: Optional[torch.Tensor], stride: List[int], padding: List[int],
                     dilation: List[int], groups: int) -> Optional[torch.Tensor]:
        """Stage ``stage`` run with its kept weight prepacked for oneDNN, or None where that
        path does not apply (see :mod:`tt_conv.layers._packed`)."""
        if x.dtype != weight.dtype:
            # Under autocast the kept weights are in its dtype, and a convolution would cast
            # its input to it too; otherwise the plain convolution says what is wrong.
            if _autocast_dtype(x.device.type) != weight.dtype:
                return None
            x = x.to(weight.dtype)
        if self._packs is None:
            self._packs = PackedConvs()
        return self._packs.run(stage, x, weight, bias, stride, padding, dilation, groups)

    def _formed_weights(self) -> List[torch.Tensor]:
        if not self._merging:
            return self.stage_weights()
        return merge_stage_weights(self.stage_weights(), self._runs, self._chain_groups)

    @torch.jit.unused
    def _kept(self, reconstructed: bool, channels_last: bool = False
              ) -> Tuple[List[torch.Tensor], Optional[torch.Tensor], bool]:
        """The weights the forward convolves with, kept while the factors stay as they are.

        Forming them costs reshapes, copies and matrix products over the factors on every
        call (merging a late 1 x 1 layer's stages costs more, at batch 1, than the stage it
        saves; rebuilding a kernel costs more than convolving with it), and under autocast
        the convolutions cast each one again. In evaluation mode outside autograd they are
        formed once, cast to the autocast dtype if one is active, and formed again only when
        a factor or the bias is changed (its version counter), replaced or moved, or the
        autocast dtype changes. In training mode, under autograd, or inside
        ``torch.compile``, they are formed on every call. The third value says which: kept
        weights are also kept prepacked for oneDNN on a CPU (:meth:`_packed_conv`).

        Either way they are laid out as the activations are (``channels_last``) or
        contiguous: the products that form them are transposed views, and a convolution
        given a weight in neither layout copies it in a slow reorder on every call (a TT
        layer's reconstructed 3 x 3 kernel ran several times slower than the dense layer).
        """
        tensors = [*self._factor_tensors()] + ([] if self.bias is None else [self.bias])
        if self.training or torch.compiler.is_compiling() or (
                torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
            weights = [self.reconstruct_kernel()] if reconstructed else self._formed_weights()
            return laid_out(weights, channels_last), self.bias, False
        device = tensors[0].device.type
        cast = _autocast_dtype(device)
        try:
            key = (reconstructed, cast, channels_last,
                   tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors))
        except RuntimeError:  # inference tensors keep no version counter: nothing to key on
            key = None
        if key is not None and self._inference_cache is not None \
                and self._inference_cache[0] == key:
            return (*self._inference_cache[1], True)
        # Formed in the factors' dtype (a product formed under autocast would be reused
        # outside it), then cast as the convolutions under autocast would cast them.
        context = (torch.autocast(device, enabled=False) if cast is not None
                   else contextlib.nullcontext())
        with context, torch.no_grad():
            weights = [self.reconstruct_kernel()] if reconstructed else self._formed_weights()
            bias = self.bias
            if cast is not None:
                weights = [w.to(cast) for w in weights]
                bias = None if bias is None else bias.to(cast)
            weights = laid_out(weights, channels_last)
        self._packs = None  # packed from the weights formed before
        if key is None:
            return weights, bias, False
        self._inference_cache = (key, (weights, bias))
        return weights, bias, True

    def forget_kept_weights(self) -> None:
        """Form the weights again on the next call.

        Needed only after changing a factor in place through ``.data`` (``p.data.mul_(2)``):
        such a change bypasses the version counter that tells the layer its factors
        changed. Changes through the parameters themselves (an optimiser step,
        ``load_state_dict``, ``p.copy_`` under ``torch.no_grad``) are seen.
        """
        self._inference_cache = None
        self._packs = None

    def _apply(self, fn, recurse=True):
        self._inference_cache = None  # the factors move or change dtype
        self._packs = None
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = super().__getstate__()
        state["_inference_cache"] = None
        state["_packs"] = None  # oneDNN's packed tensors have no storage to copy or pickle
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_packs", None)  # pickled before layers packed weights

    def _forward_reconstructed(self, x: torch.Tensor) -> torch.Tensor:
        if self._explicit_pad:
            x = F.pad(x, self._pad, mode=self._pad_mode)
        kernel, bias, kept = self._reconstructed_weights(
            is_channels_last(x) and not has_unit_spatial_axis(x))
        if kept and not torch.jit.is_scripting():
            y = self._packed_conv(0, x, kernel, bias, list(self.stride), self._conv_padding,
                                  list(self.dilation), self.groups)
            if y is not None:
                return y
        return conv_nd(x, kernel, bias, list(self.stride),
                       self._conv_padding, list(self.dilation), self.groups)

    # ------------------------------------------------------------------ cost

    def _input_shape(self, input_shape: Sequence[int]) -> Tuple[int, Tuple[int, ...]]:
        shape = tuple(int(s) for s in input_shape)
        if len(shape) == self.n_dim + 1:
            shape = (1, *shape)
        if len(shape) != self.n_dim + 2:
            raise ValueError(
                f"input_shape must be (batch, channels, *spatial) or (channels, *spatial) with "
                f"{self.n_dim} spatial axes, got {tuple(input_shape)}"
            )
        if shape[1] != self.in_channels:
            raise ValueError(
                f"input_shape has {shape[1]} channels, expected in_channels={self.in_channels}"
            )
        return shape[0], shape[2:]

    def _stage_sizes(self, spatial: Sequence[int]) -> List[Tuple[int, ...]]:
        """Spatial size at the input of each stage, and at the output of the last."""
        sizes = [tuple(spatial)]
        for i, spec in enumerate(self._executed_specs()):
            size = sizes[-1]
            if i == 1 and self._explicit_pad:
                size = tuple(n + a + b for n, (a, b) in zip(size, self._pad_pairs))
            pads = [(p, p) for p in spec.padding]
            sizes.append(output_size(size, pads, spec.kernel_size, spec.stride, spec.dilation))
        return sizes

    def output_shape(self, input_shape: Sequence[int]) -> Tuple[int, ...]:
        """Output shape for an input of shape ``(batch, channels, *spatial)``."""
        batch, spatial = self._input_shape(input_shape)
        out = output_size(spatial, self._pad_pairs, self.kernel_size, self.stride, self.dilation)
        return (batch, self.out_channels, *out)

    def flops(self, input_shape: Sequence[int], implementation: Optional[str] = None,
              autograd: bool = False) -> int:
        """FLOPs of one forward pass, as :mod:`torch.utils.flop_counter` counts them.

        Two per multiply-add of every convolution and matrix product; bias additions,
        padding and elementwise products are not counted. Outside autograd a layer keeps the
        weights it convolves with (the reconstructed kernel, the products merging
        consecutive 1 x 1 stages) until its factors change, so a pass costs its convolutions
        alone; under autograd every call forms them again (``autograd=True`` counts that).

        Parameters
        ----------
        input_shape : tuple of int
            ``(batch, channels, *spatial)`` or ``(channels, *spatial)``.
        implementation : {None, "factorized", "reconstructed", "dense"}
            Defaults to the layer's own; ``"dense"`` is the plain convolution alone.
        autograd : bool
            Count a call under autograd (a training step's forward).
        """
        batch, spatial = self._input_shape(input_shape)
        implementation = implementation or self.implementation
        out = output_size(spatial, self._pad_pairs, self.kernel_size, self.stride, self.dilation)
        dense = conv_flops(batch, self.out_channels, self.in_channels // self.groups,
                           self.kernel_size, out)
        if implementation == "dense":
            return dense
        if implementation == "reconstructed":
            return dense + (self._reconstruction_flops() if autograd else 0)
        if implementation != "factorized":
            raise ValueError(
                f"implementation must be 'factorized', 'reconstructed' or 'dense', got "
                f"{implementation!r}"
            )
        sizes = self._stage_sizes(spatial)
        total = self._stage_weight_flops() if autograd else 0
        for spec, size in zip(self._executed_specs(), sizes[1:]):
            total += conv_flops(batch, spec.out_channels, spec.in_channels // spec.groups,
                                spec.kernel_size, size)
        return total

    def estimated_cost(self, implementation: str) -> float:
        """Relative cost of an implementation on a nominal input, for ``"auto"``.

        Multiply-adds plus a charge per activation read and written; depthwise stages are
        charged extra for their low arithmetic intensity.
        """
        spatial = tuple(max(_NOMINAL_SIZE, (k - 1) * d + 1)
                        for k, d in zip(self.kernel_size, self.dilation))
        if implementation == "reconstructed":
            out = output_size(spatial, self._pad_pairs, self.kernel_size, self.stride,
                              self.dilation)
            macs = self.flops((1, self.in_channels, *spatial), "dense") / 2
            traffic = self.in_channels * math.prod(spatial) + self.out_channels * math.prod(out)
            return macs + _ACTIVATION_COST * traffic + self._reconstruction_flops() / 2
        sizes = self._stage_sizes(spatial)
        cost = self._stage_weight_flops() / 2
        for spec, size_in, size_out in zip(self._executed_specs(), sizes[:-1], sizes[1:]):
            macs = conv_flops(1, spec.out_channels, spec.in_channels // spec.groups,
                              spec.kernel_size, size_out) / 2
            if spec.depthwise:
                macs *= _DEPTHWISE_PENALTY
            traffic = spec.in_channels * math.prod(size_in) + spec.out_channels * math.prod(size_out)
            cost += macs + _ACTIVATION_COST * traffic
        return cost

    # ------------------------------------------------------------------ export

    def _dense_conv_class(self) -> Type[nn.Module]:
        return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[self.n_dim - 1]

    def to_conv(self) -> nn.Module:
        """The dense ``nn.Conv1d/2d/3d`` with this layer's geometry and reconstructed kernel."""
        param = next(self.parameters())
        conv = self._dense_conv_class()(
            self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
            padding=self.padding, dilation=self.dilation, groups=self.groups,
            bias=self.bias is not None, padding_mode=self.padding_mode,
            device=param.device, dtype=param.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.reconstruct_kernel())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def to_sequential(self, as_executed: bool = False) -> nn.Sequential:
        """The factorized chain as an ``nn.Sequential`` of plain PyTorch modules.

        It runs without tt_conv, computes the same output and holds as many parameters as
        this layer (CP's depthwise stage is exported as one depthwise convolution per
        spatial axis).

        Parameters
        ----------
        as_executed : bool
            Export the convolutions the factorized forward runs instead: consecutive 1 x 1
            stages merged into one (Tucker's and TT's 1 x 1 layers become two
            convolutions), CP's small depthwise stage as one. Fewer, cheaper modules for
            inference; the parameter count can differ from the layer's.
        """
        if as_executed:
            with torch.no_grad():
                return self._sequential(self._executed_specs(), self._formed_weights())
        return self._sequential(self._chain_specs(), self.stage_weights())

    def _sequential(self, specs: List[StageSpec], weights: List[torch.Tensor]) -> nn.Sequential:
        """Plain convolutions with the geometry of ``specs`` holding ``weights`` (the padding
        module before the second, the bias on the last)."""
        conv_class = self._dense_conv_class()
        weights = [w.detach() for w in weights]
        modules: List[nn.Module] = []
        for i, (spec, weight) in enumerate(zip(specs, weights)):
            if i == 1 and self._explicit_pad:
                modules.append(self._pad_module())
            last = i == len(specs) - 1
            conv = conv_class(
                spec.in_channels, spec.out_channels, spec.kernel_size, stride=spec.stride,
                padding=spec.padding, dilation=spec.dilation, groups=spec.groups,
                bias=last and self.bias is not None, device=weight.device, dtype=weight.dtype,
            )
            with torch.no_grad():
                conv.weight.copy_(weight)
                if last and self.bias is not None:
                    conv.bias.copy_(self.bias)
            modules.append(conv)
        return nn.Sequential(*modules)

    def _pad_module(self) -> nn.Module:
        if self.padding_mode == "zeros":
            cls = (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)[self.n_dim - 1]
            return cls(tuple(self._pad), 0.0)
        return _PAD_MODULES[self.padding_mode][self.n_dim - 1](tuple(self._pad))

    # ------------------------------------------------------------------ construction

    @classmethod
    def shaped_like(cls, conv: nn.Module, factorization: Optional[str] = None, rank=0.25,
                    implementation: str = "auto") -> "FactorizedConv":
        """A layer of ``conv``'s geometry (and bias, device, dtype) at ``rank``, with its
        initial weights: what :meth:`from_conv` then decomposes ``conv``'s kernel into, and
        what a measured time needs (it does not depend on the weights)."""
        target = cls if cls is not FactorizedConv else FactorizedConv.class_for(factorization)
        geometry, kernel, bias = conv_geometry(conv)
        return target(**geometry, bias=bias is not None, rank=rank,
                      implementation=implementation, device=kernel.device, dtype=kernel.dtype)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Module,
        factorization: Optional[str] = None,
        rank=0.25,
        implementation: str = "auto",
        **options,
    ) -> "FactorizedConv":
        """Factorize a trained convolution.

        Parameters
        ----------
        conv : nn.Conv1d, nn.Conv2d, nn.Conv3d or FactorizedConv
            The layer to factorize; a factorized layer is re-factorized from its
            reconstructed kernel (its bias and geometry kept).
        factorization : {"cp", "tucker", "tt"}
            Needed when called on :class:`FactorizedConv` itself; a subclass knows its own.
        rank : int, tuple of int or float
            See :class:`FactorizedConv`; default keeps a quarter of the kernel's parameters.
        implementation : {"auto", "factorized", "reconstructed"}
        **options
            Passed to the decomposition (see :meth:`init_from_kernel`).

        Returns
        -------
        FactorizedConv
            A new layer on the conv's device and in its dtype; the decomposition itself runs
            in float32 or float64.

        Raises
        ------
        TypeError
            If ``conv`` is not a supported convolution (transposed convolutions are not
            supported yet).
        ValueError
            For an unknown factorization, a bad rank, or a kernel holding NaN or inf.
        """
        if cls is FactorizedConv:
            if factorization is None:
                raise ValueError(
                    "factorization is required with FactorizedConv.from_conv: one of "
                    f"{sorted(FactorizedConv._registry)}"
                )
            target = FactorizedConv.class_for(factorization)
        else:
            if factorization is not None and check_factorization(factorization) != cls.factorization:
                raise ValueError(
                    f"{cls.__name__}.from_conv makes {cls.factorization!r} layers, got "
                    f"factorization={factorization!r}"
                )
            target = cls
        layer = target.shaped_like(conv, rank=rank, implementation=implementation)
        _, kernel, bias = conv_geometry(conv)
        layer.init_from_kernel(kernel.detach(), **options)
        if bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias)
        return layer

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        if any(v != 1 for v in self.stride):
            s += f", stride={self.stride}"
        if self.padding != (0,) * self.n_dim:
            s += f", padding={self.padding!r}"
        if any(v != 1 for v in self.dilation):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s + f", rank={self.rank}, implementation={self.implementation!r}"


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast casts convolutions to on ``device_type``, or None when it is off."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):  # PyTorch < 2.4: one function per device type
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


def laid_out(weights: List[torch.Tensor], channels_last: bool) -> List[torch.Tensor]:
    """``weights`` in the memory layout a convolution reads without a reorder: channels-last
    (4-D and 5-D weights) beside channels-last activations, else contiguous."""
    out = []
    for w in weights:
        if channels_last and w.dim() == 4:
            w = w.contiguous(memory_format=torch.channels_last)
        elif channels_last and w.dim() == 5:
            w = w.contiguous(memory_format=torch.channels_last_3d)
        else:
            w = w.contiguous()
        out.append(w)
    return out


def has_unit_spatial_axis(x: torch.Tensor) -> bool:
    """Whether a 4-D or 5-D activation has a spatial axis of size 1 (e.g. a 1-D signal run
    through 2-D convolutions as ``(N, C, L, 1)``), where channels-last is not used."""
    if x.dim() < 4:
        return False
    for size in x.shape[2:]:
        if size == 1:
            return True
    return False


def conv_geometry(conv: nn.Module) -> Tuple[dict, torch.Tensor, Optional[torch.Tensor]]:
    """The constructor arguments, kernel and bias of a convolution to factorize.

    Raises
    ------
    TypeError
        If ``conv`` is not ``nn.Conv1d/2d/3d`` or a :class:`FactorizedConv`.
    """
    if isinstance(conv, FactorizedConv):
        kernel = conv.reconstruct_kernel().detach()
        bias = conv.bias
    elif isinstance(conv, nn.modules.conv._ConvTransposeNd):
        raise TypeError(
            f"{type(conv).__name__} is not supported yet: only nn.Conv1d, nn.Conv2d and "
            f"nn.Conv3d (and factorized layers) can be factorized"
        )
    elif type(conv) in _CONV_TYPES or (
        isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        and not isinstance(conv, nn.modules.lazy.LazyModuleMixin)
    ):
        kernel = conv.weight.detach()
        bias = conv.bias
    elif isinstance(conv, nn.modules.lazy.LazyModuleMixin):
        raise TypeError(
            f"{type(conv).__name__} is not initialised yet: run one forward pass before "
            f"factorizing it"
        )
    else:
        raise TypeError(
            f"expected nn.Conv1d, nn.Conv2d, nn.Conv3d or a FactorizedConv, got "
            f"{type(conv).__name__}"
        )
    geometry = dict(
        in_channels=conv.in_channels, out_channels=conv.out_channels,
        kernel_size=tuple(conv.kernel_size), stride=tuple(conv.stride),
        padding=conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
        dilation=tuple(conv.dilation), groups=conv.groups, padding_mode=conv.padding_mode,
    )
    return geometry, kernel, None if bias is None else bias.detach()
