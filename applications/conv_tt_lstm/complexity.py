"""Parameters and FLOPs of a video-prediction network, measured on a real forward pass.

FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode` while the network
runs: two FLOPs per multiply-add, bias additions and pointwise operations not counted. On
the ``meta`` device nothing is computed (the counter only needs shapes), so the paper's
configuration is counted in a fraction of a second; ``device="cpu"`` gives the same counts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

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


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


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
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
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
