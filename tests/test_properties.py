"""Property tests (hypothesis): on random problems the CPU backend computes what the float64
reference computes, outputs, final states, running statistics and every gradient.

Random: sizes (T from 1, batch from 2, odd hidden sizes), lengths (including all shorter
than T, and PackedSequences), every variant, training and evaluation, both directions,
up to three layers, dropout, batch-first. Examples are derandomized so CI sees the same
ones each run; BNLSTM_HYPOTHESIS=explore draws new ones (and more) each run.
"""
import os
from dataclasses import dataclass
from typing import List, Optional

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import pack_padded_sequence

from bnlstm_cuda import BNLSTM
from helpers import randomize_bn_parameters, scalar_loss

EXPLORE = os.environ.get("BNLSTM_HYPOTHESIS") == "explore"
SETTINGS = dict(
    max_examples=1000 if EXPLORE else 150,
    derandomize=not EXPLORE,
    deadline=None,
    database=None,
    print_blob=True,
    # The autouse fixtures (NaN-filled torch.empty, a seed) hold for every example alike.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
VARIANTS = ["cooijmans", "laurent_step", "laurent_sequence", "none"]
# Both backends compute in float64 with different summation orders (blocked GEMMs, fused
# reductions). 500 explored examples agreed to 1e-12; the bound is the paper tests'
# (test_backend_behaviours.py), with room for a batch variance near 0, where a
# normalization amplifies rounding by up to gamma / sqrt(eps).
TOL = dict(rtol=1e-10, atol=1e-10)


@dataclass
class Problem:
    variant: str
    input_size: int
    hidden_size: int
    num_layers: int
    bidirectional: bool
    max_length: int
    momentum: float
    dropout: float
    training: bool
    batch_first: bool
    steps: int
    batch: int
    lengths: Optional[List[int]]
    packed: bool
    initial_state: bool
    seed: int


@st.composite
def problems(draw):
    steps = draw(st.integers(1, 7))
    batch = draw(st.integers(2, 5))
    lengths = draw(st.none() | st.lists(st.integers(1, steps), min_size=batch, max_size=batch))
    num_layers = draw(st.integers(1, 3))
    return Problem(
        variant=draw(st.sampled_from(VARIANTS)),
        input_size=draw(st.integers(1, 5)),
        hidden_size=draw(st.sampled_from([1, 3, 5, 7, 2])),
        num_layers=num_layers,
        bidirectional=draw(st.booleans()),
        max_length=draw(st.integers(1, steps + 2)),
        momentum=draw(st.sampled_from([0.1, 0.5, 1.0])),
        dropout=draw(st.sampled_from([0.0, 0.3])) if num_layers > 1 else 0.0,
        training=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        steps=steps,
        batch=batch,
        lengths=lengths,
        # A PackedSequence whose longest sequence is shorter than T is shorter than the input.
        packed=lengths is not None and draw(st.booleans()),
        initial_state=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def run(problem: Problem, backend: str):
    """Forward and backward of one backend on the problem; returns every compared tensor by name."""
    torch.manual_seed(problem.seed)  # the weights' initialisation, then the dropout masks
    g = torch.Generator().manual_seed(problem.seed)
    module = BNLSTM(
        problem.input_size, problem.hidden_size, problem.num_layers, batch_first=problem.batch_first,
        bidirectional=problem.bidirectional, dropout=problem.dropout, max_length=problem.max_length,
        variant=problem.variant, momentum=problem.momentum, backend=backend, dtype=torch.float64,
    )
    randomize_bn_parameters(module, generator=g)
    module.train(problem.training)
    shape = (problem.batch, problem.steps) if problem.batch_first else (problem.steps, problem.batch)
    x = torch.randn(*shape, problem.input_size, generator=g, dtype=torch.float64).requires_grad_(True)
    states = problem.num_layers * module.num_directions
    hx = None
    if problem.initial_state:
        hx = tuple(torch.randn(states, problem.batch, problem.hidden_size, generator=g, dtype=torch.float64)
                   .requires_grad_(True) for _ in range(2))
    torch.manual_seed(problem.seed + 1)  # the dropout masks
    if problem.packed:
        packed = pack_padded_sequence(x, problem.lengths, batch_first=problem.batch_first, enforce_sorted=False)
        out, (h_n, c_n) = module(packed, hx)
        out = out.data
    else:
        out, (h_n, c_n) = module(x, hx, lengths=problem.lengths)
    scalar_loss(out, h_n, c_n, seed=problem.seed % 1000).backward()
    result = {"output": out, "h_n": h_n, "c_n": c_n, "grad input": x.grad}
    if hx is not None:
        result.update({"grad h_0": hx[0].grad, "grad c_0": hx[1].grad})
    result.update({f"grad {name}": p.grad for name, p in module.named_parameters()})
    result.update(dict(module.named_buffers()))
    return result, module


def assert_cpu_matches_reference(problem: Problem):
    expected, _ = run(problem, "reference")
    got, _ = run(problem, "cpu")
    assert expected.keys() == got.keys()
    for name, want in expected.items():
        assert want is not None, name
        torch.testing.assert_close(got[name], want, **TOL, msg=lambda m: f"{name}: {m}\n{problem}")


@settings(**SETTINGS)
@given(problems())
def test_cpu_backend_equals_float64_reference(problem):
    assert_cpu_matches_reference(problem)


@settings(**{**SETTINGS, "max_examples": 300 if EXPLORE else 40})
@given(problems().filter(lambda p: p.training), st.integers(2, 3))
def test_running_statistics_agree_over_repeated_training_calls(problem, calls):
    """Running statistics accumulate identically over several calls (lengths and T vary
    from call to call through the seed)."""
    modules = {}
    for backend in ("reference", "cpu"):
        torch.manual_seed(problem.seed)
        module = BNLSTM(problem.input_size, problem.hidden_size, problem.num_layers,
                        bidirectional=problem.bidirectional, max_length=problem.max_length,
                        variant=problem.variant, momentum=problem.momentum, backend=backend, dtype=torch.float64)
        g = torch.Generator().manual_seed(problem.seed)
        for call in range(calls):
            steps = int(torch.randint(1, problem.steps + 3, (), generator=g))
            x = torch.randn(steps, problem.batch, problem.input_size, generator=g, dtype=torch.float64)
            lengths = torch.randint(1, steps + 1, (problem.batch,), generator=g)
            module(x, lengths=lengths)
        modules[backend] = module
    for name, want in modules["reference"].named_buffers():
        torch.testing.assert_close(getattr(modules["cpu"], name), want, **TOL, msg=lambda m: f"{name}: {m}")


def test_problems_cover_what_the_issue_asks_for():
    """The strategy reaches every corner named in the docstring (a guard against a filter or
    bound that silently narrows it)."""
    seen = []

    @settings(max_examples=300, derandomize=True, database=None, deadline=None)
    @given(problems())
    def collect(problem):
        seen.append(problem)

    collect()
    assert {p.variant for p in seen} == set(VARIANTS)
    assert {p.training for p in seen} == {True, False} and {p.bidirectional for p in seen} == {True, False}
    assert {p.num_layers for p in seen} == {1, 2, 3}
    assert min(p.steps for p in seen) == 1 and min(p.batch for p in seen) == 2
    assert any(p.hidden_size % 2 == 1 and p.hidden_size > 1 for p in seen)
    assert any(p.packed for p in seen) and any(p.lengths and max(p.lengths) < p.steps for p in seen)
    assert any(p.max_length < p.steps for p in seen) and any(p.max_length == 1 for p in seen)
