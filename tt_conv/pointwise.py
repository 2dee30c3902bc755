"""The recurrent cells' pointwise work, fused: the LSTM step and the tensor-train stream sums.

Between its convolutions a recurrent cell does only pointwise work: the LSTM gate maths
(forward and backward), the window sums and additions of the tensor-train recursion, and
the dtype casts of mixed precision. Run op by op, each of those is a pass over memory, a
kernel launch on a GPU and a thread-synchronisation point on a CPU, so in mixed precision,
where the convolutions run on AMX or tensor cores, they take a large share of a step.

This module runs them in as few passes as the maths allows. Every function takes a
``mode``:

* ``"compiled"``: the pointwise maths is compiled by ``torch.compile`` (inductor: C++ with
  OpenMP on CPU, Triton on GPU). The LSTM step is a custom autograd function whose forward
  is ONE kernel (gate casts, sigmoids, tanhs, the new cell and hidden state, the saved
  activations) and whose hand-derived backward is ONE kernel (the four gate gradients
  written straight into one tensor in the gates' dtype and layout, and the cell gradient).
  The stream sums (:func:`stream_sums`) are compiled with their backward by AOTAutograd.
* ``"eager"``: the same maths op by op (the LSTM step with a hand-written backward that
  writes the gate gradients in place), for machines without a compiler.
* ``"auto"`` (the default): ``"compiled"`` where a compiler for the device exists (a C++
  compiler for CPU tensors, Triton and a CUDA capability >= 7.0 for GPU tensors), else
  ``"eager"`` with a one-time warning. A compilation that fails at run time also falls
  back to eager, with a warning that names the error. The environment variable
  ``TT_CONV_POINTWISE=eager`` (or ``compiled``) overrides what ``"auto"`` means, e.g. to
  skip the few seconds of compilation per kernel in short runs.

Each kernel is compiled once per signature (dtypes, layout, tensor-train order, window and
rank) with dynamic shapes, the first time it runs; inductor caches the code on disk, so
later processes load it.

Inside a ``torch.compile`` of the whole model (:func:`torch.compiler.is_compiling`), the
plain formulation is traced instead and fused by that compilation.

The results of both modes are the same maths; the tests compare each with a float64
transcription of the equations.
"""

from __future__ import annotations

import functools
import os
import shutil
import types
import warnings
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from ._geometry import is_channels_last

__all__ = ["POINTWISE_MODES", "ENVIRONMENT_VARIABLE", "compiler_available", "resolve_mode",
           "lstm_update", "stream_sums"]

#: Values of the ``pointwise`` argument of the recurrent cells.
POINTWISE_MODES = ("auto", "compiled", "eager")
#: Environment variable that says what ``"auto"`` means (``auto``, ``compiled`` or ``eager``);
#: an explicit ``"compiled"`` or ``"eager"`` argument is not affected.
ENVIRONMENT_VARIABLE = "TT_CONV_POINTWISE"


def check_mode(mode: str) -> str:
    """Return ``mode`` if it is one of :data:`POINTWISE_MODES`, else raise ``ValueError``."""
    if mode not in POINTWISE_MODES:
        raise ValueError(f"pointwise must be one of {POINTWISE_MODES}, got {mode!r}")
    return mode


# ---------------------------------------------------------------------------- compilers


def _has_cpp_compiler() -> bool:
    from torch._inductor import config

    names = [c for c in config.cpp.cxx if c] or ["g++"]
    return any(shutil.which(name) for name in names)


@functools.lru_cache(maxsize=None)
def _compiler_check(device_type: str) -> Optional[str]:
    """``None`` if inductor can compile for ``device_type``, else why not."""
    try:
        import torch._inductor  # noqa: F401
    except Exception as error:  # a broken install is reported, not raised
        return f"torch._inductor cannot be imported ({error})"
    if device_type == "cpu":
        if os.name == "nt":
            return "inductor's C++ backend is not used on Windows here"
        return None if _has_cpp_compiler() else (
            "no C++ compiler found (inductor's CPU backend needs one; set CXX or install g++)")
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "Triton is not installed (inductor's GPU backend needs it)"
        if torch.cuda.get_device_capability() < (7, 0):
            return "inductor's Triton backend needs a GPU of CUDA capability >= 7.0"
        return None
    return f"no inductor backend is used for device type {device_type!r} here"


def compiler_available(device_type: str = "cpu") -> bool:
    """Whether ``"auto"`` compiles the pointwise work of tensors on ``device_type``."""
    return _compiler_check(device_type) is None and device_type not in _BROKEN


#: Device types whose compilation failed at run time (they stay eager for the process).
_BROKEN: Dict[str, str] = {}


def resolve_mode(mode: str, device_type: str) -> str:
    """``"compiled"`` or ``"eager"`` for ``mode`` on ``device_type``.

    Raises
    ------
    RuntimeError
        For ``mode="compiled"`` where no compiler exists (the message says why).
    """
    if mode == "auto":
        mode = os.environ.get(ENVIRONMENT_VARIABLE) or "auto"
        if mode not in POINTWISE_MODES:
            raise ValueError(f"environment variable {ENVIRONMENT_VARIABLE} must be one of "
                             f"{POINTWISE_MODES}, got {mode!r}")
    if mode == "eager" or torch.compiler.is_compiling():
        return "eager"
    reason = _BROKEN.get(device_type) or _compiler_check(device_type)
    if reason is None:
        return "compiled"
    if mode == "compiled":
        raise RuntimeError(f"pointwise='compiled' on {device_type}: {reason}; use "
                           f"pointwise='auto' or 'eager'")
    _warn_once(device_type, reason)
    return "eager"


@functools.lru_cache(maxsize=None)
def _warn_once(device_type: str, reason: str) -> None:
    warnings.warn(f"tt_conv recurrent cells on {device_type}: {reason}; their pointwise work "
                  f"runs unfused (eager), which is correct but slower", RuntimeWarning,
                  stacklevel=4)


def _signature(value):
    """What a compiled kernel specialises on: dtypes, ranks and layouts, and plain values."""
    if isinstance(value, torch.Tensor):
        return (value.dtype, value.dim(), is_channels_last(value), value.device.type)
    if isinstance(value, (tuple, list)):
        return tuple(_signature(v) for v in value)
    return value


class _Kernel:
    """A pointwise function compiled once per signature of its arguments.

    Each signature (dtypes, layouts, static ints) gets its own copy of the function's code
    object, so its own compilation cache: dynamo's recompile limit, which counts per code
    object, is never reached however many cell configurations a process runs. Within a
    signature the kernel is compiled with dynamic shapes (one kernel for every batch,
    channel and spatial size).
    """

    def __init__(self, function: Callable):
        self.function = function
        self.compiled: Dict[tuple, Callable] = {}
        self.copies = 0

    def _compile(self, key: tuple) -> Callable:
        fn = self.function
        self.copies += 1
        code = fn.__code__.replace(co_name=f"{fn.__name__}_{self.copies}")
        copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__,
                                  fn.__closure__)
        kernel = self.compiled[key] = torch.compile(copy, dynamic=True, fullgraph=True)
        return kernel

    def __call__(self, *args):
        key = _signature(args)
        kernel = self.compiled.get(key) or self._compile(key)
        try:
            return kernel(*args)
        except Exception as error:
            from torch._dynamo.exc import FailOnRecompileLimitHit  # dynamo loads on demand

            if not isinstance(error, FailOnRecompileLimitHit):
                raise
            # Dynamic shapes still guard on some sizes (a size of 1, sizes that were equal),
            # so a process that runs many different cells and batches can use up a copy's
            # recompilations (dynamo's recompile_limit, per code object): a fresh copy of
            # the code starts a new cache.
            return self._compile(key)(*args)


def _run(device_type: str, compiled: Callable, eager: Callable, *args):
    """``compiled(*args)``; if compilation fails, a warning and ``eager(*args)``.

    A failing compiler (no working C++ compiler or Triton after all) marks the device type
    eager for the rest of the process.
    """
    try:
        return compiled(*args)
    except Exception as error:
        from torch._dynamo import exc

        if not isinstance(error, (exc.BackendCompilerFailed, exc.TorchDynamoException)):
            raise
        first_line = str(error).splitlines()[0] if str(error) else ""
        reason = f"torch.compile of the pointwise kernels failed ({type(error).__name__}: " \
                 f"{first_line[:300]})"
        if isinstance(error, exc.BackendCompilerFailed):
            _BROKEN[device_type] = reason
        _warn_once(device_type, reason)
        return eager(*args)


# ---------------------------------------------------------------------------- LSTM step


def _lstm_forward(gates: torch.Tensor, cell: torch.Tensor):
    """``(h, c, sigmoid([i, f, o]), tanh(g), tanh(c))``; the maths in ``cell``'s dtype."""
    hidden = cell.shape[1]
    wide = gates.to(cell.dtype)
    sig = torch.sigmoid(wide[:, :3 * hidden])
    tanh_g = torch.tanh(wide[:, 3 * hidden:])
    i, f, o = sig[:, :hidden], sig[:, hidden:2 * hidden], sig[:, 2 * hidden:]
    c = f * cell + i * tanh_g
    tanh_c = torch.tanh(c)
    return (o * tanh_c).to(gates.dtype), c, sig, tanh_g, tanh_c


def _lstm_backward(grad_h: torch.Tensor, grad_c: torch.Tensor, sig: torch.Tensor,
                   tanh_g: torch.Tensor, cell: torch.Tensor, tanh_c: torch.Tensor,
                   dtype: torch.dtype):
    """Gradients of the gates (in ``dtype``) and of ``c_{t-1}``, plain ops."""
    hidden = cell.shape[1]
    i, f, o = sig[:, :hidden], sig[:, hidden:2 * hidden], sig[:, 2 * hidden:]
    grad_h = grad_h.to(cell.dtype)
    # dL/dc_t: from c_t's own consumers and through h_t = o tanh(c_t).
    grad_cell = grad_h * o * (1 - tanh_c * tanh_c) + grad_c
    grad_gates = torch.cat([grad_cell * tanh_g * i * (1 - i),
                            grad_cell * cell * f * (1 - f),
                            grad_h * tanh_c * o * (1 - o),
                            grad_cell * i * (1 - tanh_g * tanh_g)], dim=1)
    return grad_gates.to(dtype), grad_cell * f


_compiled_lstm_forward = _Kernel(_lstm_forward)
_compiled_lstm_backward = _Kernel(_lstm_backward)


def empty_state(like: torch.Tensor, channels: int, channels_last: bool,
                dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Uninitialised ``[batch, channels, *spatial]`` like ``like``, optionally channels-last.

    Channels-last is built for any number of spatial axes by permuting a
    ``[batch, *spatial, channels]`` tensor, so 1-D and 3-D states get it too.
    """
    dtype = like.dtype if dtype is None else dtype
    batch, spatial = like.shape[0], like.shape[2:]
    if channels_last:
        n = len(spatial)
        storage = like.new_empty((batch, *spatial, channels), dtype=dtype)
        return storage.permute(0, n + 1, *range(1, n + 1))
    return like.new_empty((batch, channels, *spatial), dtype=dtype)


def _eager_lstm_backward(grad_h, grad_c, sig, tanh_g, cell, tanh_c, dtype, channels_last):
    """:func:`_lstm_backward` in few eager kernels, writing the gate gradients in place."""
    hidden = cell.shape[1]
    i, f, o = sig.chunk(3, dim=1)
    grad_h = grad_h.to(cell.dtype)
    grad_cell = torch.ops.aten.tanh_backward(grad_h * o, tanh_c)
    grad_cell += grad_c
    # The convolution that made the gates wants its gradient in the same layout.
    grad_gates = empty_state(cell, 4 * hidden, channels_last)
    torch.mul(grad_cell, tanh_g, out=grad_gates[:, :hidden])                # i
    torch.mul(grad_cell, cell, out=grad_gates[:, hidden:2 * hidden])        # f
    torch.mul(grad_h, tanh_c, out=grad_gates[:, 2 * hidden:3 * hidden])     # o
    head = grad_gates[:, :3 * hidden]
    torch.ops.aten.sigmoid_backward.grad_input(head, sig, grad_input=head)
    tail = grad_gates[:, 3 * hidden:]                                       # g
    torch.mul(grad_cell, i, out=tail)
    torch.ops.aten.tanh_backward.grad_input(tail, tanh_g, grad_input=tail)
    return grad_gates.to(dtype), grad_cell * f


class _LSTMStep(torch.autograd.Function):
    """The LSTM step with a hand-derived backward; compiled or eager kernels.

    Only the activations are saved (sigmoid of i, f, o, tanh of g and of c, and c_{t-1}),
    so the backward needs no transcendental function: it is a few multiplications.
    """

    @staticmethod
    def forward(ctx, gates: torch.Tensor, cell: torch.Tensor, compiled: bool):
        device = gates.device.type
        if compiled:
            h, c, sig, tanh_g, tanh_c = _run(device, _compiled_lstm_forward, _lstm_forward,
                                             gates, cell)
        else:
            h, c, sig, tanh_g, tanh_c = _lstm_forward(gates, cell)
        ctx.save_for_backward(sig, tanh_g, cell, tanh_c)
        ctx.gates_meta = (gates.dtype, is_channels_last(gates))
        ctx.compiled = compiled
        return h, c

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h: torch.Tensor, grad_c: torch.Tensor):
        sig, tanh_g, cell, tanh_c = ctx.saved_tensors
        dtype, channels_last = ctx.gates_meta
        if ctx.compiled:
            grad_gates, grad_cell = _run(
                cell.device.type, _compiled_lstm_backward,
                lambda *args: _eager_lstm_backward(*args, channels_last),
                grad_h, grad_c, sig, tanh_g, cell, tanh_c, dtype)
            if channels_last and not is_channels_last(grad_gates):
                # The convolution that made the gates wants its gradient in its layout.
                grad_gates = grad_gates.contiguous(memory_format=_channels_last_format(
                    grad_gates))
        else:
            grad_gates, grad_cell = _eager_lstm_backward(grad_h, grad_c, sig, tanh_g, cell,
                                                         tanh_c, dtype, channels_last)
        return grad_gates, grad_cell, None


def _channels_last_format(x: torch.Tensor):
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


def _lstm_plain(gates: torch.Tensor, cell: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The LSTM step as plain differentiable ops (what a whole-model compile traces)."""
    hidden = cell.shape[1]
    wide = gates.to(cell.dtype)
    sig, g = wide.split((3 * hidden, hidden), dim=1)
    i, f, o = torch.sigmoid(sig).chunk(3, dim=1)
    c = torch.addcmul(f * cell, i, torch.tanh(g))
    return (o * torch.tanh(c)).to(gates.dtype), c


def lstm_update(gates: torch.Tensor, cell: torch.Tensor,
                mode: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """The LSTM's pointwise step from gate pre-activations ``[i, f, o, g]``.

    ``c_t = sigmoid(f) c_{t-1} + sigmoid(i) tanh(g)``, ``h_t = sigmoid(o) tanh(c_t)``.

    Parameters
    ----------
    gates : torch.Tensor
        ``[batch, 4 * hidden, *spatial]``, the four gates in the order i, f, o, g.
    cell : torch.Tensor
        ``c_{t-1}``, ``[batch, hidden, *spatial]``.
    mode : {"auto", "compiled", "eager"}
        How the pointwise work runs (module docstring of :mod:`tt_conv.pointwise`).

    Returns
    -------
    (h_t, c_t)
        The maths runs in the wider of the two input dtypes, and so does ``c_t`` (float32
        under bf16/fp16 autocast, where the cell state starts in float32: it accumulates in
        full precision); ``h_t`` has the gates' dtype (what the next convolutions read:
        casting once here saves a cast per consumer). The gate casts happen inside the
        fused kernel. First derivatives only.
    """
    check_mode(mode)
    wide = torch.promote_types(gates.dtype, cell.dtype)
    if cell.dtype != wide:
        cell = cell.to(wide)
    if torch.compiler.is_compiling():
        # The enclosing compilation fuses the plain formulation, forward and backward.
        return _lstm_plain(gates, cell)
    compiled = resolve_mode(mode, gates.device.type) == "compiled"
    return _LSTMStep.apply(gates, cell, compiled)


# ---------------------------------------------------------------------------- TT stream


def _stream_sums(projection: torch.Tensor, advanced: Optional[torch.Tensor],
                 partials: Sequence[torch.Tensor], order: int, rank: int,
                 window: int) -> Tuple[torch.Tensor, ...]:
    """``(train, inner, *new_partials)`` of :meth:`tt_conv.ConvTT.stream_update`.

    ``projection`` holds block ``d`` (``order * rank`` channels each, ``d = 0..window-1``)
    of the new state's window projections, ``partials`` the ``window - 1`` pending window
    sums and ``advanced`` the inner cores' convolutions of the previous values
    (``(order - 1) * rank`` channels, ``None`` for ``order == 1``).
    """
    width = order * rank
    if window == 1:
        sums, new_partials = projection, ()
    else:
        # Block d of the projection joins the window sum of the update d steps ahead.
        sums = projection[:, :width] + partials[0]
        new_partials = tuple(projection[:, (d + 1) * width:(d + 2) * width] + partials[d + 1]
                             for d in range(window - 2)) + (projection[:, (window - 1) * width:],)
    if order == 1:
        return (sums, sums[:, :0]) + new_partials
    assert advanced is not None
    train = sums[:, (order - 1) * rank:] + advanced[:, (order - 2) * rank:]
    if order == 2:
        inner = sums[:, :rank]
    else:
        inner = torch.cat([sums[:, :rank], sums[:, rank:(order - 1) * rank]
                           + advanced[:, :(order - 2) * rank]], dim=1)
    return (train, inner) + new_partials


_compiled_stream_sums = _Kernel(_stream_sums)


def stream_sums(projection: torch.Tensor, advanced: Optional[torch.Tensor],
                partials: Sequence[torch.Tensor], order: int, rank: int, window: int,
                mode: str = "auto") -> Tuple[torch.Tensor, ...]:
    """The tensor-train stream's additions after a new state, fused (see :func:`_stream_sums`).

    All inputs are in the compute dtype (the convolutions' output dtype), so no cast runs.
    With ``window == 1`` and ``order <= 2`` there is nothing to fuse and the eager ops run.
    """
    check_mode(mode)
    partials = tuple(partials)
    trivial = window == 1 and order <= 2
    if trivial or resolve_mode(mode, projection.device.type) == "eager":
        return _stream_sums(projection, advanced, partials, order, rank, window)
    return _run(projection.device.type, _compiled_stream_sums, _stream_sums, projection,
                advanced, partials, order, rank, window)
