"""An independent float64 BN-LSTM, written from docs/SEMANTICS.md for the tests alone.

It shares no code with the package: it reads the parameters by their documented
state_dict names and walks every step sequence by sequence, gathering the active rows of
each step explicitly, where the package masks whole batches. Slow, and meant to be.
"""
import torch

GATE_PARTS = {
    # variant -> (input statistics, normalize recurrent, normalize cell)
    "cooijmans": ("step", True, True),
    "laurent_step": ("step", False, False),
    "laurent_sequence": ("sequence", False, False),
    "none": (None, False, False),
}


def bn(z, gamma, beta, mean, var, eps):
    """BN(z; gamma, beta) = beta + gamma * (z - E[z]) / sqrt(Var[z] + eps)."""
    out = gamma * (z - mean) / torch.sqrt(var + eps)
    return out if beta is None else out + beta


def batch_moments(rows):
    """rows: [n, F] -> mean, biased variance, unbiased variance (None for n < 2)."""
    mean = rows.mean(0)
    biased = ((rows - mean) ** 2).mean(0)
    unbiased = rows.var(0, unbiased=True) if rows.shape[0] >= 2 else None
    return mean, biased, unbiased


def fold(running, key, slot, mean, unbiased, momentum):
    """running[key] slot update with momentum, skipped when unbiased is None (n < 2)."""
    if unbiased is None:
        return
    mean_buf, var_buf = running[f"running_mean_{key}"], running[f"running_var_{key}"]
    mean_buf[slot] = (1 - momentum) * mean_buf[slot] + momentum * mean.detach()
    var_buf[slot] = (1 - momentum) * var_buf[slot] + momentum * unbiased.detach()


def paper_direction(p, running, name, variant, x, h0, c0, lengths, reverse, training, momentum, eps):
    """One layer-direction. x: [T, B, I]; h0, c0: [B, H]; lengths: list of ints."""
    input_stats, norm_hh, norm_c = GATE_PARTS[variant]
    T, B = x.shape[0], x.shape[1]
    H = h0.shape[1]
    W_ih, W_hh = p[f"weight_ih_{name}"], p[f"weight_hh_{name}"]
    bias = p.get(f"bias_{name}")
    position = lambda t, b: lengths[b] - 1 - t if reverse else t

    # Sequence-wise statistics: every real (t, b) position of the batch at once.
    if input_stats == "sequence":
        all_rows = torch.stack(
            [W_ih @ x[position(t, b), b] for b in range(B) for t in range(lengths[b])]
        )
        if training:
            seq_mean, seq_var, unbiased = batch_moments(all_rows)
            fold(running, f"ih_{name}", 0, seq_mean, unbiased, momentum)
        else:
            seq_mean = running[f"running_mean_ih_{name}"][0]
            seq_var = running[f"running_var_ih_{name}"][0]

    h = [h0[b] for b in range(B)]
    c = [c0[b] for b in range(B)]
    out = [[torch.zeros(H, dtype=x.dtype) for _ in range(B)] for _ in range(T)]
    for t in range(T):
        act = [b for b in range(B) if t < lengths[b]]
        if not act:
            continue
        slot_of = lambda key: min(t, running[f"running_mean_{key}"].shape[0] - 1)
        xs = torch.stack([x[position(t, b), b] for b in act])  # [n, I]
        hs = torch.stack([h[b] for b in act])
        cs = torch.stack([c[b] for b in act])
        zx = xs @ W_ih.T
        zh = hs @ W_hh.T
        if input_stats == "step":
            key = f"ih_{name}"
            if training:
                mean, var, unbiased = batch_moments(zx)
                fold(running, key, slot_of(key), mean, unbiased, momentum)
            else:
                mean = running[f"running_mean_{key}"][slot_of(key)]
                var = running[f"running_var_{key}"][slot_of(key)]
            zx = bn(zx, p[f"gamma_ih_{name}"], None, mean, var, eps)
        elif input_stats == "sequence":
            zx = bn(zx, p[f"gamma_ih_{name}"], None, seq_mean, seq_var, eps)
        if norm_hh:
            key = f"hh_{name}"
            if training:
                mean, var, unbiased = batch_moments(zh)
                fold(running, key, slot_of(key), mean, unbiased, momentum)
            else:
                mean = running[f"running_mean_{key}"][slot_of(key)]
                var = running[f"running_var_{key}"][slot_of(key)]
            zh = bn(zh, p[f"gamma_hh_{name}"], None, mean, var, eps)
        gates = zx + zh + (0 if bias is None else bias)
        i, f, g, o = gates[:, :H], gates[:, H:2 * H], gates[:, 2 * H:3 * H], gates[:, 3 * H:]
        c_new = torch.sigmoid(f) * cs + torch.sigmoid(i) * torch.tanh(g)
        c_seen = c_new
        if norm_c:
            key = f"c_{name}"
            if training:
                mean, var, unbiased = batch_moments(c_new)
                fold(running, key, slot_of(key), mean, unbiased, momentum)
            else:
                mean = running[f"running_mean_{key}"][slot_of(key)]
                var = running[f"running_var_{key}"][slot_of(key)]
            c_seen = bn(c_new, p[f"gamma_c_{name}"], p[f"beta_c_{name}"], mean, var, eps)
        h_new = torch.sigmoid(o) * torch.tanh(c_seen)
        for row, b in enumerate(act):
            h[b], c[b] = h_new[row], c_new[row]
            out[position(t, b)][b] = h_new[row]
    output = torch.stack([torch.stack(row) for row in out])
    return output, torch.stack(h), torch.stack(c)


def paper_bnlstm(params, running, *, variant, num_layers, bidirectional, x, h0, c0,
                 lengths=None, training, momentum=0.1, eps=1e-5):
    """The whole stack. params: name -> tensor (may require grad); running: name -> tensor,
    updated in place in training. x: [T, B, I]. Returns output, h_n, c_n."""
    T, B = x.shape[0], x.shape[1]
    lengths = [T] * B if lengths is None else [int(n) for n in lengths]
    suffixes = ["", "_reverse"] if bidirectional else [""]
    h_n, c_n = [], []
    layer_input = x
    for layer in range(num_layers):
        outs = []
        for d, sfx in enumerate(suffixes):
            k = layer * len(suffixes) + d
            out, h, c = paper_direction(
                params, running, f"l{layer}{sfx}", variant, layer_input, h0[k], c0[k],
                lengths, d == 1, training, momentum, eps,
            )
            outs.append(out)
            h_n.append(h)
            c_n.append(c)
        layer_input = torch.cat(outs, dim=-1)
    return layer_input, torch.stack(h_n), torch.stack(c_n)
