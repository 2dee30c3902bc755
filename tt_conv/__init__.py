"""tt-conv: factorized (CP, Tucker, tensor-train) convolutions for PyTorch.

The public API is re-exported here.
"""

from . import decompose, rank
from .layers import CPConv, FactorizedConv, TTConv, TuckerConv
from . import interop

__version__ = "0.1.0"

__all__ = [
    "FactorizedConv",
    "CPConv",
    "TuckerConv",
    "TTConv",
    "decompose",
    "rank",
    "interop",
]
from .recurrent import (
    ConvLSTMCell,
    ConvTT,
    ConvTTLSTMCell,
    HigherOrderConvLSTMCell,
    LSTMState,
    lstm_update,
    compile_cells,
    set_pointwise,
)
from . import pointwise

__all__ += [
    "ConvTT",
    "ConvLSTMCell",
    "HigherOrderConvLSTMCell",
    "ConvTTLSTMCell",
    "LSTMState",
    "lstm_update",
    "set_pointwise",
    "compile_cells",
    "pointwise",
]

from . import budget, equivalent, profile
from .compress import compress, export, parse_rank
from .allocator import retain_freed_memory
from .fold import fold_batch_norms
from .report import CompressionReport, LayerReport

__all__ += ["compress", "export", "parse_rank", "fold_batch_norms", "CompressionReport",
            "LayerReport", "profile", "budget", "equivalent", "retain_freed_memory"]
