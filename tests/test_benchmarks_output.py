"""Where the benchmark commands write: a user's runs go to ./bnlstm-benchmarks/ or --out DIR,
and benchmarks/results/, the committed figures, changes only with --update-committed."""
from pathlib import Path

import pytest
import torch
from torch import nn

import benchmarks.providers
import benchmarks.report
from benchmarks import cell_loop, run
from benchmarks.report import COMMITTED_RESULTS, DEFAULT_RESULTS, output_dir
from benchmarks.sweeps import Config
from benchmarks.timing import Timing

# A run small enough for the test suite: no matmul-rate measurement, one tiny shape, one
# timed call per measurement.
TINY = ["--device", "cpu", "--warmup", "0", "--min-runs", "1", "--min-time", "0"]


def committed_files():
    """Every file under benchmarks/results/ with its size and modification time."""
    return {path: (path.stat().st_size, path.stat().st_mtime_ns) for path in COMMITTED_RESULTS.rglob("*")
            if path.is_file()}


def is_under(path: Path, directory: Path) -> bool:
    path, directory = path.resolve(), directory.resolve()
    return path == directory or directory in path.parents


@pytest.mark.parametrize("argv", [[], ["--sweep", "gpu"], ["--threads", "1", "--budget", "5"]])
def test_run_writes_to_the_current_directory_by_default(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = output_dir(run.parse_args(argv))
    assert out.resolve() == (tmp_path / DEFAULT_RESULTS).resolve()
    assert not is_under(out, COMMITTED_RESULTS)


@pytest.mark.parametrize("flag", ["--out", "--results-dir"])
def test_out_names_the_directory(flag, tmp_path):
    assert output_dir(run.parse_args([flag, str(tmp_path / "mine")])) == tmp_path / "mine"


def test_only_update_committed_writes_committed_results():
    assert output_dir(run.parse_args(["--update-committed"])) == COMMITTED_RESULTS
    assert COMMITTED_RESULTS == Path(benchmarks.report.__file__).parent / "results"


def test_out_and_update_committed_exclude_each_other(tmp_path):
    with pytest.raises(SystemExit):
        run.parse_args(["--update-committed", "--out", str(tmp_path)])


def test_a_run_leaves_committed_results_alone(tmp_path, monkeypatch):
    """The whole command, on one tiny shape with the reference and nn.LSTM: files appear under
    ./bnlstm-benchmarks/ and nothing under benchmarks/results/ changes."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(run.SWEEPS, "default", [Config(3, 2, 4, 5, torch.float32)])
    monkeypatch.setattr(benchmarks.providers, "available_backends", lambda device: ["reference"])
    monkeypatch.setattr(run, "matmul_rate", lambda device, dtype: 1e10)
    # The PNG needs matplotlib (the bench extra), which the tests do not.
    monkeypatch.setattr(benchmarks.report, "plot", lambda records, env, path: path.write_bytes(b""))
    before = committed_files()
    run.main(TINY)
    written = sorted(path.name for path in (tmp_path / DEFAULT_RESULTS).iterdir())
    assert [Path(name).suffix for name in written] == [".json", ".md", ".png"]
    assert all(name.endswith("_default" + Path(name).suffix) for name in written)
    assert committed_files() == before


def test_cell_loop_leaves_committed_results_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cell_loop, "cells", lambda device, input_size, hidden_size, steps: {
        "nn.LSTMCell": nn.LSTMCell(input_size, hidden_size)})
    monkeypatch.setattr(cell_loop, "time_interleaved", lambda fns, device: {
        name: fn() or Timing(1.0, 1.0, 1.0, 1.0, 1.0, 1) for name, fn in fns.items()})
    before = committed_files()
    cell_loop.main(["--device", "cpu", "--steps", "2", "--batch", "2", "--hidden", "4"])
    written = sorted(path.name for path in (tmp_path / DEFAULT_RESULTS).iterdir())
    assert [Path(name).suffix for name in written] == [".json", ".md"]
    assert committed_files() == before
    cell_loop.main(["--device", "cpu", "--steps", "2", "--batch", "2", "--hidden", "4",
                    "--out", str(tmp_path / "mine")])
    assert len(list((tmp_path / "mine").iterdir())) == 2


def test_device_tags_name_the_vector_isa_and_threads():
    """Hosts sold under one model name, with and without AVX-512, write different files; a
    GPU's tag is its name alone."""
    cpu = {"device": "AMD EPYC", "threads": 2}
    assert benchmarks.report.device_tag({**cpu, "cpu_capability": "AVX2"}) == "amd-epyc-avx2-2t"
    assert benchmarks.report.device_tag({**cpu, "cpu_capability": "AVX512"}) == "amd-epyc-avx512-2t"
    assert benchmarks.report.device_tag({"device": "Intel(R) Xeon(R) Gold", "threads": 1,
                                         "cpu_capability": "AVX512"}) == "intel-xeon-gold-avx512-1t"
    assert benchmarks.report.device_tag({"device": "NVIDIA H200"}) == "nvidia-h200"
    here = benchmarks.report.environment(torch.device("cpu"), "default", {}, {})
    assert benchmarks.report.device_tag(here).endswith(
        f"-{torch.backends.cpu.get_cpu_capability().lower()}-{torch.get_num_threads()}t")
