"""Small helpers shared by the tests."""
import copy
import io
import math

import torch

import bnlstm_cuda


def prepare_triton():
    """Where the Triton backend's tests run, and why they cannot (None: they can): ("cuda",
    None) with a visible GPU and TRITON_INTERPRET unset (compiled kernels), ("cpu", None) in
    Triton's interpreter. Without a GPU, conftest.py sets TRITON_INTERPRET=1 before triton is
    imported (Triton reads it then, and when each kernel is decorated); kernels decorated
    without it are imported again here. Imports triton only when it can be used."""
    import importlib

    from bnlstm_cuda import triton_layer

    on_gpu = torch.cuda.is_available() and not triton_layer.interpreter_requested()
    device = "cuda" if on_gpu else "cpu"
    if not on_gpu and not triton_layer.interpreter_requested():
        return device, ("without a GPU the Triton kernels run in Triton's interpreter: TRITON_INTERPRET=1 is not "
                        "set (tests/conftest.py sets it when no GPU is visible)")
    try:
        import triton  # noqa: F401
        import bnlstm_cuda.triton_kernels as triton_kernels
    except ImportError as error:
        return device, f"triton cannot be imported ({error})"
    if not on_gpu and not triton_layer._kernels_interpreted():
        importlib.reload(triton_kernels)
    return device, None


def copied_and_loaded(module):
    """copy.deepcopy(module), and module after a torch.save/torch.load round trip."""
    saved = io.BytesIO()
    torch.save(module, saved)
    saved.seek(0)
    return copy.deepcopy(module), torch.load(saved, weights_only=False)


def general_path_only(module):
    """`module` (BNLSTM or BNLSTMCell) with its direct CPU path turned off: every call takes
    forward's general path."""
    module._direct_cpu_call = lambda *args: None
    return module


def counting_direct_calls(module):
    """`module`, and a list that gets each direct call's result (None: the general path)."""
    taken, direct_call = [], module._direct_cpu_call
    module._direct_cpu_call = lambda *args: taken.append(result := direct_call(*args)) or result
    return module, taken


def randomize_bn_parameters(module, generator=None):
    """Give every gamma, beta and bias a random value and every running statistic a random
    plausible one, so no comparison passes by the accident of an initial value."""
    with torch.no_grad():
        for name, tensor in module.named_parameters():
            if name.startswith(("gamma_", "beta_", "bias_")):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5 + (1.0 if name.startswith("gamma_") else 0.0))
        for name, tensor in module.named_buffers():
            if name.startswith("running_mean_"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3)
            elif name.startswith("running_var_"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
    return module


def scalar_loss(output, h_n, c_n, seed=1):
    """A random linear functional of every output, so each one gets its own gradient."""
    g = torch.Generator().manual_seed(seed)
    terms = 0
    for tensor in (output, h_n, c_n):
        weights = torch.randn(tensor.shape, generator=g, dtype=tensor.dtype).to(tensor.device)
        terms = terms + (tensor * weights).sum()
    return terms


def make_module(variant="cooijmans", **kwargs):
    kwargs.setdefault("max_length", 4)
    kwargs.setdefault("dtype", torch.float64)
    return randomize_bn_parameters(bnlstm_cuda.BNLSTM(variant=variant, **kwargs))


def assert_matches_paper(module, x, h0=None, c0=None, lengths=None, training=True, tol=1e-10, gradients=True):
    """Run `module` (float64) and tests/paper_reference.py on the same call; compare outputs,
    final states, running statistics after the call and the gradients of the input, the
    initial states and every parameter (gradients=False: forward only). Leaves the module's
    running statistics updated and its parameters' .grad set. The module runs on the device
    of its parameters (x, h0, c0 given on the CPU are moved there); the paper on the CPU."""
    from paper_reference import paper_bnlstm

    close = dict(rtol=tol, atol=tol)
    device = next(module.parameters()).device
    states = module.num_layers * module.num_directions
    zeros = torch.zeros(states, x.shape[1], module.hidden_size, dtype=x.dtype)
    h0, c0 = (zeros if h0 is None else h0), (zeros if c0 is None else c0)
    module.train(training)
    params = {k: v.detach().cpu().clone().requires_grad_(True) for k, v in module.named_parameters()}
    running = {k: v.detach().cpu().clone() for k, v in module.named_buffers()}
    mine = [t.detach().to(device).clone().requires_grad_(True) for t in (x, h0, c0)]
    theirs = [t.detach().cpu().clone().requires_grad_(True) for t in (x, h0, c0)]
    for parameter in module.parameters():
        parameter.grad = None

    out, (h_n, c_n) = module(mine[0], (mine[1], mine[2]), lengths=lengths)
    scalar_loss(out, h_n, c_n).backward()
    expected = paper_bnlstm(
        params, running, variant=module.variant, num_layers=module.num_layers,
        bidirectional=module.bidirectional, x=theirs[0], h0=theirs[1], c0=theirs[2], lengths=lengths,
        training=training, momentum=module.momentum, eps=module.eps,
    )
    scalar_loss(*expected).backward()
    for name, got, want in zip(("output", "h_n", "c_n"), (out, h_n, c_n), expected):
        torch.testing.assert_close(got.cpu(), want, **close, msg=lambda m: f"{name}: {m}")
    for name, buffer in module.named_buffers():
        torch.testing.assert_close(buffer.cpu(), running[name], **close, msg=lambda m: f"{name}: {m}")
    if not gradients:
        return out, h_n, c_n
    for name, got, want in zip(("input", "h_0", "c_0"), mine, theirs):
        torch.testing.assert_close(got.grad.cpu(), want.grad, **close, msg=lambda m: f"grad {name}: {m}")
    for name, parameter in module.named_parameters():
        torch.testing.assert_close(parameter.grad.cpu(), params[name].grad, **close,
                                   msg=lambda m: f"grad {name}: {m}")
    return out, h_n, c_n


def random_layer(variant, T=5, B=3, I=7, H=20, S=3, dtype=torch.float64, device="cpu", seed=0):
    """Random inputs of one layer function: x [T, B, I], h0, c0 [B, H], LayerParams (gammas
    near 1) and RunningStats with S slots, drawn in float64 and cast to `dtype` on `device`."""
    g = torch.Generator().manual_seed(seed)
    v = bnlstm_cuda.get_variant(variant)
    G = 4 * H
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    gamma = lambda size: r(size) * 0.5 + 1.0
    params = bnlstm_cuda.LayerParams(
        r(G, I) * 0.3, r(G, H) * 0.3, r(G),
        gamma(G) if v.input_statistics else None, gamma(G) if v.normalize_recurrent else None,
        gamma(H) if v.normalize_cell else None, r(H) if v.normalize_cell else None,
    )
    running = {}
    for part, features in (("ih", G), ("hh", G), ("c", H)):
        if v.normalizes(part):
            rows = v.num_slots(part, S)
            var = (torch.rand(rows, features, generator=g, dtype=torch.float64) + 0.5).to(device=device, dtype=dtype)
            running[part] = (r(rows, features) * 0.3, var)
    return r(T, B, I), r(B, H), r(B, H), params, running


def run_layer(fn, x, h0, c0, params, running, variant, **kwargs):
    """One layer function with fresh leaves: (LayerResult, grads of x, h0, c0 and every
    present parameter) after backward of scalar_loss."""
    leaves = [t.clone().requires_grad_(True) for t in (x, h0, c0)]
    leaf_params = bnlstm_cuda.LayerParams(*(None if p is None else p.clone().requires_grad_(True) for p in params))
    result = fn(*leaves, leaf_params, running, variant=bnlstm_cuda.get_variant(variant), eps=1e-5, **kwargs)
    scalar_loss(result.output, result.h_n, result.c_n).backward()
    grads = {"x": leaves[0].grad, "h0": leaves[1].grad, "c0": leaves[2].grad}
    grads.update({name: p.grad for name, p in zip(bnlstm_cuda.LayerParams._fields, leaf_params) if p is not None})
    return result, grads


def assert_layer_results_close(got, want, tol):
    """Two LayerResults: outputs, final states and batch statistics, within tol."""
    for name in ("output", "h_n", "c_n"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), **tol, msg=lambda m: f"{name}: {m}")
    assert sorted(got.batch_stats) == sorted(want.batch_stats)
    for part, stats in want.batch_stats.items():
        for field, value in stats._asdict().items():
            torch.testing.assert_close(getattr(got.batch_stats[part], field), value, **tol,
                                       msg=lambda m: f"batch_stats[{part}].{field}: {m}")


def assert_layer_matches_reference(fn, variant, lengths=None, *, tol, device="cpu", T=5, B=3, I=7, H=20, S=3,
                                   **kwargs):
    """Layer function `fn` against the reference on the same random float64 layer (NaN in the
    padding, S running-statistics slots): outputs, final states, batch statistics and every
    gradient, within tol."""
    x, h0, c0, params, running = random_layer(variant, T=T, B=B, I=I, H=H, S=S, device=device)
    if lengths is not None:
        lengths = lengths.to(device)
        # Padding may hold anything: NaN must reach no output, statistic or gradient.
        padded = torch.arange(T, device=device).unsqueeze(1) >= lengths.unsqueeze(0)
        x = x.masked_fill(padded.unsqueeze(-1), float("nan"))
    want, want_grads = run_layer(bnlstm_cuda.bnlstm_layer_reference, x, h0, c0, params, running, variant,
                                 lengths=lengths, **kwargs)
    got, got_grads = run_layer(fn, x, h0, c0, params, running, variant, lengths=lengths, **kwargs)
    assert_layer_results_close(got, want, tol)
    assert sorted(got_grads) == sorted(want_grads)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, **tol, msg=lambda m: f"grad {name}: {m}")


def op_arguments(variant, training, reverse, keep_reserve=True, T=4, B=3, I=2, H=5, S=3, dtype=torch.float64,
                 device="cpu"):
    """Arguments of bnlstm::layer_forward (ops.ForwardArguments, start_step and
    operand_dtype at their defaults) for a small random problem on `device`."""
    from bnlstm_cuda.ops import INPUT_STATISTICS, ForwardArguments

    v = bnlstm_cuda.get_variant(variant)
    r = lambda *shape: torch.randn(*shape, dtype=dtype, device=device)
    grad = lambda t: t.requires_grad_(keep_reserve)
    absent = lambda: torch.empty(0, dtype=dtype, device=device)
    G = 4 * H
    optional = lambda present, tensor: tensor if present else absent()
    S_ih = 1 if v.input_statistics == "sequence" else S
    running = lambda present, rows, features: (
        [r(rows, features), torch.rand(rows, features, dtype=dtype, device=device) + 0.5]
        if present and not training else [absent(), absent()]
    )
    return ForwardArguments(
        grad(r(T, B, I)), grad(r(B, H)), grad(r(B, H)), torch.tensor([T, 2, 1][:B], device=device),
        [grad(r(G, I)), grad(r(G, H)), grad(r(G)),
         optional(v.input_statistics, grad(r(G))), optional(v.normalize_recurrent, grad(r(G))),
         optional(v.normalize_cell, grad(r(H))), optional(v.normalize_cell, grad(r(H)))],
        [*running(v.input_statistics, S_ih, G), *running(v.normalize_recurrent, S, G),
         *running(v.normalize_cell, S, H)],
        INPUT_STATISTICS[v.input_statistics], v.normalize_recurrent, v.normalize_cell, training, 1e-5,
        reverse, keep_reserve,
    )


def op_backward_arguments(args, input_grad=True, operand_dtype=None, forward=None):
    """Arguments of bnlstm::layer_backward after layer_forward(*args) (run here without
    grad; `forward`: another operator with its schema), with random output gradients; the
    forward's result comes second."""
    with torch.no_grad():
        result = (forward or torch.ops.bnlstm.layer_forward)(*args)
    output, h_n, c_n, statistics, projection, reserve = result
    detached = lambda t: t.detach()
    backward = (
        torch.randn_like(output), torch.randn_like(h_n), torch.randn_like(c_n), args.x.detach(), args.lengths,
        args.h0.detach(), args.c0.detach(), output, [detached(p) for p in args.params], statistics, projection,
        reserve, args.input_statistics, args.normalize_recurrent, args.normalize_cell, args.training, args.eps,
        args.reverse, input_grad, operand_dtype,
    )
    return backward, result


def float32_errors(variant, backend, *, hidden_size, batch, lengths, device="cpu"):
    """How far float32 lands from float64 on one problem: a 2-layer bidirectional module
    (I=16, max_length=10, the paper's initialisation) on x [12, batch, 16], loss
    sum(output^2). Returns {name: (largest output error, largest input-gradient error)} for
    `backend` and for the reference, both in float32 from the float64 module's state."""
    make = lambda backend, dtype=torch.float32: bnlstm_cuda.BNLSTM(
        16, hidden_size, 2, bidirectional=True, max_length=10, variant=variant, backend=backend, dtype=dtype,
        device=device)
    wide = make("reference", torch.float64)
    state = wide.state_dict()
    narrow = {name: make(name) for name in ("reference", backend)}
    for module in narrow.values():
        module.load_state_dict({k: v.float() for k, v in state.items()})
    x = torch.randn(12, batch, 16, dtype=torch.float64, device=device)
    x32 = x.float().requires_grad_(True)
    x64 = x.clone().requires_grad_(True)
    expected = wide(x64, lengths=lengths)[0]
    expected.pow(2).sum().backward()
    errors = {}
    for name, module in narrow.items():
        x32.grad = None
        out = module(x32, lengths=lengths)[0]
        out.pow(2).sum().backward()
        errors[name] = ((out.double() - expected).abs().max().item(), (x32.grad.double() - x64.grad).abs().max().item())
    return errors


# Problems float32_error_ratios averages over. On one problem the ratio of two equally
# accurate float32 implementations' errors is noise: normalizations over 2 or 3 active
# sequences amplify rounding, and which implementation lands closer depends on MKL's kernel
# choice. Measured for the CPU backend over the reference (2-core AMD EPYC, AVX2; largest and
# RMS errors of outputs and input gradients; MKL_CBWR unset and COMPATIBLE, the same code):
# single ratios 0.05 to 13.8, geometric means of 8 problems 0.46 to 1.57, of 24 0.89 to 1.08.
# docs/ACCURACY.md has the details.
ERROR_RATIO_PROBLEMS = 24


def float32_error_ratios(variant, backend, *, problems=ERROR_RATIO_PROBLEMS, **problem):
    """The float32 accuracy rule's measure: over `problems` random problems of
    float32_errors(variant, backend, **problem), the geometric mean of backend's error over
    the float32 reference's, for (outputs, input gradients)."""
    tiny = 1e-30  # both exact: ratio 1
    logs = [0.0, 0.0]
    for _ in range(problems):
        errors = float32_errors(variant, backend, **problem)
        for which in (0, 1):
            logs[which] += math.log((errors[backend][which] + tiny) / (errors["reference"][which] + tiny))
    return tuple(math.exp(total / problems) for total in logs)


def assert_graph_step_matches_eager(backend, dtype=torch.float32):
    """Forward and backward of a training step of BNLSTM(backend=backend) captured in a CUDA
    graph (no host synchronisation inside the operators) give what eager execution gives:
    outputs, every gradient and the running statistics after one replay. Half-precision
    modules are built in float32 and cast (no bf16 QR for the orthogonal initialisation), and
    compared at their dtype's resolution."""
    torch.backends.cuda.matmul.allow_tf32 = False
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    module = make_module("cooijmans", input_size=8, hidden_size=40, num_layers=2, bidirectional=True,
                         max_length=6, backend=backend, dtype=torch.float32).cuda().to(dtype)
    x = torch.randn(6, 5, 8, device="cuda").to(dtype)
    weights = [torch.randn(shape, device="cuda") for shape in ((6, 5, 80), (4, 5, 40), (4, 5, 40))]

    def step():
        out, (h_n, c_n) = module(x)
        loss = sum((t * w).sum() for t, w in zip((out, h_n, c_n), weights))
        loss.backward()
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: the library, cuBLAS handles, the autograd graph
            module.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    eager = make_module("cooijmans", input_size=8, hidden_size=40, num_layers=2, bidirectional=True,
                        max_length=6, backend=backend, dtype=torch.float32).cuda().to(dtype)
    eager.load_state_dict(module.state_dict())

    graph = torch.cuda.CUDAGraph()
    module.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_out = step()
    graph.replay()
    torch.cuda.synchronize()

    module, captured = eager, module  # the eager run, from the state the capture started in
    want = step()
    torch.testing.assert_close(static_out, want, **tol)
    for (name, p), q in zip(eager.named_parameters(), captured.parameters()):
        torch.testing.assert_close(q.grad, p.grad, **tol, msg=lambda m: f"grad {name}: {m}")
    for name, buffer in eager.named_buffers():
        torch.testing.assert_close(getattr(captured, name), buffer, **tol, msg=lambda m: f"{name}: {m}")


def run_op_step_by_step(args, round_to):
    """bnlstm::layer_forward one step at a time (start_step = t), h_{t-1} and W_hh rounded to
    `round_to` and widened again before each call, operands otherwise in float32: what a
    recurrent product in `round_to` (the CUDA kernels' tensor cores, the CPU's bfloat16
    products) computes for the whole sequence, up to the order of its sums. Returns
    the full call's first nine results (output, h_n, c_n and the statistics)."""
    x, h, c, lengths = args.x, args.h0, args.c0, args.lengths
    params = list(args.params)
    params[1] = params[1].to(round_to).float()
    per_step = []
    for t in range(x.shape[0]):
        active = lengths > t
        step = args._replace(x=x[t:t + 1], h0=h.to(round_to).float(), c0=c, lengths=active.long(), params=params,
                             start_step=t, operand_dtype=None)
        result = torch.ops.bnlstm.layer_forward(*step)
        # Padded rows keep their state unrounded (the call above returns the rounded copy).
        h, c = torch.where(active[:, None], result[1], h), result[2]
        per_step.append(result)
    return (torch.cat([result[0] for result in per_step]), h, c,
            *(torch.cat([result[3][i] for result in per_step]) for i in range(6)))


BACKWARD_NAMES = ("grad_x", "grad_h0", "grad_c0", "grad_weight_ih", "grad_weight_hh", "grad_bias", "grad_gamma_ih",
                  "grad_gamma_hh", "grad_gamma_c", "grad_beta_c")


def assert_backward_within_rounding(got, want, visible, fraction=1e-2):
    """Two bnlstm::layer_backward results, reduced-precision products (got) against float32
    ones (want): every gradient's root-mean-square difference at most `fraction` of its own,
    and the gradients named in `visible` differ (the rounding shows)."""
    flat = lambda result: (*result[:3], *result[3])
    got, want = flat(got), flat(want)
    rms = lambda d: d.double().pow(2).mean().sqrt().item()
    for name, g, w in zip(BACKWARD_NAMES, got, want):
        assert g.shape == w.shape, name
        if w.numel():
            assert rms(g - w) <= fraction * rms(w) + 1e-7, (name, rms(g - w), rms(w))
    for name in visible:
        assert not torch.equal(got[BACKWARD_NAMES.index(name)], want[BACKWARD_NAMES.index(name)]), name
