"""`BNLSTMCell`: one BN-LSTM step, the counterpart of `torch.nn.LSTMCell`.

A batch-normalized LSTM has statistics per time step, so a step-by-step loop (a decoder,
beam search, an agent) must say which step it is at: `step` picks the statistics slot
min(step, max_length - 1), in training and evaluation alike. The cell runs the layer's own
operator on a one-step sequence (the fused step kernels where a backend has them), so its
math and its backward pass are the layer's.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from . import direct_cpu, distributed, parameters, validation
from .module_base import BNLSTMBase


class BNLSTMCell(BNLSTMBase):
    r"""One step of the batch-normalized LSTM (Cooijmans et al., 2017).

    Args: as :class:`BNLSTM` (input_size, hidden_size, bias, max_length, variant, momentum,
    eps, gamma_init, backend, sync_statistics, process_group, device, dtype), for a single
    layer and direction. With sync_statistics, every process must call the cell in step
    (each training call all-reduces).

    Inputs: ``input, hx=None, step=0, mask=None``
        input: [B, I], or [I] unbatched.
        hx: (h_0, c_0), each [B, H] ([H] unbatched); zeros if omitted.
        step: index of this time step; the statistics slot is min(step, max_length - 1).
        mask: [B] bool, the rows still active. Inactive rows do not enter the batch
            statistics and keep their state, as padded steps do in the layer.

    Outputs: ``(h_1, c_1)``, each [B, H] ([H] unbatched); in the autocast dtype under
    torch.autocast, as BNLSTM's. A batch of no rows (B = 0) gives
    empty outputs and leaves the running statistics alone.

    State dict: the layer's names without the layer suffix: ``weight_ih`` [4H, I],
    ``weight_hh`` [4H, H], ``bias`` [4H], ``gamma_ih``, ``gamma_hh`` [4H], ``gamma_c``,
    ``beta_c`` [H], ``running_mean_*`` / ``running_var_*`` [max_length, F]. Weights move to
    and from a BNLSTM with :meth:`from_layer` and :meth:`BNLSTM.load_cell`. A
    ``torch.nn.LSTMCell`` checkpoint loads as it is, as an nn.LSTM's does into BNLSTM
    (``bias = bias_ih + bias_hh``; the BN entries keep their values and are not reported
    missing); :meth:`from_lstm_cell` builds a cell from one.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
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
        # `bias` names the parameter (the layer's state_dict name without suffix), so the flag
        # lives under another name.
        self.has_bias = validation.check_bool("bias", bias)
        parameters.register(self, "", self.input_size, self.hidden_size, self._variant, self.max_length,
                            self.has_bias, {"device": device, "dtype": dtype})
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """As BNLSTM.reset_parameters."""
        parameters.initialise(self, "", self.hidden_size, self._variant, self.gamma_init)

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}{'' if self.has_bias else ', bias=False'}, "
            f"max_length={self.max_length}, variant={self.variant!r}, momentum={self.momentum}, "
            f"eps={self.eps}, backend={self.backend!r}"
        ) + (", sync_statistics=True" if self.sync_statistics else "")

    def _state_suffixes(self):
        return [""]

    @classmethod
    def from_lstm_cell(cls, lstm_cell: nn.LSTMCell, **kwargs) -> "BNLSTMCell":
        """A BNLSTMCell with the sizes and weights of `lstm_cell` (bias = bias_ih + bias_hh).

        kwargs go to the constructor (max_length, variant, ...); the BN parameters take
        their initial values. With variant="none" the result computes what `lstm_cell` does.
        """
        if not isinstance(lstm_cell, nn.LSTMCell):
            raise TypeError(f"lstm_cell must be a torch.nn.LSTMCell, got {type(lstm_cell).__name__}")
        reference = lstm_cell.weight_ih
        kwargs.setdefault("device", reference.device)
        kwargs.setdefault("dtype", reference.dtype)
        cell = cls(lstm_cell.input_size, lstm_cell.hidden_size, lstm_cell.bias, **kwargs)
        cell.load_state_dict(lstm_cell.state_dict())  # an nn.LSTMCell checkpoint: biases summed, BN kept
        return cell

    @classmethod
    def from_layer(cls, layer_module, layer: int = 0, reverse: bool = False, **kwargs) -> "BNLSTMCell":
        """A cell holding the parameters and running statistics of one layer-direction of
        a BNLSTM (kwargs such as backend go to the constructor)."""
        layer_module._check_layer_direction(layer, reverse)
        suffix = parameters.suffix_of(layer, reverse)
        weight = getattr(layer_module, f"weight_ih{suffix}")
        kwargs.setdefault("backend", layer_module.backend)
        cell = cls(
            weight.shape[1], layer_module.hidden_size, layer_module.bias, max_length=layer_module.max_length,
            variant=layer_module.variant, momentum=layer_module.momentum, eps=layer_module.eps,
            gamma_init=layer_module.gamma_init, device=weight.device, dtype=weight.dtype, **kwargs,
        )
        parameters.copy_state(cell, "", layer_module, suffix, cell._variant)
        return cell

    def forward(self, input, hx: Optional[Tuple[Tensor, Tensor]] = None, step: int = 0,
                mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        direct = self._direct_cpu_call(input, hx, step, mask)
        if direct is not None:
            return direct
        self._refuse_torchscript_onnx()
        weight = self.weight_ih
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise validation.ShapeError(
                f"input must be 2-D [B, {self.input_size}] or 1-D unbatched [{self.input_size}], "
                f"got {input.dim()}-D shape {tuple(input.shape)}"
            )
        unbatched = input.dim() == 1
        x = input.reshape(1, 1, -1) if unbatched else input.unsqueeze(0)  # [T=1, B, I]
        # Under torch.autocast: input, state and weights in its dtype, as in BNLSTM; the input
        # and weights uncast where the backend rounds them itself (below).
        autocast_dtype = self._autocast_dtype(input, weight)
        validation.check_input(x, self.input_size, None if autocast_dtype is not None else weight.dtype,
                               weight.device)
        validation.check_positive_int("step", step, minimum=0)
        batch = x.shape[1]
        group = distributed.statistics_group(self, self.training)
        if group is None:
            validation.check_training_batch(batch, self.training, self._variant)
        else:
            validation.check_synchronized_batch(batch)
        lengths = self._mask_to_lengths(mask, batch, unbatched, x.device)
        backend, x, operand_dtype = self._backend_and_operands(x, group, autocast_dtype)
        if hx is None:
            h0 = c0 = torch.zeros(batch, self.hidden_size, dtype=x.dtype, device=x.device)
        else:
            if unbatched:
                shape, layout = (self.hidden_size,), "(hidden_size,) for unbatched input"
            else:
                shape, layout = (batch, self.hidden_size), "(batch, hidden_size)"
            h0, c0 = validation.check_hx(hx, shape, x, layout, autocast=autocast_dtype)
            if autocast_dtype is not None:
                h0, c0 = h0.to(autocast_dtype), c0.to(autocast_dtype)
            if unbatched:  # batched, they have their shape already (checked)
                h0, c0 = h0.reshape(batch, self.hidden_size), c0.reshape(batch, self.hidden_size)
        if batch == 0:
            # No row, no statistics: the backends need not run, and nothing is folded.
            anchor = parameters.graph_anchor(self, x, h0, c0)
            return h0 + anchor, c0 + anchor

        fold_momentum = self._fold_momentum(backend, self.training, group)
        options = {} if fold_momentum is None else {"fold_momentum": fold_momentum}
        if autocast_dtype is None:
            result = backend.layer(
                x, h0, c0, parameters.layer_params(self, ""), self._running_stats(""),
                variant=self._variant, training=self.training, eps=self.eps, lengths=lengths, start_step=step,
                **options,
            )
        else:
            # Off inside, so statistics and cell math stay in float32 (see BNLSTM._forward); the
            # weights cast only where the backend does not round them itself (operand_dtype).
            if operand_dtype is not None:
                options["operand_dtype"] = operand_dtype
            with torch.autocast(x.device.type, enabled=False):
                result = backend.layer(
                    x, h0, c0, self._layer_params("", autocast_dtype if operand_dtype is None else None),
                    self._running_stats(""), variant=self._variant, training=self.training, eps=self.eps,
                    lengths=lengths, start_step=step, **options,
                )
        if fold_momentum is not None:
            self._folded_in_layer("", result.batch_stats, step, result.folded)
        elif self.training:
            self._fold(backend, "", result.batch_stats, step)
        h_1, c_1 = result.h_n, result.c_n
        return (h_1[0], c_1[0]) if unbatched else (h_1, c_1)

    def _direct_cpu_call(self, input, hx, step, mask) -> Optional[Tuple[Tensor, Tensor]]:
        """forward's result for the call a decoder loop makes at every step, or None for
        forward to take its general path. That call (a [B, I] CPU tensor with the
        parameters' dtype, half precision computed in float32 as the general path computes
        it; hx a tuple of [B, H] tensors or None; no mask; the direct_cpu module's
        conditions) goes straight to the C++ operator: at small sizes forward's general path
        costs about as much Python as the operator itself (docs/CPU.md)."""
        if (mask is not None or type(step) is not int or step < 0 or type(input) is not Tensor or input.dim() != 2
                or not input.is_cpu):
            return None
        plan = direct_cpu.plan_for(self)
        if plan is None:
            return None
        training = self.training
        batch, features = input.shape
        if input.dtype is not plan.dtype or features != self.input_size or batch == 0 or (training and batch == 1):
            return None
        state = direct_cpu.initial_state(hx, (batch, self.hidden_size), plan.dtype)
        if state is None:
            return None
        h0, c0 = state
        grad = torch.is_grad_enabled()
        layer = direct_cpu.layer_arguments(self, plan, 0, grad)
        if layer is None:
            return None
        recording = layer.needs_grad or (grad and (input.requires_grad or h0.requires_grad or c0.requires_grad))
        if training and not recording:
            return None  # a training call without autograd: the general path folds after its layer
        x = input.unsqueeze(0)  # [T=1, B, I]
        _, h_n, c_n, statistics, folded = direct_cpu.run_layer(plan, x, h0, c0, layer, step, recording,
                                                               self.momentum if training else None)
        if training:
            direct_cpu.warn_if_not_finite(self, plan.suffixes, x, statistics, folded, step)
        return h_n, c_n

    @staticmethod
    def _mask_to_lengths(mask, batch: int, unbatched: bool, device) -> Optional[Tensor]:
        """mask [B] bool -> lengths [B] of 1 (active) or 0: the layer's padding rule."""
        if mask is None:
            return None
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a bool tensor of shape [{batch}], got {type(mask).__name__}")
        expected = () if unbatched else (batch,)
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must have dtype torch.bool, got {mask.dtype}")
        if tuple(mask.shape) != expected:
            raise ValueError(f"mask must have shape {list(expected)}, got {list(mask.shape)}")
        if mask.device.type != "cpu" and mask.device != device:
            raise ValueError(f"mask must be on the CPU or on the input's device {device}, got {mask.device}")
        return mask.reshape(batch).to(device=device, dtype=torch.int64)


class _DirectPlan(tuple):
    """The class of the direct path's plan in cells pickled before the plan moved to
    direct_cpu.py (a NamedTuple of six fields; since then the plan is not pickled). Such a
    plan loads as this empty stand-in, whose key matches no call's, so the cell's next call
    makes a new plan."""

    key = None

    def __new__(cls, *fields):
        return super().__new__(cls)

