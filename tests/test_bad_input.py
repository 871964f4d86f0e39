"""Bad input, beyond tests/test_validation.py: every public entry point answers with a
ValueError or TypeError that names the argument (a RuntimeError where the machine, not the
call, is at fault: a backend that cannot run here), never a crash from deep inside."""
import math

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pack_sequence

from bnlstm_cuda import BNLSTM, backends, calibrate_statistics, validation

BACKENDS = ["reference", "cpu"]


@pytest.fixture(params=BACKENDS)
def module(request):
    return BNLSTM(3, 4, num_layers=2, max_length=5, backend=request.param)


@pytest.mark.parametrize("name", ["dropout", "momentum", "eps", "gamma_init"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_constructor_rejects_non_finite_numbers(name, value):
    with pytest.raises(ValueError, match=f"{name} must be a finite number, got {value}"):
        BNLSTM(3, 4, num_layers=2, **{name: value})


def test_hx_on_another_device(module):
    meta = torch.zeros(2, 2, 4, device="meta")
    with pytest.raises(ValueError, match=r"hx\[h_0\] must be on cpu, got meta"):
        module(torch.randn(5, 2, 3), (meta, torch.zeros(2, 2, 4)))
    with pytest.raises(ValueError, match=r"hx\[c_0\] must be on cpu, got meta"):
        module(torch.randn(5, 2, 3), (torch.zeros(2, 2, 4), meta))


def test_hx_shape_follows_the_input_form(module):
    module.eval()
    with pytest.raises(ValueError, match=r"hx\[h_0\] must have shape \(2, 4\) .* got \(2, 1, 4\)"):
        module(torch.randn(5, 3), (torch.zeros(2, 1, 4), torch.zeros(2, 1, 4)))  # unbatched input
    packed = pack_padded_sequence(torch.randn(5, 3, 3), [5, 3, 2])
    with pytest.raises(ValueError, match=r"hx\[h_0\] must have shape \(2, 3, 4\) .* got \(2, 2, 4\)"):
        module(packed, (torch.zeros(2, 2, 4), torch.zeros(2, 2, 4)))
    with pytest.raises(TypeError, match=r"hx\[c_0\] must have dtype torch.float32, got torch.float64"):
        module(torch.randn(5, 2, 3), (torch.zeros(2, 2, 4), torch.zeros(2, 2, 4, dtype=torch.float64)))


@pytest.mark.parametrize(
    "lengths, error, pattern",
    [
        (torch.tensor([True, True]), TypeError, "lengths must have an integer dtype, got torch.bool"),
        (torch.tensor(5), ValueError, r"lengths must be 1-D of size batch=2, got shape \(\)"),
        ([5, 2**70], ValueError, "lengths must be <= the number of time steps T=5, got a length of 1180591620717411303424"),
        ([5, -3], ValueError, "lengths must be >= 1, got a length of -3"),
        ([5, True], TypeError, "lengths given as a list must hold ints"),
        (np.array([5, 3]), TypeError, "lengths must be a 1-D integer tensor or a list of ints, got ndarray"),
        ([], ValueError, "lengths must have batch=2 entries, got 0"),
    ],
)
def test_more_bad_lengths(module, lengths, error, pattern):
    with pytest.raises(error, match=pattern):
        module(torch.randn(5, 2, 3), lengths=lengths)


def test_lengths_in_every_accepted_form_give_the_same_result(module):
    module.eval()
    x = torch.randn(5, 3, 3)
    expected = module(x, lengths=torch.tensor([5, 2, 4]))[0]
    for lengths in ([5, 2, 4], (5, 2, 4), list(np.array([5, 2, 4])), torch.tensor([5, 2, 4], dtype=torch.uint8),
                    torch.tensor([5, 9, 2, 9, 4])[::2], torch.tensor([5, 2, 4], dtype=torch.int32)):
        assert torch.equal(module(x, lengths=lengths)[0], expected), lengths


def good_packed():
    return pack_padded_sequence(torch.randn(5, 3, 3), [2, 5, 3], enforce_sorted=False)


def malformed_packed():
    """(name, PackedSequence built by hand that breaks its invariants, expected message)."""
    p = good_packed()
    return [
        ("data short", PackedSequence(p.data[:-2], p.batch_sizes), "data has 8 rows but its batch_sizes sum to 10"),
        ("data long", PackedSequence(torch.cat([p.data, p.data[:3]]), p.batch_sizes), "data has 13 rows"),
        ("increasing", PackedSequence(p.data, torch.tensor([2, 2, 3, 2, 1])), "batch_sizes must be non-increasing"),
        ("zero size", PackedSequence(p.data[:8], torch.tensor([3, 3, 2, 0, 0])), "batch_sizes must all be >= 1"),
        ("float sizes", PackedSequence(p.data, p.batch_sizes.float()), "batch_sizes must be a non-empty 1-D int64"),
        ("3-D data", PackedSequence(p.data.unsqueeze(0), p.batch_sizes), r"data must be 2-D \[sum of lengths, 3\]"),
        ("features", PackedSequence(p.data[:, :2], p.batch_sizes), "data must have input_size=3 features"),
        ("short permutation", PackedSequence(p.data, p.batch_sizes, torch.tensor([0, 1]), torch.tensor([0, 1])),
         r"sorted_indices must be a permutation of 0..2"),
        ("repeated index", PackedSequence(p.data, p.batch_sizes, torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2])),
         "sorted_indices must be a permutation"),
        ("not inverse", PackedSequence(p.data, p.batch_sizes, torch.tensor([1, 2, 0]), torch.tensor([1, 2, 0])),
         "unsorted_indices must be the inverse permutation"),
    ]


@pytest.mark.parametrize("name, packed, pattern", malformed_packed(), ids=[case[0] for case in malformed_packed()])
def test_check_packed_rejects_malformed_packed_sequences(name, packed, pattern):
    with pytest.raises(ValueError, match=pattern):
        validation.check_packed(packed, 3)


def test_check_packed_accepts_what_torch_packs():
    for packed in (
        good_packed(),
        pack_padded_sequence(torch.randn(5, 3, 3), [5, 3, 2]),
        pack_sequence([torch.randn(n, 3) for n in (2, 4, 1)], enforce_sorted=False),
        pack_padded_sequence(torch.randn(1, 1, 3), [1]),
    ):
        assert validation.check_packed(packed, 3) is None  # raises on anything malformed


@pytest.mark.parametrize("name, packed, pattern", malformed_packed()[:4], ids=[c[0] for c in malformed_packed()[:4]])
def test_module_rejects_malformed_packed_sequences(name, packed, pattern):
    with pytest.raises(ValueError, match=pattern):
        BNLSTM(3, 4, max_length=5)(packed)


def test_packed_sequence_checks_that_work_today(module):
    with pytest.raises(TypeError, match="input has dtype torch.float64"):
        module(pack_padded_sequence(torch.randn(5, 3, 3, dtype=torch.float64), [5, 3, 2]))
    with pytest.raises(ValueError, match="input_size=3"):
        module(pack_padded_sequence(torch.randn(5, 3, 7), [5, 3, 2]))
    with pytest.raises(ValueError, match="at least 2 sequences .* got batch=1"):
        module(pack_padded_sequence(torch.randn(5, 1, 3), [5]))


def test_backend_that_cannot_run_here_says_why_and_what_to_install(monkeypatch):
    problem = "cannot build the bnlstm_cuda C++ extension: ninja is not installed (pip install ninja)"
    monkeypatch.setattr(backends, "_cpu_problem", lambda: problem)
    with pytest.raises(RuntimeError, match=r'backend="cpu" is unavailable: .*\(pip install ninja\)'):
        BNLSTM(3, 4, backend="cpu")(torch.randn(5, 2, 3))


def test_cpu_backend_on_another_device_is_refused():
    module = BNLSTM(3, 4, backend="cpu", device="meta")
    with pytest.raises(ValueError, match='backend="cpu" runs on CPU tensors; the input is on meta'):
        module(torch.empty(5, 2, 3, device="meta"))


@pytest.mark.parametrize(
    "kwargs, argument",
    [({"max_length": 5}, "max_length=7"), ({"hidden_size": 6}, "hidden_size=4"), ({"input_size": 2}, "input_size=3")],
)
def test_state_dict_of_other_sizes_is_refused_naming_the_tensors(kwargs, argument):
    """torch's own error names every mismatched tensor and both shapes; state_dict_mismatches
    says which constructor argument differs, for the hook proposed in docs/RELIABILITY.md."""
    saved = BNLSTM(3, 4, num_layers=2, bidirectional=True, max_length=7)
    module = BNLSTM(**{"input_size": 3, "hidden_size": 4, "num_layers": 2, "bidirectional": True, "max_length": 7,
                       **kwargs})
    with pytest.raises(RuntimeError, match=r"size mismatch for \w+_l0: copying a param with shape"):
        module.load_state_dict(saved.state_dict())
    own = {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}
    (message,) = validation.state_dict_mismatches(saved.state_dict(), "", own, module.max_length)
    assert f"the checkpoint was saved with {argument} but this module has " in message
    assert f"construct the module with {argument} to load it" in message
    # Nothing to say when the shapes agree, or for laurent_sequence whose only statistics
    # (one slot) do not depend on max_length.
    assert validation.state_dict_mismatches(saved.state_dict(), "", dict(saved.named_buffers()), 7) == []
    sequence = BNLSTM(3, 4, variant="laurent_sequence", max_length=3)
    sequence.load_state_dict(BNLSTM(3, 4, variant="laurent_sequence", max_length=9).state_dict())


def test_state_dict_mismatches_reads_a_prefix():
    saved = torch.nn.Sequential(BNLSTM(3, 4, max_length=7)).state_dict()
    module = BNLSTM(3, 4, max_length=5)
    own = dict(module.named_buffers(recurse=False))
    assert validation.state_dict_mismatches(saved, "0.", own, 5) == [
        "the checkpoint was saved with max_length=7 but this module has max_length=5: "
        "construct the module with max_length=7 to load it"
    ]


def test_load_state_dict_names_the_constructor_argument():
    with pytest.raises(RuntimeError, match="the checkpoint was saved with max_length=7 but this module has max_length=5"):
        BNLSTM(3, 4, max_length=5).load_state_dict(BNLSTM(3, 4, max_length=7).state_dict())


def test_calibration_names_the_bad_batch_and_the_bad_argument():
    module = BNLSTM(3, 4, max_length=5)
    good = torch.randn(5, 3, 3)
    with pytest.raises(ValueError, match=r"calibration batch 1: lengths must be <= the number of time steps T=5"):
        module.calibrate([good, (good, [5, 6, 2])])
    with pytest.raises(ValueError, match=r"calibration batch 2: training needs a batch of at least 2 sequences"):
        module.calibrate([good, good, torch.randn(5, 1, 3)])
    with pytest.raises(TypeError, match="batches must be an iterable .* got Tensor"):
        module.calibrate(good)
    with pytest.raises(TypeError, match="module must be a BNLSTM, got LSTM"):
        calibrate_statistics(torch.nn.LSTM(3, 4), [good])
    # A failed calibration leaves the running statistics alone.
    before = {k: v.clone() for k, v in module.named_buffers()}
    with pytest.raises(ValueError):
        module.calibrate([good, torch.randn(5, 3, 2)])
    assert all(torch.equal(before[k], v) for k, v in module.named_buffers())
