"""bnlstm_cuda: the batch-normalized LSTM of Cooijmans et al. (2017) for PyTorch."""
from .calibration import calibrate_statistics
from .cell import BNLSTMCell
from .distributed import convert_sync_statistics
from .module import BNLSTM
from .reference import LayerParams, LayerResult, bnlstm_layer_reference
from .statistics import BatchStats, update_running_stats
from .variants import VARIANTS, Variant, get_variant

__version__ = "0.1.0"

__all__ = [
    "BNLSTM",
    "BNLSTMCell",
    "BatchStats",
    "LayerParams",
    "LayerResult",
    "VARIANTS",
    "Variant",
    "bnlstm_layer_reference",
    "calibrate_statistics",
    "convert_sync_statistics",
    "get_variant",
    "update_running_stats",
]
