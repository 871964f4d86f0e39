"""bnlstm_cuda: the batch-normalized LSTM of Cooijmans et al. (2017) for PyTorch."""
from .calibration import calibrate_statistics
from .cell import BNLSTMCell
from .module import BNLSTM
from .module_base import convert_sync_statistics
from .layer_api import LayerParams, LayerResult
from .reference import bnlstm_layer_reference
from .statistics import BatchStats, update_running_stats
from .validation import DTypeError, ShapeError
from .variants import VARIANTS, Variant, get_variant

__version__ = "0.1.0"

__all__ = [
    "BNLSTM",
    "BNLSTMCell",
    "BatchStats",
    "DTypeError",
    "LayerParams",
    "LayerResult",
    "ShapeError",
    "VARIANTS",
    "Variant",
    "bnlstm_layer_reference",
    "calibrate_statistics",
    "convert_sync_statistics",
    "get_variant",
    "update_running_stats",
]
