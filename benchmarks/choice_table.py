"""Rows of bnlstm_cuda/gpu_choice.py's MEASURED table from GPU benchmark results.

    python -m benchmarks.choice_table benchmarks/results/<gpu>_gpu.json [...]

For every (dtype, batch, hidden size) of a result where at least one fused GPU backend ran,
the one with the shortest median training step wins. Paste the printed rows into MEASURED.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Tuple

GPU_BACKENDS = ("cuda", "triton")


def fastest_rows(result: dict, source: str) -> List[str]:
    environment = result["environment"]
    if environment.get("device_type") != "cuda":
        raise ValueError(f"{source}: not a GPU result (device_type={environment.get('device_type')!r})")
    best: Dict[Tuple[str, int, int], Tuple[float, str]] = {}
    for row in result["results"]:
        provider = row["provider"].split(":", 1)[-1]
        if row["mode"] != "train_step" or provider not in GPU_BACKENDS or row.get("error"):
            continue
        key = (row["dtype"], row["batch"], row["hidden_size"])
        if key not in best or row["median_ms"] < best[key][0]:
            best[key] = (row["median_ms"], provider)
    return [
        f"    Measured({environment['device']!r}, {dtype!r}, {batch}, {hidden}, {provider!r}, {source!r}),"
        for (dtype, batch, hidden), (_, provider) in sorted(best.items())
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="JSON files written by python -m benchmarks.run")
    args = parser.parse_args(argv)
    for path in args.results:
        for line in fastest_rows(json.loads(path.read_text()), path.name):
            print(line)


if __name__ == "__main__":
    main()
