"""The distributed half of tests/test_distributed.py: what each of two gloo processes runs.

The data and the models are pure functions of a case name and a rank, so the test process
rebuilds them to compute its single-process oracle. The workers only run and record
(torch.save to out_dir/rank{r}.pt); every comparison happens in the test process.
"""
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import bnlstm_cuda
from bnlstm_cuda import BNLSTM, BNLSTMCell
from bnlstm_cuda.distributed import GlobalBatchStats
from helpers import randomize_bn_parameters, scalar_loss

WORLD = 2
INPUT, HIDDEN = 3, 4

# Synchronized statistics: unequal batches (rank 1 of the Cooijmans case holds a single
# sequence, legal only with synchronized statistics) and unequal padded lengths, T above
# max_length=4 so the last statistics slot is shared.
SYNC_CASES = {
    "cooijmans": dict(variant="cooijmans", batches=(3, 1), steps=(5, 3)),
    "laurent_step": dict(variant="laurent_step", batches=(2, 3), steps=(4, 6)),
    "laurent_sequence": dict(variant="laurent_sequence", batches=(3, 2), steps=(5, 4)),
}
# Per-process statistics under DDP, on the module's default backend.
PER_PROCESS_CASE = dict(variant="cooijmans", batches=(3, 2), steps=(5, 4))


def make_model(variant, sync=False, **kwargs):
    """The same 2-layer bidirectional float64 model in every process."""
    torch.manual_seed(1234)
    model = BNLSTM(INPUT, HIDDEN, num_layers=2, bidirectional=True, max_length=4, variant=variant,
                   dtype=torch.float64, sync_statistics=sync, **kwargs)
    return randomize_bn_parameters(model, torch.Generator().manual_seed(99))


def make_batch(case, rank):
    """Rank `rank`'s batch: x [T_r, B_r, I], lengths [B_r] in [1, T_r], h0, c0 [4, B_r, H]."""
    g = torch.Generator().manual_seed(100 + rank)
    steps, batch = case["steps"][rank], case["batches"][rank]
    x = torch.randn(steps, batch, INPUT, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, steps + 1, (batch,), generator=g)
    lengths[0] = steps  # the rank's padded length is a real length
    h0 = torch.randn(4, batch, HIDDEN, generator=g, dtype=torch.float64)
    c0 = torch.randn(4, batch, HIDDEN, generator=g, dtype=torch.float64)
    return x, lengths, h0, c0


def make_cell(sync=False):
    torch.manual_seed(4321)
    cell = BNLSTMCell(INPUT, HIDDEN, max_length=2, dtype=torch.float64, sync_statistics=sync)
    return randomize_bn_parameters(cell, torch.Generator().manual_seed(98))


def make_cell_inputs(rank, batches=(2, 3), steps=3):
    """[steps] inputs [B_r, I], masks [B_r] (row 0 always active), initial state [B_r, H]."""
    g = torch.Generator().manual_seed(200 + rank)
    batch = batches[rank]
    xs = [torch.randn(batch, INPUT, generator=g, dtype=torch.float64) for _ in range(steps)]
    masks = [torch.rand(batch, generator=g) < 0.7 for _ in range(steps)]
    for mask in masks:
        mask[0] = True
    h0 = torch.randn(batch, HIDDEN, generator=g, dtype=torch.float64)
    c0 = torch.randn(batch, HIDDEN, generator=g, dtype=torch.float64)
    return xs, masks, h0, c0


def offset_features(rank):
    """float32 rows with |mean| / std ~ 3e3, where a float32 E[z^2] - E[z]^2 cancels."""
    g = torch.Generator().manual_seed(300 + rank)
    z = 3000.0 + torch.randn(2, 4 + rank, 6, generator=g, dtype=torch.float64)  # [T, B_r, F]
    mask = torch.rand(2, 4 + rank, generator=g) < 0.8
    mask[:, 0] = True
    return z.to(torch.float32), mask


def grads_of(module):
    return {name: p.grad.detach().clone() for name, p in module.named_parameters()}


def buffers_of(module):
    return {name: b.detach().clone() for name, b in module.named_buffers()}


def run_sync_case(rank, case):
    """One DDP training step with synchronized statistics (forward_sync_buffers=False, so equal
    running statistics on both ranks come from the statistics themselves)."""
    model = bnlstm_cuda.convert_sync_statistics(make_model(case["variant"]))
    ddp = DistributedDataParallel(model, forward_sync_buffers=False)
    x, lengths, h0, c0 = (t.requires_grad_(t.is_floating_point()) for t in make_batch(case, rank))
    output, (h_n, c_n) = ddp(x, (h0, c0), lengths=lengths)
    scalar_loss(output, h_n, c_n, seed=rank).backward()
    return dict(output=output.detach(), h_n=h_n.detach(), c_n=c_n.detach(),
                grad_x=x.grad, grad_h0=h0.grad, grad_c0=c0.grad,
                grads=grads_of(model), buffers=buffers_of(model))


def run_per_process_case(rank):
    """One DDP training step with per-process statistics, then an evaluation forward, at
    whose start DDP broadcasts rank 0's buffers."""
    model = make_model(PER_PROCESS_CASE["variant"])
    ddp = DistributedDataParallel(model)  # buffers broadcast from rank 0 at each forward, the default
    x, lengths, h0, c0 = make_batch(PER_PROCESS_CASE, rank)
    output, (h_n, c_n) = ddp(x, (h0, c0), lengths=lengths)
    scalar_loss(output, h_n, c_n, seed=rank).backward()
    result = dict(grads=grads_of(model), buffers=buffers_of(model))
    ddp.eval()
    with torch.no_grad():
        ddp(x, (h0, c0), lengths=lengths)
    result["buffers_after_eval_forward"] = buffers_of(model)
    return result


def count_all_reduces():
    """Patch torch.distributed.all_reduce to count its calls; returns the counter list."""
    calls = []
    real = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tuple(tensor.shape))
        return real(tensor, *args, **kwargs)

    dist.all_reduce = counting
    return calls


def run_communication_count(rank):
    """How many all-reduces a synchronized forward and backward issue, and that
    evaluation issues none."""
    counts = {}
    calls = count_all_reduces()
    for variant in ("cooijmans", "laurent_step"):
        case = dict(SYNC_CASES["cooijmans"], variant=variant)
        model = make_model(variant, sync=True)
        x, lengths, h0, c0 = make_batch(case, rank)
        x.requires_grad_(True)
        del calls[:]
        output, (h_n, c_n) = model(x, (h0, c0), lengths=lengths)
        counts[f"{variant}_forward"] = len(calls)
        del calls[:]
        scalar_loss(output, h_n, c_n, seed=rank).backward()
        counts[f"{variant}_backward"] = len(calls)
        del calls[:]
        model.eval()
        with torch.no_grad():
            model(x, (h0, c0), lengths=lengths)
        counts[f"{variant}_eval"] = len(calls)
    return counts


def run_cell_case(rank):
    """A synchronized BNLSTMCell loop of 3 steps with masks; local gradients."""
    cell = bnlstm_cuda.convert_sync_statistics(make_cell())
    xs, masks, h0, c0 = make_cell_inputs(rank)
    for t in (*xs, h0, c0):
        t.requires_grad_(True)
    state, loss, outputs = (h0, c0), 0, []
    for step, (x, mask) in enumerate(zip(xs, masks)):
        state = cell(x, state, step=step, mask=mask)
        outputs.append(torch.stack(state).detach())
        loss = loss + scalar_loss(state[0], state[1], torch.zeros(()), seed=10 * rank + step)
    loss.backward()
    return dict(outputs=outputs, grad_xs=[x.grad for x in xs], grad_h0=h0.grad, grad_c0=c0.grad,
                grads=grads_of(cell), buffers=buffers_of(cell))


def run_group_of_one(rank, solo_group):
    """sync_statistics over a group of one process: must be the unsynchronized module, on
    its default backend, bit for bit."""
    case = PER_PROCESS_CASE
    results = {}
    for name, kwargs in (("plain", {}), ("solo", dict(sync=True, process_group=solo_group))):
        model = make_model(case["variant"], **kwargs)
        x, lengths, h0, c0 = make_batch(case, rank)
        x.requires_grad_(True)
        output, (h_n, c_n) = model(x, (h0, c0), lengths=lengths)
        scalar_loss(output, h_n, c_n).backward()
        results[name] = dict(output=output.detach(), grad_x=x.grad, grads=grads_of(model),
                             buffers=buffers_of(model))
    return results


def run_checkpoint(rank, out_dir):
    """Rank 0 saves the state_dict of a synchronized model after a training step, and
    evaluates it alone (evaluation must not communicate, or rank 0 would wait forever)."""
    case = SYNC_CASES["cooijmans"]
    model = make_model(case["variant"], sync=True)
    x, lengths, h0, c0 = make_batch(case, rank)
    output, (h_n, c_n) = model(x, (h0, c0), lengths=lengths)
    scalar_loss(output, h_n, c_n).backward()
    if rank != 0:
        return {}
    torch.save(model.state_dict(), os.path.join(out_dir, "checkpoint.pt"))
    model.eval()
    with torch.no_grad():
        eval_output, _ = model(*make_batch(case, 0)[:1])
    return dict(eval_output=eval_output, keys=list(model.state_dict()))


def worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    # new_group is collective: every process creates every group.
    solo_groups = [dist.new_group([r]) for r in range(WORLD)]
    started = time.perf_counter()
    results = {f"sync_{name}": run_sync_case(rank, case) for name, case in SYNC_CASES.items()}
    results["per_process"] = run_per_process_case(rank)
    results["cell"] = run_cell_case(rank)
    results["group_of_one"] = run_group_of_one(rank, solo_groups[rank])
    z, mask = offset_features(rank)
    stats = GlobalBatchStats()(z, mask)
    results["offset_stats"] = dict(mean=stats.mean, var=stats.var, count=stats.count)
    results["checkpoint"] = run_checkpoint(rank, out_dir)
    dist.barrier()
    results["communication"] = run_communication_count(rank)
    results["seconds"] = time.perf_counter() - started
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def run_workers(out_dir, timeout=120.0):
    """Start WORLD gloo processes running `worker`; raise if one fails or they hang."""
    init_file = os.path.join(out_dir, "init")
    context = mp.start_processes(worker, args=(init_file, out_dir), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise TimeoutError(f"the {WORLD} distributed test processes did not finish in {timeout} s")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]
