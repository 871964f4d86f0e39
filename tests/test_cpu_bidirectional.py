"""Both directions of a bidirectional layer in one CPU operator call
(bnlstm::bidirectional_forward / bidirectional_backward, csrc/bidirectional_cpu.cpp): the
same results as a layer_forward / layer_backward call per direction, whether the directions
run at once (one thread each) or one after the other; its registration (opcheck); its
errors. The module runs bidirectional layers through it: the paper tests of
test_backend_behaviours.py and test_cpu_backend.py cover it against the float64 reference."""
import pytest
import torch

from helpers import op_arguments, op_backward_arguments

VARIANTS = ["cooijmans", "laurent_step", "laurent_sequence", "none"]

pytestmark = pytest.mark.usefixtures("cpu_extension")

# Enough recurrent work for two threads to split a direction into two blocks of hidden
# units, so that with two threads the directions run at once.
CONCURRENT = dict(T=11, B=23, I=5, H=64)


def bidirectional_arguments(variant, training, keep_reserve=True, **sizes):
    """(bidirectional_forward's arguments, the forward direction's layer_forward arguments,
    the reverse direction's), on one x and lengths."""
    forward = op_arguments(variant, training, reverse=False, keep_reserve=keep_reserve, **sizes)
    reverse = op_arguments(variant, training, reverse=True, keep_reserve=keep_reserve, **sizes)
    steps, batch = forward.x.shape[:2]
    lengths = torch.tensor([max(1, steps - b % 4) for b in range(batch)])
    forward = forward._replace(lengths=lengths)
    reverse = reverse._replace(x=forward.x, lengths=lengths)
    stacked = lambda a, b: torch.stack([a.detach(), b.detach()]).requires_grad_(keep_reserve)
    arguments = (forward.x, stacked(forward.h0, reverse.h0), stacked(forward.c0, reverse.c0), lengths,
                 forward.params + reverse.params, forward.running + reverse.running, forward.input_statistics,
                 forward.normalize_recurrent, forward.normalize_cell, training, forward.eps, keep_reserve)
    return arguments, forward, reverse


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_both_directions_as_two_layer_calls(variant, training, num_threads, threads):
    """Outputs, final states, statistics and every gradient equal those of a layer call per
    direction, padded, with the directions at once (2 threads) and one after the other."""
    threads(num_threads)
    sizes = CONCURRENT
    assert torch.ops.bnlstm.cpu_directions_concurrent(sizes["T"], sizes["B"], sizes["H"]) == (num_threads == 2)
    torch.manual_seed(7)
    arguments, forward, reverse = bidirectional_arguments(variant, training, **sizes)
    with torch.no_grad():
        output, h_n, c_n, statistics, projection, reserve = torch.ops.bnlstm.bidirectional_forward(*arguments)
    backward_f, result_f = op_backward_arguments(forward)
    backward_r, result_r = op_backward_arguments(reverse)
    close = lambda got, want: torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    close(output, torch.cat([result_f[0], result_r[0]], 2))
    close(h_n, torch.stack([result_f[1], result_r[1]]))
    close(c_n, torch.stack([result_f[2], result_r[2]]))
    for got, want in zip(statistics, result_f[3] + result_r[3]):
        close(got, want)
    for got, want in zip(projection + reserve, (result_f[4], result_r[4], result_f[5], result_r[5])):
        close(got, want)

    # The backward from the per-direction calls' output gradients, concatenated and stacked.
    # At once, each direction runs as one block of hidden units where a call alone splits
    # into two, whose partial products of grad_h and grad_x add up in another order: equal
    # to float64 rounding, amplified by the batch norms' backward.
    close = lambda got, want: torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    grad_output = torch.cat([backward_f[0], backward_r[0]], 2)
    grad_h_n, grad_c_n = torch.stack([backward_f[1], backward_r[1]]), torch.stack([backward_f[2], backward_r[2]])
    grad_x, grad_h0, grad_c0, grad_params = torch.ops.bnlstm.bidirectional_backward(
        grad_output, grad_h_n, grad_c_n, forward.x.detach(), forward.lengths, arguments[1].detach(),
        arguments[2].detach(), output, [p.detach() for p in arguments[4]], statistics, projection, reserve,
        *arguments[6:11])
    want_f = torch.ops.bnlstm.layer_backward(*backward_f)
    want_r = torch.ops.bnlstm.layer_backward(*backward_r)
    close(grad_x, want_f[0] + want_r[0])
    close(grad_h0, torch.stack([want_f[1], want_r[1]]))
    close(grad_c0, torch.stack([want_f[2], want_r[2]]))
    assert len(grad_params) == 14
    for got, want in zip(grad_params, want_f[3] + want_r[3]):
        close(got, want)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck_bidirectional(variant, training, threads):
    """Schema, fake kernels and the autograd registration, with the directions at once."""
    threads(2)
    torch.manual_seed(3)
    arguments, _, _ = bidirectional_arguments(variant, training, **CONCURRENT)
    torch.library.opcheck(torch.ops.bnlstm.bidirectional_forward.default, arguments)
    inference, _, _ = bidirectional_arguments(variant, training, keep_reserve=False, **CONCURRENT)
    torch.library.opcheck(torch.ops.bnlstm.bidirectional_forward.default, inference)
    with torch.no_grad():
        output, h_n, c_n, statistics, projection, reserve = torch.ops.bnlstm.bidirectional_forward(*arguments)
    backward = (torch.randn_like(output), torch.randn_like(h_n), torch.randn_like(c_n), arguments[0].detach(),
                arguments[3], arguments[1].detach(), arguments[2].detach(), output,
                [p.detach() for p in arguments[4]], statistics, projection, reserve, *arguments[6:11])
    torch.library.opcheck(torch.ops.bnlstm.bidirectional_backward.default, backward)
    torch.library.opcheck(torch.ops.bnlstm.bidirectional_backward.default, backward + (False,))


def test_directions_run_at_once_where_a_direction_would_use_two_threads(threads):
    """At once with two threads to give and enough work to wake them; one after the other
    where a direction alone splits over more threads, where the call is small, and with one
    thread."""
    concurrent = torch.ops.bnlstm.cpu_directions_concurrent
    threads(2)
    assert concurrent(100, 32, 128) and concurrent(50, 8, 64)
    assert not concurrent(1, 16, 128)  # a decoder step: too little work to wake a thread
    threads(1)
    assert not concurrent(100, 32, 128)
    threads(4)
    assert torch.ops.bnlstm.cpu_hidden_blocks(100, 32, 128) == 4
    assert not concurrent(100, 32, 128)
    assert torch.ops.bnlstm.cpu_hidden_blocks(100, 32, 64) == 2
    assert concurrent(100, 32, 64)


def test_an_error_in_one_direction_reaches_the_caller(threads):
    """A problem only the reverse direction's layer call finds (its running statistics, read
    in evaluation) is raised as that call's error, with the directions at once."""
    threads(2)
    arguments, _, _ = bidirectional_arguments("cooijmans", training=False, keep_reserve=False, **CONCURRENT)
    running = list(arguments[5])
    running[6 + 2] = running[6 + 2][:, :-1]  # the reverse direction's running_mean_hh
    with pytest.raises(RuntimeError, match=r"running_mean_hh must have shape \[S >= 1, 256\]"):
        torch.ops.bnlstm.bidirectional_forward(*arguments[:5], running, *arguments[6:])


def test_list_lengths_are_checked():
    arguments, _, _ = bidirectional_arguments("cooijmans", training=True)
    with pytest.raises(RuntimeError, match="params must hold 14 tensors"):
        torch.ops.bnlstm.bidirectional_forward(*arguments[:4], arguments[4][:7], *arguments[5:])
    with pytest.raises(RuntimeError, match=r"h0 must have shape \[2, 3, 5\]"):
        torch.ops.bnlstm.bidirectional_forward(arguments[0], arguments[1][:1], *arguments[2:])
