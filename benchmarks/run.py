"""`python -m benchmarks.run`: every provider (or those --backends selects), every mode a
configuration asks for, over a sweep; prints the table and writes
<device tag>_<sweep>.{json,md,png} to ./bnlstm-benchmarks/ (--out DIR), or to
benchmarks/results/ with --update-committed."""
from __future__ import annotations

import argparse
import time
from typing import List, Optional

import torch
from tqdm.auto import tqdm

from .floor import matmul_rate, rate_dtypes
from .providers import make_call, modes_of, providers
from .report import Measurement, add_output_arguments, environment, markdown_table, output_dir, rows, write_files
from .sweeps import SWEEPS
from .timing import peak_memory_bytes, time_interleaved


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--sweep", choices=sorted(SWEEPS), default="default",
                        help="default: small, for a CPU (a few minutes); gpu: bf16/fp32, H up to 1024, T up to 784; "
                             "users: what users run on a CPU (B=1 serving, 2-layer bidirectional, padded, "
                             "pixel MNIST, bf16 autocast and module)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", type=_names, default=None, metavar="NAME[,NAME]",
                        help="only these bnlstm providers (cpu: bnlstm:cpu; cuda: bnlstm:cuda and its variants; "
                             "cuda+cublas-gemm: that variant alone); nn.LSTM always runs (default: all available)")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile of the reference (minutes of compilation per shape on a CPU)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    parser.add_argument("--min-runs", type=int, default=10, help="timed runs per measurement, at least")
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds of timed runs per measurement, at least")
    parser.add_argument("--rounds", type=int, default=None,
                        help="time the providers of a configuration and mode in this many rounds of consecutive "
                             "runs (1: one after the other) instead of alternating them call by call")
    add_output_arguments(parser)
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds: start no configuration after this long, and write what was measured "
                             "(for a time-limited GPU session; configurations come in the sweep's order)")
    return parser.parse_args(argv)


def _names(text: str) -> List[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected NAME[,NAME]")
    return names


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = SWEEPS[args.sweep]
    try:
        found = providers(device, compile=args.compile, backends=args.backends)
    except ValueError as error:
        raise SystemExit(f"--backends: {error}") from None
    timing = {"warmup": args.warmup, "min_runs": args.min_runs, "min_time_s": args.min_time}

    dtypes = dict.fromkeys(dtype for config in configs for dtype in rate_dtypes(config))
    rates = {dtype: matmul_rate(device, dtype) for dtype in dtypes}
    measurements = []
    skipped = []
    total = sum(len(modes_of(config)) for config in configs) * len(found)
    with tqdm(total=total, unit="measurement") as progress:
        for config in configs:
            if args.budget is not None and time.perf_counter() - started > args.budget:
                skipped.append(config.label)
                continue
            modules = {}
            for provider in found:
                torch.manual_seed(0)
                modules[provider.name] = provider.build(config, device)
            # A mode the configuration leaves out (training at B=1) is not measured, not failed.
            for mode in modes_of(config):
                progress.set_postfix_str(f"{config.label} {mode}", refresh=True)
                measurements += _measure_together(modules, mode, config, device, timing, args.rounds)
                progress.update(len(modules))
            del modules

    alternation = "call by call" if args.rounds is None else f"{args.rounds} rounds"
    env = environment(device, args.sweep, {**timing, "alternation": alternation}, rates)
    records = rows(measurements, rates)
    print(markdown_table(records))
    below_floor = sum(record.get("times_floor", 1.0) < 1.0 for record in records)
    if below_floor:
        print(f"note: {below_floor} measurements ran faster than the floor: the matmul rate was "
              "measured under load (re-run on a quiet machine), or cuDNN used TF32 for fp32")
    if skipped:
        print(f"--budget {args.budget:g} s spent: {len(skipped)} configurations not measured: {', '.join(skipped)}")
    for path in write_files(records, env, output_dir(args)):
        print(f"wrote {path}")
    print(f"{len(measurements)} measurements in {time.perf_counter() - started:.0f} s")


def _measure_together(modules, mode, config, device, timing, rounds) -> List[Measurement]:
    """Every provider's module in one mode, timed in alternation (time_interleaved), so the
    ratios to nn.LSTM compare calls made in the same seconds. A provider whose call fails
    is recorded with its error, not raised, and the others are timed without it."""
    calls, failures = {}, {}
    for provider, module in modules.items():
        try:
            call = make_call(module, mode, config, device)
            call()
        except (RuntimeError, NotImplementedError, ValueError, TypeError) as error:
            tqdm.write(f"{config.label} {provider} {mode} failed: {error}")
            failures[provider] = Measurement(config, provider, mode, None, None,
                                             error=f"{type(error).__name__}: {error}")
            continue
        calls[provider] = call
    timings = time_interleaved(calls, device, rounds=rounds, **timing) if calls else {}
    return [failures[provider] if provider in failures
            else Measurement(config, provider, mode, timings[provider], peak_memory_bytes(calls[provider], device))
            for provider in modules]


if __name__ == "__main__":
    main()
