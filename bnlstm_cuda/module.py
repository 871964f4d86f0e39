"""`BNLSTM`: a batch-normalized LSTM that drops in where `torch.nn.LSTM` stood."""
from __future__ import annotations

import numbers
import warnings
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from . import direct_cpu, distributed, parameters, validation
from .backends import Backend
from .module_base import BNLSTMBase
from .statistics import BatchStats

# layer-direction suffix, e.g. "_l1_reverse" -> part -> batch statistics of that pass
ForwardStats = Dict[str, Dict[str, BatchStats]]


class BNLSTM(BNLSTMBase):
    r"""Batch-normalized LSTM (Cooijmans et al., 2017), shaped like :class:`torch.nn.LSTM`.

    .. math::
        gates_t = BN(W_{ih} x_t; \gamma_{ih}, 0) + BN(W_{hh} h_{t-1}; \gamma_{hh}, 0) + b \\
        c_t = \sigma(f_t) c_{t-1} + \sigma(i_t) \tanh(g_t) \qquad
        h_t = \sigma(o_t) \tanh(BN(c_t; \gamma_c, \beta_c))

    Statistics are per time step: over the active sequences of the batch in training, the
    running statistics of slot ``min(t, max_length - 1)`` in evaluation.

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
            proj_size: as :class:`torch.nn.LSTM`, positionally too (``proj_size`` must be 0:
            projections are not supported). The others are keyword-only.
        max_length: number of per-step statistics slots; later steps use the last one.
        variant: ``"cooijmans"`` (input, recurrent and cell normalization),
            ``"laurent_step"`` / ``"laurent_sequence"`` (input projection only, statistics
            per step / over the whole sequence, one slot), or ``"none"`` (a plain LSTM).
        momentum: running statistics update ``running = (1 - m) running + m batch``.
        eps: added to the variance before the square root.
        gamma_init: initial value of every gamma (the paper's 0.1).
        backend: ``"auto"`` (the fused backend for the input's device), ``"reference"``
            (the plain PyTorch loop), ``"cpu"``, ``"cuda"`` or ``"triton"``. While
            torch.export traces (torch.onnx.export(..., dynamo=True) too), the reference
            loop runs whatever the backend, so the exported graph needs no extension.
        sync_statistics: in training, normalize with the batch statistics of the global
            batch over ``process_group`` (torch.distributed), the SyncBatchNorm of this
            layer; needs backend "auto" or "reference". See bnlstm_cuda.distributed.
        process_group: the group for ``sync_statistics`` (None: the default group).

    Inputs: ``input, hx=None, lengths=None, start_step=0``
        input: [T, B, I] ([B, T, I] if batch_first), [T, I] unbatched, or a PackedSequence.
        hx: (h_0, c_0), each [num_layers * num_directions, B, H] ([.., H] unbatched);
            zeros if omitted.
        lengths: [B] valid lengths of a padded batch (ints in [1, T], on the CPU or the
            input's device). Padded positions give zero outputs and leave the state alone;
            statistics are taken over the sequences still active at each step.
        start_step: index of input's first time step, for streaming a long sequence in
            chunks while carrying (h, c): step t uses statistics slot
            min(start_step + t, max_length - 1). Unidirectional layers only.

    Outputs: ``output, (h_n, c_n)`` shaped as :class:`torch.nn.LSTM`'s; h_n and c_n hold
    each sequence's state at its last valid step. Under torch.autocast (float16 or
    bfloat16, for the input's device type) input, state and weight matrices are cast to its
    dtype, statistics and cell math run in float32, and the outputs come in its dtype
    (docs/SEMANTICS.md, "Under torch.autocast"). A batch of no sequences (B = 0) gives
    empty outputs and leaves the running statistics alone.

    State dict, for layer k and direction suffix "" or "_reverse":
    ``weight_ih_l{k}`` [4H, I_k], ``weight_hh_l{k}`` [4H, H], ``bias_l{k}`` [4H],
    ``gamma_ih_l{k}`` [4H], ``gamma_hh_l{k}`` [4H], ``gamma_c_l{k}`` [H], ``beta_c_l{k}`` [H],
    buffers ``running_mean_{ih,hh,c}_l{k}`` and ``running_var_{ih,hh,c}_l{k}`` of shape
    [max_length, 4H] (ih, hh; [1, 4H] for laurent_sequence's ih) or [max_length, H] (c).
    Gate order i, f, g, o. Parts a variant does not normalize have no entries.
    ``all_weights`` lists each layer-direction's parameters in that order, as nn.LSTM's does.

    A :class:`torch.nn.LSTM` state_dict loads directly (``load_state_dict``, strict or not):
    ``bias_ih_l{k}`` + ``bias_hh_l{k}`` sum into ``bias_l{k}``, and the BN parameters and
    running statistics, which it lacks, keep their current values without counting as
    missing keys. A checkpoint counts as nn.LSTM's when it holds this module's weights, none
    of BNLSTM's other names, and (with bias) the nn.LSTM bias pairs.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        *,
        max_length: int = 100,
        variant: str = "cooijmans",
        momentum: float = 0.1,
        eps: float = 1e-5,
        gamma_init: float = 0.1,
        backend: str = "auto",
        sync_statistics: bool = False,
        process_group=None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self._set_options(input_size, hidden_size, max_length, variant, momentum, eps, gamma_init, backend,
                          sync_statistics, process_group)
        self.num_layers = validation.check_positive_int("num_layers", num_layers)
        self.dropout = validation.check_float("dropout", dropout, 0.0, 1.0)
        self.bias = validation.check_bool("bias", bias)
        self.batch_first = validation.check_bool("batch_first", batch_first)
        self.bidirectional = validation.check_bool("bidirectional", bidirectional)
        if isinstance(proj_size, bool) or not isinstance(proj_size, numbers.Integral) or proj_size != 0:
            raise ValueError(f"proj_size must be 0 (projections are not supported), got {proj_size!r}")
        self.proj_size = 0  # read by code written for nn.LSTM
        if self.dropout > 0 and self.num_layers == 1:
            warnings.warn(
                "dropout acts between layers, so it has no effect with num_layers=1 "
                f"(got dropout={self.dropout})"
            )

        factory = {"device": device, "dtype": dtype}
        for suffix, layer_input in self._layer_directions():
            parameters.register(self, suffix, layer_input, self.hidden_size, self._variant, self.max_length,
                                self.bias, factory)
        self.reset_parameters()

    # Construction helpers ---------------------------------------------------------------

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _layer_directions(self):
        """(state_dict suffix, input features) of every layer-direction, in hx order."""
        for layer in range(self.num_layers):
            layer_input = self.input_size if layer == 0 else self.hidden_size * self.num_directions
            for reverse in (False, True)[: self.num_directions]:
                yield parameters.suffix_of(layer, reverse), layer_input

    def reset_running_stats(self) -> None:
        """Running means to 0 and variances to 1."""
        for suffix, _ in self._layer_directions():
            for mean, var in self._running_stats(suffix).values():
                nn.init.zeros_(mean)
                nn.init.ones_(var)

    def reset_parameters(self) -> None:
        """The "none" variant initialises as torch.nn.LSTM does. Normalized variants follow
        the paper: orthogonal W_hh per gate, zero bias, every gamma gamma_init, beta_c 0."""
        for suffix, _ in self._layer_directions():
            parameters.initialise(self, suffix, self.hidden_size, self._variant, self.gamma_init)

    def flatten_parameters(self) -> None:
        """No-op, for code written for torch.nn.LSTM: the weights need no flat buffer."""

    @property
    def all_weights(self) -> List[List[nn.Parameter]]:
        """The parameters of each layer-direction (hx order), in state_dict order, as
        torch.nn.LSTM.all_weights lists them."""
        return [[getattr(self, name) for name in parameters.parameter_names(self, suffix)]
                for suffix, _ in self._layer_directions()]

    def extra_repr(self) -> str:
        text = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            text += f", num_layers={self.num_layers}"
        if not self.bias:
            text += ", bias=False"
        if self.batch_first:
            text += ", batch_first=True"
        if self.dropout:
            text += f", dropout={self.dropout}"
        if self.bidirectional:
            text += ", bidirectional=True"
        return text + (
            f", max_length={self.max_length}, variant={self.variant!r}, "
            f"momentum={self.momentum}, eps={self.eps}, backend={self.backend!r}"
        ) + (", sync_statistics=True" if self.sync_statistics else "")

    # Forward ----------------------------------------------------------------------------

    def forward(self, input, hx: Optional[Tuple[Tensor, Tensor]] = None, lengths=None, start_step: int = 0):
        direct = self._direct_cpu_call(input, hx, lengths, start_step)
        if direct is not None:
            return direct
        self._refuse_torchscript_onnx()
        group = distributed.statistics_group(self, self.training)
        output, state, _, _ = self._forward(
            input, hx, lengths,
            batch_statistics=self.training,
            dropout=self.dropout if self.training else 0.0,
            start_step=start_step,
            group=group,
            fold=self.training,
        )
        return output, state

    def _direct_cpu_call(self, input, hx, lengths, start_step):
        """forward's result for the call a training or serving loop makes at every step, or
        None for forward to take its general path. That call (a [T, B, I] CPU tensor,
        batch-first or not, with the parameters' dtype, half precision computed in float32 as
        the general path computes it; hx a tuple of tensors or None; no lengths, no
        PackedSequence; the direct_cpu module's conditions) goes straight to the C++
        operators, one call per layer: at small sizes forward's general path costs about as
        much Python as the operators (docs/CPU.md)."""
        if (lengths is not None or type(input) is not Tensor or input.dim() != 3 or not input.is_cpu
                or type(start_step) is not int or start_step < 0 or (start_step and self.bidirectional)):
            return None
        plan = direct_cpu.plan_for(self)
        if plan is None:
            return None
        x = input.transpose(0, 1) if self.batch_first else input  # [T, B, I]
        steps, batch, features = x.shape
        training = self.training
        if (input.dtype is not plan.dtype or features != self.input_size or steps == 0 or batch == 0
                or (training and batch == 1)):
            return None
        directions, hidden = self.num_directions, self.hidden_size
        if hx is None:  # every layer starts from the same zeros, without a view per layer
            h0 = c0 = torch.zeros((batch, hidden) if directions == 1 else (2, batch, hidden), dtype=plan.compute_dtype)
        else:
            state = direct_cpu.initial_state(hx, (self.num_layers * directions, batch, hidden), plan.dtype)
            if state is None:
                return None
            h0, c0 = state
        grad = torch.is_grad_enabled()
        recording = grad and (input.requires_grad or h0.requires_grad or c0.requires_grad)
        layers = []
        for index in range(len(plan.suffixes)):
            arguments = direct_cpu.layer_arguments(self, plan, index, grad)
            if arguments is None:
                return None
            layers.append(arguments)
            recording = recording or arguments.needs_grad
        if training and not recording:
            return None  # a training call without autograd: the general path folds after its layers
        momentum = self.momentum if training else None
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            first = layer * directions
            states = first if directions == 1 else slice(first, first + 2)
            layer_h0, layer_c0 = (h0, c0) if hx is None else (h0[states], c0[states])
            if directions == 1:
                output, h, c, statistics, folded = direct_cpu.run_layer(
                    plan, x, layer_h0, layer_c0, layers[first], start_step, recording, momentum)
            else:
                output, h, c, statistics, folded = direct_cpu.run_bidirectional(
                    plan, x, layer_h0, layer_c0, layers[first], layers[first + 1], recording, momentum)
            if training:
                direct_cpu.warn_if_not_finite(self, plan.suffixes[first:first + directions], x, statistics, folded,
                                              start_step)
            h_n.append(h)
            c_n.append(c)
            x = output
            if training and self.dropout > 0 and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        if directions == 1:
            h_n, c_n = (h_n[0].unsqueeze(0), c_n[0].unsqueeze(0)) if len(h_n) == 1 else (torch.stack(h_n),
                                                                                         torch.stack(c_n))
        else:
            h_n, c_n = (h_n[0], c_n[0]) if len(h_n) == 1 else (torch.cat(h_n), torch.cat(c_n))
        return (x.transpose(0, 1) if self.batch_first else x), (h_n, c_n)

    # Checkpoints --------------------------------------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        if any(key.startswith(prefix + "weight_hr_l") for key in state_dict):
            error_msgs.append(
                "the checkpoint is of a torch.nn.LSTM with proj_size > 0 (it holds weight_hr_l*), "
                "but BNLSTM supports proj_size=0 only: projections are not supported (its weight_hh_l* "
                "have proj_size columns, not hidden_size)"
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _state_suffixes(self) -> List[str]:
        return [suffix for suffix, _ in self._layer_directions()]

    def _forward(self, input, hx, lengths, *, batch_statistics: bool, dropout: float, start_step: int = 0,
                 group=None, fold: bool = False):
        """Validate, bring the input to [T, B, I], run every layer, restore the layout.

        group: a process group for synchronized batch statistics (distributed.statistics_group),
        or None for statistics of this batch. fold: fold the batch statistics into the running
        statistics (a training step; the calibration only collects them).
        Returns (output, (h_n, c_n), batch statistics of every layer-direction, the Backend
        that ran); for an empty batch, no statistics and no Backend (None).
        """
        validation.check_positive_int("start_step", start_step, minimum=0)
        if start_step and self.bidirectional:
            raise ValueError(
                f"start_step={start_step} streams a sequence in chunks, which a bidirectional layer cannot "
                "do (its reverse direction needs the whole sequence); use start_step=0"
            )
        weight = self.weight_ih_l0
        packed = isinstance(input, PackedSequence)
        # Under torch.autocast: the input, state and weights in its dtype (float32 compute
        # inside the backends), whatever dtype each came in; the input and weights uncast
        # where the backend rounds them itself (below).
        autocast_dtype = self._autocast_dtype(input.data if packed else input, weight)
        expected_dtype = None if autocast_dtype is not None else weight.dtype
        if packed:
            if lengths is not None:
                raise ValueError("lengths must be None when input is a PackedSequence (it carries its own)")
            validation.check_packed(input, self.input_size)
            x, lengths = pad_packed_sequence(input)  # [T, B, I] in the caller's batch order
            validation.check_input(x, self.input_size, expected_dtype, weight.device)
        else:
            validation.check_input(input, self.input_size, expected_dtype, weight.device, self.batch_first)
            if input.dim() == 2:
                x = input.unsqueeze(1)
            else:
                x = input.transpose(0, 1) if self.batch_first else input
        unbatched = not packed and input.dim() == 2
        num_steps, batch = x.shape[0], x.shape[1]
        if group is None:
            # (Synchronized statistics need only the global batch to hold 2 sequences, and it
            # does: every process holds at least one.)
            validation.check_training_batch(batch, batch_statistics, self._variant)
        else:
            validation.check_synchronized_batch(batch)
        lengths = validation.check_lengths(lengths, batch, num_steps, x.device)
        if group is not None:
            # Each step all-reduces, so every process runs the longest sequence of the group.
            x, lengths = distributed.pad_to_global_length(x, lengths, group)
        backend, x, operand_dtype = self._backend_and_operands(x, group, autocast_dtype)
        fold_momentum = self._fold_momentum(backend, fold, group)

        num_states = self.num_layers * self.num_directions
        if hx is None:
            zeros = torch.zeros(num_states, batch, self.hidden_size, dtype=x.dtype, device=x.device)
            h0, c0 = zeros, zeros
        else:
            if unbatched:
                shape = (num_states, self.hidden_size)
                layout = "(num_layers * num_directions, hidden_size) for unbatched input"
            else:
                shape = (num_states, batch, self.hidden_size)
                layout = "(num_layers * num_directions, batch, hidden_size)"
            h0, c0 = validation.check_hx(hx, shape, x, layout, autocast=autocast_dtype)
            if autocast_dtype is not None:
                h0, c0 = h0.to(autocast_dtype), c0.to(autocast_dtype)
            if unbatched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)

        if batch == 0:
            # No sequence, no statistics: the backends need not run, and nothing is folded.
            anchor = parameters.graph_anchor(self, x, h0, c0)
            output = x.new_zeros(num_steps, 0, self.num_directions * self.hidden_size) + anchor
            h_n, c_n, batch_stats, folded = h0 + anchor, c0 + anchor, {}, set()
        elif autocast_dtype is None:
            output, h_n, c_n, batch_stats, folded = self._run_layers(
                backend, x, h0, c0, lengths, batch_statistics, dropout, start_step, fold_momentum=fold_momentum)
        else:
            # Off inside: the backends keep statistics and cell math in float32, which
            # autocast would otherwise turn to its dtype at every matrix product.
            with torch.autocast(x.device.type, enabled=False):
                output, h_n, c_n, batch_stats, folded = self._run_layers(
                    backend, x, h0, c0, lengths, batch_statistics, dropout, start_step,
                    autocast_dtype if operand_dtype is None else None, operand_dtype, fold_momentum)
        if fold:
            for suffix, parts in batch_stats.items():
                if suffix not in folded:
                    self._fold(backend, suffix, parts, start_step)
        if group is not None:
            output = output[:num_steps]  # [T, B, H]: drop the steps added for other processes

        if packed:
            output = _pack_like(output, input)
        elif unbatched:
            output, h_n, c_n = output.squeeze(1), h_n.squeeze(1), c_n.squeeze(1)
        elif self.batch_first:
            output = output.transpose(0, 1)
        return output, (h_n, c_n), batch_stats, backend

    def _run_layers(self, backend: Backend, x, h0, c0, lengths, batch_statistics: bool, dropout: float,
                    start_step: int, autocast_dtype: Optional[torch.dtype] = None,
                    operand_dtype: Optional[torch.dtype] = None, fold_momentum: Optional[float] = None):
        """x: [T, B, I]; h0, c0: [num_layers * num_directions, B, H]; autocast_dtype: the
        dtype of the weights under torch.autocast (None: as they are); operand_dtype: the
        layers' (layer_api.LayerFunction), where the backend rounds the operands itself;
        fold_momentum: the layers' (_fold_momentum). Returns the output, h_n, c_n, the batch
        statistics and the layer-directions whose layers folded them."""
        options = {} if operand_dtype is None else {"operand_dtype": operand_dtype}
        if fold_momentum is not None:
            options["fold_momentum"] = fold_momentum
        if self.bidirectional and backend.bidirectional_layer is not None and not torch.compiler.is_compiling():
            return self._run_bidirectional_layers(backend, x, h0, c0, lengths, batch_statistics, dropout,
                                                  autocast_dtype, options)
        layer_fn = backend.layer
        h_n, c_n, outputs = [], [], []
        batch_stats: ForwardStats = {}
        folded = set()
        for index, (suffix, _) in enumerate(self._layer_directions()):
            direction = index % self.num_directions
            result = layer_fn(
                x, h0[index], c0[index], self._layer_params(suffix, autocast_dtype), self._running_stats(suffix),
                variant=self._variant, training=batch_statistics, eps=self.eps,
                lengths=lengths, reverse=direction == 1, start_step=start_step, **options,
            )
            outputs.append(result.output)
            h_n.append(result.h_n)
            c_n.append(result.c_n)
            batch_stats[suffix] = result.batch_stats
            if fold_momentum is not None:
                self._folded_in_layer(suffix, result.batch_stats, start_step, result.folded)
                folded.add(suffix)
            if direction == self.num_directions - 1:
                x = torch.cat(outputs, dim=-1) if len(outputs) > 1 else outputs[0]
                outputs = []
                last_layer = index == self.num_layers * self.num_directions - 1
                if dropout > 0 and not last_layer:
                    x = F.dropout(x, dropout, training=True)
        if len(h_n) == 1:  # one layer-direction: a view, without stack's copy
            return x, h_n[0].unsqueeze(0), c_n[0].unsqueeze(0), batch_stats, folded
        return x, torch.stack(h_n), torch.stack(c_n), batch_stats, folded

    def _run_bidirectional_layers(self, backend: Backend, x, h0, c0, lengths, batch_statistics: bool,
                                  dropout: float, autocast_dtype: Optional[torch.dtype], options: dict):
        """_run_layers with a call of the backend's bidirectional_layer per layer (torch.compile
        traces the call per direction); options: the layer functions' operand_dtype and
        fold_momentum, if any."""
        h_n, c_n = [], []
        batch_stats: ForwardStats = {}
        folded = set()
        for layer in range(self.num_layers):
            suffixes = (parameters.suffix_of(layer, False), parameters.suffix_of(layer, True))
            states = slice(2 * layer, 2 * layer + 2)
            result = backend.bidirectional_layer(
                x, h0[states], c0[states], tuple(self._layer_params(suffix, autocast_dtype) for suffix in suffixes),
                tuple(self._running_stats(suffix) for suffix in suffixes),
                variant=self._variant, training=batch_statistics, eps=self.eps, lengths=lengths, **options,
            )
            x = result.output
            h_n.append(result.h_n)
            c_n.append(result.c_n)
            batch_stats.update(zip(suffixes, result.batch_stats))
            if "fold_momentum" in options:
                for suffix, parts, skipped in zip(suffixes, result.batch_stats, result.folded):
                    self._folded_in_layer(suffix, parts, 0, skipped)
                folded.update(suffixes)
            if dropout > 0 and layer < self.num_layers - 1:
                x = F.dropout(x, dropout, training=True)
        return x, torch.cat(h_n), torch.cat(c_n), batch_stats, folded

    # Interoperability -------------------------------------------------------------------

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM, **kwargs) -> "BNLSTM":
        """A BNLSTM with the sizes and weights of `lstm` (bias = bias_ih + bias_hh).

        kwargs go to the constructor (max_length, variant, ...); the BN parameters take
        their initial values. With variant="none" the result computes what `lstm` does.
        """
        if not isinstance(lstm, nn.LSTM):
            raise TypeError(f"lstm must be a torch.nn.LSTM, got {type(lstm).__name__}")
        if lstm.proj_size:
            raise ValueError(f"lstm.proj_size must be 0 (projections are not supported), got {lstm.proj_size}")
        reference = lstm.weight_ih_l0
        kwargs.setdefault("device", reference.device)
        kwargs.setdefault("dtype", reference.dtype)
        module = cls(
            lstm.input_size, lstm.hidden_size, lstm.num_layers, lstm.bias, lstm.batch_first,
            lstm.dropout, lstm.bidirectional, **kwargs,
        )
        module.load_state_dict(lstm.state_dict())  # an nn.LSTM checkpoint: biases summed, BN kept
        return module

    def load_cell(self, cell, layer: int = 0, reverse: bool = False) -> "BNLSTM":
        """Copy a BNLSTMCell's parameters and running statistics into one layer-direction
        (the inverse of BNLSTMCell.from_layer). Sizes, variant, bias and max_length must agree."""
        self._check_layer_direction(layer, reverse)
        if cell.variant != self.variant:
            raise ValueError(f"the cell has variant {cell.variant!r}, the layer {self.variant!r}")
        parameters.copy_state(self, parameters.suffix_of(layer, reverse), cell, "", self._variant)
        return self

    def _check_layer_direction(self, layer: int, reverse: bool) -> None:
        validation.check_positive_int("layer", layer, minimum=0)
        if layer >= self.num_layers:
            raise ValueError(f"layer must be < num_layers={self.num_layers}, got {layer}")
        if reverse and not self.bidirectional:
            raise ValueError("reverse=True needs a bidirectional layer")

    def calibrate(self, batches, progress: bool = False) -> "BNLSTM":
        """Replace the running statistics by exact population statistics over `batches`.

        See :func:`bnlstm_cuda.calibration.calibrate_statistics`.
        """
        from .calibration import calibrate_statistics

        calibrate_statistics(self, batches, progress=progress)
        return self


def _pack_like(output: Tensor, template: PackedSequence) -> PackedSequence:
    """Pack output [T, B, H] (caller's batch order) with the layout of `template`."""
    if template.sorted_indices is not None:
        output = output.index_select(1, template.sorted_indices)
    batch_sizes = template.batch_sizes  # [T] on the CPU
    steps = output.shape[0]
    rows = torch.arange(output.shape[1]).unsqueeze(0) < batch_sizes[:steps].unsqueeze(1)  # [T, B]
    # Row-major boolean indexing walks steps, then sorted sequences: the packed order.
    data = output[rows.to(output.device)]
    return PackedSequence(data, batch_sizes, template.sorted_indices, template.unsorted_indices)
