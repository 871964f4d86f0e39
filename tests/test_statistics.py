"""Running statistics: the update rule by hand, the max_length rule, calibration."""
import pytest
import torch

from bnlstm_cuda import BNLSTM, BatchStats, update_running_stats
from bnlstm_cuda.ops import ensure_loaded, update_running_stats_compiled, update_running_stats_parts_compiled
from bnlstm_cuda.statistics import update_running_stats_parts
from helpers import make_module


def identity_input_module(max_length, momentum=0.1):
    """laurent_step with H=1 and W_ih = I: the ih statistics are those of the input itself."""
    module = BNLSTM(4, 1, max_length=max_length, variant="laurent_step", momentum=momentum, dtype=torch.float64)
    with torch.no_grad():
        module.weight_ih_l0.copy_(torch.eye(4, dtype=torch.float64))
    return module


def test_running_statistics_by_hand():
    module = identity_input_module(max_length=2, momentum=0.25)
    batches = [torch.randn(3, 5, 4, dtype=torch.float64) for _ in range(2)]
    mean = torch.zeros(2, 4, dtype=torch.float64)
    var = torch.ones(2, 4, dtype=torch.float64)
    for x in batches:
        module(x)
        # Step 0 updates slot 0; steps 1 and 2 both update slot 1, in that order.
        for t, slot in ((0, 0), (1, 1), (2, 1)):
            mean[slot] = 0.75 * mean[slot] + 0.25 * x[t].mean(0)
            var[slot] = 0.75 * var[slot] + 0.25 * x[t].var(0, unbiased=True)
    torch.testing.assert_close(module.running_mean_ih_l0, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(module.running_var_ih_l0, var, rtol=1e-12, atol=1e-12)


def test_steps_with_fewer_than_two_active_sequences_do_not_update():
    module = identity_input_module(max_length=5)
    x = torch.randn(4, 3, 4, dtype=torch.float64)
    module(x, lengths=[4, 2, 1])  # steps 2 and 3 have one active sequence
    assert torch.all(module.running_mean_ih_l0[2:] == 0)
    assert torch.all(module.running_var_ih_l0[2:] == 1)
    torch.testing.assert_close(module.running_mean_ih_l0[1], 0.1 * x[1, :2].mean(0))


# The vectorised fold (any device) and the C++ one that modules on the fused CPU backend use.
UPDATES = {"vectorised": update_running_stats, "compiled": update_running_stats_compiled}


@pytest.mark.parametrize("num_slots, num_steps", [(1, 1), (1, 5), (3, 2), (3, 3), (3, 8)])
@pytest.mark.parametrize("start_step", [0, 1, 4])
@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize("poisoned", [False, True], ids=["finite", "inf-nan"])
@pytest.mark.parametrize("features, dtype", [(6, torch.float64), (21, torch.float64), (21, torch.float32)])
def test_update_equals_sequential_rule(num_slots, num_steps, start_step, update, poisoned, features, dtype):
    """The sequential rule, feature by feature: steps with fewer than 2 rows, and features
    whose batch mean or variance is not finite, leave the running value alone. 21 features
    are whole vectors and a shorter rest, in float32 and float64, for the C++ fold's lanes."""
    momentum = 0.3
    stats = BatchStats(
        torch.randn(num_steps, features, dtype=dtype),
        torch.rand(num_steps, features, dtype=dtype),
        torch.tensor([5.0, 1.0, 3.0, 0.0, 2.0, 4.0, 1.0, 7.0], dtype=dtype)[:num_steps],
    )
    if poisoned:
        # The first step's only one in the last lanes: the report must cover every vector.
        stats.mean[0, features - 1] = float("nan")
        stats.var[-1, 2] = float("inf")
        stats.var[num_steps // 2, features - 2] = float("nan")
        stats.mean[num_steps // 2, 1] = float("-inf")
        stats.mean[-1, features // 2] = float("inf")
    running_mean = torch.randn(num_slots, features, dtype=dtype)
    running_var = torch.rand(num_slots, features, dtype=dtype)
    expected_mean, expected_var = running_mean.clone(), running_var.clone()
    first_skipped = -1
    for t in range(num_steps):
        n = stats.count[t]
        if n < 2:
            continue
        slot = min(start_step + t, num_slots - 1)
        for f in range(features):
            mean, var = stats.mean[t, f], stats.var[t, f] * n / (n - 1)
            if not (torch.isfinite(mean) and torch.isfinite(var)):
                first_skipped = t if first_skipped < 0 else first_skipped
                continue
            expected_mean[slot, f] = (1 - momentum) * expected_mean[slot, f] + momentum * mean
            expected_var[slot, f] = (1 - momentum) * expected_var[slot, f] + momentum * var
    skipped = UPDATES[update](running_mean, running_var, stats, momentum, start_step)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(running_mean, expected_mean, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(running_var, expected_var, rtol=tolerance, atol=tolerance)
    # The C++ fold reports the first step it skipped a feature of; the vectorised one does not know.
    if update == "compiled":
        assert skipped.dtype == torch.int64 and int(skipped) == first_skipped
    else:
        assert skipped is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_update_matches_vectorised_in_running_dtype(dtype):
    """float32 running statistics fed float64 batch statistics (and the reverse) update alike."""
    stats = BatchStats(torch.randn(9, 5, dtype=torch.float64), torch.rand(9, 5, dtype=torch.float64),
                       torch.tensor([3.0, 1.0, 4.0, 2.0, 0.0, 5.0, 6.0, 2.0, 3.0]))
    running = (torch.randn(4, 5, dtype=dtype), torch.rand(4, 5, dtype=dtype))
    vectorised = tuple(t.clone() for t in running)
    update_running_stats_compiled(*running, stats, 0.2, 1)
    update_running_stats(*vectorised, stats, 0.2, 1)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6
    for got, expected in zip(running, vectorised):
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("count_dtype", [torch.int64, torch.float32, torch.float64, torch.bfloat16])
def test_compiled_update_reads_counts_of_any_dtype(count_dtype):
    """The C++ fold reads float32 and float64 counts as they are and converts the others."""
    stats = BatchStats(torch.randn(4, 5), torch.rand(4, 5), torch.tensor([3, 1, 4, 2]))
    expected = (torch.zeros(3, 5), torch.ones(3, 5))
    update_running_stats(*expected, stats, 0.2, 1)
    running = (torch.zeros(3, 5), torch.ones(3, 5))
    update_running_stats_compiled(*running, stats._replace(count=stats.count.to(count_dtype)), 0.2, 1)
    for got, want in zip(running, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_opcheck_update_running_stats():
    ensure_loaded()
    args = (torch.randn(3, 4), torch.rand(3, 4), torch.randn(5, 4), torch.rand(5, 4),
            torch.tensor([3.0, 2.0, 1.0, 4.0, 2.0]), 0.1, 1)
    torch.library.opcheck(torch.ops.bnlstm.update_running_stats.default, args)


def test_compiled_update_names_bad_shapes():
    ensure_loaded()
    with pytest.raises(RuntimeError, match=r"count must be \[5\]"):
        torch.ops.bnlstm.update_running_stats(torch.zeros(3, 4), torch.ones(3, 4), torch.zeros(5, 4),
                                              torch.ones(5, 4), torch.ones(4), 0.1, 0)
    with pytest.raises(RuntimeError, match=r"mean must be \[N, 4\]"):
        torch.ops.bnlstm.update_running_stats(torch.zeros(3, 4), torch.ones(3, 4), torch.zeros(5, 3),
                                              torch.ones(5, 3), torch.ones(5), 0.1, 0)


def layer_direction_statistics(poisoned_part=None):
    """Running and batch statistics of one cooijmans layer-direction with sequence-wise input
    statistics (G = 8, H = 2, 4 slots, 6 steps): parts of different widths and step counts.
    poisoned_part: a part whose steps 3 and 5 hold a NaN and an inf."""
    counts = torch.tensor([4.0, 4.0, 1.0, 3.0, 2.0, 0.0], dtype=torch.float64)
    shapes = {"ih": (1, 8), "hh": (6, 8), "c": (6, 2)}
    batch = {}
    for part, (steps, features) in shapes.items():
        mean = torch.randn(steps, features, dtype=torch.float64)
        var = torch.rand(steps, features, dtype=torch.float64)
        if part == poisoned_part:
            mean[3, 1] = float("nan")
            var[5 if steps > 5 else 0, 0] = float("inf")
        batch[part] = BatchStats(mean, var, counts.sum().reshape(1) if part == "ih" else counts)
    running = {part: (torch.randn(4, f, dtype=torch.float64), torch.rand(4, f, dtype=torch.float64))
               for part, (_, f) in shapes.items()}
    return running, batch


@pytest.mark.parametrize("start_step", [0, 2])
def test_one_call_folds_every_part_as_one_call_per_part(start_step):
    """update_running_stats_parts (the C++ operator and the loop over the vectorised fold)
    equals the fold part by part, and the operator reports each part's first non-finite step."""
    running, batch = layer_direction_statistics(poisoned_part="hh")
    expected = {part: tuple(t.clone() for t in pair) for part, pair in running.items()}
    vectorised = {part: tuple(t.clone() for t in pair) for part, pair in running.items()}
    for part, stats in batch.items():
        update_running_stats(*expected[part], stats, 0.2, start_step)
    skipped = update_running_stats_parts_compiled(running, batch, 0.2, start_step)
    assert update_running_stats_parts(vectorised, batch, 0.2, start_step) is None
    for part in batch:
        for got, other, want in zip(running[part], vectorised[part], expected[part]):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(other, want, rtol=0, atol=0)
    assert skipped.dtype == torch.int64 and skipped.tolist() == [-1, 3, -1]  # step 5 has no count


@pytest.mark.parametrize("fold", [update_running_stats_parts_compiled, update_running_stats_parts])
def test_folding_no_part_is_a_no_op(fold):
    """Variant "none" normalizes nothing: its layer-directions have no statistics to fold."""
    skipped = fold({}, {}, 0.1, 0)
    assert skipped is None or skipped.tolist() == []


def test_opcheck_update_running_stats_parts():
    ensure_loaded()
    running, batch = layer_direction_statistics()
    stats = list(batch.values())
    args = ([m for m, _ in running.values()], [v for _, v in running.values()], [s.mean for s in stats],
            [s.var for s in stats], [s.count for s in stats], 0.1, 1)
    torch.library.opcheck(torch.ops.bnlstm.update_running_stats_parts.default, args)


def test_update_running_stats_parts_names_lists_of_different_lengths():
    ensure_loaded()
    tensors = [torch.zeros(3, 4)]
    with pytest.raises(RuntimeError, match="lists of the same length .* got 1, 1, 1, 1 and 2"):
        torch.ops.bnlstm.update_running_stats_parts(tensors, tensors, tensors, tensors, [torch.ones(3)] * 2, 0.1, 0)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_warning_names_the_part_whose_statistics_are_not_finite(backend):
    """Whether the fold reports the non-finite steps (the C++ one) or the module scans for
    them (the vectorised one), the warning names the part and the step: here the cell's
    statistics, at step start_step + 3."""
    from bnlstm_cuda import backends

    module = BNLSTM(3, 2, max_length=4, backend=backend, dtype=torch.float64)
    _, batch = layer_direction_statistics(poisoned_part="c")
    with pytest.warns(UserWarning, match=r"layer 0: the batch statistics of step 5 \(c\) are not finite") as record:
        module._fold(backends.REGISTRY[backend], "_l0", batch, start_step=2)
    assert len(record) == 1  # one warning, for the first part that had a non-finite step


@pytest.mark.parametrize("update", UPDATES)
def test_skipped_step_holding_nan_does_not_touch_the_last_slot(update):
    stats = BatchStats(
        torch.tensor([[1.0], [float("nan")], [3.0]]), torch.tensor([[1.0], [float("nan")], [1.0]]),
        torch.tensor([4.0, 1.0, 4.0]),
    )
    running_mean, running_var = torch.zeros(1, 1), torch.ones(1, 1)
    UPDATES[update](running_mean, running_var, stats, 0.5)
    assert torch.isfinite(running_mean).all() and torch.isfinite(running_var).all()


@pytest.mark.parametrize("variant", ["cooijmans", "laurent_step"])
def test_eval_past_max_length_uses_the_last_slot(variant):
    """A module with max_length=3 gives, at every step, the output of one with max_length=7
    whose slots 3..6 repeat slot 2."""
    short = make_module(variant, input_size=3, hidden_size=4, max_length=3).eval()
    long = BNLSTM(3, 4, max_length=7, variant=variant, dtype=torch.float64).eval()
    state = short.state_dict()
    for name, tensor in list(state.items()):
        if name.startswith("running_"):
            state[name] = torch.cat([tensor, tensor[-1:].expand(4, -1)])
    long.load_state_dict(state)
    x = torch.randn(7, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(short(x)[0], long(x)[0], rtol=0, atol=0)
    # And the slots matter: another value in slot 2 of the short module changes steps 2..6.
    with torch.no_grad():
        short.running_mean_ih_l0[2] += 1.0
    changed = (short(x)[0] - long(x)[0]).abs().amax(dim=(1, 2))
    assert torch.all(changed[:2] == 0) and torch.all(changed[2:] > 0)


def test_calibration_gives_population_statistics_of_each_slot():
    module = identity_input_module(max_length=2)
    batches = [torch.randn(3, 4, 4, dtype=torch.float64) + i for i in range(3)]
    lengths = [[3, 3, 2, 1], [3, 1, 1, 2], [2, 3, 3, 3]]
    module.train()
    module.calibrate(list(zip(batches, lengths)))
    assert module.training
    samples = {0: [], 1: []}
    for x, lens in zip(batches, lengths):
        for b, n in enumerate(lens):
            for t in range(n):
                samples[min(t, 1)].append(x[t, b])
    for slot, rows in samples.items():
        rows = torch.stack(rows)
        torch.testing.assert_close(module.running_mean_ih_l0[slot], rows.mean(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(module.running_var_ih_l0[slot], rows.var(0), rtol=1e-10, atol=1e-12)


def test_calibration_of_a_stack_matches_running_average_of_one_repeated_batch():
    """Calibrating on a single batch gives that batch's statistics: the limit the running
    average of the same batch converges to with momentum 1. Also leaves weights alone."""
    module = make_module("cooijmans", input_size=3, hidden_size=4, num_layers=2, bidirectional=True, max_length=6)
    other = make_module("cooijmans", input_size=3, hidden_size=4, num_layers=2, bidirectional=True, max_length=6, momentum=1.0)
    other.load_state_dict(module.state_dict())
    x = torch.randn(5, 6, 3, dtype=torch.float64)
    module.calibrate([x])
    other.train()(x)
    for name, buffer in module.named_buffers():
        # Slot 5 is never reached by T=5 and keeps its value in both.
        torch.testing.assert_close(buffer, getattr(other, name), rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_calibration_needs_batches():
    with pytest.raises(ValueError, match="at least one batch"):
        BNLSTM(3, 4).calibrate([])
    with pytest.raises(TypeError, match="calibration batch"):
        BNLSTM(3, 4).calibrate([1.0])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("bad", [9.97e36, float("nan")], ids=["fill-value", "nan"])
def test_one_bad_batch_does_not_poison_evaluation(backend, bad):
    """One value of a netCDF fill value (or a NaN) in one training batch: its non-finite batch
    statistics are not folded (one warning naming the layer and step), the running statistics
    stay finite, and after clean batches evaluation depends on every step's input."""
    torch.manual_seed(0)
    module = BNLSTM(3, 5, max_length=6, backend=backend)
    x = torch.randn(6, 4, 3)
    x[2, 1, 0] = bad
    with pytest.warns(UserWarning, match="layer 0: the batch statistics of step 2 .* not finite"):
        module(x)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per module
        module(x)
        for _ in range(5):
            module(torch.randn(6, 4, 3))
    for name, buffer in module.named_buffers():
        assert torch.isfinite(buffer).all(), name
    module.eval()
    clean = torch.randn(6, 2, 3)
    out = module(clean)[0]
    assert torch.isfinite(out).all()
    changed = clean.clone()
    changed[2] += 1.0
    assert not torch.allclose(module(changed)[0][2], out[2])  # step 2's input still counts
