"""`python -m benchmarks.cell_loop`: a decoder loop of T cell calls, BNLSTMCell against
torch.nn.LSTMCell, in the same run.

A decoder calls its cell once per step, so at small batch the per-call cost (Python,
argument checks, the dispatcher, autograd bookkeeping), not the arithmetic, sets the time.
Each row is the loop's time, its ratio to nn.LSTMCell's loop, and the per-call overhead:
the time of one call at a size where the arithmetic is negligible (B=2, I=H=8).
Writes <device tag>_cell_loop.{json,md} to ./bnlstm-benchmarks/ (--out DIR), or to
benchmarks/results/ with --update-committed.
"""
from __future__ import annotations

import argparse
import json
from typing import Callable, List, Optional

import torch
from torch import nn

from bnlstm_cuda import BNLSTMCell
from bnlstm_cuda.backends import available_backends

from .report import add_output_arguments, device_tag, environment, output_dir
from .timing import synchronized, time_interleaved

MODES = ("inference", "train_step")


def cells(device: torch.device, input_size: int, hidden_size: int, steps: int) -> dict:
    """provider name -> a fresh cell of that provider."""
    made = {f"bnlstm:{name}": BNLSTMCell(input_size, hidden_size, max_length=steps, backend=name, device=device)
            for name in available_backends(device)}
    made["nn.LSTMCell"] = nn.LSTMCell(input_size, hidden_size, device=device)
    return made


def loop_call(cell: nn.Module, mode: str, steps: int, batch: int, device: torch.device) -> Callable[[], None]:
    """One decoder loop over `steps` steps: inference (eval, no grad) or a training step
    (forward through every step, then backward from the last state)."""
    x = torch.randn(steps, batch, cell.input_size, device=device)
    bn = isinstance(cell, BNLSTMCell)

    def run() -> torch.Tensor:
        state = None
        for t in range(steps):
            state = cell(x[t], state, step=t) if bn else cell(x[t], state)
        return state[0]

    if mode == "inference":
        cell.eval()

        def call() -> None:
            with torch.no_grad():
                run()
    else:
        cell.train()

        def call() -> None:
            cell.zero_grad(set_to_none=True)
            run().sum().backward()

    return synchronized(call, device)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cell_loop", description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    records = []
    for mode in MODES:
        loops = time_interleaved({name: loop_call(cell, mode, args.steps, args.batch, device)
                                  for name, cell in cells(device, args.hidden, args.hidden, args.steps).items()}, device)
        overhead = time_interleaved({name: loop_call(cell, mode, 1, 2, device)
                                     for name, cell in cells(device, 8, 8, 1).items()}, device)
        for name, timing in loops.items():
            records.append({
                "mode": mode, "provider": name, "loop_ms": timing.median_ms,
                "x_nn_lstmcell": timing.median_ms / loops["nn.LSTMCell"].median_ms,
                "per_call_overhead_us": overhead[name].median_ms * 1e3,
            })

    env = environment(device, "cell_loop", {"steps": args.steps, "batch": args.batch, "hidden": args.hidden}, {})
    lines = [
        f"# Decoder loop of {args.steps} cell calls, B={args.batch}, I=H={args.hidden}, on {env['device']}",
        "",
        f"torch {env['torch']}, {env.get('threads', '')} threads, {env['date']}, timer {env['timer']}",
        "",
        "| mode | provider | loop ms | x nn.LSTMCell | per-call overhead us (B=2, I=H=8) |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['mode']} | {r['provider']} | {r['loop_ms']:.2f} | {r['x_nn_lstmcell']:.2f} | {r['per_call_overhead_us']:.0f} |"
        for r in records
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    results_dir = output_dir(args)
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = results_dir / f"{device_tag(env)}_cell_loop"
    stem.with_suffix(".json").write_text(json.dumps({"environment": env, "records": records}, indent=2) + "\n")
    stem.with_suffix(".md").write_text(table)
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
