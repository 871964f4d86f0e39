"""Data-parallel training of a BN-LSTM with torch.distributed (DistributedDataParallel).

Classifies scikit-learn's 8x8 digits read one row per step (8 steps), each sequence
ending at its last row with ink (variable lengths). Every process trains on its shard of
each global batch; DDP averages the gradients.

    torchrun --nproc_per_node=2 examples/ddp_train.py                     # per-process statistics
    torchrun --nproc_per_node=2 examples/ddp_train.py --sync-statistics   # global-batch statistics
    python examples/ddp_train.py                                          # one process, no torch.distributed

Per-process statistics (the default, what torch.nn.BatchNorm does under DDP): each process
normalizes with the statistics of its own shard; DDP broadcasts rank 0's running statistics
at the start of every forward pass. Synchronized statistics (`--sync-statistics`,
bnlstm_cuda.convert_sync_statistics): every step is normalized with the statistics of the
global batch, all-reduced across processes, and the running statistics are the same on
every rank. The process-group backend is NCCL (one GPU per process) when CUDA is available,
gloo (CPU) otherwise; `--backend` overrides. See docs/DISTRIBUTED.md.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import bnlstm_cuda
from bnlstm_cuda import BNLSTM

PIXELS_PER_STEP = 8  # one row of the image per step


def digits_sequences():
    """(x [N, 8, 8] in [0, 1], lengths [N], labels [N]) split 80/20 into train and test
    with a fixed shuffle. A sequence ends at its last step that holds ink."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).reshape(-1, 64 // PIXELS_PER_STEP, PIXELS_PER_STEP) / 16
    inked = x.abs().sum(-1) > 0  # [N, T]
    steps = torch.arange(1, x.shape[1] + 1)
    lengths = (inked * steps).amax(1).clamp(min=1)
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    split = len(labels) * 4 // 5
    train, test = order[:split], order[split:]
    return (x[train], lengths[train], labels[train]), (x[test], lengths[test], labels[test])


class DigitClassifier(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.rnn = BNLSTM(PIXELS_PER_STEP, hidden, batch_first=True, max_length=64 // PIXELS_PER_STEP)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x, lengths):
        _, (h_n, _) = self.rnn(x, lengths=lengths)  # x [B, T, 8]; h_n [1, B, H]
        return self.head(h_n[-1])  # [B, 10]


def setup(requested: str):
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, ... in the
    environment), or run alone when started without torchrun. Returns (rank, world, device)."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cpu")
    backend = requested
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend == "nccl":
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), device


@torch.no_grad()
def accuracy(model: nn.Module, data, device) -> float:
    model.eval()
    x, lengths, labels = data
    logits = model(x.to(device), lengths.to(device))
    model.train()
    return (logits.argmax(1).cpu() == labels).float().mean().item()


@torch.no_grad()
def running_statistics_spread(model: nn.Module) -> float:
    """Largest difference of any running statistic between this rank and rank 0."""
    spread = torch.zeros((), dtype=torch.float64)
    for name, buffer in model.named_buffers():
        if "running_" in name:
            reference = buffer.clone()
            dist.broadcast(reference, src=0)
            spread = torch.maximum(spread, (buffer - reference).abs().max().double().cpu())
    spread = spread.to(next(model.parameters()).device)
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    return spread.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sync-statistics", action="store_true",
                        help="normalize with the statistics of the global batch (all-reduced every step)")
    parser.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto",
                        help="process-group backend (auto: nccl with CUDA, else gloo)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per process and step")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--checkpoint", default=None, help="rank 0 saves the model's state_dict here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    rank, world, device = setup(args.backend)
    torch.manual_seed(args.seed)  # the same initial model everywhere (DDP also broadcasts rank 0's)
    train, test = digits_sequences()
    model = DigitClassifier(args.hidden).to(device)
    if args.sync_statistics:
        bnlstm_cuda.convert_sync_statistics(model)  # before wrapping, as for SyncBatchNorm
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    optimizer = torch.optim.Adam(ddp.parameters(), lr=args.lr)
    sampler = DistributedSampler(TensorDataset(*train), num_replicas=world, rank=rank, shuffle=True,
                                 seed=args.seed, drop_last=True)
    loader = DataLoader(TensorDataset(*train), batch_size=args.batch_size, sampler=sampler, drop_last=True)
    if rank == 0:
        mode = "synchronized" if args.sync_statistics else "per-process"
        where = dist.get_backend() if world > 1 else "no process group"
        print(f"{world} process(es), {where}, {device}; {mode} statistics; global batch "
              f"{args.batch_size * world}, {len(loader)} steps per epoch")

    started = time.perf_counter()
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        epoch_started, total_loss = time.perf_counter(), 0.0
        for x, lengths, labels in loader:
            loss = F.cross_entropy(ddp(x.to(device), lengths.to(device)), labels.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total_loss += loss.item()
        if world > 1:
            # Every rank's shard has the same size: the mean of the ranks' losses is the global one.
            total = torch.tensor(total_loss / world, dtype=torch.float64, device=device)
            dist.all_reduce(total)
            total_loss = total.item()
        if rank == 0:
            # Evaluation needs no communication: rank 0 evaluates its own copy, the unwrapped
            # module (a DDP forward would broadcast buffers and wait for the other ranks).
            print(f"epoch {epoch + 1}: loss {total_loss / len(loader):.3f}, train accuracy "
                  f"{accuracy(model, train, device):.3f}, test accuracy {accuracy(model, test, device):.3f} "
                  f"({time.perf_counter() - epoch_started:.1f} s)", flush=True)
    if world > 1:
        spread = running_statistics_spread(model)
        if rank == 0:
            print(f"running statistics: largest difference between ranks {spread:.3g}"
                  + ("" if args.sync_statistics else " (DDP broadcasts rank 0's at the next forward)"))
    if rank == 0:
        print(f"trained in {time.perf_counter() - started:.1f} s")
        if args.checkpoint:
            # The state_dict of a synchronized model has the plain keys: it loads anywhere.
            torch.save(model.state_dict(), args.checkpoint)
            plain = DigitClassifier(args.hidden)
            plain.load_state_dict(torch.load(args.checkpoint, map_location="cpu"))
            print(f"saved {args.checkpoint}; a plain single-process model loaded it: test accuracy "
                  f"{accuracy(plain, test, torch.device('cpu')):.3f}")
    if world > 1:
        # Leave together: a gloo process tearing down while its peer still talks can abort.
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
