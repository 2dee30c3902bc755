"""What a run reports while it trains: a tqdm bar, TensorBoard scalars and images, a JSONL log.

Only rank 0 writes; on other ranks every method is a no-op, so the training loop can call
them unconditionally.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Union

import torch

from ..files import read_json_lines, write_text_atomic
from .distributed import DistContext

LOG_FILE = "log.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class RunLogger:
    """Progress bar, ``log.jsonl`` and TensorBoard of one run (rank 0 only).

    Parameters
    ----------
    run_dir : str or pathlib.Path
        The run folder; ``log.jsonl`` and ``tensorboard/`` are written inside.
    context : DistContext
        Only ``context.is_main`` writes anything.
    total_steps : int
        Length of the progress bar.
    initial_step : int
        Step the run starts from (after a resume: records of later steps, left by the
        interrupted run, are dropped from ``log.jsonl`` so that it reads as one run).
    progress : bool
        Show the tqdm bar.
    tensorboard : bool
        Write TensorBoard event files.
    """

    def __init__(self, run_dir: Union[str, Path], context: DistContext, total_steps: int, *,
                 initial_step: int = 0, progress: bool = True, tensorboard: bool = True,
                 description: str = "train"):
        self.enabled = context.is_main
        self.run_dir = Path(run_dir)
        self._bar = None
        self._writer = None
        self._log = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.run_dir / LOG_FILE
        if log_path.is_file():
            kept = [record for record in read_json_lines(log_path, what="training log")
                    if not isinstance(record, dict) or record.get("step", 0) <= initial_step]
            write_text_atomic(log_path, "".join(json.dumps(r) + "\n" for r in kept))
        self._log = open(log_path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR),
                                         purge_step=initial_step if initial_step else None)
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc=description,
                             unit="step", dynamic_ncols=True)

    def record(self, step: int, kind: str, values: Mapping[str, Any]) -> None:
        """One JSONL line ``{"step", "kind", **values}`` and TensorBoard scalars ``kind/name``."""
        if not self.enabled:
            return
        entry = {"step": int(step), "kind": kind}
        entry.update({k: _plain(v) for k, v in values.items()})
        self._log.write(json.dumps(entry) + "\n")
        self._log.flush()
        if self._writer is not None:
            for name, value in values.items():
                value = _plain(value)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(f"{kind}/{name}", value, step)

    def images(self, step: int, tag: str, images: torch.Tensor) -> None:
        """TensorBoard images ``[N, C, H, W]`` in ``[0, 1]`` under ``tag``."""
        if self.enabled and self._writer is not None:
            self._writer.add_images(tag, images.detach().float().clamp(0, 1).cpu(), step,
                                    dataformats="NCHW")

    def advance(self, steps: int = 1, **postfix: Any) -> None:
        """Move the progress bar and show ``postfix`` beside it."""
        if self._bar is not None:
            self._bar.update(steps)
            if postfix:
                self._bar.set_postfix({k: _plain(v) for k, v in postfix.items()}, refresh=False)

    def said(self, key: str) -> bool:
        """Whether :meth:`said` was asked about ``key`` before (a message shown once a run)."""
        seen = self.__dict__.setdefault("_said", set())
        if key in seen:
            return True
        seen.add(key)
        return False

    def set_total(self, total_steps: int) -> None:
        """The run will take ``total_steps`` steps after all (the progress bar's total)."""
        if self._bar is not None:
            self._bar.total = total_steps
            self._bar.refresh()

    def message(self, text: str) -> None:
        """Print a line without breaking the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
