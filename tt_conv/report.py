"""The report of :func:`tt_conv.compress`: one row per convolution, totals, and output as a
table, a dict, JSON or markdown (files written atomically)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

from .files import write_text_atomic


@dataclass
class LayerReport:
    """One convolution's line of a :class:`CompressionReport`.

    ``factorization`` is ``"dense"`` for a layer left as it was (``note`` says why);
    FLOP fields are None without an input shape, ``output_error`` None without a
    calibration batch. ``latency_before``/``latency_after`` are measured seconds of the
    layer's forward pass on its input shape (dense, and as it now runs) when they were
    measured (latency budgets, the measured execution choice); ``implementation`` says how a
    factorized layer runs.
    """

    name: str
    kernel_shape: Tuple[int, ...]
    factorization: str
    ranks: Optional[Tuple[int, ...]]
    params_before: int
    params_after: int
    flops_before: Optional[int] = None
    flops_after: Optional[int] = None
    kernel_error: Optional[float] = None
    output_error: Optional[float] = None
    note: str = ""
    latency_before: Optional[float] = None
    latency_after: Optional[float] = None
    implementation: Optional[str] = None


@dataclass
class CompressionReport:
    """What :func:`compress` did, layer by layer, and in total.

    ``str(report)`` is a readable table; :meth:`to_dict`, :meth:`to_json` and
    :meth:`to_markdown` give the same content for machines and documents.
    """

    layers: List[LayerReport]
    factorization: str
    rank: str
    model_params_before: int
    model_params_after: int
    model_flops_before: Optional[int] = None
    model_flops_after: Optional[int] = None
    input_shape: Optional[Tuple[int, ...]] = None
    model_output_error: Optional[float] = None
    shared_energy: Optional[float] = None
    notes: List[str] = field(default_factory=list)
    #: Measured seconds of the whole model's forward pass on ``input_shape``, dense and
    #: compressed (latency budgets), and the fraction asked for.
    model_latency_before: Optional[float] = None
    model_latency_after: Optional[float] = None
    latency_target: Optional[float] = None
    #: The autocast dtype every measured time was taken under (``None``: the model's dtype).
    latency_autocast: Optional[str] = None
    #: What ``model_output_error`` and the layers' output errors were measured on.
    measured_on: str = "the calibration batch"

    # ------------------------------------------------------------------ totals

    @property
    def conv_params_before(self) -> int:
        return sum(r.params_before for r in self.layers)

    @property
    def conv_params_after(self) -> int:
        return sum(r.params_after for r in self.layers)

    @property
    def conv_flops_before(self) -> Optional[int]:
        values = [r.flops_before for r in self.layers]
        return None if any(v is None for v in values) else sum(values)

    @property
    def conv_flops_after(self) -> Optional[int]:
        values = [r.flops_after for r in self.layers]
        return None if any(v is None for v in values) else sum(values)

    def totals(self) -> Dict[str, Any]:
        def ratio(before, after):
            return None if before is None or after is None or after == 0 else before / after

        return {
            "conv_params_before": self.conv_params_before,
            "conv_params_after": self.conv_params_after,
            "conv_params_reduction": ratio(self.conv_params_before, self.conv_params_after),
            "conv_flops_before": self.conv_flops_before,
            "conv_flops_after": self.conv_flops_after,
            "conv_flops_reduction": ratio(self.conv_flops_before, self.conv_flops_after),
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
            "model_params_reduction": ratio(self.model_params_before, self.model_params_after),
            "model_flops_before": self.model_flops_before,
            "model_flops_after": self.model_flops_after,
            "model_flops_reduction": ratio(self.model_flops_before, self.model_flops_after),
            "model_output_error": self.model_output_error,
            "model_latency_before": self.model_latency_before,
            "model_latency_after": self.model_latency_after,
            "latency_autocast": self.latency_autocast,
            "model_speedup": ratio(self.model_latency_before, self.model_latency_after),
            "layers_factorized": sum(r.factorization != "dense" for r in self.layers),
            "layers_dense": sum(r.factorization == "dense" for r in self.layers),
        }

    # ------------------------------------------------------------------ output

    def to_dict(self) -> Dict[str, Any]:
        """Plain Python values (lists, dicts, numbers, strings), ready for JSON."""
        layers = []
        for row in self.layers:
            item = asdict(row)
            item["kernel_shape"] = list(row.kernel_shape)
            item["ranks"] = None if row.ranks is None else list(row.ranks)
            layers.append(item)
        return {
            "factorization": self.factorization,
            "rank": self.rank,
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "shared_energy": self.shared_energy,
            "measured_on": self.measured_on,
            "layers": layers,
            "totals": self.totals(),
            "notes": list(self.notes),
        }

    def to_json(self, path: Optional[Union[str, os.PathLike]] = None, indent: int = 2) -> str:
        """The report as JSON; also written (atomically) to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            write_text_atomic(path, text + "\n")
        return text

    def _table(self) -> Tuple[List[str], List[List[str]], List[str]]:
        header = ["layer", "kernel", "method", "ranks", "params", "FLOPs", "kernel err",
                  "output err"]
        timed = any(r.latency_before is not None for r in self.layers)
        if timed:
            header.append("latency (ms)")
        rows = []
        for r in self.layers:
            rows.append([
                r.name,
                "x".join(map(str, r.kernel_shape)),
                r.factorization,
                "-" if r.ranks is None else ",".join(map(str, r.ranks)),
                f"{_human(r.params_before)} -> {_human(r.params_after)}",
                "-" if r.flops_before is None
                else f"{_human(r.flops_before)} -> {_human(r.flops_after)}",
                _error(r.kernel_error),
                _error(r.output_error),
            ] + ([_latency(r)] if timed else []))
        t = self.totals()
        total = [
            "total (convs)", "", "", "",
            f"{_human(t['conv_params_before'])} -> {_human(t['conv_params_after'])} "
            f"({_times(t['conv_params_reduction'])})",
            "-" if t["conv_flops_before"] is None else
            f"{_human(t['conv_flops_before'])} -> {_human(t['conv_flops_after'])} "
            f"({_times(t['conv_flops_reduction'])})",
            "", "",
        ] + ([""] if timed else [])
        lines = [
            f"model parameters: {_human(t['model_params_before'])} -> "
            f"{_human(t['model_params_after'])} ({_times(t['model_params_reduction'])})",
        ]
        if t["model_flops_before"] is not None:
            lines.append(
                f"model FLOPs at input {tuple(self.input_shape)}: "
                f"{_human(t['model_flops_before'])} -> {_human(t['model_flops_after'])} "
                f"({_times(t['model_flops_reduction'])})"
            )
        if self.model_latency_before is not None and self.model_latency_after is not None:
            lines.append(
                f"measured model latency at input {tuple(self.input_shape)}"
                + ("" if self.latency_autocast is None else
                   f" under {self.latency_autocast} autocast") + ": "
                f"{self.model_latency_before * 1e3:.4g} ms -> {self.model_latency_after * 1e3:.4g} ms "
                f"({self.model_latency_after / self.model_latency_before:.3f} of dense"
                + ("" if self.latency_target is None else
                   f", target {self.latency_target:g}: "
                   + ("held" if self.model_latency_after <= self.latency_target
                      * self.model_latency_before else "NOT held")) + ")")
        if t["model_output_error"] is not None:
            lines.append(f"relative output error of the model on {self.measured_on}: "
                         f"{t['model_output_error']:.4g}")
        if self.shared_energy is not None:
            lines.append(f"global budget: shared energy threshold {self.shared_energy:.6g}")
        notes = [f"{r.name}: {r.note}" for r in self.layers if r.note] + list(self.notes)
        return header, rows + [total], lines + (["notes:"] + ["  " + n for n in notes] if notes else [])

    def __str__(self) -> str:
        header, rows, lines = self._table()
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
        def fmt(cells):
            return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
        out = [f"tt_conv.compress: factorization={self.factorization}, rank={self.rank}",
               fmt(header), fmt(["-" * w for w in widths])]
        out += [fmt(r) for r in rows[:-1]]
        out += [fmt(["-" * w for w in widths]), fmt(rows[-1])]
        return "\n".join(out + lines)

    def to_markdown(self, path: Optional[Union[str, os.PathLike]] = None) -> str:
        """The report as a markdown table; also written (atomically) to ``path`` when given."""
        header, rows, lines = self._table()
        out = [f"**tt_conv.compress**: factorization `{self.factorization}`, rank {self.rank}", "",
               "| " + " | ".join(header) + " |",
               "|" + "|".join("---" for _ in header) + "|"]
        for r in rows:
            out.append("| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |")
        out.append("")
        for line in lines:
            out.append(line if line.startswith("  ") else line)
        text = "\n".join(
            ("- " + line.strip()) if line.startswith("  ") else line for line in out
        ) + "\n"
        if path is not None:
            write_text_atomic(path, text)
        return text


def _human(n: Optional[float]) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def _times(ratio: Optional[float]) -> str:
    """A before/after ratio in words: growth is said as growth."""
    if ratio is None:
        return "-"
    if ratio < 1:
        return f"{1 / ratio:.2f}x larger"
    return f"{ratio:.2f}x smaller"


def _latency(row: LayerReport) -> str:
    if row.latency_before is None:
        return "-"
    after = "-" if row.latency_after is None else f"{row.latency_after * 1e3:.3g}"
    how = f" ({row.implementation})" if row.implementation and row.factorization != "dense" else ""
    return f"{row.latency_before * 1e3:.3g} -> {after}{how}"


def _error(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3g}"
