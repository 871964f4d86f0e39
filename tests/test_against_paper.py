"""Every backend against an independent float64 implementation of docs/SEMANTICS.md, read
through the documented state_dict names: outputs, final states, running statistics and
the gradient of the input, the initial states and every parameter, to 1e-10."""
import pytest
import torch

from helpers import assert_matches_paper, make_module

VARIANTS = ["cooijmans", "laurent_step", "laurent_sequence", "none"]
BACKENDS = ["reference", "cpu"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("lengths", [None, [5, 2, 4]], ids=["full", "lengths"])
def test_two_layer_bidirectional_matches_paper(backend, variant, training, lengths):
    # T=5 > max_length=3: the tail steps share (and in training, all update) the last slot.
    module = make_module(variant, input_size=3, hidden_size=5, num_layers=2, bidirectional=True,
                         max_length=3, backend=backend)
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    h0 = torch.randn(4, 3, 5, dtype=torch.float64)
    c0 = torch.randn(4, 3, 5, dtype=torch.float64)
    assert_matches_paper(module, x, h0, c0, lengths=lengths, training=training)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["cooijmans", "laurent_sequence"])
def test_repeated_training_steps_match_paper(backend, variant):
    """Running statistics accumulate over calls exactly as the sequential rule says, also
    with one sequence left active at the last steps (no update there) and T=1."""
    module = make_module(variant, input_size=4, hidden_size=3, num_layers=1, max_length=2, backend=backend)
    for steps, lengths in ((6, [6, 1, 2]), (1, None), (3, [3, 3, 2])):
        x = torch.randn(steps, 3, 4, dtype=torch.float64)
        h0 = torch.randn(1, 3, 3, dtype=torch.float64)
        c0 = torch.randn(1, 3, 3, dtype=torch.float64)
        assert_matches_paper(module, x, h0, c0, lengths=lengths, training=True)
    assert_matches_paper(module, x, h0, c0, lengths=[3, 1, 2], training=False)
