"""BNLSTM where torch.nn.LSTM stood: what nn.LSTM's own callers and tests rely on. Empty
batches, a batch of one where nothing is normalized, all_weights, bool flags, exception
types, nn.LSTM's constructor signature, and nn.LSTM checkpoints loaded directly."""
import inspect
import re

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from bnlstm_cuda import BNLSTM, BNLSTMCell
from bnlstm_cuda.validation import DTypeError, ShapeError
from helpers import randomize_bn_parameters, scalar_loss

TOL = dict(rtol=1e-10, atol=1e-10)
BACKENDS = ["reference", "cpu"]
VARIANTS = ["cooijmans", "laurent_step", "laurent_sequence", "none"]


def buffers(module):
    return {name: buffer.clone() for name, buffer in module.named_buffers()}


def assert_same_buffers(module, before):
    for name, buffer in module.named_buffers():
        assert torch.equal(buffer, before[name]), name


# Empty batches ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["TBI", "BTI"])
def test_empty_batch_gives_what_lstm_gives(backend, variant, training, batch_first):
    kwargs = dict(num_layers=2, bidirectional=True, batch_first=batch_first)
    lstm = nn.LSTM(3, 4, **kwargs, dtype=torch.float64).train(training)
    module = BNLSTM(3, 4, **kwargs, variant=variant, backend=backend, max_length=5,
                    dtype=torch.float64).train(training)
    shape = (0, 5, 3) if batch_first else (5, 0, 3)
    before = buffers(module)
    results = []
    for rnn in (lstm, module):
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        h0 = torch.randn(4, 0, 4, dtype=torch.float64, requires_grad=True)
        c0 = torch.randn(4, 0, 4, dtype=torch.float64, requires_grad=True)
        for hx in (None, (h0, c0)):
            out, (h_n, c_n) = rnn(x, hx)
            scalar_loss(out, h_n, c_n).backward()
            results.append([out, h_n, c_n, x.grad, h0.grad])
    for ours, theirs in zip(results[2:], results[:2]):
        for got, want in zip(ours, theirs):
            assert (got is None) == (want is None)
            if got is not None:
                assert got.shape == want.shape and got.dtype == want.dtype
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and torch.all(parameter.grad == 0), name
    assert_same_buffers(module, before)


def test_empty_batch_with_lengths_and_in_half_precision():
    module = BNLSTM(3, 4, max_length=5)
    out, (h_n, _) = module(torch.randn(5, 0, 3), lengths=torch.zeros(0, dtype=torch.int64))
    assert out.shape == (5, 0, 4) and h_n.shape == (1, 0, 4)
    assert module(torch.randn(5, 0, 3), lengths=[])[0].shape == (5, 0, 4)
    half = BNLSTM(3, 4, max_length=5, dtype=torch.bfloat16)
    assert half(torch.randn(5, 0, 3, dtype=torch.bfloat16))[0].dtype == torch.bfloat16


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["cooijmans", "none"])
def test_empty_batch_in_the_cell(backend, variant):
    lstm_cell = nn.LSTMCell(3, 4)
    cell = BNLSTMCell(3, 4, variant=variant, backend=backend, max_length=5)
    before = buffers(cell)
    x = torch.randn(0, 3, requires_grad=True)
    expected = lstm_cell(x)
    h_1, c_1 = cell(x, step=2)
    assert h_1.shape == expected[0].shape and c_1.shape == expected[1].shape and h_1.dtype == torch.float32
    hx = (torch.zeros(0, 4), torch.zeros(0, 4))
    h_2, c_2 = cell(x, hx, mask=torch.zeros(0, dtype=torch.bool))
    (h_1.sum() + c_1.sum() + h_2.sum() + c_2.sum()).backward()
    assert x.grad.shape == (0, 3)
    for name, parameter in cell.named_parameters():
        assert parameter.grad is not None and torch.all(parameter.grad == 0), name
    assert_same_buffers(cell, before)


def test_empty_batch_in_a_synchronized_step_is_refused(monkeypatch):
    """The other processes would wait for its all-reduces."""
    from bnlstm_cuda import distributed

    monkeypatch.setattr(distributed, "statistics_group", lambda module, training: object())
    for call in (lambda: BNLSTM(3, 4)(torch.randn(5, 0, 3)), lambda: BNLSTMCell(3, 4)(torch.randn(0, 3))):
        with pytest.raises(ValueError, match="sync_statistics=True needs at least one sequence on every process"):
            call()


def test_zero_time_steps_stay_an_error():
    module = BNLSTM(3, 4, batch_first=True)
    for rnn, x in ((nn.LSTM(3, 4), torch.randn(0, 2, 3)), (nn.LSTM(3, 4), torch.randn(0, 3))):
        with pytest.raises(RuntimeError):
            rnn(x)
    with pytest.raises(ShapeError, match=r"at least one time step \(dimension 1\), got shape \(2, 0, 3\)"):
        module(torch.randn(2, 0, 3))
    with pytest.raises(ShapeError, match=r"at least one time step \(dimension 0\), got shape \(0, 3\)"):
        module(torch.randn(0, 3))


# A batch of one where nothing is normalized ----------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_none_variant_trains_on_one_sequence_as_lstm_does(backend):
    lstm = nn.LSTM(3, 5, num_layers=2, dtype=torch.float64)
    module = BNLSTM.from_lstm(lstm, variant="none", backend=backend)
    assert module.training
    for x in (torch.randn(6, 1, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)):
        out, (h_n, c_n) = module(x)
        expected, (h_ref, c_ref) = lstm(x)
        torch.testing.assert_close(out, expected, **TOL)
        torch.testing.assert_close(h_n, h_ref, **TOL)
        torch.testing.assert_close(c_n, c_ref, **TOL)
        module.zero_grad()
        lstm.zero_grad()
        scalar_loss(out, h_n, c_n).backward()
        scalar_loss(expected, h_ref, c_ref).backward()
        for name, parameter in module.named_parameters():
            want = getattr(lstm, name.replace("bias_", "bias_ih_")).grad
            torch.testing.assert_close(parameter.grad, want, **TOL, msg=lambda m: f"{name}: {m}")
    packed = pack_padded_sequence(torch.randn(6, 1, 3, dtype=torch.float64), [4])
    torch.testing.assert_close(module(packed)[0].data, lstm(packed)[0].data, **TOL)


def test_none_cell_trains_on_one_row():
    cell = BNLSTMCell(3, 5, variant="none", dtype=torch.float64)
    x = torch.randn(1, 3, dtype=torch.float64)
    trained = cell(x, step=3)
    torch.testing.assert_close(cell.eval()(x, step=3), trained, rtol=0, atol=0)
    assert cell.train()(x[0])[0].shape == (5,)


@pytest.mark.parametrize("variant", VARIANTS[:3])
def test_normalized_variants_still_need_two_sequences(variant):
    module = BNLSTM(3, 4, variant=variant, max_length=5)
    for x in (torch.randn(5, 1, 3), torch.randn(5, 3)):
        with pytest.raises(ValueError, match=rf"got batch=1; .*variant='{variant}' normalizes with batch statistics"):
            module(x)
    with pytest.raises(ValueError, match="got batch=1"):
        BNLSTMCell(3, 4, variant=variant)(torch.randn(1, 3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_one_sequence_active_at_some_steps_stays_allowed(backend, variant):
    """Two sequences, the second ending at step 2: steps 2.. have one active sequence."""
    module = BNLSTM(3, 4, variant=variant, backend=backend, max_length=6)
    before = buffers(module)
    out, (h_n, c_n) = module(torch.randn(6, 2, 3), lengths=[6, 2])
    assert torch.isfinite(out).all() and torch.isfinite(h_n).all() and torch.isfinite(c_n).all()
    assert variant == "none" or any(not torch.equal(b, before[n]) for n, b in module.named_buffers())
    packed = pack_padded_sequence(torch.randn(6, 2, 3), [6, 2])
    assert torch.isfinite(module(packed)[0].data).all()


# all_weights -----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bias", [True, False])
def test_all_weights_lists_each_layer_direction_in_state_dict_order(variant, bias):
    lstm = nn.LSTM(3, 5, num_layers=2, bidirectional=True, bias=bias)
    module = BNLSTM(3, 5, num_layers=2, bidirectional=True, bias=bias, variant=variant)
    assert len(module.all_weights) == len(lstm.all_weights) == 4
    # Flattened: every parameter once, in named_parameters (state_dict) order.
    flat = [parameter for weights in module.all_weights for parameter in weights]
    assert [id(p) for p in flat] == [id(p) for p in module.parameters()]
    names = {id(p): name for name, p in module.named_parameters()}
    suffixes = ("_l0", "_l0_reverse", "_l1", "_l1_reverse")
    for weights, theirs, suffix in zip(module.all_weights, lstm.all_weights, suffixes):
        assert all(names[id(p)].endswith(suffix) for p in weights)
        assert weights[0].shape == theirs[0].shape and weights[1].shape == theirs[1].shape  # weight_ih, weight_hh
    expected = ["weight_ih", "weight_hh", *(["bias"] if bias else [])]
    expected += {"cooijmans": ["gamma_ih", "gamma_hh", "gamma_c", "beta_c"], "none": []}.get(variant, ["gamma_ih"])
    assert [names[id(p)] for p in module.all_weights[3]] == [f"{name}_l1_reverse" for name in expected]


# Flags and exception types ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["bias", "batch_first", "bidirectional"])
@pytest.mark.parametrize("value", [0, 1, "False", None, 1.0])
def test_flags_must_be_bool(name, value):
    if name != "bidirectional":  # nn.LSTM checks these two, with this message
        with pytest.raises(TypeError) as theirs:
            nn.LSTM(3, 4, **{name: value})
        assert str(theirs.value) == f"{name} should be of type bool, got: {type(value).__name__}"
    message = f"{name} should be of type bool, got: {type(value).__name__} ({value!r})"
    with pytest.raises(TypeError, match=re.escape(message)):
        BNLSTM(3, 4, **{name: value})
    if name == "bias":
        with pytest.raises(TypeError, match="bias should be of type bool, got: "):
            BNLSTMCell(3, 4, bias=value)


def lstm_and_module(**kwargs):
    lstm = nn.LSTM(3, 4, num_layers=2, **kwargs)
    return lstm, BNLSTM(3, 4, num_layers=2, max_length=5, **kwargs)


MODULE_CASES = {
    "feature size": lambda rnn: rnn(torch.randn(5, 2, 7)),
    "hx batch": lambda rnn: rnn(torch.randn(5, 2, 3), (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))),
    "hx hidden": lambda rnn: rnn(torch.randn(5, 2, 3), (torch.zeros(2, 2, 6), torch.zeros(2, 2, 6))),
    "hx layers": lambda rnn: rnn(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))),
    "zero steps": lambda rnn: rnn(torch.randn(0, 2, 3)),
    "rank 4": lambda rnn: rnn(torch.randn(5, 2, 3, 1)),
    "packed features": lambda rnn: rnn(pack_padded_sequence(torch.randn(5, 2, 7), [5, 3])),
    "dtype": lambda rnn: rnn(torch.randn(5, 2, 3, dtype=torch.float64)),
}


@pytest.mark.parametrize("case", MODULE_CASES)
def test_module_errors_are_of_lstms_type_and_of_the_documented_one(case):
    """Each error is an instance of what nn.LSTM raises for the same call (RuntimeError for
    sizes, ValueError for a dtype) and of the documented ValueError / TypeError."""
    lstm, module = lstm_and_module()
    with pytest.raises(Exception) as theirs:
        MODULE_CASES[case](lstm)
    documented = DTypeError if case == "dtype" else ShapeError
    with pytest.raises(documented) as ours:
        MODULE_CASES[case](module)
    assert isinstance(ours.value, type(theirs.value)), (type(ours.value), type(theirs.value))
    assert isinstance(ours.value, TypeError if case == "dtype" else ValueError)


CELL_CASES = {
    "hx batch broadcast": lambda cell: cell(torch.randn(3, 3), (torch.zeros(1, 4), torch.zeros(1, 4))),
    "1-D hx, 2-D input": lambda cell: cell(torch.randn(3, 3), (torch.zeros(4), torch.zeros(4))),
    "2-D hx, 1-D input": lambda cell: cell(torch.randn(3), (torch.zeros(1, 4), torch.zeros(1, 4))),
    "hx hidden": lambda cell: cell(torch.randn(3, 3), (torch.zeros(3, 5), torch.zeros(3, 4))),
    "feature size": lambda cell: cell(torch.randn(3, 5)),
    "rank 3": lambda cell: cell(torch.randn(2, 3, 3)),
}


@pytest.mark.parametrize("case", CELL_CASES)
def test_cell_errors_are_of_lstm_cells_type_and_a_value_error(case):
    with pytest.raises(Exception) as theirs:
        CELL_CASES[case](nn.LSTMCell(3, 4))
    with pytest.raises(ShapeError) as ours:
        CELL_CASES[case](BNLSTMCell(3, 4).eval())
    assert isinstance(ours.value, type(theirs.value)) and isinstance(ours.value, ValueError)


def test_hx_messages_name_the_shape_of_each_module():
    cell = BNLSTMCell(3, 4).eval()
    pattern = r"hx\[h_0\] must have shape \(3, 4\) \(batch, hidden_size\), got \(1, 4\)"
    with pytest.raises(ShapeError, match=pattern) as error:
        cell(torch.randn(3, 3), (torch.zeros(1, 4), torch.zeros(1, 4)))
    assert "num_layers" not in str(error.value)
    with pytest.raises(ShapeError, match=r"must have shape \(4,\) \(hidden_size,\) for unbatched input, got \(1, 4\)"):
        cell(torch.randn(3), (torch.zeros(1, 4), torch.zeros(1, 4)))
    module = BNLSTM(3, 4, num_layers=2).eval()
    with pytest.raises(ShapeError, match=r"must have shape \(2, 4\) \(num_layers \* num_directions, hidden_size\) "
                                         r"for unbatched input, got \(2, 1, 4\)"):
        module(torch.randn(5, 3), (torch.zeros(2, 1, 4), torch.zeros(2, 1, 4)))
    with pytest.raises(ShapeError, match=r"must have shape \(2, 2, 4\) \(num_layers \* num_directions, batch, "):
        module(torch.randn(5, 2, 3), (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)))


# nn.LSTM's signature ---------------------------------------------------------------------


def test_positional_arguments_are_lstms():
    theirs = list(inspect.signature(nn.modules.rnn.RNNBase.__init__).parameters.values())[2:]  # after self, mode
    ours = list(inspect.signature(BNLSTM.__init__).parameters.values())[1:]
    positional = [p for p in ours if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert [(p.name, p.default) for p in positional] == [
        (p.name, p.default) for p in theirs if p.name not in ("device", "dtype")
    ]
    assert all(p.kind == p.KEYWORD_ONLY for p in ours[len(positional):])
    arguments = (3, 5, 2, True, True, 0.25, True, 0)
    lstm, module = nn.LSTM(*arguments), BNLSTM(*arguments)
    for name in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional",
                 "proj_size"):
        assert getattr(module, name) == getattr(lstm, name), name
    with pytest.raises(TypeError):
        BNLSTM(*arguments, 100)  # max_length and the rest stay keyword-only


def test_proj_size_zero_only():
    assert BNLSTM(3, 5, proj_size=0).proj_size == 0
    assert BNLSTM(3, 5, device="cpu", dtype=torch.float64).weight_ih_l0.dtype == torch.float64
    for value in (2, -1, True, 0.0, "0"):
        message = f"proj_size must be 0 (projections are not supported), got {value!r}"
        with pytest.raises(ValueError, match=re.escape(message)):
            BNLSTM(3, 5, proj_size=value)
    with pytest.raises(ValueError, match="projections are not supported"):
        BNLSTM(3, 5, 1, True, False, 0.0, False, 2)


# nn.LSTM checkpoints ---------------------------------------------------------------------


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(num_layers=2, bidirectional=True), dict(num_layers=2, bidirectional=True, bias=False)],
    ids=["one layer", "2 layers bidirectional", "no bias"],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_none_variant_loading_an_lstm_state_dict_equals_it(kwargs, strict, backend):
    lstm = nn.LSTM(3, 5, **kwargs, dtype=torch.float64)
    module = BNLSTM(3, 5, **kwargs, variant="none", backend=backend, dtype=torch.float64)
    state = lstm.state_dict()
    keys = list(state)
    result = module.load_state_dict(state, strict=strict)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert list(state) == keys  # the caller's dict is left alone
    directions = 2 if kwargs.get("bidirectional") else 1
    hx = tuple(torch.randn(kwargs.get("num_layers", 1) * directions, 4, 5, dtype=torch.float64) for _ in range(2))
    for training in (True, False):
        module.train(training)
        lstm.train(training)
        x = torch.randn(6, 4, 3, dtype=torch.float64)
        out, (h_n, c_n) = module(x, hx)
        expected, (h_ref, c_ref) = lstm(x, hx)
        torch.testing.assert_close(out, expected, **TOL)
        torch.testing.assert_close(h_n, h_ref, **TOL)
        torch.testing.assert_close(c_n, c_ref, **TOL)


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("variant", VARIANTS[:3])
def test_normalized_variant_loads_an_lstm_state_dict_keeping_bn_values(variant, strict):
    lstm = nn.LSTM(3, 5, num_layers=2, bidirectional=True, dtype=torch.float64)
    module = randomize_bn_parameters(BNLSTM(3, 5, num_layers=2, bidirectional=True, variant=variant,
                                            max_length=4, dtype=torch.float64))
    before = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    result = module.load_state_dict(lstm.state_dict(), strict=strict)
    assert result.missing_keys == [] and result.unexpected_keys == []
    for name, tensor in module.state_dict().items():
        if name.startswith("weight_"):
            assert torch.equal(tensor, getattr(lstm, name)), name
        elif name.startswith("bias_"):
            suffix = name[len("bias"):]
            torch.testing.assert_close(tensor, getattr(lstm, f"bias_ih{suffix}") + getattr(lstm, f"bias_hh{suffix}"))
        else:
            assert torch.equal(tensor, before[name]), name


def test_lstm_state_dict_loads_into_a_nested_module():
    source = nn.Sequential(nn.Linear(2, 3), nn.LSTM(3, 5, dtype=torch.float64))
    target = nn.Sequential(nn.Linear(2, 3), BNLSTM(3, 5, variant="none", dtype=torch.float64))
    target.load_state_dict(source.state_dict())
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(target[1](x)[0], source[1](x)[0], **TOL)


def test_bnlstm_checkpoints_load_as_before():
    saved = randomize_bn_parameters(BNLSTM(3, 5, num_layers=2, bidirectional=True, max_length=4))
    module = BNLSTM(3, 5, num_layers=2, bidirectional=True, max_length=4)
    assert module.load_state_dict(saved.state_dict()).missing_keys == []
    for name, tensor in saved.state_dict().items():
        assert torch.equal(module.state_dict()[name], tensor), name


def test_mismatched_checkpoints_are_still_refused():
    # Other sizes: the error names the constructor argument.
    with pytest.raises(RuntimeError, match="saved with hidden_size=6 but this module has hidden_size=5"):
        BNLSTM(3, 5, variant="none").load_state_dict(nn.LSTM(3, 6).state_dict())
    with pytest.raises(RuntimeError, match="saved with input_size=2 but this module has input_size=3"):
        BNLSTM(3, 5).load_state_dict(nn.LSTM(2, 5).state_dict(), strict=False)
    # Not an nn.LSTM checkpoint: missing BN entries are missing, as ever.
    none_state = BNLSTM(3, 5, variant="none").state_dict()
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "gamma_ih_l0"'):
        BNLSTM(3, 5).load_state_dict(none_state)
    assert "running_var_c_l0" in BNLSTM(3, 5).load_state_dict(none_state, strict=False).missing_keys
    # An nn.LSTM checkpoint with a layer fewer, or a lone bias of a pair: reported, not guessed.
    missing = r'Missing key\(s\) in state_dict: "weight_ih_l1", "weight_hh_l1", "bias_l1"'
    with pytest.raises(RuntimeError, match=missing):
        BNLSTM(3, 5, num_layers=2).load_state_dict(nn.LSTM(3, 5).state_dict())
    lone = nn.LSTM(3, 5).state_dict()
    del lone["bias_hh_l0"]
    result = BNLSTM(3, 5, variant="none").load_state_dict(lone, strict=False)
    assert result.missing_keys == ["bias_l0"] and result.unexpected_keys == ["bias_ih_l0"]
    # Biases where the module has none, projections.
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "bias_ih_l0", "bias_hh_l0"'):
        BNLSTM(3, 5, bias=False).load_state_dict(nn.LSTM(3, 5).state_dict())
    with pytest.raises(RuntimeError, match="torch.nn.LSTM with proj_size > 0 .* projections are not supported"):
        BNLSTM(3, 5).load_state_dict(nn.LSTM(3, 5, proj_size=2).state_dict(), strict=False)


# nn.LSTMCell checkpoints: the same rules for the cell -------------------------------------


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_none_variant_cell_loading_an_lstm_cell_state_dict_equals_it(bias, strict, backend):
    lstm_cell = nn.LSTMCell(3, 5, bias=bias, dtype=torch.float64)
    cell = BNLSTMCell(3, 5, bias, variant="none", backend=backend, dtype=torch.float64)
    state = lstm_cell.state_dict()
    keys = list(state)
    result = cell.load_state_dict(state, strict=strict)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert list(state) == keys  # the caller's dict is left alone
    hx = tuple(torch.randn(4, 5, dtype=torch.float64) for _ in range(2))
    for training in (True, False):
        cell.train(training)
        x = torch.randn(4, 3, dtype=torch.float64)
        for got, expected in zip(cell(x, hx, step=1), lstm_cell(x, hx)):
            torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("variant", VARIANTS[:3])
def test_normalized_cell_loads_an_lstm_cell_state_dict_keeping_bn_values(variant):
    lstm_cell = nn.LSTMCell(3, 5, dtype=torch.float64)
    cell = randomize_bn_parameters(BNLSTMCell(3, 5, variant=variant, max_length=4, dtype=torch.float64))
    with torch.no_grad():
        cell.bias.normal_()
    before = {name: tensor.clone() for name, tensor in cell.state_dict().items()}
    result = cell.load_state_dict(lstm_cell.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    for name, tensor in cell.state_dict().items():
        if name.startswith("weight_"):
            assert torch.equal(tensor, getattr(lstm_cell, name)), name
        elif name == "bias":
            torch.testing.assert_close(tensor, lstm_cell.bias_ih + lstm_cell.bias_hh)
        else:
            assert torch.equal(tensor, before[name]), name


def test_from_lstm_cell_copies_weights_and_sums_biases():
    lstm_cell = nn.LSTMCell(3, 5, dtype=torch.float64)
    cell = BNLSTMCell.from_lstm_cell(lstm_cell, variant="none", max_length=7)
    assert (cell.input_size, cell.hidden_size, cell.has_bias, cell.max_length) == (3, 5, True, 7)
    assert cell.weight_ih.dtype == torch.float64
    x = torch.randn(4, 3, dtype=torch.float64)
    for got, expected in zip(cell(x), lstm_cell(x)):
        torch.testing.assert_close(got, expected, **TOL)
    normalized = BNLSTMCell.from_lstm_cell(nn.LSTMCell(3, 5, bias=False))
    assert not normalized.has_bias and torch.equal(normalized.gamma_ih, torch.full((20,), 0.1))
    with pytest.raises(TypeError, match="lstm_cell must be a torch.nn.LSTMCell, got LSTM"):
        BNLSTMCell.from_lstm_cell(nn.LSTM(3, 5))


def test_mismatched_cell_checkpoints_are_still_refused():
    with pytest.raises(RuntimeError, match="saved with hidden_size=6 but this module has hidden_size=5"):
        BNLSTMCell(3, 5, variant="none").load_state_dict(nn.LSTMCell(3, 6).state_dict())
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "bias_ih", "bias_hh"'):
        BNLSTMCell(3, 5, bias=False).load_state_dict(nn.LSTMCell(3, 5).state_dict())
    # A cell checkpoint without its BN entries is not nn.LSTMCell's: they are missing, as ever.
    none_state = BNLSTMCell(3, 5, variant="none").state_dict()
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "gamma_ih"'):
        BNLSTMCell(3, 5).load_state_dict(none_state)
    saved = randomize_bn_parameters(BNLSTMCell(3, 5, max_length=4))
    cell = BNLSTMCell(3, 5, max_length=4)
    assert cell.load_state_dict(saved.state_dict()).missing_keys == []
    for name, tensor in saved.state_dict().items():
        assert torch.equal(cell.state_dict()[name], tensor), name


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_double_backward_works_or_names_the_reference(backend):
    """A gradient penalty: the reference differentiates twice; the fused CPU backend says
    clearly that it cannot and which backend can."""
    torch.manual_seed(0)
    module = BNLSTM(3, 4, max_length=5, backend=backend, dtype=torch.float64)
    x = torch.randn(5, 3, 3, dtype=torch.float64, requires_grad=True)
    out, _ = module(x)
    if backend == "reference":
        (grad_x,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
        grad_x.pow(2).sum().backward()
        assert module.weight_ih_l0.grad is not None and module.weight_ih_l0.grad.abs().sum() > 0
    else:
        with pytest.raises(RuntimeError, match='double backward .* backend=\"reference\"'):
            torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_torch_func_transforms_run_on_the_reference(backend):
    """torch.func.grad and vmap over functional_call in evaluation: the reference gives
    autograd's gradients and the per-sample outputs; the CPU backend is refused by torch
    (README, "Compile, export, mixed precision")."""
    torch.manual_seed(0)
    module = BNLSTM(3, 4, max_length=5, backend=backend, dtype=torch.float64).eval()
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    params = dict(module.named_parameters())
    loss = lambda p: torch.func.functional_call(module, p, (x,))[0].pow(2).sum()  # noqa: E731
    samples = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    per_sample = lambda sample: torch.func.functional_call(module, params, (sample,))[0]  # noqa: E731
    if backend == "reference":
        grads = torch.func.grad(loss)(params)
        module(x)[0].pow(2).sum().backward()
        for name, parameter in params.items():
            torch.testing.assert_close(grads[name], parameter.grad, rtol=1e-10, atol=1e-12)
        with torch.no_grad():
            torch.testing.assert_close(torch.func.vmap(per_sample)(samples),
                                       torch.stack([module(sample)[0] for sample in samples]), rtol=0, atol=1e-12)
    else:
        with pytest.raises(RuntimeError, match="functorch transforms"):
            torch.func.grad(loss)(params)
        with torch.no_grad(), pytest.raises(RuntimeError, match="Batching rule not implemented for bnlstm::layer_forward"):
            torch.func.vmap(per_sample)(samples)


def test_torchscript_says_what_to_use_instead():
    for module in (BNLSTM(3, 4), BNLSTMCell(3, 4)):
        with pytest.raises(RuntimeError, match="cannot be compiled with torch.jit.script; use torch.compile"):
            torch.jit.script(module)
