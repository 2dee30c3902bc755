"""Spatio-temporal layers: the convolutional tensor-train module and three ConvLSTM cells.

* :class:`ConvTT`: the convolutional tensor-train module of Su et al. (NeurIPS 2020), which
  maps the last ``steps`` states of a sequence to one output through ``order`` small
  convolutional cores and a sliding window over the states.
* :class:`ConvLSTMCell`, :class:`HigherOrderConvLSTMCell` and :class:`ConvTTLSTMCell`:
  LSTM cells whose gates are convolutions of the input and of the past hidden states (the
  last one, the last ``steps`` ones through a full kernel each, or through :class:`ConvTT`).

All of them work on 1-D, 2-D and 3-D spatial inputs (``[batch, channels, *spatial]``) and
use "same" zero padding, so states keep the input's spatial size.

The cells keep no state between calls: ``h, state = cell(x, state)`` takes the previous
:class:`LSTMState` and returns the next one, which is what DistributedDataParallel,
``torch.compile`` and activation checkpointing need. ``cell.initial_state(x)`` builds the
state of the maths at ``t = 0`` (all past states zero) for inputs like ``x``; passing
``state=None`` does the same.

Speed notes
-----------
The gate convolution runs as ONE convolution over ``concat(x, recurrent input)``: measured on
CPU (fp32 and bf16) this is faster than two convolutions whose outputs are added, because the
recurrent part alone (``rank`` channels for Conv-TT-LSTM) is too thin to use the machine well.

:class:`ConvTTLSTMCell` does not keep raw hidden states: when a hidden state is produced it
is convolved ONCE with every window kernel it will ever meet (one convolution from
``hidden_channels`` to ``order * window * rank`` channels, see :meth:`ConvTT.project`). By
linearity of convolution, the window convolution of a core is the sum of the matching slices
of those projections, so no convolution is ever recomputed at a later step. The tensor train
is advanced along its anti-diagonal: after each state, all ``order - 1`` inner cores run as
ONE grouped convolution, each on the value its predecessor produced one step earlier
(:class:`ConvTT` explains why that is the same recursion).

The pointwise work between the convolutions (the LSTM gate maths forward and backward, the
tensor-train sums and the dtype casts) runs fused, in as few passes over memory as the maths
allows, by :mod:`tt_conv.pointwise`: compiled kernels where a compiler exists (inductor's C++
on CPU, Triton on GPU), eager kernels otherwise (every cell's ``pointwise`` argument, or
:func:`set_pointwise` on a whole model). Under autocast the tensor-train stream is kept in the
compute dtype (bf16/fp16), which is the dtype its convolutions read, and every
concatenation is made in that dtype, so no separate cast runs; the cell state stays float32.
States follow the input's memory layout; channels-last is the fast one on CPU.
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._geometry import as_tuple, conv_nd
from .pointwise import POINTWISE_MODES, check_mode, empty_state, is_channels_last, lstm_update, \
    stream_sums

__all__ = [
    "ConvTT",
    "LSTMState",
    "ConvLSTMCell",
    "HigherOrderConvLSTMCell",
    "ConvTTLSTMCell",
    "lstm_update",
    "set_pointwise",
    "compile_cells",
    "POINTWISE_MODES",
]


class LSTMState(NamedTuple):
    """The state a recurrent cell carries from one step to the next.

    Attributes
    ----------
    cell : torch.Tensor
        The cell state ``c_{t-1}``, ``[batch, hidden_channels, *spatial]``.
    memory : tuple of torch.Tensor
        What the cell keeps of its past hidden states: ``(h_{t-1},)`` for
        :class:`ConvLSTMCell`, ``(h_{t-N}, ..., h_{t-1})`` (oldest first) for
        :class:`HigherOrderConvLSTMCell`, and the tensor-train stream of
        :meth:`ConvTT.initial_stream` for :class:`ConvTTLSTMCell`.
    """

    cell: torch.Tensor
    memory: Tuple[torch.Tensor, ...]


# ---------------------------------------------------------------------------- helpers


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _kernel_geometry(kernel_size, n_dim: Optional[int]) -> Tuple[int, Tuple[int, ...]]:
    """``(n_dim, kernel tuple)`` from an int or tuple kernel size; kernels must be odd."""
    if isinstance(kernel_size, int) and not isinstance(kernel_size, bool):
        n_dim = 2 if n_dim is None else n_dim
    else:
        try:
            inferred = len(kernel_size)
        except TypeError:
            raise TypeError(
                f"kernel_size must be an int or a tuple of ints, got {kernel_size!r}"
            ) from None
        if n_dim is not None and n_dim != inferred:
            raise ValueError(f"kernel_size {kernel_size!r} does not have n_dim={n_dim} axes")
        n_dim = inferred
    if n_dim not in (1, 2, 3):
        raise ValueError(f"n_dim must be 1, 2 or 3 (spatial dimensions), got {n_dim!r}")
    kernel = as_tuple(kernel_size, n_dim, "kernel_size")
    if any(k % 2 == 0 for k in kernel):
        # "Same" padding k // 2 keeps the size only for odd kernels; the maths needs that.
        raise ValueError(f"kernel_size must be odd on every axis, got {kernel_size!r}")
    return n_dim, kernel


def _uniform_(tensor: torch.Tensor, fan_in: int) -> None:
    """PyTorch's default convolution init: uniform in ``±1/sqrt(fan_in)``."""
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        tensor.uniform_(-bound, bound)


def _check_input(x: torch.Tensor, n_dim: int, channels: int, name: str, module: str) -> None:
    if x.dim() != n_dim + 2 or x.shape[1] != channels:
        raise ValueError(
            f"{module}: {name} must be [batch, {channels}, <{n_dim} spatial sizes>], "
            f"got shape {tuple(x.shape)}"
        )


def zeros_state(
    like: torch.Tensor, channels: int, channels_last: bool, dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """Zeros ``[batch, channels, *spatial]`` of ``like``, optionally laid out channels-last."""
    return empty_state(like, channels, channels_last, dtype).zero_()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the convolutions of ``x`` run in: autocast's when it is on, else ``x``'s."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _cat(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Concatenate on channels in ``dtype``: one copy, instead of a promoting concatenation
    followed by autocast's cast of the result."""
    return torch.cat([t if t.dtype == dtype else t.to(dtype) for t in tensors], dim=1)


def compile_cells(module: nn.Module, **options) -> nn.Module:
    """``torch.compile`` the forward of every recurrent cell in ``module``, in place.

    Each cell step (its convolutions and pointwise work) becomes one compiled graph; the
    loops over time and layers stay in Python, so nothing is unrolled and the compilation
    takes seconds per distinct cell shape. Inside it the pointwise work is traced as
    plain ops and fused by that compilation. ``options`` go to :meth:`torch.nn.Module.compile`
    (e.g. ``mode="max-autotune"``). Returns ``module``.
    """
    cells = [m for m in module.modules() if isinstance(m, _ConvLSTMBase)]
    if not cells:
        raise ValueError(f"compile_cells: {type(module).__name__} holds no recurrent cell")
    for cell in cells:
        cell.compile(**options)
    return module


def set_pointwise(module: nn.Module, mode: str) -> nn.Module:
    """Set how every recurrent cell (and :class:`ConvTT`) in ``module`` runs its pointwise
    work: ``"auto"``, ``"compiled"`` or ``"eager"`` (see :mod:`tt_conv.pointwise`).

    Returns ``module``.
    """
    check_mode(mode)
    for child in module.modules():
        if isinstance(child, (ConvTT, _ConvLSTMBase)):
            child.pointwise = mode
    return module


# ---------------------------------------------------------------------------- ConvTT


class ConvTT(nn.Module):
    """Convolutional tensor-train module: ``steps`` past states in, one tensor out.

    With ``P = order``, ``N = steps``, ``R = rank`` and window length ``L = N - P + 1``,
    core ``l`` (``l = 1..P``) reads the ``L`` consecutive states
    ``s_l, ..., s_{l+L-1}`` of the ``N`` given ones (oldest first, so core 1's window
    starts at the oldest state and core ``P``'s ends at the newest) and reduces them to
    ``R`` channels with one convolution over the window,
    ``U_l = sum_j W_{l,j} * s_{l+j} + b_l``. The tensor train then runs
    ``T_1 = U_1``, ``T_l = U_l + K_{l-1} * T_{l-1}`` and the output is
    ``K_P * concat(x, T_P) + b``, where ``x`` is an optional extra input of
    ``input_channels`` channels (a Conv-TT-LSTM's current input; none by default).

    Parameters
    ----------
    in_channels : int
        Channels of each past state.
    out_channels : int
        Channels of the output.
    order : int
        Number of tensor-train cores ``P``.
    steps : int
        Number of past states ``N`` (``steps >= order``).
    rank : int
        Tensor-train rank ``R`` (channels between the cores).
    kernel_size : int or tuple of int
        Kernel of every convolution (odd; "same" zero padding). A tuple's length sets the
        number of spatial dimensions; an int uses ``n_dim``.
    input_channels : int, optional
        Channels of the extra input ``x`` that the last core reads beside ``T_P``
        (default 0: no extra input).
    bias : bool
        Whether the output convolution has a bias (the window convolutions and inner
        cores always have one, as in the paper).
    n_dim : int, optional
        Number of spatial dimensions when ``kernel_size`` is an int (default 2).
    pointwise : {"auto", "compiled", "eager"}
        How the stream's additions run (:mod:`tt_conv.pointwise`; default: compiled where a
        compiler exists).

    Attributes
    ----------
    window_weight : Parameter
        ``[window * order * rank, in_channels, *kernel]``, every window kernel stacked as
        ONE convolution: row block ``(d, l)`` (``d`` slowest, then the core, then the rank)
        holds ``W_{l+1, j}`` for the window slot ``j = window - 1 - d``, i.e. slot ``d``
        counted back from the newest state of the window.
    window_bias : Parameter
        ``[order * rank]``: ``b_1, ..., b_P``.
    core_weight, core_bias : Parameter
        ``[(order - 1) * rank, rank, *kernel]`` and ``[(order - 1) * rank]``:
        ``K_1, ..., K_{P-1}`` stacked as one grouped convolution (``groups = order - 1``).
    output_weight, output_bias : Parameter
        ``[out_channels, input_channels + rank, *kernel]`` (input channels first) and
        ``[out_channels]``: ``K_P`` and its bias.

    Notes
    -----
    ``forward(states)`` computes the output from ``steps`` raw states. Over a sequence,
    use the *stream* instead (:meth:`initial_stream`, :meth:`stream_output`,
    :meth:`stream_update`): each new state is convolved once with all the window kernels
    (:meth:`project`), and the tensor train is advanced along its anti-diagonal. After state
    ``h_t`` every core's pending window covers the same last ``L`` states, and core ``l``'s
    value for time ``t + 1 + P - l`` needs only core ``l - 1``'s value for that time, which
    the previous update produced. So one grouped convolution applies all of
    ``K_1 .. K_{P-1}`` per step, instead of ``P - 1`` dependent convolutions, and nothing
    is recomputed. The results are those of the recursion above, exactly.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        order: int,
        steps: int,
        rank: int,
        kernel_size: Union[int, Sequence[int]],
        *,
        input_channels: int = 0,
        bias: bool = True,
        n_dim: Optional[int] = None,
        pointwise: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.pointwise = check_mode(pointwise)
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("order", order), ("steps", steps), ("rank", rank)):
            _positive_int(value, name)
        if isinstance(input_channels, bool) or not isinstance(input_channels, int) \
                or input_channels < 0:
            raise ValueError(f"input_channels must be an int >= 0, got {input_channels!r}")
        if steps < order:
            raise ValueError(
                f"steps must be >= order (each of the {order} cores needs a window of at "
                f"least one state), got steps={steps}, order={order}"
            )
        self.n_dim, self.kernel_size = _kernel_geometry(kernel_size, n_dim)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.input_channels = input_channels
        self.order = order
        self.steps = steps
        self.rank = rank
        self.window = steps - order + 1
        self._padding = [k // 2 for k in self.kernel_size]
        self._ones = [1] * self.n_dim
        factory = {"device": device, "dtype": dtype}
        k = self.kernel_size
        # Parameters are stored in the shapes the convolutions read, so every step uses
        # the leaf tensors themselves (autocast casts each of them once per region).
        self.window_weight = nn.Parameter(
            torch.empty(self.window * order * rank, in_channels, *k, **factory))
        self.window_bias = nn.Parameter(torch.empty(order * rank, **factory))
        self.core_weight = nn.Parameter(torch.empty((order - 1) * rank, rank, *k, **factory))
        self.core_bias = nn.Parameter(torch.empty((order - 1) * rank, **factory))
        self.output_weight = nn.Parameter(
            torch.empty(out_channels, input_channels + rank, *k, **factory))
        if bias:
            self.output_bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("output_bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default conv init, each convolution with its own fan-in."""
        taps = math.prod(self.kernel_size)
        window_fan_in = self.window * self.in_channels * taps
        _uniform_(self.window_weight, window_fan_in)
        _uniform_(self.window_bias, window_fan_in)
        _uniform_(self.core_weight, self.rank * taps)
        _uniform_(self.core_bias, self.rank * taps)
        output_fan_in = (self.input_channels + self.rank) * taps
        _uniform_(self.output_weight, output_fan_in)
        if self.output_bias is not None:
            _uniform_(self.output_bias, output_fan_in)

    @property
    def projection_channels(self) -> int:
        """Channels of :meth:`project`'s output: ``window * order * rank``."""
        return self.window * self.order * self.rank

    def extra_repr(self) -> str:
        extra = f", input_channels={self.input_channels}" if self.input_channels else ""
        return (f"{self.in_channels}, {self.out_channels}, order={self.order}, "
                f"steps={self.steps}, rank={self.rank}, kernel_size={self.kernel_size}{extra}")

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
              groups: int = 1) -> torch.Tensor:
        return conv_nd(x, weight, bias, self._ones, self._padding, self._ones, groups)

    def _projection_bias(self) -> torch.Tensor:
        # b_l rides on the block of window slot 0 only, so each window sum has it once.
        if self.window == 1:
            return self.window_bias
        return F.pad(self.window_bias, ((self.window - 1) * self.order * self.rank, 0))

    def project(self, state: torch.Tensor) -> torch.Tensor:
        """Convolve one state with every window kernel at once.

        Returns ``[batch, window * order * rank, *spatial]``, channel block ``(d, l)`` as in
        :attr:`window_weight`; the window biases are added to the blocks of slot 0
        (``d = window - 1``).
        """
        return self._conv(state, self.window_weight, self._projection_bias())

    def _block(self, projection: torch.Tensor, d: int, core: int) -> torch.Tensor:
        start = (d * self.order + core) * self.rank
        return projection[:, start:start + self.rank]

    def tensor_train(self, states: Sequence[torch.Tensor]) -> torch.Tensor:
        """``T_P`` (``rank`` channels) of ``steps`` raw states, oldest first."""
        projections = [self.project(s) for s in states]
        rank, window = self.rank, self.window
        train: Optional[torch.Tensor] = None
        for core in range(self.order):
            # U = sum_j W_{core,j} * s_{core+j}: block d = window - 1 - j of each projection.
            u = self._block(projections[core], window - 1, core)
            for j in range(1, window):
                u = u + self._block(projections[core + j], window - 1 - j, core)
            if train is None:
                train = u
            else:
                rows = slice((core - 1) * rank, core * rank)
                train = self._conv(train, self.core_weight[rows], self.core_bias[rows]) + u
        assert train is not None
        return train

    def _output(self, train: torch.Tensor, x: Optional[torch.Tensor]) -> torch.Tensor:
        if self.input_channels:
            if x is None:
                raise ValueError(
                    f"ConvTT was built with input_channels={self.input_channels}: pass x")
            _check_input(x, self.n_dim, self.input_channels, "x", "ConvTT")
            train = _cat((x, train), compute_dtype(train))
        elif x is not None:
            raise ValueError("ConvTT was built with input_channels=0 but x was given")
        return self._conv(train, self.output_weight, self.output_bias)

    def forward(self, states: Union[torch.Tensor, Sequence[torch.Tensor]],
                x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Apply the module to the last ``steps`` states.

        Parameters
        ----------
        states : sequence of torch.Tensor
            ``steps`` tensors ``[batch, in_channels, *spatial]``, oldest first (or one
            tensor ``[batch, steps, in_channels, *spatial]``).
        x : torch.Tensor, optional
            The extra input ``[batch, input_channels, *spatial]`` when
            ``input_channels > 0``.

        Returns
        -------
        torch.Tensor
            ``[batch, out_channels, *spatial]``.
        """
        if isinstance(states, torch.Tensor):
            if states.dim() != self.n_dim + 3:
                raise ValueError(
                    f"ConvTT: states as one tensor must be [batch, {self.steps}, "
                    f"{self.in_channels}, <{self.n_dim} spatial sizes>], got shape "
                    f"{tuple(states.shape)}")
            states = states.unbind(1)
        if len(states) != self.steps:
            raise ValueError(f"ConvTT: expected {self.steps} states, got {len(states)}")
        for i, state in enumerate(states):
            _check_input(state, self.n_dim, self.in_channels, f"states[{i}]", "ConvTT")
        return self._output(self.tensor_train(states), x)

    # -- streaming over a sequence

    def initial_stream(self, like: torch.Tensor, channels_last: bool = False,
                       dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, ...]:
        """The stream before the first step, when every past state is zero.

        Parameters
        ----------
        like : torch.Tensor
            ``[batch, any, *spatial]``: batch and spatial size, device (and default dtype).
        channels_last : bool
            Lay the stream's tensors out channels-last.
        dtype : torch.dtype, optional
            The stream's dtype (default: the compute dtype, i.e. autocast's when autocast is
            on, else ``like``'s).

        Returns
        -------
        tuple of torch.Tensor
            ``(train, inner, *partial_window_sums)``: ``train`` is ``T_P`` of the first
            step (``rank`` channels), ``inner`` holds ``T_l`` for time ``P - l``,
            ``l = 1..P-1`` (``(order - 1) * rank`` channels), and the ``window - 1``
            partial window sums (``order * rank`` channels each) belong to the next
            updates. With zero states all of them come from the biases only, so the stream
            depends on the parameters: build it in the forward pass, once per sequence.
        """
        dtype = compute_dtype(like) if dtype is None else dtype
        spatial = tuple(like.shape[2:])
        rank, order = self.rank, self.order
        ones = (1,) * self.n_dim
        image = self.window_bias.view(1, order * rank, *ones).expand(1, order * rank, *spatial)
        # T_l of all-zero windows: B_1 = b_1, B_l = b_l + K_{l-1} * B_{l-1} (one sample).
        trains = [image[:, :rank]]
        for core in range(1, order):
            rows = slice((core - 1) * rank, core * rank)
            trains.append(image[:, core * rank:(core + 1) * rank] + self._conv(
                trains[-1], self.core_weight[rows], self.core_bias[rows]))
        parts = [trains[-1], torch.cat(trains[:-1], dim=1) if order > 1 else image[:, :0]]
        parts += [image] * (self.window - 1)
        # Materialised per sample, in the wanted layout and dtype.
        return tuple(zeros_state(like, part.shape[1], channels_last, dtype) + part.to(dtype)
                     for part in parts)

    def stream_output(self, stream: Sequence[torch.Tensor],
                      x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The output at the current step: ``K_P * concat(x, T_P) + b``."""
        if len(stream) != self.window + 1:
            raise ValueError(
                f"ConvTT: a stream holds {self.window + 1} tensors, got {len(stream)}")
        return self._output(stream[0], x)

    def stream_update(self, stream: Sequence[torch.Tensor],
                      state: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The stream after a new state ``h_t``: one projection and one grouped conv."""
        inner, partials = stream[1], stream[2:]
        projection = self.project(state)
        advanced = None
        if self.order > 1:
            # All inner cores at once: K_l reads T_l, which the previous update produced.
            advanced = self._conv(inner, self.core_weight, self.core_bias,
                                  groups=self.order - 1)
        return stream_sums(projection, advanced, partials, self.order, self.rank,
                           self.window, self.pointwise)


# ---------------------------------------------------------------------------- cells


class _ConvLSTMBase(nn.Module):
    """What the three cells share: validation, initial state and the LSTM step.

    A subclass says how its gate pre-activations come from the input and the memory
    (:meth:`_gates`) and what it keeps of a new hidden state (:meth:`_remember`).
    """

    in_channels: int
    hidden_channels: int
    n_dim: int

    def _init_geometry(self, in_channels, hidden_channels, kernel_size, n_dim,
                       pointwise) -> None:
        self.pointwise = check_mode(pointwise)
        _positive_int(in_channels, "in_channels")
        _positive_int(hidden_channels, "hidden_channels")
        self.n_dim, self.kernel_size = _kernel_geometry(kernel_size, n_dim)
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self._padding = [k // 2 for k in self.kernel_size]
        self._ones = [1] * self.n_dim

    def _memory_channels(self) -> List[int]:
        raise NotImplementedError

    def _gates(self, x: torch.Tensor, memory: Tuple[torch.Tensor, ...]) -> torch.Tensor:
        raise NotImplementedError

    def _remember(self, memory: Tuple[torch.Tensor, ...],
                  h: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def _input_like(self, x: Union[torch.Tensor, Sequence[int]], channels_last: Optional[bool],
                    dtype: Optional[torch.dtype], device) -> Tuple[torch.Tensor, bool]:
        """An empty ``[batch, 0, *spatial]`` tensor standing for the input, and the layout."""
        if not isinstance(x, torch.Tensor):
            shape = tuple(x)
            if len(shape) != self.n_dim + 2 or not all(isinstance(n, int) for n in shape):
                raise ValueError(
                    f"{type(self).__name__}.initial_state: the input shape must be [batch, "
                    f"channels, <{self.n_dim} spatial sizes>], got {x!r}")
            if device is None or dtype is None:
                reference = next(self.parameters())
                device = reference.device if device is None else device
                dtype = reference.dtype if dtype is None else dtype
            return (torch.empty((shape[0], 0, *shape[2:]), dtype=dtype, device=device),
                    bool(channels_last))
        if x.dim() != self.n_dim + 2:
            raise ValueError(
                f"{type(self).__name__}.initial_state: x must be [batch, channels, "
                f"<{self.n_dim} spatial sizes>], got shape {tuple(x.shape)}")
        if channels_last is None:
            channels_last = is_channels_last(x)
        like = torch.empty((x.shape[0], 0, *x.shape[2:]), dtype=dtype or x.dtype,
                           device=x.device if device is None else device)
        return like, channels_last

    def initial_state(self, x: Union[torch.Tensor, Sequence[int]],
                      channels_last: Optional[bool] = None,
                      dtype: Optional[torch.dtype] = None, device=None) -> LSTMState:
        """The state of the maths at ``t = 0`` (all past states zero) for inputs like ``x``.

        Parameters
        ----------
        x : torch.Tensor or tuple of int
            An input ``[batch, channels, *spatial]`` of the cell, or just its shape. Of a
            tensor only the batch and spatial sizes, layout, device and dtype are used.
        channels_last : bool, optional
            Lay the state out channels-last (default: as ``x`` is laid out).
        dtype, device : optional
            Default: ``x``'s (for a shape, the parameters').
        """
        like, channels_last = self._input_like(x, channels_last, dtype, device)
        cell = zeros_state(like, self.hidden_channels, channels_last)
        # Past hidden states in the dtype the gate convolution reads (autocast's, if on).
        memory = tuple(zeros_state(like, c, channels_last, compute_dtype(like))
                       for c in self._memory_channels())
        return LSTMState(cell, memory)

    def forward(self, x: torch.Tensor,
                state: Optional[LSTMState] = None) -> Tuple[torch.Tensor, LSTMState]:
        """One time step.

        Parameters
        ----------
        x : torch.Tensor
            ``[batch, in_channels, *spatial]``.
        state : LSTMState, optional
            The state returned by the previous step (default: :meth:`initial_state`).

        Returns
        -------
        (h, state)
            The new hidden state ``[batch, hidden_channels, *spatial]`` and the state to
            pass to the next step.
        """
        _check_input(x, self.n_dim, self.in_channels, "x", type(self).__name__)
        if state is None:
            state = self.initial_state(x)
        gates = self._gates(x, state.memory)
        h, c = lstm_update(gates, state.cell, self.pointwise)
        return h, LSTMState(c, self._remember(state.memory, h))


class HigherOrderConvLSTMCell(_ConvLSTMBase):
    """Full higher-order ConvLSTM cell: a separate kernel for each of ``steps`` past states.

    ``[i, f, o, g] = W * concat(x_t, h_{t-1}, ..., h_{t-N}) + b`` (one convolution), then
    the LSTM step of :func:`lstm_update`. With ``steps=1`` this is the ConvLSTM.

    Parameters
    ----------
    in_channels, hidden_channels : int
        Channels of the input and of the hidden (and cell) state.
    kernel_size : int or tuple of int
        Odd kernel; "same" zero padding. A tuple's length sets the number of spatial
        dimensions; an int uses ``n_dim``.
    steps : int
        Number of past hidden states ``N``.
    n_dim : int, optional
        Spatial dimensions when ``kernel_size`` is an int (default 2).
    pointwise : {"auto", "compiled", "eager"}
        How the LSTM step runs (:mod:`tt_conv.pointwise`; default: compiled where a
        compiler exists).

    Attributes
    ----------
    weight : Parameter
        ``[4 * hidden, in_channels + steps * hidden, *kernel]``; input channels first, then
        ``h_{t-1}``, ..., ``h_{t-N}``. Output channels are the gates i, f, o, g.
    bias : Parameter
        ``[4 * hidden]``.
    """

    def __init__(self, in_channels: int, hidden_channels: int,
                 kernel_size: Union[int, Sequence[int]], steps: int, *,
                 n_dim: Optional[int] = None, pointwise: str = "auto", device=None,
                 dtype=None):
        super().__init__()
        self._init_geometry(in_channels, hidden_channels, kernel_size, n_dim, pointwise)
        self.steps = _positive_int(steps, "steps")
        fan_in = (in_channels + steps * hidden_channels) * math.prod(self.kernel_size)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(
            4 * hidden_channels, in_channels + steps * hidden_channels, *self.kernel_size,
            **factory))
        self.bias = nn.Parameter(torch.empty(4 * hidden_channels, **factory))
        self._fan_in = fan_in
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _uniform_(self.weight, self._fan_in)
        _uniform_(self.bias, self._fan_in)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.hidden_channels}, "
                f"kernel_size={self.kernel_size}, steps={self.steps}")

    def _memory_channels(self) -> List[int]:
        return [self.hidden_channels] * self.steps

    def _gates(self, x, memory):
        # memory is oldest first; the kernel reads the newest state first.
        stacked = _cat((x, *memory[::-1]), compute_dtype(x))
        return conv_nd(stacked, self.weight, self.bias, self._ones, self._padding,
                       self._ones, 1)

    def _remember(self, memory, h):
        return tuple(memory[1:]) + (h,)


class ConvLSTMCell(HigherOrderConvLSTMCell):
    """ConvLSTM cell (Shi et al. 2015, no peepholes).

    ``[i, f, o, g] = W * concat(x_t, h_{t-1}) + b``, ``c_t = sigmoid(f) c_{t-1} +
    sigmoid(i) tanh(g)``, ``h_t = sigmoid(o) tanh(c_t)``. The state's memory is
    ``(h_{t-1},)``.

    Parameters
    ----------
    in_channels, hidden_channels : int
        Channels of the input and of the hidden (and cell) state.
    kernel_size : int or tuple of int
        Odd kernel; "same" zero padding. A tuple's length sets the number of spatial
        dimensions; an int uses ``n_dim``.
    n_dim : int, optional
        Spatial dimensions when ``kernel_size`` is an int (default 2).
    pointwise : {"auto", "compiled", "eager"}
        How the LSTM step runs (:mod:`tt_conv.pointwise`).

    Attributes
    ----------
    weight : Parameter
        ``[4 * hidden, in_channels + hidden, *kernel]`` (input channels first).
    bias : Parameter
        ``[4 * hidden]``.
    """

    def __init__(self, in_channels: int, hidden_channels: int,
                 kernel_size: Union[int, Sequence[int]], *, n_dim: Optional[int] = None,
                 pointwise: str = "auto", device=None, dtype=None):
        super().__init__(in_channels, hidden_channels, kernel_size, 1, n_dim=n_dim,
                         pointwise=pointwise, device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.hidden_channels}, kernel_size={self.kernel_size}"


class ConvTTLSTMCell(_ConvLSTMBase):
    """Convolutional tensor-train LSTM cell (Su et al., NeurIPS 2020).

    The gates are ``K_P * concat(x_t, T_P) + b``, where ``T_P`` is the tensor train of a
    :class:`ConvTT` over the last ``steps`` hidden states; ``h_{t-1}`` reaches the gates
    only through it. The state's memory is the :class:`ConvTT` stream: each hidden state
    is convolved once with all window kernels and the tensor train advances with one
    grouped convolution per step (see :class:`ConvTT`).

    Parameters
    ----------
    in_channels, hidden_channels : int
        Channels of the input and of the hidden (and cell) state.
    kernel_size : int or tuple of int
        Odd kernel of every convolution; "same" zero padding.
    order, steps, rank : int
        Tensor-train cores ``P``, past states ``N >= P`` and rank ``R`` (see
        :class:`ConvTT`).
    n_dim : int, optional
        Spatial dimensions when ``kernel_size`` is an int (default 2).
    pointwise : {"auto", "compiled", "eager"}
        How the LSTM step and the stream's additions run (:mod:`tt_conv.pointwise`).

    Attributes
    ----------
    tt : ConvTT
        ``ConvTT(hidden, 4 * hidden, order, steps, rank, kernel_size,
        input_channels=in_channels)``: its ``output_weight`` is the gate kernel ``K_P``
        over ``concat(x_t, T_P)`` and its ``output_bias`` the gate bias.
    """

    def __init__(self, in_channels: int, hidden_channels: int,
                 kernel_size: Union[int, Sequence[int]], order: int, steps: int, rank: int,
                 *, n_dim: Optional[int] = None, pointwise: str = "auto", device=None,
                 dtype=None):
        super().__init__()
        self._init_geometry(in_channels, hidden_channels, kernel_size, n_dim, pointwise)
        self.tt = ConvTT(hidden_channels, 4 * hidden_channels, order, steps, rank,
                         self.kernel_size, input_channels=in_channels, pointwise=pointwise,
                         device=device, dtype=dtype)
        self.order, self.steps, self.rank = order, steps, rank

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.hidden_channels}, kernel_size={self.kernel_size}, "
                f"order={self.order}, steps={self.steps}, rank={self.rank}")

    def initial_state(self, x: Union[torch.Tensor, Sequence[int]],
                      channels_last: Optional[bool] = None,
                      dtype: Optional[torch.dtype] = None, device=None) -> LSTMState:
        """The state of the maths at ``t = 0`` (all past states zero) for inputs like ``x``.

        The memory is :meth:`ConvTT.initial_stream`, which is computed from the biases and
        cores: build the state inside the forward pass whose loss is differentiated, once
        per sequence. See :meth:`HigherOrderConvLSTMCell.initial_state` for the arguments.
        """
        like, channels_last = self._input_like(x, channels_last, dtype, device)
        cell = zeros_state(like, self.hidden_channels, channels_last)
        return LSTMState(cell, self.tt.initial_stream(like, channels_last))

    def _memory_channels(self) -> List[int]:
        return []

    def _gates(self, x, memory):
        return self.tt.stream_output(memory, x)

    def _remember(self, memory, h):
        return self.tt.stream_update(memory, h)


#: The recurrent cell classes (what :func:`compile_cells` and :func:`set_pointwise` look for).
RECURRENT_CELLS = (ConvLSTMCell, HigherOrderConvLSTMCell, ConvTTLSTMCell)
