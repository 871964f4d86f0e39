"""backend="auto" on a GPU: the table of measured fastest backends, and the rows made from
benchmark results."""
import torch

from benchmarks.choice_table import fastest_rows
from bnlstm_cuda.gpu_choice import Measured, choose, measured_choice

H100 = "NVIDIA H100 80GB HBM3"
TABLE = (
    Measured(H100, "bf16", 64, 512, "triton", "h100_gpu.json"),
    Measured(H100, "bf16", 64, 1024, "cuda", "h100_gpu.json"),
    Measured(H100, "fp32", 64, 512, "cuda", "h100_gpu.json"),
)


def test_nearest_measured_shape_wins():
    assert measured_choice(H100, torch.bfloat16, 64, 400, TABLE) == "triton"
    assert measured_choice(H100, torch.bfloat16, 32, 2048, TABLE) == "cuda"
    assert measured_choice(H100, torch.float32, 256, 64, TABLE) == "cuda"


def test_unmeasured_gpu_or_dtype_has_no_measured_choice():
    assert measured_choice("NVIDIA A100-SXM4-80GB", torch.bfloat16, 64, 512, TABLE) is None
    assert measured_choice(H100, torch.float16, 64, 512, TABLE) is None


def test_choice_falls_back_in_order_when_unmeasured_or_unavailable():
    assert choose(("cuda", "triton"), H100, torch.bfloat16, 64, 512, TABLE) == "triton"
    # The measured winner cannot run here: the next available one in FALLBACK_ORDER.
    assert choose(("cuda",), H100, torch.bfloat16, 64, 512, TABLE) == "cuda"
    assert choose(("triton",), "some GPU", torch.float32, 8, 8, TABLE) == "triton"
    assert choose(("cuda", "triton"), "some GPU", torch.float32, 8, 8, TABLE) == "cuda"
    assert choose((), H100, torch.bfloat16, 64, 512, TABLE) is None


def test_rows_from_a_benchmark_result():
    def row(provider, mode, dtype, batch, hidden, median, error=None):
        return {"provider": provider, "mode": mode, "dtype": dtype, "batch": batch, "hidden_size": hidden,
                "median_ms": median, "error": error}

    result = {
        "environment": {"device": H100, "device_type": "cuda"},
        "results": [
            row("bnlstm:cuda", "train_step", "bf16", 64, 512, 9.0),
            row("bnlstm:triton", "train_step", "bf16", 64, 512, 8.0),
            row("bnlstm:triton", "inference", "bf16", 64, 1024, 1.0),  # not a training step
            row("bnlstm:cuda", "train_step", "bf16", 64, 1024, 20.0),
            row("bnlstm:triton", "train_step", "bf16", 64, 1024, 5.0, error="out of resources"),
            row("nn.LSTM", "train_step", "bf16", 64, 1024, 1.0),  # not a BN-LSTM backend
        ],
    }
    rows = fastest_rows(result, "h100_gpu.json")
    table = tuple(eval(line.strip().rstrip(","), {"Measured": Measured}) for line in rows)
    assert table == (
        Measured(H100, "bf16", 64, 512, "triton", "h100_gpu.json"),
        Measured(H100, "bf16", 64, 1024, "cuda", "h100_gpu.json"),
    )


def test_auto_on_a_gpu_device_without_fused_gpu_backends_is_the_reference(monkeypatch):
    from bnlstm_cuda import backends
    from bnlstm_cuda.reference import bnlstm_layer_reference

    monkeypatch.setattr(backends, "available_backends", lambda device: ("reference",))
    layer = backends.resolve_backend("auto", torch.device("cuda"), dtype=torch.bfloat16, batch=64, hidden_size=512)
    assert layer is bnlstm_layer_reference


def test_auto_on_a_gpu_device_takes_the_table_choice(monkeypatch):
    from bnlstm_cuda import backends, gpu_choice

    chosen = []
    monkeypatch.setattr(backends, "available_backends", lambda device: ("reference", "cuda", "triton"))
    monkeypatch.setattr(gpu_choice, "MEASURED", TABLE)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: H100)
    real_resolve = backends.resolve

    def record(name, device, **shape):
        if name != "auto":
            chosen.append(name)
            return name
        return real_resolve(name, device, **shape)

    monkeypatch.setattr(backends, "resolve", record)
    assert real_resolve("auto", torch.device("cuda"), dtype=torch.bfloat16, batch=64, hidden_size=512) == "triton"
    assert real_resolve("auto", torch.device("cuda"), dtype=torch.bfloat16, batch=64, hidden_size=1024) == "cuda"
    assert real_resolve("auto", torch.device("cuda"), dtype=torch.float16, batch=64, hidden_size=1024) == "cuda"
    assert chosen == ["triton", "cuda", "cuda"]


def test_triton_without_the_triton_package_is_unavailable_not_an_error(monkeypatch):
    """Where triton cannot be imported, the Triton backend reports why it cannot run (so
    "auto" on a GPU passes it over) instead of raising from the availability check."""
    from bnlstm_cuda import backends, triton_layer

    def no_triton():
        raise RuntimeError('backend="triton" needs the triton package (pip install triton): no module named triton')

    monkeypatch.setattr(triton_layer, "_kernels", no_triton)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "needs the triton package" in backends.TRITON.unavailable(torch.device("cuda"))

