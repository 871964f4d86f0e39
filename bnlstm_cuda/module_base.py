"""What `BNLSTM` and `BNLSTMCell` share: their options, state_dict checks, running
statistics kept in float32, and the choice of what runs a forward pass (the backend,
resolved once per device and dtype, or the synchronized reference layer) with the fold of
its batch statistics that goes with it."""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import backends, distributed, parameters, validation
from .backends import Backend
from .layer_api import LayerParams, RunningStats
from .statistics import BatchStats
from .variants import get_variant


class BNLSTMBase(nn.Module):
    """Base of BNLSTM and BNLSTMCell (not a module of its own)."""

    def _set_options(self, input_size, hidden_size, max_length, variant, momentum, eps, gamma_init, backend,
                     sync_statistics, process_group) -> None:
        options = validation.check_layer_options(input_size, hidden_size, max_length, variant, momentum, eps,
                                                 gamma_init, backend, backends.BACKEND_NAMES)
        for name, value in options.items():
            setattr(self, name, value)
        distributed.configure(self, sync_statistics, process_group)
        # (backend name, device, dtype, GPU batch) -> the Backend resolved for them
        self._resolved: Optional[Tuple[tuple, Backend]] = None

    @property
    def _variant(self):
        return get_variant(self.variant)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A torch.nn.LSTM (or nn.LSTMCell) checkpoint loads as it is: its bias pairs become
        # bias, and the BN entries it cannot hold keep their values instead of counting as
        # missing.
        normalization = self._normalization_keys(prefix)
        from_lstm = self._convert_lstm_checkpoint(state_dict, prefix, normalization)
        # Name the constructor argument that differs before torch lists every mismatched tensor.
        own = {**dict(self.named_parameters(recurse=False)), **dict(self.named_buffers(recurse=False))}
        error_msgs.extend(validation.state_dict_mismatches(state_dict, prefix, own, self.max_length))
        first_new = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if from_lstm:
            missing_keys[first_new:] = [key for key in missing_keys[first_new:] if key not in normalization]

    def _state_suffixes(self) -> List[str]:
        """The state_dict suffix of each layer-direction ("_l0", "_l0_reverse", ...; "" for a cell)."""
        raise NotImplementedError

    def _normalization_keys(self, prefix: str) -> set:
        """state_dict keys of every gamma, beta and running statistic: what nn.LSTM lacks."""
        return {
            prefix + attribute
            for suffix in self._state_suffixes()
            for name, attribute in parameters.state_names(self, suffix, self._variant).items()
            if name not in ("weight_ih", "weight_hh", "bias")
        }

    def _convert_lstm_checkpoint(self, state_dict, prefix: str, normalization: set) -> bool:
        """Replace each nn.LSTM (nn.LSTMCell) pair bias_ih{sfx}, bias_hh{sfx} (both present,
        same shape, and no bias{sfx}) by their sum bias{sfx}, in state_dict. True when the
        checkpoint is recognizably nn.LSTM's: it holds this module's weights, none of its own
        other names (normalization: _normalization_keys(prefix), and the biases), and (where
        this module has biases) nn.LSTM's bias pairs."""
        suffixes = self._state_suffixes()
        with_bias = [suffix for suffix in suffixes if "bias" + suffix in self._parameters]
        own_only = normalization | {prefix + "bias" + suffix for suffix in suffixes}
        has_own_only = any(key in state_dict for key in own_only)
        has_weights = any(prefix + f"weight_{kind}{suffix}" in state_dict for suffix in suffixes for kind in ("ih", "hh"))
        converted = 0
        for suffix in with_bias:
            if prefix + "bias" + suffix in state_dict:
                continue
            pair = prefix + "bias_ih" + suffix, prefix + "bias_hh" + suffix
            values = [state_dict.get(key) for key in pair]
            # A lone or odd-shaped bias is left as it is: torch reports it as unexpected.
            if not all(isinstance(value, Tensor) for value in values) or values[0].shape != values[1].shape:
                continue
            for key in pair:
                del state_dict[key]
            state_dict[prefix + "bias" + suffix] = values[0] + values[1]
            converted += 1
        return has_weights and not has_own_only and (converted > 0 or not with_bias)

    def __getstate__(self):
        # The direct CPU path's plan (direct_cpu.py) is a cache the next call remakes: left out,
        # so a pickled module does not depend on the plan's class.
        state = super().__getstate__()
        state.pop("_direct_plan", None)
        return state

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        parameters.keep_statistics_float32(self)
        return self

    def __prepare_scriptable__(self):
        # torch.jit.script calls this first: a clear refusal instead of a parse error deep in
        # the forward pass (TorchScript cannot compile its Python, f-strings included).
        raise RuntimeError(
            f"{type(self).__name__} cannot be compiled with torch.jit.script; use torch.compile(model) "
            "for speed or torch.export.export(model, (x,)) for a graph to deploy"
        )

    def _refuse_torchscript_onnx(self) -> None:
        """The TorchScript-based ONNX exporter (torch.onnx.export(..., dynamo=False)) traces
        with torch.jit.trace, which passes the integer arguments as tensors and would make
        each a required input of the ONNX graph: refused with the exporter that works."""
        if torch.jit.is_tracing() and torch.onnx.is_in_onnx_export():
            raise RuntimeError(
                f"{type(self).__name__} does not support the TorchScript-based ONNX exporter "
                "(torch.onnx.export(..., dynamo=False)); use torch.onnx.export(model, (x,), dynamo=True), "
                "which traces the module with torch.export"
            )

    def _pass_backend(self, x: Tensor, group, dtype: Optional[torch.dtype] = None) -> Backend:
        """What runs this forward pass on x [T, B, I]: the reference layer with statistics of
        `group`'s global batch (a synchronized training step); the reference layer while
        torch.export traces (torch.onnx.export(..., dynamo=True) included), so the exported
        graph holds standard operators only, whatever the backend; else this module's
        backend, resolved once per backend name, device and dtype (and batch on a GPU,
        where "auto" depends on it). torch.compile keeps the module's backend. dtype: the
        one the layers compute in, where not x's (torch.autocast's)."""
        if group is not None:
            return distributed.synchronized_backend(group)
        if torch.compiler.is_exporting():
            return backends.REFERENCE
        dtype = x.dtype if dtype is None else dtype
        batch = x.shape[1] if x.device.type == "cuda" else None
        key = (self.backend, x.device, dtype, batch)
        resolved = getattr(self, "_resolved", None)  # modules pickled before it existed lack it
        if resolved is None or resolved[0] != key:
            backend = backends.resolve(self.backend, x.device, dtype=dtype, batch=x.shape[1],
                                       hidden_size=self.hidden_size)
            resolved = self._resolved = (key, backend)
        return resolved[1]

    def _backend_and_operands(self, x: Tensor, group, autocast_dtype: Optional[torch.dtype]):
        """(backend, x, operand_dtype) for a pass over x [T, B, I]: _pass_backend's backend
        (None for a batch of no rows) and, under torch.autocast, how the input and weights
        reach it. A backend that rounds float32 operands as the casts would takes them uncast
        and multiplies in autocast's dtype (operand_dtype): the casts' copies and autograd
        nodes are a visible part of a small step (docs/CPU.md). Otherwise x comes back cast
        to autocast's dtype and operand_dtype is None."""
        backend = self._pass_backend(x, group, autocast_dtype) if x.shape[1] else None
        operand_dtype = None
        if autocast_dtype is not None:
            if backend is not None and backend.rounds_operands(autocast_dtype):
                operand_dtype = autocast_dtype
            else:
                x = x.to(autocast_dtype)
        return backend, x, operand_dtype

    def _autocast_dtype(self, input, weight: Tensor) -> Optional[torch.dtype]:
        """The dtype torch.autocast multiplies in for this pass, or None where it does not
        apply: autocast must be enabled for the input's device type with a half-precision
        dtype, and input and parameters must be of a dtype autocast casts (float32, float16,
        bfloat16; it leaves float64 alone, as this module does)."""
        if not isinstance(input, Tensor):
            return None
        device_type = input.device.type
        if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
            return None
        dtype = torch.get_autocast_dtype(device_type)
        eligible = validation.AUTOCAST_DTYPES
        if dtype not in (torch.float16, torch.bfloat16) or input.dtype not in eligible or weight.dtype not in eligible:
            return None
        return dtype

    def _layer_params(self, suffix: str, autocast_dtype: Optional[torch.dtype]) -> LayerParams:
        """One layer-direction's parameters; under autocast the weights (the matrix products'
        operands) in its dtype, as autocast gives them to a Linear, while bias, gammas and
        beta stay as they are for the normalization and cell math in float32. The cast is
        recorded by autograd: the gradients reach the parameters in their own dtype."""
        params = parameters.layer_params(self, suffix)
        if autocast_dtype is None:
            return params
        return params._replace(weight_ih=params.weight_ih.to(autocast_dtype),
                               weight_hh=params.weight_hh.to(autocast_dtype))

    def _running_stats(self, suffix: str) -> RunningStats:
        """The running statistics of one layer-direction (suffix "" for the cell)."""
        return parameters.running_stats(self, suffix, self._variant)

    def _fold(self, backend: Backend, suffix: str, batch_stats: Dict[str, BatchStats], start_step: int) -> None:
        """Fold one layer-direction's batch statistics into its running statistics, the way
        the backend that computed them does."""
        if not batch_stats:  # variant "none"
            return
        skipped = backend.fold(self._running_stats(suffix), batch_stats, self.momentum, start_step)
        self._warn_if_not_finite(suffix, batch_stats, start_step, skipped)

    def _fold_momentum(self, backend: Optional[Backend], fold: bool, group) -> Optional[float]:
        """The layers' fold_momentum: the module's momentum where a training call's backend
        folds in its layers (Backend.folds_in_layer) and the statistics are this batch's
        (group None; synchronized ones come from the reference backend); None: the module
        folds after the layers (_fold), or there is nothing to fold (an empty batch runs no
        backend)."""
        folds = fold and backend is not None and backend.folds_in_layer and group is None
        return self.momentum if folds else None

    def _folded_in_layer(self, suffix: str, batch_stats: Dict[str, BatchStats], start_step: int,
                         skipped: Optional[Tensor]) -> None:
        """After a layer that folded its batch statistics itself (LayerResult.folded): the
        warning _fold would give."""
        if batch_stats:  # variant "none": nothing to fold, nothing to warn of
            self._warn_if_not_finite(suffix, batch_stats, start_step, skipped)

    def _warn_if_not_finite(self, suffix: str, batch_stats: Dict[str, BatchStats], start_step: int,
                            skipped: Optional[Tensor]) -> None:
        """Warn once per module when batch statistics held an inf or NaN (the fold skipped
        them). skipped: each part's first such step as the fold found it (-1: none), or None,
        when the fold does not say. Checked on CPU tensors only: on a GPU the check would wait
        for the device at every training step (and cannot run inside a captured graph)."""
        # (_fold calls this only with batch statistics: variant "none" has none.)
        if self.__dict__.get("_warned_not_finite", False) or torch.compiler.is_compiling():
            return
        if skipped is not None:  # the C++ fold's report (CPU tensors)
            firsts = skipped.tolist()
        elif next(iter(batch_stats.values())).mean.device.type != "cpu":
            return
        else:
            firsts = []
            for stats in batch_stats.values():
                finite = torch.isfinite(stats.mean).all(-1) & torch.isfinite(stats.var).all(-1)  # [N]
                firsts.append(-1 if bool(finite.all()) else int((~finite).nonzero()[0, 0]))
        found = [(part, first) for part, first in zip(batch_stats, firsts) if first >= 0]
        if not found:
            return
        part, first = found[0]
        self._warned_not_finite = True
        where = "the sequence" if part == "ih" and self._variant.input_statistics == "sequence" else \
            f"step {start_step + first}"
        layer = suffix.replace("_l", "layer ", 1).replace("_reverse", " (reverse)") or "the cell"
        warnings.warn(
            f"{type(self).__name__} {layer}: the batch statistics of {where} ({part}) are not finite (an inf "
            "or NaN in the batch); their running statistics were left as they were, not folded. "
            "Warned once per module."
        )


def convert_sync_statistics(module: nn.Module, process_group=None) -> nn.Module:
    """Turn on synchronized statistics in every BNLSTM and BNLSTMCell inside `module`
    (`module` itself included), in place, and return `module`.

    The counterpart of torch.nn.SyncBatchNorm.convert_sync_batchnorm: training-mode batch
    statistics become those of the global batch over `process_group` (None: the default
    group, looked up at each forward pass). Parameters, buffers and state_dict keys are
    unchanged, so an optimizer built before the conversion and checkpoints of either kind
    still fit. Every converted module must have backend "auto" or "reference".
    Call it before wrapping the model in DistributedDataParallel.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    distributed.check_process_group(process_group)
    targets = [m for m in module.modules() if isinstance(m, BNLSTMBase)]
    # Check every target before changing any, so a refusal leaves the model as it was.
    for target in targets:
        if target.backend not in distributed.SYNC_BACKENDS:
            raise ValueError(
                f"cannot synchronize statistics of {type(target).__name__} with backend={target.backend!r}; "
                f"use one of {list(distributed.SYNC_BACKENDS)} (synchronized training steps run the reference layer)"
            )
    for target in targets:
        distributed.configure(target, True, process_group)
    return module
