"""Data-parallel training: per-process and synchronized batch statistics (issue 9).

Two gloo processes on this machine run tests/distributed_worker.py once per session (a few
seconds); each test compares what they recorded with one process computing the same thing.
The world-size-1 and not-initialized paths run in this process.
"""
import copy
import io

import pytest
import torch
import torch.distributed as dist
from torch import nn

import bnlstm_cuda
from bnlstm_cuda import BNLSTM, BNLSTMCell
from bnlstm_cuda.distributed import GlobalBatchStats
from bnlstm_cuda.module_base import convert_sync_statistics
from bnlstm_cuda.statistics import masked_batch_stats
from distributed_worker import (
    INPUT, HIDDEN, PER_PROCESS_CASE, SYNC_CASES, WORLD, make_batch, make_cell, make_cell_inputs, make_model,
    offset_features, run_workers,
)
from helpers import scalar_loss

TIGHT = dict(rtol=1e-10, atol=1e-10)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the two processes recorded: a list indexed by rank."""
    out_dir = tmp_path_factory.mktemp("distributed")
    return run_workers(str(out_dir)), out_dir


def rows_of(case, rank):
    """The batch rows of `rank` in the concatenated batch."""
    start = sum(case["batches"][:rank])
    return slice(start, start + case["batches"][rank])


def assert_close_dicts(got, want, what, **tol):
    assert got.keys() == want.keys(), what
    for name in want:
        torch.testing.assert_close(got[name], want[name], **(tol or TIGHT), msg=lambda m: f"{what} {name}: {m}")


def concatenated(case):
    """The ranks' batches as one: x padded to the longest T, lengths, h0, c0 joined on B."""
    batches = [make_batch(case, rank) for rank in range(WORLD)]
    steps = max(case["steps"])
    x = torch.cat([torch.cat((b[0], b[0].new_zeros(steps - b[0].shape[0], *b[0].shape[1:]))) for b in batches], 1)
    lengths = torch.cat([b[1] for b in batches])
    h0 = torch.cat([b[2] for b in batches], 1)
    c0 = torch.cat([b[3] for b in batches], 1)
    return x, lengths, h0, c0


# Synchronized statistics: one process on the concatenated batch ----------------------------

@pytest.mark.parametrize("name", sorted(SYNC_CASES))
def test_sync_statistics_equal_one_process_on_the_global_batch(ranks, name):
    ranks, _ = ranks
    case = SYNC_CASES[name]
    model = make_model(case["variant"], backend="reference")
    x, lengths, h0, c0 = (t.requires_grad_(t.is_floating_point()) for t in concatenated(case))
    output, (h_n, c_n) = model(x, (h0, c0), lengths=lengths)
    # The global loss is the sum of the ranks' losses; DDP averages parameter gradients.
    loss = sum(
        scalar_loss(output[: case["steps"][r], rows_of(case, r)], h_n[:, rows_of(case, r)], c_n[:, rows_of(case, r)],
                    seed=r)
        for r in range(WORLD)
    )
    loss.backward()
    want_grads = {n: p.grad / WORLD for n, p in model.named_parameters()}
    want_buffers = dict(model.named_buffers())
    for rank, got in enumerate(ranks):
        got = got[f"sync_{name}"]
        rows, steps = rows_of(case, rank), case["steps"][rank]
        what = f"rank {rank}"
        torch.testing.assert_close(got["output"], output[:steps, rows], **TIGHT, msg=lambda m: f"{what} output: {m}")
        torch.testing.assert_close(got["h_n"], h_n[:, rows], **TIGHT)
        torch.testing.assert_close(got["c_n"], c_n[:, rows], **TIGHT)
        torch.testing.assert_close(got["grad_x"], x.grad[:steps, rows], **TIGHT, msg=lambda m: f"{what} grad x: {m}")
        torch.testing.assert_close(got["grad_h0"], h0.grad[:, rows], **TIGHT)
        torch.testing.assert_close(got["grad_c0"], c0.grad[:, rows], **TIGHT)
        assert_close_dicts(got["grads"], want_grads, f"{what} grad")
        assert_close_dicts(got["buffers"], want_buffers, f"{what} running statistics")


@pytest.mark.parametrize("name", sorted(SYNC_CASES))
def test_sync_running_statistics_identical_on_every_rank(ranks, name):
    # DDP ran with forward_sync_buffers=False: equality comes from the global statistics.
    ranks, _ = ranks
    first, second = (r[f"sync_{name}"]["buffers"] for r in ranks)
    assert first.keys() == second.keys() and first
    for key in first:
        assert torch.equal(first[key], second[key]), key
    # ...and they moved: the training step updated them.
    initial = dict(make_model(SYNC_CASES[name]["variant"]).named_buffers())
    assert any(not torch.equal(first[key], initial[key]) for key in first)


def test_sync_cell_equals_one_process_on_the_global_batch(ranks):
    ranks, _ = ranks
    cell = make_cell()
    cell.backend = "reference"
    inputs = [make_cell_inputs(rank) for rank in range(WORLD)]
    sizes = [i[0][0].shape[0] for i in inputs]
    bounds = [slice(sum(sizes[:r]), sum(sizes[: r + 1])) for r in range(WORLD)]
    xs = [torch.cat(step, 0).requires_grad_(True) for step in zip(*(i[0] for i in inputs))]
    masks = [torch.cat(step, 0) for step in zip(*(i[1] for i in inputs))]
    h0 = torch.cat([i[2] for i in inputs], 0).requires_grad_(True)
    c0 = torch.cat([i[3] for i in inputs], 0).requires_grad_(True)
    state, loss, outputs = (h0, c0), 0, []
    for step, (x, mask) in enumerate(zip(xs, masks)):
        state = cell(x, state, step=step, mask=mask)
        outputs.append(torch.stack(state).detach())
        for r in range(WORLD):
            loss = loss + scalar_loss(state[0][bounds[r]], state[1][bounds[r]], torch.zeros(()), seed=10 * r + step)
    loss.backward()
    for rank, got in enumerate(ranks):
        got, rows = got["cell"], bounds[rank]
        for step in range(len(xs)):
            torch.testing.assert_close(got["outputs"][step], outputs[step][:, rows], **TIGHT)
            torch.testing.assert_close(got["grad_xs"][step], xs[step].grad[rows], **TIGHT)
        torch.testing.assert_close(got["grad_h0"], h0.grad[rows], **TIGHT)
        torch.testing.assert_close(got["grad_c0"], c0.grad[rows], **TIGHT)
        assert_close_dicts(got["buffers"], dict(cell.named_buffers()), f"rank {rank} cell running statistics")
    # Without DDP each rank holds its local parameter gradients; their sum is the global one.
    summed = {n: sum(r["cell"]["grads"][n] for r in ranks) for n in ranks[0]["cell"]["grads"]}
    assert_close_dicts(summed, {n: p.grad for n, p in cell.named_parameters()}, "cell grad")


def test_sync_variance_in_float32_does_not_cancel(ranks):
    """float32 rows with |mean| / std ~ 3e3: the float64 one-pass variance stays within
    float32 rounding of the exact one; a float32 one-pass would be off by O(1)."""
    ranks, _ = ranks
    parts = [offset_features(rank) for rank in range(WORLD)]
    z = torch.cat([p[0] for p in parts], 1).double()  # [T, B, F]
    mask = torch.cat([p[1] for p in parts], 1)
    want = masked_batch_stats(z, mask)  # two-pass, float64
    for rank, got in enumerate(ranks):
        got = got["offset_stats"]
        assert got["var"].dtype == torch.float32
        torch.testing.assert_close(got["var"].double(), want.var, rtol=1e-6, atol=0)
        torch.testing.assert_close(got["mean"].double(), want.mean, rtol=1e-7, atol=0)
        torch.testing.assert_close(got["count"].double(), want.count, rtol=0, atol=0)
    # The data do make a float32 E[z^2] - E[z]^2 fail, so the check above means something.
    z32, weight = z.float(), mask.float().unsqueeze(-1)
    count = weight.sum(-2)
    naive = (weight * z32 * z32).sum(-2) / count - ((weight * z32).sum(-2) / count) ** 2
    assert (naive.double() - want.var).abs().max() > 1e-2


def test_sync_communication_count_and_none_in_eval(ranks):
    """Per forward: 1 all-reduce for the global length, then per layer-direction 1 for the
    input side and T per normalized recurrent part; the backward pass mirrors them."""
    ranks, _ = ranks
    layer_directions, steps = 2 * 2, max(SYNC_CASES["cooijmans"]["steps"])
    for got in ranks:
        counts = got["communication"]
        assert counts["cooijmans_forward"] == 1 + layer_directions * (1 + 2 * steps)
        assert counts["cooijmans_backward"] == layer_directions * (1 + 2 * steps)
        assert counts["laurent_step_forward"] == 1 + layer_directions
        assert counts["laurent_step_backward"] == layer_directions
        assert counts["cooijmans_eval"] == 0 and counts["laurent_step_eval"] == 0


# Per-process statistics under DDP ----------------------------------------------------------

def test_per_process_statistics_under_ddp(ranks):
    """Gradients: DDP's average of each rank computing its own batch alone. Running
    statistics: each rank's own after the step; rank 0's everywhere once DDP has broadcast
    them at the start of the next forward."""
    ranks, _ = ranks
    models = []
    for rank in range(WORLD):
        model = make_model(PER_PROCESS_CASE["variant"])
        x, lengths, h0, c0 = make_batch(PER_PROCESS_CASE, rank)
        output, (h_n, c_n) = model(x, (h0, c0), lengths=lengths)
        scalar_loss(output, h_n, c_n, seed=rank).backward()
        models.append(model)
    want_grads = {n: sum(dict(m.named_parameters())[n].grad for m in models) / WORLD
                  for n, _ in models[0].named_parameters()}
    for rank, got in enumerate(ranks):
        got = got["per_process"]
        assert_close_dicts(got["grads"], want_grads, f"rank {rank} grad")
        assert_close_dicts(got["buffers"], dict(models[rank].named_buffers()), f"rank {rank} running statistics")
        assert_close_dicts(got["buffers_after_eval_forward"], dict(models[0].named_buffers()),
                           f"rank {rank} running statistics after DDP's broadcast")
    first, second = (r["per_process"] for r in ranks)
    assert any(not torch.equal(first["buffers"][k], second["buffers"][k]) for k in first["buffers"])
    for key in first["buffers_after_eval_forward"]:
        assert torch.equal(first["buffers_after_eval_forward"][key], second["buffers_after_eval_forward"][key]), key


# Checkpoints, groups of one, no process group -------------------------------------------------

def test_rank0_checkpoint_loads_into_a_plain_module(ranks):
    ranks, out_dir = ranks
    state = torch.load(out_dir / "checkpoint.pt")
    plain = BNLSTM(INPUT, HIDDEN, num_layers=2, bidirectional=True, max_length=4, variant="cooijmans",
                   dtype=torch.float64)
    assert ranks[0]["checkpoint"]["keys"] == list(plain.state_dict())
    plain.load_state_dict(state, strict=True)
    plain.eval()
    with torch.no_grad():
        output, _ = plain(make_batch(SYNC_CASES["cooijmans"], 0)[0])
    torch.testing.assert_close(output, ranks[0]["checkpoint"]["eval_output"], rtol=1e-12, atol=1e-12)


def test_group_of_one_is_the_unsynchronized_module(ranks):
    ranks, _ = ranks
    for rank, got in enumerate(ranks):
        plain, solo = got["group_of_one"]["plain"], got["group_of_one"]["solo"]
        assert torch.equal(plain["output"], solo["output"]) and torch.equal(plain["grad_x"], solo["grad_x"])
        for kind in ("grads", "buffers"):
            for key in plain[kind]:
                assert torch.equal(plain[kind][key], solo[kind][key]), (rank, kind, key)


def run_and_record(model, case):
    x, lengths, h0, c0 = make_batch(case, 0)
    x.requires_grad_(True)
    output, (h_n, c_n) = model(x, (h0, c0), lengths=lengths)
    scalar_loss(output, h_n, c_n).backward()
    return [output, x.grad, *(p.grad for p in model.parameters()), *model.buffers()]


def assert_bit_identical_to_plain(case):
    plain = run_and_record(make_model(case["variant"]), case)
    synced = run_and_record(make_model(case["variant"], sync=True), case)
    assert len(plain) == len(synced)
    for a, b in zip(plain, synced):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(SYNC_CASES))
def test_sync_without_torch_distributed_is_the_plain_module(name):
    assert not dist.is_initialized()
    assert_bit_identical_to_plain(SYNC_CASES[name])


def test_synchronized_steps_fold_running_statistics_as_the_reference():
    """A synchronized training step runs the reference layer, so it folds its statistics with
    the reference's fold, whether or not this process has loaded the fused operators (which
    round an ulp differently): otherwise a rank whose evaluation loaded them (examples/
    ddp_train.py evaluates on rank 0 only) drifted from the others by an ulp a step."""
    from bnlstm_cuda import backends, distributed, ops
    from bnlstm_cuda.statistics import update_running_stats_parts

    if backends._cpu_problem() is not None:
        pytest.skip("needs the CPU extension")
    assert ops.is_loaded()
    cpu = torch.device("cpu")
    for name in ("auto", "cpu"):
        assert backends.resolve(name, cpu).fold is ops.update_running_stats_parts_compiled
    assert distributed.synchronized_backend(None).fold is update_running_stats_parts
    assert backends.resolve("reference", cpu).fold is update_running_stats_parts


@pytest.fixture
def world_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_sync_in_a_world_of_one_is_the_plain_module(world_of_one):
    assert dist.get_world_size() == 1
    for case in SYNC_CASES.values():
        assert_bit_identical_to_plain(case)


def test_global_batch_stats_match_masked_batch_stats(world_of_one):
    """Over one process, the all-reduced one-pass moments are the two-pass ones: values and
    gradients (mean, variance and count, with masked rows holding NaN)."""
    g = torch.Generator().manual_seed(5)
    z = (torch.randn(3, 5, 6, generator=g, dtype=torch.float64) * 2 + 1).requires_grad_(True)
    mask = torch.rand(3, 5, generator=g) < 0.7
    mask[:, :2] = True
    poisoned = torch.where(mask.unsqueeze(-1), z, torch.full_like(z, float("nan")))
    got = GlobalBatchStats()(poisoned, mask)
    want = masked_batch_stats(torch.where(mask.unsqueeze(-1), z, torch.zeros_like(z)), mask)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    weights = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    grad_got, = torch.autograd.grad((got.mean * weights[0] + got.var * weights[1]).sum(), z)
    grad_want, = torch.autograd.grad((want.mean * weights[0] + want.var * weights[1]).sum(), z)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-12, atol=1e-12)


# Options and conversion -----------------------------------------------------------------------

def test_convert_sync_statistics_converts_every_bnlstm_and_cell_in_place():
    model = nn.ModuleDict(dict(encoder=BNLSTM(3, 4), decoder=BNLSTMCell(4, 4), head=nn.Linear(4, 2)))
    keys = list(model.state_dict())
    parameters = list(model.parameters())
    assert convert_sync_statistics(model) is model
    assert model["encoder"].sync_statistics and model["decoder"].sync_statistics
    assert list(model.state_dict()) == keys
    assert all(a is b for a, b in zip(model.parameters(), parameters))
    assert "sync_statistics=True" in repr(model)
    solo = BNLSTM(3, 4)
    assert bnlstm_cuda.convert_sync_statistics(solo) is solo and solo.sync_statistics


def test_sync_module_copies_and_pickles(world_of_one):
    group = dist.new_group([0])
    model = BNLSTM(3, 4, sync_statistics=True, process_group=group)
    copied = copy.deepcopy(model)
    assert copied.sync_statistics and copied._statistics_group.group is group
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    # A process group does not travel: the loaded module uses the default group.
    assert loaded.sync_statistics and loaded._statistics_group.group is None
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_sync_statistics_bad_options():
    with pytest.raises(ValueError, match="sync_statistics=True needs backend"):
        BNLSTM(3, 4, sync_statistics=True, backend="cpu")
    with pytest.raises(ValueError, match="sync_statistics=True needs backend"):
        BNLSTMCell(3, 4, sync_statistics=True, backend="cpu")
    with pytest.raises(TypeError, match="process_group must be None .* got str"):
        BNLSTM(3, 4, sync_statistics=True, process_group="world")
    with pytest.raises(TypeError, match="sync_statistics must be a bool"):
        BNLSTM(3, 4, sync_statistics=1)
    with pytest.raises(ValueError, match="process_group is only used with sync_statistics=True"):
        BNLSTM(3, 4, process_group=object())
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        convert_sync_statistics([BNLSTM(3, 4)])
    with pytest.raises(TypeError, match="process_group must be None"):
        convert_sync_statistics(BNLSTM(3, 4), process_group=0)
    # A refused conversion changes nothing.
    model = nn.Sequential(BNLSTM(3, 4), BNLSTM(4, 4, backend="cpu"))
    with pytest.raises(ValueError, match="backend='cpu'"):
        convert_sync_statistics(model)
    assert not model[0].sync_statistics and not model[1].sync_statistics
