"""What comes out: per-configuration rows (ratios to nn.LSTM, floor), the table, the
JSON, markdown and PNG files, all tagged with the device and the software versions."""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .floor import floor_rate, gemm_flops
from .providers import BASELINE, MODES
from .sweeps import DTYPE_NAMES, Config, shape_extras, shape_text
from .timing import Timing, memory_method, timer_name


@dataclass(frozen=True)
class Measurement:
    config: Config
    provider: str
    mode: str
    timing: Optional[Timing]  # None when the call failed
    peak_memory_bytes: Optional[int]
    error: Optional[str] = None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_tag(env: dict) -> str:
    """A file-name-safe form of the device: "Intel(R) Xeon(R) Gold", torch's AVX512 kernels,
    2 threads -> "intel-xeon-gold-avx512-2t". A CPU's figures depend on its vector ISA (one
    model name covers hosts with and without AVX-512) and on its thread count."""
    name = re.sub(r"\((r|tm)\)", "", env["device"].lower())
    tag = re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    if "cpu_capability" in env:
        tag = f"{tag}-{env['cpu_capability'].lower()}"
    return f"{tag}-{env['threads']}t" if "threads" in env else tag


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "absent"
    return triton.__version__


def environment(device: torch.device, sweep: str, timing: dict, rates: Dict[torch.dtype, float]) -> dict:
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "sweep": sweep,
        "timer": timer_name(device),
        "timing": timing,
        "peak_memory": memory_method(device),
        "matmul_tflops": {DTYPE_NAMES[dtype]: rate / 1e12 for dtype, rate in rates.items()},
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    else:
        env["threads"] = torch.get_num_threads()
        env.update(cpu_features())
    return env


# torch's private probes of the CPU features behind fast bf16 (oneDNN takes them when
# present); absent from some torch versions, so looked up by name.
_CPU_FLAGS = {
    "avx512": "_is_avx512_supported",
    "avx512_bf16": "_is_avx512_bf16_supported",
    "amx_tile": "_is_amx_tile_supported",
    "amx_fp16": "_is_amx_fp16_supported",
}


def cpu_features() -> dict:
    """The architecture, the vector ISA torch's CPU kernels dispatch to (e.g. "AVX2",
    "AVX512") and the CPU flags that decide whether bf16 runs fast (the CPU model is the
    record's device)."""
    flags = {}
    for flag, probe in _CPU_FLAGS.items():
        function = getattr(torch.cpu, probe, None)
        if function is not None:
            flags[flag] = bool(function())
    return {
        "arch": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": flags,
    }


def rows(measurements: List[Measurement], rates: Dict[torch.dtype, float]) -> List[dict]:
    """One flat record per measurement, with throughput, the ratio to nn.LSTM measured in
    the same run (time / nn.LSTM's time: 3.0 means three times slower) and the floor."""
    baseline = {
        (m.config, m.mode): m.timing.median_ms
        for m in measurements
        if m.provider == BASELINE and m.timing is not None
    }
    records = []
    for m in measurements:
        config = m.config
        record = {
            "seq_len": config.seq_len, "batch": config.batch, "input_size": config.input_size,
            "hidden_size": config.hidden_size, "dtype": config.dtype_name,
            "num_layers": config.num_layers, "bidirectional": config.bidirectional,
            "padded": config.padded, "autocast": config.autocast, "tokens": config.tokens,
            "mode": m.mode, "provider": m.provider, "error": m.error,
        }
        flops = gemm_flops(config, m.mode)
        floor_ms = flops / floor_rate(config, rates) * 1e3
        record.update(gemm_gflop=flops / 1e9, floor_ms=floor_ms)
        if m.timing is not None:
            seconds = m.timing.median_ms * 1e-3
            bar = baseline.get((config, m.mode))
            record.update(asdict(m.timing))
            record.update(
                sequences_per_s=config.batch / seconds,
                tokens_per_s=config.tokens / seconds,
                peak_memory_mb=None if m.peak_memory_bytes is None else m.peak_memory_bytes / 2**20,
                ratio_to_nn_lstm=None if bar is None else m.timing.median_ms / bar,
                times_floor=m.timing.median_ms / floor_ms,
            )
        records.append(record)
    return records


COLUMNS = (
    ("shape", "shape"), ("dtype", "dtype"), ("mode", "mode"), ("provider", "provider"),
    ("ms", "median_ms"), ("q1-q3 ms", "iqr"), ("k tok/s", "ktokens"), ("peak MB", "peak_memory_mb"),
    ("x nn.LSTM", "ratio_to_nn_lstm"), ("floor ms", "floor_ms"), ("x floor", "times_floor"),
)


def markdown_table(records: List[dict]) -> str:
    """An aligned markdown table: readable in a terminal, renders in a README."""
    cells = [[title for title, _ in COLUMNS]]
    for record in records:
        cells.append([_cell(record, key) for _, key in COLUMNS])
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["| " + " | ".join(text.ljust(w) for text, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def _cell(record: dict, key: str) -> str:
    if key == "shape":
        return record_shape(record)
    if key in ("dtype", "mode", "provider"):
        return record[key]
    if key == "floor_ms":
        return _number(record[key])
    if record.get("error") and key == "median_ms":
        return "failed"
    if "median_ms" not in record:
        return "-"
    if key == "iqr":
        return f"{_number(record['q1_ms'])}-{_number(record['q3_ms'])}"
    if key == "ktokens":
        return _number(record["tokens_per_s"] / 1e3)
    return _number(record[key])


def record_shape(record: dict) -> str:
    """A record's configuration as Config.shape writes it (records written before the layer,
    direction, padding and autocast fields read as the defaults)."""
    return shape_text(
        record["seq_len"], record["batch"], record["input_size"], record["hidden_size"],
        record.get("num_layers", 1), record.get("bidirectional", False), record.get("padded", False),
        record.get("autocast", False),
    )


def _number(value: Optional[float]) -> str:
    """Three significant figures or so, without exponents."""
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def header_lines(env: dict) -> List[str]:
    rates = ", ".join(f"{name} {tflops:.3g} TFLOP/s" for name, tflops in env["matmul_tflops"].items())
    threads = f", {env['threads']} thread{'s' * (env['threads'] != 1)}" if "threads" in env else ""
    lines = [f"- device: {env['device']} ({env['device_type']}{threads})"]
    if "cpu_capability" in env:
        flags = ", ".join(f"{flag} {'yes' if present else 'no'}" for flag, present in env["cpu_flags"].items())
        lines.append(f"- {env['arch']}; torch CPU capability {env['cpu_capability']}"
                     + (f"; {flags}" if flags else ""))
    return lines + [
        f"- torch {env['torch']}, triton {env['triton']}, Python {env['python']}, {env['date']}",
        f"- sweep `{env['sweep']}`; timer: {env['timer']}, " + ", ".join(f"{k} {v}" for k, v in env["timing"].items()),
        f"- peak memory: {env['peak_memory']}",
        f"- floor: GEMM FLOPs at the measured matmul rate ({rates})",
    ]


# The figures committed with the package: rewritten only when asked (--update-committed), so
# that measuring leaves a checkout clean.
COMMITTED_RESULTS = Path(__file__).parent / "results"
# A run's files by default: under the current directory, outside the package.
DEFAULT_RESULTS = Path("bnlstm-benchmarks")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """Where a command writes its files: --out DIR (alias --results-dir), or
    --update-committed for benchmarks/results/; see output_dir."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", "--results-dir", dest="out", type=Path, default=None, metavar="DIR",
                       help=f"directory for the result files (default: ./{DEFAULT_RESULTS}/)")
    where.add_argument("--update-committed", action="store_true",
                       help="write into benchmarks/results/, replacing the committed figures of this device tag")


def output_dir(args: argparse.Namespace) -> Path:
    """The directory a run writes to: benchmarks/results/ only with --update-committed."""
    if args.update_committed:
        return COMMITTED_RESULTS
    return args.out if args.out is not None else DEFAULT_RESULTS


def write_files(records: List[dict], env: dict, results_dir: Path) -> List[Path]:
    """results_dir/<device tag>_<sweep>.{json,md,png}; returns the paths written."""
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = results_dir / f"{device_tag(env)}_{env['sweep']}"
    json_path, md_path, png_path = (stem.with_suffix(suffix) for suffix in (".json", ".md", ".png"))
    json_path.write_text(json.dumps({"environment": env, "results": records}, indent=1) + "\n")
    md_path.write_text(
        f"# BN-LSTM against nn.LSTM on {env['device']}\n\n"
        + "\n".join(header_lines(env)) + "\n\n" + markdown_table(records) + "\n"
    )
    plot(records, env, png_path)
    return [json_path, md_path, png_path]


def plot(records: List[dict], env: dict, path: Path) -> None:
    """Time against sequence length and against batch (log-log), one line per provider,
    one row of panels per mode. Each panel takes the largest group of configurations that
    differ only along its axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    axes_fields = ("seq_len", "batch")
    measured = [r for r in records if "median_ms" in r]
    figure, panels = plt.subplots(len(MODES), len(axes_fields), figsize=(11, 3.6 * len(MODES)), squeeze=False)
    for row, mode in enumerate(MODES):
        for column, field in enumerate(axes_fields):
            panel = panels[row][column]
            fixed, group = _largest_group([r for r in measured if r["mode"] == mode], field)
            for provider in dict.fromkeys(r["provider"] for r in group):
                points = sorted((r[field], r["median_ms"]) for r in group if r["provider"] == provider)
                panel.plot(*zip(*points), marker="o", label=provider)
            panel.set(xscale="log", yscale="log", xlabel=field, ylabel="ms (median)",
                      title=f"{mode}, {fixed}")
            # Ticks at the measured sizes and at 1-2-5 steps of time, written plainly.
            panel.set_xticks(sorted({r[field] for r in group}))
            panel.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            for axis in (panel.xaxis, panel.yaxis):
                axis.set_major_formatter(ScalarFormatter())
                axis.set_minor_formatter(NullFormatter())
            panel.grid(True, which="both", alpha=0.3)
            if group:
                panel.legend(fontsize="small")
    figure.suptitle(f"BN-LSTM vs nn.LSTM, {env['device']}, torch {env['torch']}, {env['date'][:10]}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# A record's configuration fields; the defaults stand in for fields older records lack.
_CONFIG_FIELDS = {
    "seq_len": None, "batch": None, "input_size": None, "hidden_size": None, "dtype": None,
    "num_layers": 1, "bidirectional": False, "padded": False, "autocast": False,
}


def _largest_group(records: List[dict], field: str):
    """(description of the fixed fields, records) of the largest set of records that agree
    on every configuration field but `field`."""
    others = [f for f in _CONFIG_FIELDS if f != field]
    groups: Dict[tuple, List[dict]] = {}
    for record in records:
        groups.setdefault(tuple(record.get(f, _CONFIG_FIELDS[f]) for f in others), []).append(record)
    if not groups:
        return "", []
    key, group = max(groups.items(), key=lambda item: len({r[field] for r in item[1]}))
    fixed = dict(zip(others, key))
    names = {"seq_len": "T", "batch": "B", "input_size": "I", "hidden_size": "H"}
    words = [f"{name}={fixed[f]}" for f, name in names.items() if f != field]
    words += shape_extras(fixed["num_layers"], fixed["bidirectional"], fixed["padded"], fixed["autocast"])
    return " ".join(words + [fixed["dtype"]]), group
