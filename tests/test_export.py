"""Export for deployment: torch.export.export and torch.onnx.export(..., dynamo=True).

While torch.export traces (the ONNX exporter included), the modules run the reference layer,
whatever their backend, so the graph holds standard operators only and needs no extension
where it runs. The batch dimension can be dynamic; the sequence length is fixed at export
(the reference loop unrolls the time steps), and a call with another length is refused by
torch.export's input check or by onnxruntime. torch.compile keeps the fused operators.
"""
import copy

import pytest
import torch

from bnlstm_cuda import BNLSTM, BNLSTMCell
from helpers import randomize_bn_parameters

TOL = dict(rtol=1e-5, atol=1e-6)  # float32 against float64, or fused against reference


def trained_module(**kwargs):
    """A float32 module in evaluation mode with non-trivial parameters and running statistics."""
    kwargs.setdefault("max_length", 4)
    return randomize_bn_parameters(BNLSTM(5, 8, **kwargs)).eval()


def float64_reference(module):
    """The module in float64 on the reference backend: what the exported graph computes."""
    reference = copy.deepcopy(module).double()
    reference.backend = "reference"
    return reference


def operators(graph):
    return {str(node.target) for node in graph.nodes if node.op == "call_function"}


def assert_outputs_close(got, want):
    output, (h_n, c_n) = want
    for name, value, expected in zip(("output", "h_n", "c_n"), got, (output, h_n, c_n)):
        value = torch.as_tensor(value)
        torch.testing.assert_close(value.double(), expected.double(), **TOL, msg=lambda m: f"{name}: {m}")


# torch.export ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend, batch_first", [("auto", False), ("cpu", True), ("reference", False)])
def test_torch_export_runs_the_reference_layer_with_a_dynamic_batch(backend, batch_first):
    module = trained_module(num_layers=2, bidirectional=True, batch_first=batch_first, backend=backend)
    batch_dim = 0 if batch_first else 1
    shape = lambda batch: (batch, 6, 5) if batch_first else (6, batch, 5)
    program = torch.export.export(module, (torch.randn(shape(3)),),
                                  dynamic_shapes=({batch_dim: torch.export.Dim("batch")},))
    assert not any("bnlstm" in name for name in operators(program.graph)), "the graph needs the extension"
    exported = program.module()
    reference = float64_reference(module)
    for batch in (1, 3, 9):
        x = torch.randn(shape(batch))
        got = exported(x)
        output, (h_n, c_n) = got
        assert output.dtype == torch.float32
        assert_outputs_close((output, h_n, c_n), reference(x.double()))
        # The module itself still runs its own backend, which agrees.
        assert_outputs_close((output, h_n, c_n), module(x))
    # The time steps are unrolled: another sequence length is refused by the program.
    with pytest.raises(Exception, match=r"size\(\)\[\d\] == 6|Expected input.*6"):
        exported(torch.randn((3, 7, 5) if batch_first else (7, 3, 5)))


def test_torch_export_with_state_and_lengths():
    module = trained_module(num_layers=2, bidirectional=True)
    batch = torch.export.Dim("batch")
    x, lengths = torch.randn(6, 3, 5), torch.tensor([6, 4, 2])
    hx = torch.randn(4, 3, 8), torch.randn(4, 3, 8)
    program = torch.export.export(module, (x, hx, lengths),
                                  dynamic_shapes=({1: batch}, ({1: batch}, {1: batch}), {0: batch}))
    reference = float64_reference(module)
    x, lengths = torch.randn(6, 5, 5), torch.tensor([6, 1, 3, 6, 2])
    hx = torch.randn(4, 5, 8), torch.randn(4, 5, 8)
    output, (h_n, c_n) = program.module()(x, hx, lengths)
    assert_outputs_close((output, h_n, c_n), reference(x.double(), tuple(s.double() for s in hx), lengths))
    assert torch.all(output[2:, 1] == 0), "padded steps give zero output"


def test_torch_export_of_the_cell():
    cell = randomize_bn_parameters(BNLSTMCell(5, 8, max_length=4, backend="cpu")).eval()
    batch = torch.export.Dim("batch")
    hx = torch.randn(3, 8), torch.randn(3, 8)
    program = torch.export.export(cell, (torch.randn(3, 5), hx), kwargs={"step": 2},
                                  dynamic_shapes={"input": {0: batch}, "hx": ({0: batch}, {0: batch}), "step": None})
    assert not any("bnlstm" in name for name in operators(program.graph))
    reference = copy.deepcopy(cell).double()
    reference.backend = "reference"
    x, hx = torch.randn(6, 5), (torch.randn(6, 8), torch.randn(6, 8))
    h_1, c_1 = program.module()(x, hx, step=2)
    want_h, want_c = reference(x.double(), tuple(s.double() for s in hx), step=2)
    torch.testing.assert_close(h_1.double(), want_h, **TOL)
    torch.testing.assert_close(c_1.double(), want_c, **TOL)


def test_training_mode_export_takes_batch_statistics_and_folds_them():
    """Not a deployment target, but what it does: the program normalizes with the batch's
    statistics and updates the running statistics as the module's training step does."""
    module = randomize_bn_parameters(BNLSTM(5, 8, max_length=4, bidirectional=True))
    eager = copy.deepcopy(module)
    program = torch.export.export(module, (torch.randn(6, 3, 5),),
                                  dynamic_shapes=({1: torch.export.Dim("batch")},))
    exported = program.module()
    x = torch.randn(6, 4, 5)
    got = exported(x)
    want = eager(x)
    assert_outputs_close((got[0], *got[1]), want)
    for (name, buffer), expected in zip(exported.named_buffers(), eager.buffers()):
        torch.testing.assert_close(buffer, expected, **TOL, msg=lambda m: f"{name}: {m}")


# torch.compile keeps the fused operator ---------------------------------------------------------------


def test_torch_compile_keeps_the_fused_operator():
    from bnlstm_cuda.backends import available_backends

    if "cpu" not in available_backends("cpu"):
        pytest.skip("the CPU extension is unavailable here")
    module = trained_module(backend="cpu")
    traced = []

    def recording_backend(graph_module, example_inputs):
        traced.append(operators(graph_module.graph))
        return graph_module.forward

    x = torch.randn(6, 3, 5)
    got = torch.compile(module, backend=recording_backend, fullgraph=True)(x)
    assert any("bnlstm.layer_forward" in name for name in traced[0])
    assert_outputs_close((got[0], *got[1]), module(x))


# ONNX --------------------------------------------------------------------------------------------------


def onnx_session(program):
    onnxruntime = pytest.importorskip("onnxruntime")
    return onnxruntime.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])


def test_onnx_export_matches_onnxruntime_with_a_dynamic_batch():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    onnxruntime = pytest.importorskip("onnxruntime")
    module = trained_module(num_layers=2, bidirectional=True)  # backend "auto": the fused CPU operator
    program = torch.onnx.export(module, (torch.randn(4, 3, 5),), dynamo=True, verbose=False,
                                input_names=["input"], output_names=["output", "h_n", "c_n"],
                                dynamic_shapes=({1: "batch"},))
    domains = {node.domain for node in program.model_proto.graph.node}
    assert domains <= {"", "ai.onnx"}, f"custom operators in the graph: {domains}"
    session = onnx_session(program)
    reference = float64_reference(module)
    for batch in (1, 3, 9):
        x = torch.randn(4, batch, 5)
        got = session.run(["output", "h_n", "c_n"], {"input": x.numpy()})
        assert_outputs_close(got, reference(x.double()))
        assert_outputs_close(got, module(x))
    with pytest.raises(onnxruntime.capi.onnxruntime_pybind11_state.InvalidArgument,
                       match=r"index: 0 Got: 7 Expected: 4"):
        session.run(None, {"input": torch.randn(7, 3, 5).numpy()})


def test_legacy_onnx_exporter_is_refused_naming_dynamo():
    import io

    for module, x in ((BNLSTM(5, 8).eval(), torch.randn(4, 3, 5)), (BNLSTMCell(5, 8).eval(), torch.randn(3, 5))):
        with pytest.raises(RuntimeError, match=r"TorchScript-based ONNX exporter.*dynamo=True"):
            torch.onnx.export(module, (x,), io.BytesIO(), dynamo=False)
