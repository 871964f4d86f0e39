"""Triton kernels of the BN-LSTM layer (docs/SEMANTICS.md); host code in triton_layer.py.

Three kernels, each the fused form of one part of the reference (reference.py):

    bnlstm_input_bn_kernel   BN(W_ih x_t; gamma_ih, 0) + bias for every step at once
    bnlstm_fwd_step_kernel   one step: W_hh h_{t-1} (tl.dot), its batch norm, gates, cell,
                             cell batch norm, h_t
    bnlstm_bwd_step_kernel   one step backwards: through h_t, the cell norm, the gates and
                             both gate-side norms, up to the gradient of W_hh h_{t-1}

and a plain GEMM, tf32_matmul_kernel, for the backward pass's products over all steps when
the inputs were float16/bfloat16 (TF32 products whatever torch's allow_tf32 says).

A step program owns BLOCK_H hidden units with their four gate columns and the whole batch
(looping over batch tiles of BLOCK_B rows), so batch statistics are reduced inside one
program and a step needs no grid-wide synchronisation. Values pass between the loops over
batch tiles through global memory written and read by the same program, with a barrier
between the loops (a block-wide barrier also orders global memory among its threads).

Statistics and the cell state are kept in the compute dtype (float32, or float64 for
float64 inputs): every *_ptr documented "compute dtype" has it, and the kernels read it off
those pointers. Matrix operands (h_{t-1}, W_hh) are in the weight's dtype, accumulated in
the compute dtype.

Batch statistics are merged tile by tile with Chan et al.'s pairwise update of (count, mean,
M2), which stays as accurate as a two-pass centred variance; with one tile it is exactly the
two-pass formula of statistics.masked_batch_stats.
"""
from __future__ import annotations

import triton
import triton.language as tl


# Reserve layout of the Triton backend, per (t, b): [zh (4H, if the recurrence is
# normalized) | activated gates i, f, g, o (4H) | c_t (H)]. zh is W_hh h_{t-1} as computed,
# not normalized: written once and never overwritten, so no program reads a value another
# thread of it may still be writing; the backward pass normalizes it with the step's
# statistics.
def reserve_offsets(hidden: int, normalize_recurrent: bool):
    """(zh offset or -1, gates offset, c_new offset, width) of the reserve's columns."""
    zh = 0 if normalize_recurrent else -1
    gates = 4 * hidden if normalize_recurrent else 0
    return zh, gates, gates + 4 * hidden, gates + 5 * hidden


@triton.jit
def _tanh(x):
    # tl has no tanh (and the interpreter no libdevice), and 2 sigmoid(2x) - 1 cancels near
    # 0, where the gates of a gamma = 0.1 network live. Instead
    #     tanh|x| = -expm1(-2|x|) / (2 + expm1(-2|x|)),
    # with expm1(y) = (u - 1) y / log(u), u = exp(y) (Kahan), accurate to a few ulps.
    y = -2.0 * tl.abs(x)
    u = tl.exp(y)
    safe_u = tl.where((u == 1.0) | (u == 0.0), 0.5, u)  # keeps log away from 0 and 1
    expm1 = tl.where(u == 1.0, y, tl.where(u == 0.0, -1.0, (u - 1.0) * y / tl.log(safe_u)))
    magnitude = -expm1 / (2.0 + expm1)
    return tl.where(x < 0.0, -magnitude, magnitude)


@triton.jit
def _tile_moments(z, keep):
    """Count, mean and M2 (sum of squared deviations) of z [BLOCK_B, N] over the rows where
    keep [BLOCK_B, 1] holds. Padded rows are excluded with tl.where: they may hold NaN."""
    count = tl.sum(tl.where(keep, 1.0, 0.0).to(z.dtype) + tl.zeros_like(z), axis=0)  # [N], all equal
    mean = tl.sum(tl.where(keep, z, 0.0), axis=0) / tl.maximum(count, 1.0)
    centred = tl.where(keep, z - mean[None, :], 0.0)
    return count, mean, tl.sum(centred * centred, axis=0)


@triton.jit
def _merge_moments(count, mean, m2, tile_count, tile_mean, tile_m2):
    """Chan et al.'s pairwise merge of (count, mean, M2) of two disjoint sets of rows."""
    total = count + tile_count
    delta = tile_mean - mean
    frac = tile_count / tl.maximum(total, 1.0)
    return total, mean + delta * frac, m2 + tile_m2 + delta * delta * count * frac


@triton.jit
def _recurrent_dot(h_ptr, w_ptr, rows, row_ok, cols, col_ok, H, acc_dtype: tl.constexpr,
                   BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """The four gate columns of W_hh h_{t-1} for rows x cols: ([BLOCK_B, BLOCK_H],) * 4, in
    acc_dtype (the compute dtype).

    h_ptr: [B, H] h_{t-1} in W_hh's dtype; w_ptr: [4H, H], gate g's rows start at g * H.
    DOT_UPCAST: multiply the (already rounded) operands in the compute dtype; the host sets
    it for bfloat16 under the interpreter, whose bfloat16 tl.dot is wrong (Triton 3.9).
    """
    # out_dtype: Triton 3.6's tl.dot asserts the accumulator is float32 unless told otherwise
    # (float64 layers); 3.9 infers it.
    acc_i = tl.zeros([BLOCK_B, BLOCK_H], dtype=acc_dtype)
    acc_f = tl.zeros([BLOCK_B, BLOCK_H], dtype=acc_dtype)
    acc_g = tl.zeros([BLOCK_B, BLOCK_H], dtype=acc_dtype)
    acc_o = tl.zeros([BLOCK_B, BLOCK_H], dtype=acc_dtype)
    gate_stride = H * H
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        a = tl.load(h_ptr + rows[:, None] * H + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        # W_hh[g * H + col, k] as a [BLOCK_K, BLOCK_H] tile: the B operand of h @ W^T.
        w_tile = w_ptr + cols[None, :] * H + ks[:, None]
        w_ok = k_ok[:, None] & col_ok[None, :]
        w_i = tl.load(w_tile, mask=w_ok, other=0.0)
        w_f = tl.load(w_tile + gate_stride, mask=w_ok, other=0.0)
        w_g = tl.load(w_tile + 2 * gate_stride, mask=w_ok, other=0.0)
        w_o = tl.load(w_tile + 3 * gate_stride, mask=w_ok, other=0.0)
        if DOT_UPCAST:
            a = a.to(acc_dtype)
            w_i, w_f, w_g, w_o = w_i.to(acc_dtype), w_f.to(acc_dtype), w_g.to(acc_dtype), w_o.to(acc_dtype)
        acc_i = tl.dot(a, w_i, acc_i, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
        acc_f = tl.dot(a, w_f, acc_f, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
        acc_g = tl.dot(a, w_g, acc_g, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
        acc_o = tl.dot(a, w_o, acc_o, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def bnlstm_input_bn_kernel(
    wx_ptr,      # [N, R, F] W_ih x (x's dtype), zero at padded rows
    active_ptr,  # [N, R] int8, 1 for active rows
    stats_in_mean_ptr, stats_in_var_ptr,  # [S, F] statistics read when not COMPUTE_STATS
    mean_ptr, var_ptr,  # [N, F] compute dtype: the statistics each step used (written)
    gamma_ptr,   # [F]
    bias_ptr,    # [F] (unused without HAS_BIAS)
    out_ptr,     # [N, R, F] compute dtype: gamma * (wx - mean) * rstd + bias (if APPLY)
    R, F, start_step, num_slots, eps: tl.float64,
    COMPUTE_STATS: tl.constexpr, APPLY: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """Batch norm of the input projection, BN(W_ih x_t; gamma_ih, 0) + bias, over all steps.

    Grid (N, cdiv(F, BLOCK_F)): program (n, fb) owns features fb of step n and loops over
    the R rows in tiles of BLOCK_R. COMPUTE_STATS: mean and biased variance over the active
    rows (step-wise training: N = T, R = B; sequence-wise: N = 1, R = T * B). Otherwise the
    statistics of slot min(start_step + n, num_slots - 1) are read (evaluation; and the
    sequence statistics, num_slots = 1). The statistics used are written to mean/var row n.
    """
    n = tl.program_id(0)
    features = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = features < F
    compute = mean_ptr.dtype.element_ty
    eps = tl.full([], eps, compute)  # annotated float64: the JIT types a plain Python float fp32
    wx_ptr += n * R * F
    active_ptr += n * R
    out_ptr += n * R * F
    if COMPUTE_STATS:
        count = tl.zeros([BLOCK_F], dtype=compute)
        mean = tl.zeros([BLOCK_F], dtype=compute)
        m2 = tl.zeros([BLOCK_F], dtype=compute)
        for r0 in range(0, R, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            row_ok = rows < R
            keep = (tl.load(active_ptr + rows, mask=row_ok, other=0) != 0)[:, None]
            z = tl.load(wx_ptr + rows[:, None] * F + features[None, :], mask=row_ok[:, None] & f_ok[None, :],
                        other=0.0).to(compute)
            tile_count, tile_mean, tile_m2 = _tile_moments(z, keep)
            count, mean, m2 = _merge_moments(count, mean, m2, tile_count, tile_mean, tile_m2)
        var = m2 / tl.maximum(count, 1.0)
    else:
        slot = tl.minimum(start_step + n, num_slots - 1)
        mean = tl.load(stats_in_mean_ptr + slot * F + features, mask=f_ok, other=0.0).to(compute)
        var = tl.load(stats_in_var_ptr + slot * F + features, mask=f_ok, other=1.0).to(compute)
    tl.store(mean_ptr + n * F + features, mean, mask=f_ok)
    tl.store(var_ptr + n * F + features, var, mask=f_ok)
    if APPLY:
        scale = tl.load(gamma_ptr + features, mask=f_ok, other=0.0).to(compute) / tl.sqrt(var + eps)
        shift = -mean * scale
        if HAS_BIAS:
            shift += tl.load(bias_ptr + features, mask=f_ok, other=0.0).to(compute)
        for r0 in range(0, R, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            ok = (rows < R)[:, None] & f_ok[None, :]
            offsets = rows[:, None] * F + features[None, :]
            z = tl.load(wx_ptr + offsets, mask=ok, other=0.0).to(compute)
            tl.store(out_ptr + offsets, z * scale[None, :] + shift[None, :], mask=ok)


@triton.jit
def _load_gate_columns(ptr, cols, col_ok, H, other):
    """Four [BLOCK_H] vectors: ptr[g * H + cols] for the gates i, f, g, o."""
    return (tl.load(ptr + cols, mask=col_ok, other=other), tl.load(ptr + H + cols, mask=col_ok, other=other),
            tl.load(ptr + 2 * H + cols, mask=col_ok, other=other),
            tl.load(ptr + 3 * H + cols, mask=col_ok, other=other))


@triton.jit
def _finish_step(c_new, o, keep, rows, row_ok, cols, col_ok, H,
                 cell_mean, cell_rstd, gamma_c, beta_c,
                 h_prev_ptr, h_next_ptr, h_op_next_ptr, c_ptr, out_ptr, NORM_CELL: tl.constexpr,
                 H_OPERAND: tl.constexpr):
    """h_t = o * tanh(BN(c_t; gamma_c, beta_c)); write h_t, c_t where the row is active
    (padded rows keep their state and output 0), and with H_OPERAND h_t in W_hh's dtype."""
    seen = c_new
    if NORM_CELL:
        seen = (c_new - cell_mean[None, :]) * (cell_rstd * gamma_c)[None, :] + beta_c[None, :]
    h = o * _tanh(seen)
    offsets = rows[:, None] * H + cols[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    h_prev = tl.load(h_prev_ptr + offsets, mask=ok, other=0.0)
    h_next = tl.where(keep, h, h_prev)
    tl.store(h_next_ptr + offsets, h_next, mask=ok)
    if H_OPERAND:
        tl.store(h_op_next_ptr + offsets, h_next.to(h_op_next_ptr.dtype.element_ty), mask=ok)
    tl.store(c_ptr + offsets, c_new, mask=ok & keep)
    tl.store(out_ptr + offsets, tl.where(keep, h, 0.0), mask=ok)


# `step` and `stat_row` change at every launch: specialising them (== 1, % 16 == 0) would
# only compile three copies of the kernel.
@triton.jit(do_not_specialize=["step", "stat_row"])
def bnlstm_fwd_step_kernel(
    h_prev_ptr,   # [B, H] compute dtype: h_{t-1}
    h_next_ptr,   # [B, H] compute dtype: h_t (h_{t-1} on padded rows)
    h_op_prev_ptr,  # [B, H] W_hh's dtype: h_{t-1} as the GEMM's operand (h_prev_ptr unless H_OPERAND)
    h_op_next_ptr,  # [B, H] W_hh's dtype: h_t rounded to it, written if H_OPERAND
    c_ptr,        # [B, H] compute dtype: c_{t-1} in, c_t out (padded rows unchanged)
    out_ptr,      # [T, B, H] compute dtype: outputs; step `step`'s written (0 on padded rows)
    xin_ptr,      # [T, B, 4H] compute dtype: BN(W_ih x_t) + bias
    w_hh_ptr,     # [4H, H] matrix operand dtype
    active_ptr,   # [T, B] int8
    gamma_hh_ptr,              # [4H]
    gamma_c_ptr, beta_c_ptr,   # [H]
    mean_hh_ptr, var_hh_ptr,   # [*, 4H] compute dtype, row stat_row: written (TRAINING) or read
    mean_c_ptr, var_c_ptr,     # [*, H] likewise
    reserve_ptr,  # [T, B, RES_W] compute dtype: the reserve (see reserve_offsets), if KEEP or in-step statistics
    step, stat_row, B, H, RES_W, ZH_OFF, GATES_OFF, CNEW_OFF, eps: tl.float64,
    NORM_REC: tl.constexpr, NORM_CELL: tl.constexpr, TRAINING: tl.constexpr, KEEP: tl.constexpr,
    TILES: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, H_OPERAND: tl.constexpr,
):
    """One forward step (docs/SEMANTICS.md):

        gates = xin + BN(W_hh h_{t-1}; gamma_hh, 0);  i, f, g, o = split(gates)
        c_t = sigmoid(f) c_{t-1} + sigmoid(i) tanh(g);  h_t = sigmoid(o) tanh(BN(c_t; gamma_c, beta_c))

    Grid (cdiv(H, BLOCK_H), batch programs): program (p, q) owns hidden units
    [p * BLOCK_H, (p + 1) * BLOCK_H) and the batch tiles q * TILES ... q * TILES + TILES - 1.
    With batch statistics in the step (TRAINING and a normalized recurrence or cell) one
    program takes the whole batch (TILES = cdiv(B, BLOCK_B)) and up to three loops run:
    (1) W_hh h_{t-1} to the reserve and its statistics, (2) gates and c_t to the reserve and
    the cell statistics, (3) h_t from the reserve. Otherwise each tile is one straight pass
    in registers. KEEP: the reserve is written (the backward pass reads it). H_OPERAND (W_hh
    narrower than the compute dtype): h_t is also written in W_hh's dtype, which the next
    step's GEMM reads, half the bytes of the compute-dtype h every program streams from L2.
    The [T, ...] tensors are passed whole and indexed by `step` here, which saves the host a
    view per tensor and step (docs/TRITON.md, "Host time a step").
    """
    compute = c_ptr.dtype.element_ty
    eps = tl.full([], eps, compute)  # annotated float64: the JIT types a plain Python float fp32
    step_rows = step.to(tl.int64) * B  # first row of step `step` in the [T, B, *] tensors
    out_ptr += step_rows * H
    xin_ptr += step_rows * (4 * H)
    active_ptr += step_rows
    reserve_ptr += step_rows * RES_W
    cols = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    first_tile = tl.program_id(1) * TILES
    G = 4 * H
    REC_STATS: tl.constexpr = NORM_REC and TRAINING
    CELL_STATS: tl.constexpr = NORM_CELL and TRAINING
    zero = tl.zeros([BLOCK_H], dtype=compute)

    gamma_i, gamma_f, gamma_g, gamma_o = zero, zero, zero, zero
    mean_i, mean_f, mean_g, mean_o = zero, zero, zero, zero
    rstd_i, rstd_f, rstd_g, rstd_o = zero, zero, zero, zero
    if NORM_REC:
        gamma_i, gamma_f, gamma_g, gamma_o = _load_gate_columns(gamma_hh_ptr, cols, col_ok, H, 0.0)
        gamma_i, gamma_f = gamma_i.to(compute), gamma_f.to(compute)
        gamma_g, gamma_o = gamma_g.to(compute), gamma_o.to(compute)
    stats_hh = stat_row * G
    if REC_STATS:
        # Loop 1: W_hh h_{t-1} of every tile, kept raw in the reserve; its statistics.
        count = tl.zeros([BLOCK_H], dtype=compute)
        m2_i, m2_f, m2_g, m2_o = zero, zero, zero, zero
        for tile in range(TILES):
            rows = (first_tile + tile) * BLOCK_B + tl.arange(0, BLOCK_B)
            row_ok = rows < B
            keep = (tl.load(active_ptr + rows, mask=row_ok, other=0) != 0)[:, None]
            z_i, z_f, z_g, z_o = _recurrent_dot(h_op_prev_ptr, w_hh_ptr, rows, row_ok, cols, col_ok, H, compute,
                                                BLOCK_B, BLOCK_H, BLOCK_K, DOT_PRECISION, DOT_UPCAST)
            zh = reserve_ptr + rows[:, None] * RES_W + ZH_OFF + cols[None, :]
            ok = row_ok[:, None] & col_ok[None, :]
            tl.store(zh, z_i, mask=ok)
            tl.store(zh + H, z_f, mask=ok)
            tl.store(zh + 2 * H, z_g, mask=ok)
            tl.store(zh + 3 * H, z_o, mask=ok)
            n, m, s = _tile_moments(z_i, keep)
            total, mean_i, m2_i = _merge_moments(count, mean_i, m2_i, n, m, s)
            n, m, s = _tile_moments(z_f, keep)
            _, mean_f, m2_f = _merge_moments(count, mean_f, m2_f, n, m, s)
            n, m, s = _tile_moments(z_g, keep)
            _, mean_g, m2_g = _merge_moments(count, mean_g, m2_g, n, m, s)
            n, m, s = _tile_moments(z_o, keep)
            _, mean_o, m2_o = _merge_moments(count, mean_o, m2_o, n, m, s)
            count = total
        divisor = tl.maximum(count, 1.0)
        var_i, var_f, var_g, var_o = m2_i / divisor, m2_f / divisor, m2_g / divisor, m2_o / divisor
        tl.store(mean_hh_ptr + stats_hh + cols, mean_i, mask=col_ok)
        tl.store(mean_hh_ptr + stats_hh + H + cols, mean_f, mask=col_ok)
        tl.store(mean_hh_ptr + stats_hh + 2 * H + cols, mean_g, mask=col_ok)
        tl.store(mean_hh_ptr + stats_hh + 3 * H + cols, mean_o, mask=col_ok)
        tl.store(var_hh_ptr + stats_hh + cols, var_i, mask=col_ok)
        tl.store(var_hh_ptr + stats_hh + H + cols, var_f, mask=col_ok)
        tl.store(var_hh_ptr + stats_hh + 2 * H + cols, var_g, mask=col_ok)
        tl.store(var_hh_ptr + stats_hh + 3 * H + cols, var_o, mask=col_ok)
        rstd_i, rstd_f = 1.0 / tl.sqrt(var_i + eps), 1.0 / tl.sqrt(var_f + eps)
        rstd_g, rstd_o = 1.0 / tl.sqrt(var_g + eps), 1.0 / tl.sqrt(var_o + eps)
        tl.debug_barrier()
    elif NORM_REC:
        mean_i, mean_f, mean_g, mean_o = _load_gate_columns(mean_hh_ptr + stats_hh, cols, col_ok, H, 0.0)
        var_i, var_f, var_g, var_o = _load_gate_columns(var_hh_ptr + stats_hh, cols, col_ok, H, 1.0)
        mean_i, mean_f = mean_i.to(compute), mean_f.to(compute)
        mean_g, mean_o = mean_g.to(compute), mean_o.to(compute)
        rstd_i, rstd_f = 1.0 / tl.sqrt(var_i.to(compute) + eps), 1.0 / tl.sqrt(var_f.to(compute) + eps)
        rstd_g, rstd_o = 1.0 / tl.sqrt(var_g.to(compute) + eps), 1.0 / tl.sqrt(var_o.to(compute) + eps)

    cell_mean = tl.zeros([BLOCK_H], dtype=compute)
    cell_rstd = tl.zeros([BLOCK_H], dtype=compute)
    gamma_c = tl.zeros([BLOCK_H], dtype=compute)
    beta_c = tl.zeros([BLOCK_H], dtype=compute)
    if NORM_CELL:
        gamma_c = tl.load(gamma_c_ptr + cols, mask=col_ok, other=0.0).to(compute)
        beta_c = tl.load(beta_c_ptr + cols, mask=col_ok, other=0.0).to(compute)
        if not TRAINING:
            cell_mean = tl.load(mean_c_ptr + stat_row * H + cols, mask=col_ok, other=0.0).to(compute)
            cell_var = tl.load(var_c_ptr + stat_row * H + cols, mask=col_ok, other=1.0).to(compute)
            cell_rstd = 1.0 / tl.sqrt(cell_var + eps)

    # Loop 2: gates and c_t; h_t too unless the cell statistics must be taken first.
    cell_count = tl.zeros([BLOCK_H], dtype=compute)
    cell_m2 = tl.zeros([BLOCK_H], dtype=compute)
    for tile in range(TILES):
        rows = (first_tile + tile) * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        ok = row_ok[:, None] & col_ok[None, :]
        keep = (tl.load(active_ptr + rows, mask=row_ok, other=0) != 0)[:, None]
        rs = reserve_ptr + rows[:, None] * RES_W + cols[None, :]
        if REC_STATS:
            z_i = tl.load(rs + ZH_OFF, mask=ok, other=0.0)
            z_f = tl.load(rs + ZH_OFF + H, mask=ok, other=0.0)
            z_g = tl.load(rs + ZH_OFF + 2 * H, mask=ok, other=0.0)
            z_o = tl.load(rs + ZH_OFF + 3 * H, mask=ok, other=0.0)
        else:
            z_i, z_f, z_g, z_o = _recurrent_dot(h_op_prev_ptr, w_hh_ptr, rows, row_ok, cols, col_ok, H, compute,
                                                BLOCK_B, BLOCK_H, BLOCK_K, DOT_PRECISION, DOT_UPCAST)
            if KEEP and NORM_REC:
                tl.store(rs + ZH_OFF, z_i, mask=ok)
                tl.store(rs + ZH_OFF + H, z_f, mask=ok)
                tl.store(rs + ZH_OFF + 2 * H, z_g, mask=ok)
                tl.store(rs + ZH_OFF + 3 * H, z_o, mask=ok)
        if NORM_REC:
            z_i = (z_i - mean_i[None, :]) * (rstd_i * gamma_i)[None, :]
            z_f = (z_f - mean_f[None, :]) * (rstd_f * gamma_f)[None, :]
            z_g = (z_g - mean_g[None, :]) * (rstd_g * gamma_g)[None, :]
            z_o = (z_o - mean_o[None, :]) * (rstd_o * gamma_o)[None, :]
        xin = xin_ptr + rows[:, None] * G + cols[None, :]
        i = tl.sigmoid(z_i + tl.load(xin, mask=ok, other=0.0))
        f = tl.sigmoid(z_f + tl.load(xin + H, mask=ok, other=0.0))
        g = _tanh(z_g + tl.load(xin + 2 * H, mask=ok, other=0.0))
        o = tl.sigmoid(z_o + tl.load(xin + 3 * H, mask=ok, other=0.0))
        c_prev = tl.load(c_ptr + rows[:, None] * H + cols[None, :], mask=ok, other=0.0)
        c_new = f * c_prev + i * g
        if KEEP or CELL_STATS:
            tl.store(rs + GATES_OFF, i, mask=ok)
            tl.store(rs + GATES_OFF + H, f, mask=ok)
            tl.store(rs + GATES_OFF + 2 * H, g, mask=ok)
            tl.store(rs + GATES_OFF + 3 * H, o, mask=ok)
            tl.store(rs + CNEW_OFF, c_new, mask=ok)
        if CELL_STATS:
            n, m, s = _tile_moments(c_new, keep)
            cell_count, cell_mean, cell_m2 = _merge_moments(cell_count, cell_mean, cell_m2, n, m, s)
        else:
            _finish_step(c_new, o, keep, rows, row_ok, cols, col_ok, H, cell_mean, cell_rstd, gamma_c, beta_c,
                         h_prev_ptr, h_next_ptr, h_op_next_ptr, c_ptr, out_ptr, NORM_CELL, H_OPERAND)

    if CELL_STATS:
        cell_var = cell_m2 / tl.maximum(cell_count, 1.0)
        tl.store(mean_c_ptr + stat_row * H + cols, cell_mean, mask=col_ok)
        tl.store(var_c_ptr + stat_row * H + cols, cell_var, mask=col_ok)
        cell_rstd = 1.0 / tl.sqrt(cell_var + eps)
        tl.debug_barrier()
        # Loop 3: h_t from c_t and o kept in the reserve.
        for tile in range(TILES):
            rows = (first_tile + tile) * BLOCK_B + tl.arange(0, BLOCK_B)
            row_ok = rows < B
            ok = row_ok[:, None] & col_ok[None, :]
            keep = (tl.load(active_ptr + rows, mask=row_ok, other=0) != 0)[:, None]
            rs = reserve_ptr + rows[:, None] * RES_W + cols[None, :]
            c_new = tl.load(rs + CNEW_OFF, mask=ok, other=0.0)
            o = tl.load(rs + GATES_OFF + 3 * H, mask=ok, other=0.0)
            _finish_step(c_new, o, keep, rows, row_ok, cols, col_ok, H, cell_mean, cell_rstd, gamma_c, beta_c,
                         h_prev_ptr, h_next_ptr, h_op_next_ptr, c_ptr, out_ptr, NORM_CELL, H_OPERAND)


@triton.jit
def _cell_backward_tile(rows, row_ok, cols, col_ok, H, keep, grad_out_ptr, grad_h_ptr, reserve_ptr, RES_W,
                        GATES_OFF, CNEW_OFF, cell_mean, cell_rstd, gamma_c, beta_c, NORM_CELL: tl.constexpr):
    """Gradient of the output gate's pre-activation and of the normalized cell BN(c_t) that
    feeds h_t, for one tile; also c_hat = (c_t - mean) * rstd and the loaded o.
    Padded rows get zero gradients."""
    ok = row_ok[:, None] & col_ok[None, :]
    offsets = rows[:, None] * H + cols[None, :]
    grad_h_new = tl.load(grad_out_ptr + offsets, mask=ok, other=0.0) + tl.load(grad_h_ptr + offsets, mask=ok,
                                                                               other=0.0)
    grad_h_new = tl.where(keep & ok, grad_h_new, 0.0)
    rs = reserve_ptr + rows[:, None] * RES_W + cols[None, :]
    c_new = tl.load(rs + CNEW_OFF, mask=ok, other=0.0)
    o = tl.load(rs + GATES_OFF + 3 * H, mask=ok, other=0.0)
    c_hat = c_new
    seen = c_new
    if NORM_CELL:
        c_hat = (c_new - cell_mean[None, :]) * cell_rstd[None, :]
        seen = c_hat * gamma_c[None, :] + beta_c[None, :]
    tanh_c = _tanh(seen)
    grad_o = grad_h_new * tanh_c * o * (1.0 - o)
    grad_seen = grad_h_new * o * (1.0 - tanh_c * tanh_c)
    return grad_o, grad_seen, c_hat


@triton.jit
def _gate_backward_sums(dy, z, mean, rstd, NORMALIZED: tl.constexpr):
    """sum(dy) and sum(dy * zhat) over the rows of a [BLOCK_B, BLOCK_H] tile, with
    zhat = (z - mean) * rstd (rows outside the batch or padded have dy = 0)."""
    sum_dy_zhat = tl.sum(dy * 0.0, axis=0)
    if NORMALIZED:
        sum_dy_zhat = tl.sum(dy * ((z - mean[None, :]) * rstd[None, :]), axis=0)
    return tl.sum(dy, axis=0), sum_dy_zhat


@triton.jit
def _grad_h_dot(acc, grad_zh_ptr, w_ptr, rows, row_ok, cols, col_ok, H,
                BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + grad_zh @ W_hh for rows x cols, [BLOCK_B, BLOCK_H]: grad_zh_ptr [B, 4H] compute
    dtype, w_ptr [4H, H] (W_hh, its rows k are the gate pre-activations), converted to the
    compute dtype before the product (exactly: float16/bfloat16 values are TF32 values)."""
    G = 4 * H
    for k0 in range(0, G, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < G
        a = tl.load(grad_zh_ptr + rows[:, None] * G + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + ks[:, None] * H + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, w.to(acc.dtype), acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)
    return acc


@triton.jit(do_not_specialize=["step"])
def bnlstm_bwd_step_kernel(
    grad_out_ptr,   # [T, B, H] compute dtype: gradients of the outputs
    grad_h_ptr,     # [B, H] gradient reaching h_t: grad_h_n in at the last step, else computed here
    grad_c_ptr,     # [B, H] in: gradient of c_t; out: gradient of c_{t-1}
    grad_h_carry_ptr,  # [B, H] in: step t + 1's; out: grad_h on padded rows (their h passes through), 0 elsewhere
    w_hh_ptr,       # [4H, H] W_hh (weight dtype)
    reserve_ptr,    # [T, B, RES_W] the forward pass's reserve (c_{t-1} is step t - 1's c_t)
    c0_ptr,         # [B, H] c_0, the c_{t-1} of step 0
    wx_ptr,         # [T, B, 4H] W_ih x as projected (x's dtype), if the input is normalized
    active_ptr,     # [T, B] int8
    gamma_ih_ptr, gamma_hh_ptr,  # [4H]
    gamma_c_ptr, beta_c_ptr,     # [H]
    mean_ih_ptr, var_ih_ptr,     # [IH_ROWS, 4H] input statistics: row min(step, IH_ROWS - 1)
    mean_hh_ptr, var_hh_ptr,     # [T, 4H] recurrent statistics of each step
    mean_c_ptr, var_c_ptr,       # [T, H] cell statistics of each step
    grad_gates_ptr,  # [T, B, 4H] out: gradient of the gate pre-activations
    grad_zh_ptr,     # [T, B, 4H] out: gradient of W_hh h_{t-1}, if NORM_REC
    grad_wx_ptr,     # [T, B, 4H] out: gradient of W_ih x_t, if STEP_INPUT
    sums_ptr,        # [T, 14H] out: sum over rows of dy | dy zhat | dy xhat (4H each) | dcell | dcell c_hat (H each)
    step, T, IH_ROWS, B, H, RES_W, ZH_OFF, GATES_OFF, CNEW_OFF, eps: tl.float64,
    NORM_INPUT: tl.constexpr, STEP_INPUT: tl.constexpr, NORM_REC: tl.constexpr, NORM_CELL: tl.constexpr,
    TRAINING: tl.constexpr, TILES: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
    FUSED_GRAD_H: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One backward step. With dy the gradient of the gate pre-activations, each batch norm
    y = gamma * zhat backpropagates as
        training:   dz = gamma * rstd * (dy - mean(dy) - zhat * mean(dy * zhat))  (active rows)
        evaluation: dz = gamma * rstd * dy
    Grid (cdiv(H, BLOCK_H),): a program owns BLOCK_H hidden units and loops over all TILES
    batch tiles: (0) FUSED_GRAD_H, below the last step: the gradient reaching h_t, step t + 1's
    carry plus grad_zh_{t+1} @ W_hh for its columns (tl.dot over K = 4H; grad_zh_{t+1} is
    complete, the previous launch wrote it), (1) cell-norm sums (training), (2) gradients of
    the gates, of c_{t-1} and the gate-side sums, (3) the gate-side batch-norm backward
    (training; in evaluation it is done in (2)). Without FUSED_GRAD_H the host computes
    grad_h = carry + grad_zh @ W_hh between launches; either way it does so after step 0 for
    the gradient of h_0. The [T, ...] tensors are passed whole and indexed by `step` here, as
    in the forward step.
    """
    compute = grad_c_ptr.dtype.element_ty
    eps = tl.full([], eps, compute)  # annotated float64: the JIT types a plain Python float fp32
    cols = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    G = 4 * H
    step_rows = step.to(tl.int64) * B  # first row of step `step` in the [T, B, *] tensors
    # Row masks (the interpreter takes no scalar in a mask): c_{t-1} is c_0 at step 0, else
    # step t - 1's c_t in the reserve.
    step_of_rows = tl.zeros([BLOCK_B], dtype=tl.int32) + step
    prev_is_c0, prev_in_reserve = step_of_rows == 0, step_of_rows > 0
    grad_out_ptr += step_rows * H
    reserve_ptr += step_rows * RES_W
    c_prev_ptr = reserve_ptr - B * RES_W + CNEW_OFF  # step t - 1's c_t (read from step 1 on)
    wx_ptr += step_rows * G
    active_ptr += step_rows
    grad_gates_ptr += step_rows * G
    grad_zh_ptr += step_rows * G
    grad_wx_ptr += step_rows * G
    sums_ptr += step * (14 * H)
    ih_row = tl.minimum(step, IH_ROWS - 1)
    mean_ih_ptr += ih_row * G
    var_ih_ptr += ih_row * G
    mean_hh_ptr += step * G
    var_hh_ptr += step * G
    mean_c_ptr += step * H
    var_c_ptr += step * H
    CELL_STATS: tl.constexpr = NORM_CELL and TRAINING
    GATE_PASS: tl.constexpr = TRAINING and (NORM_REC or STEP_INPUT)
    zero = tl.zeros([BLOCK_H], dtype=compute)

    if FUSED_GRAD_H and step + 1 < T:
        # Loop 0: grad_h_t = carry_{t+1} + grad_zh_{t+1} @ W_hh. Padded rows of step t + 1
        # have grad_zh = 0 and carry their gradient through; the others have carry 0. This
        # program reads and later writes only its own columns of grad_h and the carry.
        for tile in range(TILES):
            rows = tile * BLOCK_B + tl.arange(0, BLOCK_B)
            row_ok = rows < B
            ok = row_ok[:, None] & col_ok[None, :]
            offsets = rows[:, None] * H + cols[None, :]
            acc = tl.load(grad_h_carry_ptr + offsets, mask=ok, other=0.0)
            acc = _grad_h_dot(acc, grad_zh_ptr + B * G, w_hh_ptr, rows, row_ok, cols, col_ok, H, BLOCK_K,
                              DOT_PRECISION)
            tl.store(grad_h_ptr + offsets, acc, mask=ok)
        tl.debug_barrier()

    cell_mean = tl.zeros([BLOCK_H], dtype=compute)
    cell_rstd = tl.zeros([BLOCK_H], dtype=compute)
    gamma_c = tl.zeros([BLOCK_H], dtype=compute)
    beta_c = tl.zeros([BLOCK_H], dtype=compute)
    if NORM_CELL:
        cell_mean = tl.load(mean_c_ptr + cols, mask=col_ok, other=0.0).to(compute)
        cell_rstd = 1.0 / tl.sqrt(tl.load(var_c_ptr + cols, mask=col_ok, other=1.0).to(compute) + eps)
        gamma_c = tl.load(gamma_c_ptr + cols, mask=col_ok, other=0.0).to(compute)
        beta_c = tl.load(beta_c_ptr + cols, mask=col_ok, other=0.0).to(compute)

    # Loop 1: sums over the batch that the cell norm's backward needs first.
    sum_dc = tl.zeros([BLOCK_H], dtype=compute)
    sum_dc_chat = tl.zeros([BLOCK_H], dtype=compute)
    count = tl.zeros([BLOCK_H], dtype=compute)
    for tile in range(TILES):
        rows = tile * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        keep = (tl.load(active_ptr + rows, mask=row_ok, other=0) != 0)[:, None]
        count += tl.sum(keep.to(compute), axis=0)
        if CELL_STATS:
            _, grad_seen, c_hat = _cell_backward_tile(rows, row_ok, cols, col_ok, H, keep, grad_out_ptr, grad_h_ptr,
                                                      reserve_ptr, RES_W, GATES_OFF, CNEW_OFF, cell_mean, cell_rstd,
                                                      gamma_c, beta_c, NORM_CELL)
            sum_dc += tl.sum(grad_seen, axis=0)
            sum_dc_chat += tl.sum(grad_seen * c_hat, axis=0)
    inv_count = 1.0 / tl.maximum(count, 1.0)
    cell_scale = cell_rstd * gamma_c

    in_mean_i, in_mean_f, in_mean_g, in_mean_o = zero, zero, zero, zero
    in_rstd_i, in_rstd_f, in_rstd_g, in_rstd_o = zero, zero, zero, zero
    in_gamma_i, in_gamma_f, in_gamma_g, in_gamma_o = zero, zero, zero, zero
    if NORM_INPUT:
        in_mean_i, in_mean_f, in_mean_g, in_mean_o = _load_gate_columns(mean_ih_ptr, cols, col_ok, H, 0.0)
        v_i, v_f, v_g, v_o = _load_gate_columns(var_ih_ptr, cols, col_ok, H, 1.0)
        in_rstd_i, in_rstd_f = 1.0 / tl.sqrt(v_i.to(compute) + eps), 1.0 / tl.sqrt(v_f.to(compute) + eps)
        in_rstd_g, in_rstd_o = 1.0 / tl.sqrt(v_g.to(compute) + eps), 1.0 / tl.sqrt(v_o.to(compute) + eps)
        in_gamma_i, in_gamma_f, in_gamma_g, in_gamma_o = _load_gate_columns(gamma_ih_ptr, cols, col_ok, H, 0.0)
        in_mean_i, in_mean_f = in_mean_i.to(compute), in_mean_f.to(compute)
        in_mean_g, in_mean_o = in_mean_g.to(compute), in_mean_o.to(compute)
        in_gamma_i, in_gamma_f = in_gamma_i.to(compute), in_gamma_f.to(compute)
        in_gamma_g, in_gamma_o = in_gamma_g.to(compute), in_gamma_o.to(compute)
    rec_mean_i, rec_mean_f, rec_mean_g, rec_mean_o = zero, zero, zero, zero
    rec_rstd_i, rec_rstd_f, rec_rstd_g, rec_rstd_o = zero, zero, zero, zero
    rec_gamma_i, rec_gamma_f, rec_gamma_g, rec_gamma_o = zero, zero, zero, zero
    if NORM_REC:
        rec_mean_i, rec_mean_f, rec_mean_g, rec_mean_o = _load_gate_columns(mean_hh_ptr, cols, col_ok, H, 0.0)
        v_i, v_f, v_g, v_o = _load_gate_columns(var_hh_ptr, cols, col_ok, H, 1.0)
        rec_rstd_i, rec_rstd_f = 1.0 / tl.sqrt(v_i.to(compute) + eps), 1.0 / tl.sqrt(v_f.to(compute) + eps)
        rec_rstd_g, rec_rstd_o = 1.0 / tl.sqrt(v_g.to(compute) + eps), 1.0 / tl.sqrt(v_o.to(compute) + eps)
        rec_gamma_i, rec_gamma_f, rec_gamma_g, rec_gamma_o = _load_gate_columns(gamma_hh_ptr, cols, col_ok, H, 0.0)
        rec_mean_i, rec_mean_f = rec_mean_i.to(compute), rec_mean_f.to(compute)
        rec_mean_g, rec_mean_o = rec_mean_g.to(compute), rec_mean_o.to(compute)
        rec_gamma_i, rec_gamma_f = rec_gamma_i.to(compute), rec_gamma_f.to(compute)
        rec_gamma_g, rec_gamma_o = rec_gamma_g.to(compute), rec_gamma_o.to(compute)

    # Loop 2: gate gradients, the gradient of c_{t-1}, and the gate-side sums.
    s_dy_i, s_dy_f, s_dy_g, s_dy_o = zero, zero, zero, zero
    s_dz_i, s_dz_f, s_dz_g, s_dz_o = zero, zero, zero, zero
    s_dx_i, s_dx_f, s_dx_g, s_dx_o = zero, zero, zero, zero
    for tile in range(TILES):
        rows = tile * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        ok = row_ok[:, None] & col_ok[None, :]
        keep = (tl.load(active_ptr + rows, mask=row_ok, other=0) != 0)[:, None]
        grad_o, grad_seen, c_hat = _cell_backward_tile(rows, row_ok, cols, col_ok, H, keep, grad_out_ptr,
                                                       grad_h_ptr, reserve_ptr, RES_W, GATES_OFF, CNEW_OFF,
                                                       cell_mean, cell_rstd, gamma_c, beta_c, NORM_CELL)
        grad_cell = grad_seen
        if NORM_CELL:
            if not TRAINING:
                sum_dc += tl.sum(grad_seen, axis=0)
                sum_dc_chat += tl.sum(grad_seen * c_hat, axis=0)
            if TRAINING:
                grad_cell = grad_seen - (sum_dc * inv_count)[None, :] - c_hat * (sum_dc_chat * inv_count)[None, :]
            grad_cell = grad_cell * cell_scale[None, :]
        offsets = rows[:, None] * H + cols[None, :]
        grad_c_next = tl.load(grad_c_ptr + offsets, mask=ok, other=0.0)
        dc = tl.where(keep, grad_cell + grad_c_next, 0.0)
        rs = reserve_ptr + rows[:, None] * RES_W + cols[None, :]
        i = tl.load(rs + GATES_OFF, mask=ok, other=0.0)
        f = tl.load(rs + GATES_OFF + H, mask=ok, other=0.0)
        g = tl.load(rs + GATES_OFF + 2 * H, mask=ok, other=0.0)
        # One of the two loads is masked off entirely.
        c_prev = tl.load(c0_ptr + offsets, mask=ok & prev_is_c0[:, None], other=0.0) + tl.load(
            c_prev_ptr + rows[:, None] * RES_W + cols[None, :], mask=ok & prev_in_reserve[:, None], other=0.0)
        grad_i = dc * g * i * (1.0 - i)
        grad_f = dc * c_prev * f * (1.0 - f)
        grad_g = dc * i * (1.0 - g * g)
        # A padded step leaves its state unchanged: the gradient passes straight through.
        tl.store(grad_c_ptr + offsets, tl.where(keep, dc * f, grad_c_next), mask=ok)
        grad_h_next = tl.load(grad_h_ptr + offsets, mask=ok, other=0.0)
        tl.store(grad_h_carry_ptr + offsets, tl.where(keep, 0.0, grad_h_next), mask=ok)
        gg = grad_gates_ptr + rows[:, None] * G + cols[None, :]
        tl.store(gg, grad_i, mask=ok)
        tl.store(gg + H, grad_f, mask=ok)
        tl.store(gg + 2 * H, grad_g, mask=ok)
        tl.store(gg + 3 * H, grad_o, mask=ok)

        # Gate-side sums. Masked-out rows have dy = 0, so loads there may return anything finite.
        zh = reserve_ptr + rows[:, None] * RES_W + ZH_OFF + cols[None, :]
        wx = wx_ptr + rows[:, None] * G + cols[None, :]
        z_i, z_f, z_g, z_o = grad_i, grad_i, grad_i, grad_i
        x_i, x_f, x_g, x_o = grad_i, grad_i, grad_i, grad_i
        if NORM_REC:
            z_i = tl.load(zh, mask=ok, other=0.0)
            z_f = tl.load(zh + H, mask=ok, other=0.0)
            z_g = tl.load(zh + 2 * H, mask=ok, other=0.0)
            z_o = tl.load(zh + 3 * H, mask=ok, other=0.0)
        if NORM_INPUT:
            x_i = tl.load(wx, mask=ok, other=0.0).to(compute)
            x_f = tl.load(wx + H, mask=ok, other=0.0).to(compute)
            x_g = tl.load(wx + 2 * H, mask=ok, other=0.0).to(compute)
            x_o = tl.load(wx + 3 * H, mask=ok, other=0.0).to(compute)
        a, b = _gate_backward_sums(grad_i, z_i, rec_mean_i, rec_rstd_i, NORM_REC)
        s_dy_i, s_dz_i = s_dy_i + a, s_dz_i + b
        a, b = _gate_backward_sums(grad_f, z_f, rec_mean_f, rec_rstd_f, NORM_REC)
        s_dy_f, s_dz_f = s_dy_f + a, s_dz_f + b
        a, b = _gate_backward_sums(grad_g, z_g, rec_mean_g, rec_rstd_g, NORM_REC)
        s_dy_g, s_dz_g = s_dy_g + a, s_dz_g + b
        a, b = _gate_backward_sums(grad_o, z_o, rec_mean_o, rec_rstd_o, NORM_REC)
        s_dy_o, s_dz_o = s_dy_o + a, s_dz_o + b
        _, b = _gate_backward_sums(grad_i, x_i, in_mean_i, in_rstd_i, NORM_INPUT)
        s_dx_i += b
        _, b = _gate_backward_sums(grad_f, x_f, in_mean_f, in_rstd_f, NORM_INPUT)
        s_dx_f += b
        _, b = _gate_backward_sums(grad_g, x_g, in_mean_g, in_rstd_g, NORM_INPUT)
        s_dx_g += b
        _, b = _gate_backward_sums(grad_o, x_o, in_mean_o, in_rstd_o, NORM_INPUT)
        s_dx_o += b
        if not TRAINING:
            # Evaluation: fixed statistics, each row's gradient is its own.
            gz = grad_zh_ptr + rows[:, None] * G + cols[None, :]
            gx = grad_wx_ptr + rows[:, None] * G + cols[None, :]
            if NORM_REC:
                tl.store(gz, grad_i * (rec_rstd_i * rec_gamma_i)[None, :], mask=ok)
                tl.store(gz + H, grad_f * (rec_rstd_f * rec_gamma_f)[None, :], mask=ok)
                tl.store(gz + 2 * H, grad_g * (rec_rstd_g * rec_gamma_g)[None, :], mask=ok)
                tl.store(gz + 3 * H, grad_o * (rec_rstd_o * rec_gamma_o)[None, :], mask=ok)
            if STEP_INPUT:
                tl.store(gx, grad_i * (in_rstd_i * in_gamma_i)[None, :], mask=ok)
                tl.store(gx + H, grad_f * (in_rstd_f * in_gamma_f)[None, :], mask=ok)
                tl.store(gx + 2 * H, grad_g * (in_rstd_g * in_gamma_g)[None, :], mask=ok)
                tl.store(gx + 3 * H, grad_o * (in_rstd_o * in_gamma_o)[None, :], mask=ok)

    tl.store(sums_ptr + cols, s_dy_i, mask=col_ok)
    tl.store(sums_ptr + H + cols, s_dy_f, mask=col_ok)
    tl.store(sums_ptr + 2 * H + cols, s_dy_g, mask=col_ok)
    tl.store(sums_ptr + 3 * H + cols, s_dy_o, mask=col_ok)
    tl.store(sums_ptr + G + cols, s_dz_i, mask=col_ok)
    tl.store(sums_ptr + G + H + cols, s_dz_f, mask=col_ok)
    tl.store(sums_ptr + G + 2 * H + cols, s_dz_g, mask=col_ok)
    tl.store(sums_ptr + G + 3 * H + cols, s_dz_o, mask=col_ok)
    tl.store(sums_ptr + 2 * G + cols, s_dx_i, mask=col_ok)
    tl.store(sums_ptr + 2 * G + H + cols, s_dx_f, mask=col_ok)
    tl.store(sums_ptr + 2 * G + 2 * H + cols, s_dx_g, mask=col_ok)
    tl.store(sums_ptr + 2 * G + 3 * H + cols, s_dx_o, mask=col_ok)
    tl.store(sums_ptr + 3 * G + cols, sum_dc, mask=col_ok)
    tl.store(sums_ptr + 3 * G + H + cols, sum_dc_chat, mask=col_ok)

    if GATE_PASS:
        tl.debug_barrier()
        # Loop 3 (training): the gate-side batch norms' backward, from the stored dy.
        for tile in range(TILES):
            rows = tile * BLOCK_B + tl.arange(0, BLOCK_B)
            row_ok = rows < B
            ok = row_ok[:, None] & col_ok[None, :]
            keep = (tl.load(active_ptr + rows, mask=row_ok, other=0) != 0)[:, None] & ok
            gg = grad_gates_ptr + rows[:, None] * G + cols[None, :]
            zh = reserve_ptr + rows[:, None] * RES_W + ZH_OFF + cols[None, :]
            wx = wx_ptr + rows[:, None] * G + cols[None, :]
            gz = grad_zh_ptr + rows[:, None] * G + cols[None, :]
            gx = grad_wx_ptr + rows[:, None] * G + cols[None, :]
            _gate_norm_backward(gg, zh, gz, ok, keep, rec_mean_i, rec_rstd_i, rec_gamma_i, s_dy_i, s_dz_i, inv_count,
                                NORM_REC)
            _gate_norm_backward(gg + H, zh + H, gz + H, ok, keep, rec_mean_f, rec_rstd_f, rec_gamma_f, s_dy_f,
                                s_dz_f, inv_count, NORM_REC)
            _gate_norm_backward(gg + 2 * H, zh + 2 * H, gz + 2 * H, ok, keep, rec_mean_g, rec_rstd_g, rec_gamma_g,
                                s_dy_g, s_dz_g, inv_count, NORM_REC)
            _gate_norm_backward(gg + 3 * H, zh + 3 * H, gz + 3 * H, ok, keep, rec_mean_o, rec_rstd_o, rec_gamma_o,
                                s_dy_o, s_dz_o, inv_count, NORM_REC)
            _gate_norm_backward(gg, wx, gx, ok, keep, in_mean_i, in_rstd_i, in_gamma_i, s_dy_i, s_dx_i, inv_count,
                                STEP_INPUT)
            _gate_norm_backward(gg + H, wx + H, gx + H, ok, keep, in_mean_f, in_rstd_f, in_gamma_f, s_dy_f, s_dx_f,
                                inv_count, STEP_INPUT)
            _gate_norm_backward(gg + 2 * H, wx + 2 * H, gx + 2 * H, ok, keep, in_mean_g, in_rstd_g, in_gamma_g,
                                s_dy_g, s_dx_g, inv_count, STEP_INPUT)
            _gate_norm_backward(gg + 3 * H, wx + 3 * H, gx + 3 * H, ok, keep, in_mean_o, in_rstd_o, in_gamma_o,
                                s_dy_o, s_dx_o, inv_count, STEP_INPUT)


@triton.jit
def _gate_norm_backward(dy_ptr, z_ptr, dz_ptr, ok, keep, mean, rstd, gamma, sum_dy, sum_dy_zhat, inv_count,
                        ENABLED: tl.constexpr):
    """Training batch-norm backward of one gate column block (see bnlstm_bwd_step_kernel):
    dz = gamma * rstd * (dy - mean(dy) - zhat * mean(dy * zhat)) on active rows, 0 elsewhere."""
    if ENABLED:
        dy = tl.load(dy_ptr, mask=ok, other=0.0)
        zhat = (tl.load(z_ptr, mask=ok, other=0.0).to(dy.dtype) - mean[None, :]) * rstd[None, :]
        grad = dy - (sum_dy * inv_count)[None, :] - zhat * (sum_dy_zhat * inv_count)[None, :]
        tl.store(dz_ptr, tl.where(keep, grad * (gamma * rstd)[None, :], 0.0), mask=ok)


@triton.jit
def tf32_matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                       PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """c = a b for float32 a [M, K] and b [K, N] of any strides, c [M, N] contiguous.
    PRECISION "tf32": the products on TF32 tensor cores (operands rounded to 10 mantissa
    bits), accumulated in float32. One program per BLOCK_M x BLOCK_N tile of c."""
    # int64 offsets: [T * B, 4H] gradients pass 2^31 elements at the largest sizes.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_ok = ks < K
        a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak, mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        b = tl.load(b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn, mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    tl.store(c_ptr + rows[:, None] * N + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])
