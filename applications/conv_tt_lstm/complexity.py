"""Parameters and FLOPs of a video-prediction network, measured on a real forward pass.

FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode` while the network
runs: two FLOPs per multiply-add, bias additions and pointwise operations not counted. On
the ``meta`` device nothing is computed (the counter only needs shapes), so the paper's
configuration is counted in a fraction of a second; ``device="cpu"`` gives the same counts.

:func:`parameter_counts` is the application's one parameter count (total and per top-level
part, shared tensors counted once: :func:`tt_conv.profile.count_parameters`), and
:func:`compare_cells` / :func:`comparison_markdown` / :func:`comparison_payload` the
``compare`` command's measurements and outputs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from tt_conv.profile import count_parameters

from .checks import check_int
from .model import CELL_NAMES, ArchitectureConfig, VideoPredictionNetwork


@dataclass(frozen=True)
class Complexity:
    """What one network costs, per sequence of one sample.

    Attributes
    ----------
    cell, name : str
        Cell type and its readable name.
    parameters : int
        Weights and biases.
    steps : int
        Recurrent steps per sequence (``input_frames + future_frames - 1``).
    forward_flops : int
        FLOPs of the forward rollout of one sequence.
    training_flops : int or None
        FLOPs of forward and backward (None when not measured).
    """

    cell: str
    name: str
    parameters: int
    steps: int
    forward_flops: int
    training_flops: Optional[int]

    @property
    def macs_per_step(self) -> float:
        """Multiply-adds per sample per time step (the convention of the paper's release)."""
        return self.forward_flops / 2 / self.steps

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["macs_per_step"] = self.macs_per_step
        return out


def parameter_counts(model: torch.nn.Module) -> Dict[str, int]:
    """``{"total": n, part: n, ...}``: parameters in all and per top-level child module.

    Parts are the model's direct children that hold parameters (``blocks`` and ``output``
    of the video-prediction network; ``encoder``, ``cells`` / ``convs`` and ``head`` of a
    classifier).
    """
    parts = {name: count_parameters(child) for name, child in model.named_children()}
    return {"total": count_parameters(model), **{k: v for k, v in parts.items() if v}}


def measure_complexity(config: ArchitectureConfig, *, input_frames: int = 10,
                       future_frames: int = 10, height: int = 64, width: int = 64,
                       backward: bool = True, device: str = "meta") -> Complexity:
    """Parameters and FLOPs of ``config``'s network on one ``height x width`` sequence.

    Parameters
    ----------
    config : ArchitectureConfig
    input_frames, future_frames : int
        The rollout (``input_frames + future_frames - 1`` steps).
    height, width : int
        Frame size.
    backward : bool
        Also count forward + backward (a training step without the optimiser).
    device : str
        Where to run; ``"meta"`` computes nothing and counts the same.
    """
    for name, value in (("input_frames", input_frames), ("future_frames", future_frames),
                        ("height", height), ("width", width)):
        check_int(name, value)
    model = VideoPredictionNetwork(config, device=device)
    frames = torch.zeros(1, input_frames, config.image_channels, height, width, device=device)
    with FlopCounterMode(display=False) as counter:
        outputs = model(frames, future_frames)
    forward = counter.get_total_flops()
    training = None
    if backward:
        with FlopCounterMode(display=False) as counter:
            outputs = model(frames, future_frames)
            outputs.sum().backward()
        training = counter.get_total_flops()
    return Complexity(cell=config.cell, name=CELL_NAMES[config.cell],
                      parameters=count_parameters(model),
                      steps=input_frames + future_frames - 1, forward_flops=forward,
                      training_flops=training)


# ------------------------------------------------------------------------------ compare


def compare_cells(config: ArchitectureConfig, cells: Sequence[str], **sequence: Any
                  ) -> List[Complexity]:
    """:func:`measure_complexity` of ``config`` with each of ``cells`` in its place."""
    return [measure_complexity(config.replace(cell=cell), **sequence) for cell in cells]


def _reference(results: Sequence[Complexity]) -> Optional[Complexity]:
    return next((r for r in results if r.cell == "convttlstm"), None)


def comparison_markdown(results: Sequence[Complexity], *, input_frames: int,
                        future_frames: int, height: int, width: int) -> str:
    """The ``compare`` table; reduction factors are relative to Conv-TT-LSTM when measured."""
    reference = _reference(results)
    backward = all(r.training_flops is not None for r in results)
    ref = reference.name if reference else "ref"
    head = ["model", "parameters", f"params / {ref}", "GFLOPs / sequence (fwd)"]
    if backward:
        head.append("GFLOPs / sequence (fwd+bwd)")
    head += ["G multiply-adds / sample / step", f"FLOPs / {ref}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        row = [r.name, f"{r.parameters:,}",
               f"{r.parameters / reference.parameters:.2f}x" if reference else "-",
               f"{r.forward_flops / 1e9:.1f}"]
        if backward:
            row.append(f"{r.training_flops / 1e9:.1f}")
        row += [f"{r.macs_per_step / 1e9:.2f}",
                f"{r.forward_flops / reference.forward_flops:.2f}x" if reference else "-"]
        lines.append("| " + " | ".join(row) + " |")
    notes = [
        "",
        f"One sample, {input_frames} -> {future_frames} frames ({results[0].steps} recurrent "
        f"steps), {height} x {width}. FLOPs counted by torch.utils.flop_counter on a real "
        "rollout: 2 per multiply-add, biases and pointwise operations not counted.",
        "Multiply-adds per sample per step = forward FLOPs / 2 / steps (the paper release's "
        "convention; it reports 15.88 G for ConvLSTM and 10.76 G for Conv-TT-LSTM).",
    ]
    if reference is not None:
        for r in results:
            if r is not reference:
                notes.append(
                    f"{reference.name} has {r.parameters / reference.parameters:.2f}x fewer "
                    f"parameters and {r.forward_flops / reference.forward_flops:.2f}x fewer "
                    f"FLOPs than {r.name}.")
    return "\n".join(lines + notes)


def comparison_payload(config: ArchitectureConfig, results: Sequence[Complexity], *,
                       input_frames: int, future_frames: int, height: int,
                       width: int) -> Dict[str, Any]:
    """The ``compare`` results as JSON-ready values."""
    reference = _reference(results)
    return {
        "architecture": {k: v for k, v in config.to_dict().items() if k != "cell"},
        "sequence": {"input_frames": input_frames, "future_frames": future_frames,
                     "height": height, "width": width, "batch": 1},
        "flop_convention": "torch.utils.flop_counter: 2 FLOPs per multiply-add, biases and "
                           "pointwise ops not counted; macs_per_step = forward_flops / 2 / steps",
        "results": [r.to_dict() for r in results],
        "reductions_vs_convttlstm": (
            {r.cell: {"parameters": r.parameters / reference.parameters,
                      "forward_flops": r.forward_flops / reference.forward_flops}
             for r in results} if reference else None),
    }
