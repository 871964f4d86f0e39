"""The `users` sweep and what it needs from the harness: configurations with layers,
directions, padding, autocast and a subset of modes, built and called by every provider,
recorded with those fields, and --backends. All at tiny sizes: the real sweep takes minutes."""
import json
from dataclasses import replace

import pytest
import torch

import benchmarks.providers
import benchmarks.report
from benchmarks import run
from benchmarks.floor import floor_rate, gemm_flops
from benchmarks.providers import MODES, make_call, modes_of, providers
from benchmarks.report import Measurement, header_lines, markdown_table, rows
from benchmarks.sweeps import SWEEPS, USERS, Config, padded_lengths
from benchmarks.timing import Timing
from bnlstm_cuda.backends import available_backends

CPU = torch.device("cpu")
# As test_benchmarks_output.py: no warm-up, one timed call per measurement.
TINY_RUN = ["--device", "cpu", "--warmup", "0", "--min-runs", "1", "--min-time", "0"]
# What an autocast call may raise (nn.LSTM under CPU autocast without avx512_bf16), which the
# harness records as a failure.
RECORDED_ERRORS = (RuntimeError, ValueError, TypeError)


def tiny(config: Config) -> Config:
    """`config` at T=3, B=4 (B=1 stays 1), I=H=8, with its layers, directions, padding,
    autocast, dtype and modes."""
    return replace(config, seq_len=3, batch=1 if config.batch == 1 else 4, input_size=8, hidden_size=8)


def test_users_sweep_holds_the_issue_configs():
    fp32, bf16 = torch.float32, torch.bfloat16
    wanted = [Config(seq_len, batch, 64, 128, fp32) for seq_len in (25, 100) for batch in (8, 32)] + [
        Config(100, 1, 64, 128, fp32, modes=("inference",)),
        Config(50, 32, 64, 128, fp32, num_layers=2, bidirectional=True),
        Config(50, 32, 512, 512, fp32),
        Config(100, 32, 64, 128, fp32, padded=True),
        Config(784, 16, 1, 100, fp32),
        Config(100, 32, 64, 128, fp32, autocast=True),
        Config(100, 32, 64, 128, bf16),
    ]
    assert SWEEPS["users"] is USERS
    assert set(wanted) <= set(USERS)
    assert len(set(USERS)) == len(USERS)


def test_new_fields_default_to_the_old_configs():
    config = Config(100, 32, 64, 128, torch.float32)
    assert (config.num_layers, config.bidirectional, config.padded, config.autocast, config.modes) == (
        1, False, False, False, None)
    assert config.label == "T=100 B=32 I=64 H=128 fp32"
    assert modes_of(config) == MODES
    assert config.tokens == 100 * 32


def test_labels_show_what_is_not_default():
    base = Config(50, 32, 64, 128, torch.float32)
    assert replace(base, num_layers=2, bidirectional=True).shape == "T=50 B=32 I=64 H=128 L=2 bidir"
    assert replace(base, padded=True).label == "T=50 B=32 I=64 H=128 padded fp32"
    assert replace(base, autocast=True).label == "T=50 B=32 I=64 H=128 autocast-bf16 fp32"


def test_modes_of_keeps_the_configs_modes_in_order():
    base = Config(3, 1, 8, 8, torch.float32)
    assert modes_of(replace(base, modes=("train_step", "inference"))) == ("inference", "train_step")
    with pytest.raises(ValueError):
        modes_of(replace(base, modes=("backward",)))


def test_padded_lengths_are_fixed_and_within_the_sequence():
    config = Config(100, 32, 64, 128, torch.float32, padded=True)
    lengths = padded_lengths(config)
    torch.manual_seed(123)  # the global seed does not move them
    assert torch.equal(lengths, padded_lengths(config))
    assert lengths.shape == (32,) and int(lengths.min()) >= 1 and int(lengths.max()) <= 100
    assert config.tokens == int(lengths.sum())


def test_gemm_flops_count_layers_directions_and_real_steps():
    T, B, I, H = 5, 3, 4, 6
    one = 2 * T * B * 4 * H * (I + H)
    assert gemm_flops(Config(T, B, I, H, torch.float32), "inference") == one
    stacked = Config(T, B, I, H, torch.float32, num_layers=3, bidirectional=True)
    # Layers 1 and 2 read both directions' outputs of the layer below: 2H inputs.
    assert gemm_flops(stacked, "inference") == 2 * (one + 2 * 2 * T * B * 4 * H * (2 * H + H))
    assert gemm_flops(stacked, "train_step") == 3 * gemm_flops(stacked, "inference")
    padded = Config(T, B, I, H, torch.float32, padded=True)
    assert gemm_flops(padded, "forward") == 2 * padded.tokens * 4 * H * (I + H)


def test_autocast_floor_takes_the_faster_rate():
    config = Config(3, 4, 8, 8, torch.float32, autocast=True)
    assert floor_rate(config, {torch.float32: 2.0, torch.bfloat16: 5.0}) == 5.0
    assert floor_rate(replace(config, autocast=False), {torch.float32: 2.0, torch.bfloat16: 5.0}) == 2.0


def _cases():
    names = ["bnlstm:reference", "bnlstm:cpu", "nn.LSTM"]
    for index, config in enumerate(USERS):
        for name in names:
            for mode in modes_of(config):
                yield pytest.param(tiny(config), name, mode, id=f"{index}-{tiny(config).label}-{name}-{mode}")


@pytest.mark.parametrize("config, provider_name, mode", list(_cases()))
def test_every_users_config_runs_at_a_tiny_size(config, provider_name, mode):
    """The call runs the module on the configuration's input: a finite output of the
    configuration's shape (packed data for a padded batch), in the mode's training state,
    and in a train step a finite gradient for every parameter. Only nn.LSTM under autocast
    may fail instead (its CPU bf16 path needs avx512_bf16), as the harness records."""
    found = {provider.name: provider for provider in providers(CPU)}
    if provider_name not in found:
        pytest.skip(f"{provider_name} is not available here")
    torch.manual_seed(0)
    module = found[provider_name].build(config, CPU)
    outputs = []
    module.register_forward_hook(lambda _module, _inputs, result: outputs.append(result[0]))
    call = make_call(module, mode, config, CPU)
    try:
        call()
    except RECORDED_ERRORS:
        if not (config.autocast and provider_name == "nn.LSTM"):
            raise
        return
    (output,) = outputs
    data = output.data if config.padded else output
    rows = (int(padded_lengths(config).sum()),) if config.padded else (config.seq_len, config.batch)
    assert tuple(data.shape) == (*rows, config.hidden_size * config.directions)
    assert torch.isfinite(data).all()
    assert module.training == (mode != "inference")
    if mode == "train_step":
        for name, parameter in module.named_parameters():
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name


def test_a_padded_train_step_gives_every_provider_the_same_packed_batch(monkeypatch):
    config = tiny(Config(100, 32, 64, 128, torch.float32, padded=True))
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(()))

        def forward(self, x):
            seen.append(x)
            data = x.data.sum(-1, keepdim=True).expand(-1, config.hidden_size) * self.weight
            return torch.nn.utils.rnn.PackedSequence(data, x.batch_sizes, x.sorted_indices, x.unsorted_indices), None

    recorder = Recorder()
    make_call(recorder, "train_step", config, CPU)()
    assert isinstance(seen[0], torch.nn.utils.rnn.PackedSequence)
    lengths = torch.nn.utils.rnn.pad_packed_sequence(seen[0])[1]
    assert torch.equal(lengths, padded_lengths(config))
    assert recorder.weight.grad is not None


@pytest.fixture
def no_png(monkeypatch):
    # The PNG needs matplotlib (the bench extra), which the tests do not.
    monkeypatch.setattr(benchmarks.report, "plot", lambda records, env, path: path.write_bytes(b""))
    monkeypatch.setattr(run, "matmul_rate", lambda device, dtype: 1e10)


def test_run_users_writes_the_new_fields(tmp_path, monkeypatch, no_png):
    monkeypatch.setitem(run.SWEEPS, "users", [tiny(config) for config in USERS])
    monkeypatch.setattr(benchmarks.providers, "available_backends", lambda device: ["reference"])
    run.main(TINY_RUN + ["--sweep", "users", "--out", str(tmp_path)])
    [json_path] = tmp_path.glob("*_users.json")
    written = json.loads(json_path.read_text())
    env, records = written["environment"], written["results"]
    for field in ("cpu_capability", "cpu_flags", "arch"):
        assert field in env
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    for record in records:
        for field in ("num_layers", "bidirectional", "padded", "autocast", "tokens"):
            assert field in record

    # B=1: inference only, and nothing recorded for the modes it leaves out.
    serving = [r for r in records if r["batch"] == 1]
    assert {r["mode"] for r in serving} == {"inference"} and not any(r["error"] for r in serving)
    assert len(records) == sum(len(modes_of(config)) for config in USERS) * 2

    # The ratio pairs the same configuration: the stacked model's bar is the stacked nn.LSTM.
    stacked = [r for r in records if r["num_layers"] == 2 and r["bidirectional"] and r["mode"] == "inference"]
    mine, = (r for r in stacked if r["provider"] == "bnlstm:reference")
    bar, = (r for r in stacked if r["provider"] == "nn.LSTM")
    assert mine["ratio_to_nn_lstm"] == pytest.approx(mine["median_ms"] / bar["median_ms"])
    padded, = (tiny(config) for config in USERS if config.padded)
    assert {r["tokens"] for r in records if r["padded"]} == {padded.tokens}

    markdown = next(tmp_path.glob("*_users.md")).read_text()
    assert "L=2 bidir" in markdown and "padded" in markdown and "autocast-bf16" in markdown
    assert f"torch CPU capability {env['cpu_capability']}" in markdown


def test_backends_limits_the_bnlstm_providers(monkeypatch):
    monkeypatch.setattr(benchmarks.providers, "available_backends", lambda device: ["reference", "cpu", "cuda"])
    names = lambda **kwargs: [provider.name for provider in providers(CPU, **kwargs)]  # noqa: E731
    assert names() == ["bnlstm:reference", "bnlstm:cpu", "bnlstm:cuda", "bnlstm:cuda+cublas-gemm", "nn.LSTM"]
    assert names(backends=["cpu"]) == ["bnlstm:cpu", "nn.LSTM"]
    assert names(backends=["cuda"]) == ["bnlstm:cuda", "bnlstm:cuda+cublas-gemm", "nn.LSTM"]
    assert names(backends=["cuda+cublas-gemm", "reference"]) == [
        "bnlstm:reference", "bnlstm:cuda+cublas-gemm", "nn.LSTM"]
    with pytest.raises(ValueError, match="triton"):
        providers(CPU, backends=["triton"])


def test_run_backends_runs_that_backend_and_nn_lstm(tmp_path, monkeypatch, no_png):
    if "cpu" not in available_backends(CPU):
        pytest.skip("the fused CPU backend is not built here")
    monkeypatch.setitem(run.SWEEPS, "users", [tiny(USERS[0])])
    run.main(TINY_RUN + ["--sweep", "users", "--backends", "cpu", "--out", str(tmp_path)])
    records = json.loads(next(tmp_path.glob("*_users.json")).read_text())["results"]
    assert {r["provider"] for r in records} == {"bnlstm:cpu", "nn.LSTM"}
    with pytest.raises(SystemExit):
        run.main(TINY_RUN + ["--sweep", "users", "--backends", "nonesuch", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        run.parse_args(["--backends", ","])


def _fake_records():
    """rows() of every users configuration, every provider named, each with a made-up time,
    and nn.LSTM failing under autocast as on a CPU without avx512_bf16."""
    measurements = []
    for config in USERS:
        for provider in ("bnlstm:cpu", "nn.LSTM"):
            for mode in modes_of(config):
                if config.autocast and provider == "nn.LSTM":
                    measurements.append(Measurement(config, provider, mode, None, None, error="RuntimeError: x"))
                    continue
                ms = 1e-4 * config.tokens * (2 if provider == "bnlstm:cpu" else 1)
                measurements.append(Measurement(config, provider, mode, Timing(ms, ms, ms, ms, ms, 1), None))
    return rows(measurements, {torch.float32: 1e11, torch.bfloat16: 1e9})


def test_the_table_and_header_show_the_new_fields():
    records = _fake_records()
    table = markdown_table(records)
    assert "T=50 B=32 I=64 H=128 L=2 bidir" in table and "failed" in table
    env = {"device": "cpu", "device_type": "cpu", "threads": 2, "torch": "x", "triton": "absent",
           "python": "3", "date": "2026-01-01T00:00:00+00:00", "sweep": "users", "timer": "t", "timing": {},
           "peak_memory": "m", "matmul_tflops": {"fp32": 0.1}}
    assert len(header_lines(env)) == 5  # an environment from before the CPU fields
    env.update(benchmarks.report.cpu_features())
    assert "torch CPU capability" in "\n".join(header_lines(env))


def test_the_plot_takes_the_users_sweep(tmp_path):
    pytest.importorskip("matplotlib")
    env = {"device": "cpu", "torch": "x", "date": "2026-01-01"}
    benchmarks.report.plot(_fake_records(), env, tmp_path / "users.png")
    assert (tmp_path / "users.png").stat().st_size > 0


def test_providers_are_timed_in_alternating_rounds():
    """time_interleaved warms every call up, then gives each its share of every round in
    turn, the order reversed every other round; each Timing counts its own runs."""
    from benchmarks.timing import time_interleaved

    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in ("a", "b")}
    timings = time_interleaved(calls, torch.device("cpu"), warmup=1, min_runs=6, min_time_s=0, rounds=3)
    assert order == ["a", "b"] + ["a", "a", "b", "b"] + ["b", "b", "a", "a"] + ["a", "a", "b", "b"]
    assert {name: timing.runs for name, timing in timings.items()} == {"a": 6, "b": 6}


def test_providers_alternate_call_by_call_by_default():
    """Without rounds, time_interleaved warms every call up, then runs one call of each per
    turn, the order reversed every other turn, until each has min_runs runs."""
    from benchmarks.timing import time_interleaved

    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in ("a", "b", "c")}
    timings = time_interleaved(calls, torch.device("cpu"), warmup=1, min_runs=3, min_time_s=0)
    assert order == ["a", "b", "c"] + ["a", "b", "c"] + ["c", "b", "a"] + ["a", "b", "c"]
    assert {name: timing.runs for name, timing in timings.items()} == {"a": 3, "b": 3, "c": 3}


def test_a_failing_provider_is_recorded_beside_the_others(monkeypatch):
    """Where one provider's call raises, the failure is a record with its error and the
    others are timed together, each call made only by the provider it belongs to."""
    config = SWEEPS["users"][0]
    modules = {"good": torch.nn.Identity(), "bad": torch.nn.Identity(), "also good": torch.nn.Identity()}
    made = []

    def make_call(module, mode, config, device):
        name = next(name for name, found in modules.items() if found is module)
        made.append(name)
        if name == "bad":
            def fail():
                raise RuntimeError("no kernel")
            return fail
        return lambda: None

    monkeypatch.setattr(run, "make_call", make_call)
    timing = {"warmup": 0, "min_runs": 2, "min_time_s": 0}
    found = run._measure_together(modules, "inference", config, torch.device("cpu"), timing, rounds=2)
    assert [measurement.provider for measurement in found] == ["good", "bad", "also good"]
    by_provider = {measurement.provider: measurement for measurement in found}
    for name in ("good", "also good"):
        assert by_provider[name].timing is not None and by_provider[name].error is None
        assert by_provider[name].timing.runs == 2
    assert by_provider["bad"].timing is None and "no kernel" in by_provider["bad"].error
    assert made == ["good", "bad", "also good"]  # no provider is built or timed a second time
