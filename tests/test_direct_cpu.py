"""BNLSTM's direct CPU path (bnlstm_cuda/direct_cpu.py): the common call straight to the
C++ operators gives, bit for bit, what forward's general path gives, and every other call
is left to the general path. (BNLSTMCell's direct path: tests/test_cell.py.)"""
import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from bnlstm_cuda import BNLSTM, BNLSTMCell
from helpers import (copied_and_loaded, counting_direct_calls, general_path_only, randomize_bn_parameters,
                     scalar_loss)


LAYOUTS = {  # (num_layers, bidirectional, batch_first, dropout)
    "one_layer": (1, False, False, 0.0),
    "two_layers_batch_first_dropout": (2, False, True, 0.3),
    "bidirectional": (1, True, False, 0.0),
    "two_bidirectional_layers_dropout": (2, True, False, 0.3),
}


@pytest.mark.parametrize("variant", ["cooijmans", "laurent_step", "laurent_sequence", "none"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["fp32", "fp64", "bf16", "fp16"])
@pytest.mark.parametrize("mode", ["train", "eval_graph", "eval_no_grad"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("first_state", ["given", "none"])
def test_direct_call_equals_the_general_path(variant, bias, dtype, mode, layout, first_state):
    """Outputs, final states, running statistics after every fold and every gradient agree
    bit for bit between the two paths: three calls of 5 steps (max_length=4, so the last
    slot repeats), the first resolving the backend, the others direct; dropout between
    layers draws the same masks from the same seed."""
    num_layers, bidirectional, batch_first, dropout = LAYOUTS[layout]
    training, grad = mode == "train", mode != "eval_no_grad"
    torch.manual_seed(3)
    kwargs = dict(num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first, dropout=dropout,
                  bias=bias, variant=variant, max_length=4, backend="cpu", dtype=dtype)
    direct, taken = counting_direct_calls(BNLSTM(5, 6, **kwargs).train(training))
    general = general_path_only(BNLSTM(5, 6, **kwargs).train(training))
    randomize_bn_parameters(direct)
    general.load_state_dict(direct.state_dict())
    states = num_layers * (2 if bidirectional else 1)
    inputs = [torch.randn(3, 5, 5, dtype=dtype) for _ in range(3)]  # [B, T, I] or [T, B, I]
    hx = None if first_state == "none" else tuple(torch.randn(states, 3 if batch_first else 5, 6, dtype=dtype)
                                                  for _ in range(2))
    results = []
    for module in (direct, general):
        got = []
        for call, x in enumerate(inputs):
            x = x.clone().requires_grad_(grad)
            state = None if hx is None else tuple(t.clone().requires_grad_(grad) for t in hx)
            torch.manual_seed(10 + call)
            with torch.set_grad_enabled(grad):
                output, (h_n, c_n) = module(x, state)
                got += [output, h_n, c_n]
                if grad:
                    for parameter in module.parameters():
                        parameter.grad = None
                    scalar_loss(output, h_n, c_n).backward()
                    got += [x.grad] + ([] if state is None else [t.grad for t in state])
                    got += [p.grad for p in module.parameters()]
            got += [b.clone() for b in module.buffers()]
        results.append(got)
    assert [result is not None for result in taken] == [False, True, True]
    assert len(results[0]) == len(results[1])
    for index, (a, b) in enumerate(zip(*results)):
        assert a is not None and b is not None, index
        assert torch.equal(a, b), index


@pytest.mark.parametrize("mode", ["train", "eval_no_grad"])
def test_direct_call_streams_chunks_as_the_general_path(mode):
    """A sequence streamed in chunks with start_step (a unidirectional layer): each chunk's
    statistics slots and the carried state agree with the general path's, past max_length."""
    torch.manual_seed(4)
    training = mode == "train"
    direct, taken = counting_direct_calls(BNLSTM(4, 5, num_layers=2, max_length=5, backend="cpu").train(training))
    general = general_path_only(BNLSTM(4, 5, num_layers=2, max_length=5, backend="cpu").train(training))
    randomize_bn_parameters(direct)
    general.load_state_dict(direct.state_dict())
    x = torch.randn(9, 3, 4)
    results = []
    for module in (direct, general):
        state, outputs = None, []
        with torch.set_grad_enabled(training):
            for start in range(0, 9, 3):
                output, state = module(x[start:start + 3], state, start_step=start)
                outputs.append(output)
                state = tuple(t.detach() for t in state)
        results.append(outputs + list(state) + [b.clone() for b in module.buffers()])
    assert [result is not None for result in taken] == [False, True, True]
    for index, (a, b) in enumerate(zip(*results)):
        assert torch.equal(a, b), index


def test_direct_call_leaves_other_calls_to_the_general_path():
    """Calls the direct path does not serve reach the general path, which names what is
    wrong with a bad one, as before the first call."""
    module = BNLSTM(3, 5, max_length=4, backend="cpu")
    x, hx = torch.randn(4, 2, 3), (torch.zeros(1, 2, 5), torch.zeros(1, 2, 5))
    module(x, hx)  # resolves the backend
    assert module._direct_cpu_call(x, hx, None, 0) is not None
    assert module._direct_cpu_call(x, hx, None, 7) is not None
    packed = pack_padded_sequence(x, [4, 3])
    served_elsewhere = [
        (x, hx, torch.tensor([4, 3]), 0), (packed, None, None, 0), (x[:, 0], None, None, 0),
        (x, list(hx), None, 0), (x, (hx[0][:, :1], hx[1]), None, 0), (x.double(), None, None, 0),
        (x[:, :1], None, None, 0), (x[:, :0], None, None, 0), (x[:0], None, None, 0), (x[..., :2], None, None, 0),
        (x, hx, None, 1.0), (x, hx, None, -1), (x, hx, None, True),
    ]
    for arguments in served_elsewhere:
        assert module._direct_cpu_call(*arguments) is None
    with torch.no_grad():  # a training call without autograd folds after its layers
        assert module._direct_cpu_call(x, hx, None, 0) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert module._direct_cpu_call(x, hx, None, 0) is None
    bidirectional = BNLSTM(3, 5, bidirectional=True, backend="cpu")
    bidirectional(x)
    assert bidirectional._direct_cpu_call(x, None, None, 0) is not None
    assert bidirectional._direct_cpu_call(x, None, None, 2) is None  # refused by the general path
    with pytest.raises(ValueError, match="bidirectional layer cannot"):
        bidirectional(x, start_step=2)
    module.to(torch.bfloat16)
    assert module._direct_cpu_call(x, None, None, 0) is None  # float32 input, bfloat16 parameters
    reference = BNLSTM(3, 5, backend="reference")
    reference(x)
    assert reference._direct_cpu_call(x, None, None, 0) is None


def test_bad_calls_after_a_direct_one_name_what_is_wrong():
    """Once the direct path serves a module, bad arguments still get the general path's
    messages."""
    module = BNLSTM(3, 5, backend="cpu")
    x = torch.randn(4, 2, 3)
    module(x)
    module(x)
    with pytest.raises(ValueError, match=r"hx\[h_0\] must have shape \(1, 2, 5\)"):
        module(x, (torch.zeros(1, 3, 5), torch.zeros(1, 2, 5)))
    with pytest.raises(TypeError, match="hx must be a tuple"):
        module(x, torch.zeros(1, 2, 5))
    with pytest.raises(ValueError, match="input must have input_size=3 features"):
        module(x[..., :2])
    with pytest.raises(TypeError, match="input has dtype torch.float64"):
        module(x.double())
    with pytest.raises(ValueError, match="batch=1"):
        module(x[:, :1])
    with pytest.raises(ValueError, match="start_step must be >= 0, got -1"):
        module(x, start_step=-1)


def test_direct_call_warns_of_statistics_that_are_not_finite():
    """A training call whose batch holds an inf, in the second layer-direction of a
    bidirectional layer's pair as in a plain layer: the direct path warns once, naming the
    layer-direction, as the general path does, and the slot keeps its running statistics."""
    for module, name in ((BNLSTM(3, 5, num_layers=2, max_length=4, backend="cpu", dtype=torch.float64), "layer 0"),
                         (BNLSTM(3, 5, bidirectional=True, max_length=4, backend="cpu", dtype=torch.float64),
                          "layer 0")):
        module(torch.randn(4, 3, 3, dtype=torch.float64))
        before = module.running_mean_ih_l0[2].clone()
        poisoned = torch.randn(4, 3, 3, dtype=torch.float64)
        poisoned[2, 1, 0] = float("inf")
        with pytest.warns(UserWarning, match=name + r": the batch statistics of step 2 \(ih\) are not finite"):
            module(poisoned)
        assert torch.equal(module.running_mean_ih_l0[2], before)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            module(poisoned)  # warned once per module


def test_a_copied_or_loaded_module_keeps_its_direct_path():
    """copy.deepcopy and torch.save/torch.load copy the resolved backend with the module: the
    copies still go direct, and agree with the original."""
    module = BNLSTM(3, 5, num_layers=2, bidirectional=True, backend="cpu").eval()
    x = torch.randn(4, 2, 3)
    module(x)  # resolves the backend
    for copy_of_module in copied_and_loaded(module):
        with torch.no_grad():
            assert copy_of_module._direct_cpu_call(x, None, None, 0) is not None
            assert torch.equal(copy_of_module(x)[0], module(x)[0])


def test_a_replaced_parameter_is_read_at_the_next_call():
    """The direct path reads the parameters at every call: a parameter replaced after the
    plan was made is the one used, and one that can no longer be read directly (a
    parametrization) sends the call to the general path."""
    module = BNLSTM(3, 5, backend="cpu").eval()
    x = torch.randn(4, 2, 3)
    with torch.no_grad():
        module(x)
        before = module(x)[0]
        module.weight_hh_l0 = torch.nn.Parameter(torch.zeros_like(module.weight_hh_l0))
        assert not torch.equal(module(x)[0], before)
        torch.nn.utils.parametrize.register_parametrization(module, "weight_ih_l0", torch.nn.Identity())
        assert module._direct_cpu_call(x, None, None, 0) is None
        module(x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["module", "cell"])
def test_half_precision_calls_after_the_first_are_direct(kind, dtype):
    """A module or cell in half precision takes the direct path from its second call on,
    computing in float32 as the general path does: repeated evaluation calls give the first
    call's result, in the module's dtype. (A former direct path handed such calls to the
    operators in their own dtype, which the CPU kernels do not compute in.)"""
    torch.manual_seed(5)
    if kind == "module":
        module, x = BNLSTM(3, 5, backend="cpu", dtype=dtype), torch.randn(4, 2, 3, dtype=dtype)
        direct_arguments = (x, None, None, 0)
    else:
        module, x = BNLSTMCell(3, 5, backend="cpu", dtype=dtype), torch.randn(2, 3, dtype=dtype)
        direct_arguments = (x, None, 0, None)
    module, taken = counting_direct_calls(module)
    for training in (True, False):
        module.train(training)
        taken.clear()
        results = [module(x) for _ in range(3)]
        assert all(result is not None for result in taken[1:])
        assert all(t.dtype == dtype for t in torch.utils._pytree.tree_leaves(results))
        first = results[0][0]
        if not training:  # training calls fold: each call's statistics move the next one's
            for result in results[1:]:
                assert torch.equal(result[0], first)
    assert module._direct_cpu_call(*direct_arguments) is not None


def test_the_plan_is_not_pickled_and_an_old_pickled_plan_loads():
    """A pickled module leaves its plan out (a cache the next call remakes). A cell pickled
    while the plan was `bnlstm_cuda.cell._DirectPlan`, a NamedTuple of six fields, still
    loads, and its next call makes a new plan and gives the original's result."""
    import pickle
    from typing import NamedTuple

    import bnlstm_cuda.cell

    cell = BNLSTMCell(3, 5, backend="cpu").eval()
    x = torch.randn(4, 3)
    with torch.no_grad():
        cell(x)
        want = cell(x)[0]  # direct: the cell has a plan
    assert "_direct_plan" in cell.__dict__
    assert "_direct_plan" not in pickle.loads(pickle.dumps(cell)).__dict__

    class OldPlan(NamedTuple):
        key: tuple
        dtype: torch.dtype
        absent: torch.Tensor
        parameter_names: tuple
        running_names: tuple
        flags: tuple

    OldPlan.__module__, OldPlan.__qualname__ = "bnlstm_cuda.cell", "_DirectPlan"
    old_plan = OldPlan(cell._direct_plan.key, torch.float32, torch.empty(0), (), (), ())
    saved = cell.__dict__.copy()
    saved["_direct_plan"] = old_plan
    original = bnlstm_cuda.cell._DirectPlan
    bnlstm_cuda.cell._DirectPlan = OldPlan  # pickle finds the class under its name while dumping
    try:
        pickled = pickle.dumps(saved)
    finally:
        bnlstm_cuda.cell._DirectPlan = original
    loaded = BNLSTMCell.__new__(BNLSTMCell)
    loaded.__setstate__(pickle.loads(pickled))
    assert loaded._direct_plan.key is None
    with torch.no_grad():
        assert loaded._direct_cpu_call(x, None, 0, None) is not None
        assert torch.equal(loaded(x)[0], want)
    assert loaded._direct_plan.key == cell._direct_plan.key
