"""Gradient flow at initialisation against gamma: the paper's argument for gamma = 0.1.

What the paper did (Cooijmans et al., 2017, section 4 and Figure 1): a batch-normalized
tanh RNN on sequential MNIST (784 steps, one pixel per step), at initialisation; the loss
is the classification loss at the last step, and the plot is the norm of its gradient
with respect to the hidden state h_t at every step t, for several initial gammas. With
gamma near 1 the pre-activations have unit variance, tanh saturates (its expected
derivative is well below 1, panel c) and the gradient vanishes going back in time; with
gamma = 0.1 it stays nearly constant. (What this run shows, which differs in part, is in
examples/README.md.)

This script does the same, for that tanh RNN (written here, batch statistics per step)
and for the project's BNLSTM, with gamma in {0.1, 0.3, 0.5, 0.7, 1.0} (for BNLSTM every
gamma: input, recurrent and cell). The data are one batch of 64 of scikit-learn's 8x8
digits, upsampled to 28x28 and read pixel by pixel (784 steps, like MNIST; no download),
or MNIST test images with `--mnist DIR`. Loss: cross-entropy of a linear read-out of
h_T. Gradient: d loss / d h_t for t = 1..T, its norm over the batch and the hidden units.
The weights (orthogonal W_hh) are the same for every gamma; only gamma changes. Training
mode: batch statistics, as in training; computed in float64 so that nothing underflows.

BNLSTM does not expose h_t as a graph node: the recurrence uses its internal state and
output[t] is a copy of h_t. So the script runs the module one step at a time, passing
(h, c) and `start_step=t` in: then each h_t is a tensor that the later steps consume, and
autograd gives d loss / d h_t directly. Each call normalizes step t with that step's batch
statistics, exactly as one call over the whole sequence does (checked below).

    PYTHONPATH=. python examples/gradient_flow.py        # about half a minute here

Writes examples/results/gradient_flow.json and gradient_flow.png.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import common
from bnlstm_cuda import BNLSTM

GAMMAS = (0.1, 0.3, 0.5, 0.7, 1.0)


class BNTanhRNN(nn.Module):
    """h_t = tanh(BN(W_ih x_t; gamma) + BN(W_hh h_{t-1}; gamma) + b), with the batch
    statistics of each step: the simple recurrent net of the paper's Figure 1(a)."""

    def __init__(self, input_size: int, hidden_size: int, gamma: float, dtype) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(hidden_size)
        self.weight_ih = nn.Parameter(torch.empty(hidden_size, input_size, dtype=dtype).uniform_(-bound, bound))
        self.weight_hh = nn.Parameter(nn.init.orthogonal_(torch.empty(hidden_size, hidden_size, dtype=dtype)))
        self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=dtype))
        self.gamma_ih = nn.Parameter(torch.full((hidden_size,), gamma, dtype=dtype))
        self.gamma_hh = nn.Parameter(torch.full((hidden_size,), gamma, dtype=dtype))

    def step(self, x_t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """x_t: [B, I], h: [B, H] -> h_t [B, H]."""
        wx = F.batch_norm(x_t @ self.weight_ih.t(), None, None, self.gamma_ih, None, training=True)
        wh = F.batch_norm(h @ self.weight_hh.t(), None, None, self.gamma_hh, None, training=True)
        return torch.tanh(wx + wh + self.bias)


def hidden_states_rnn(rnn: BNTanhRNN, pixels: torch.Tensor) -> list:
    """pixels: [B, T, 1] -> [h_1, ..., h_T], each [B, H]."""
    h = pixels.new_zeros(pixels.shape[0], rnn.weight_hh.shape[0])
    states = []
    for t in range(pixels.shape[1]):
        h = rnn.step(pixels[:, t], h)
        states.append(h)
    return states


def hidden_states_bnlstm(lstm: BNLSTM, pixels: torch.Tensor) -> list:
    """pixels: [B, T, 1] -> [h_1, ..., h_T], each [1, B, H], one module call per step."""
    zeros = pixels.new_zeros(1, pixels.shape[0], lstm.hidden_size)
    h, c = zeros, zeros
    states = []
    for t in range(pixels.shape[1]):
        _, (h, c) = lstm(pixels[:, t:t + 1], (h, c), start_step=t)
        states.append(h)
    # One step per call must compute what one call over the sequence does.
    _, (h_whole, _) = lstm(pixels)
    assert torch.allclose(h_whole, states[-1], atol=1e-10), "step-by-step run differs"
    return states


def gradient_norms(states: list, head: nn.Linear, labels: torch.Tensor) -> list:
    """|| d loss / d h_t || for every t, loss = cross-entropy of head(h_T)."""
    loss = F.cross_entropy(head(states[-1].reshape(labels.shape[0], -1)), labels)
    grads = torch.autograd.grad(loss, states)
    return [float(f"{g.norm().item():.4g}") for g in grads]  # 4 digits: a readable JSON


def load_batch(args) -> tuple:
    """--batch-size images read pixel by pixel: ([B, 784, 1] float64, labels [B])."""
    if args.mnist:
        test = common.load_mnist(args.mnist)["test"]
        images, labels = test["images"], test["labels"]
    else:
        data = common.load_digits_images()
        images = F.interpolate(data["images"].unsqueeze(1), size=(28, 28), mode="bilinear",
                               align_corners=False).squeeze(1)
        labels = data["labels"]
    index = torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(args.seed))[:args.batch_size]
    return images[index].flatten(1).unsqueeze(-1).double(), labels[index]


def expected_tanh_derivative(std: np.ndarray) -> np.ndarray:
    """E[tanh'(x)] for x ~ N(0, std^2), by Gauss-Hermite quadrature (the paper's Figure 1(b))."""
    nodes, weights = np.polynomial.hermite.hermgauss(80)
    x = np.sqrt(2.0) * std[:, None] * nodes[None, :]
    return (weights * (1.0 - np.tanh(x) ** 2)).sum(axis=1) / np.sqrt(np.pi)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mnist", metavar="DIR", help="use MNIST test images from these idx files")
    parser.add_argument("--hidden", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backend", default="auto", help="BNLSTM's backend")
    parser.add_argument("--out", default=str(common.RESULTS), help="directory for JSON and PNG")
    args = parser.parse_args()
    common.setup(args.threads)
    started = time.perf_counter()

    pixels, labels = load_batch(args)
    steps = pixels.shape[1]
    norms = {"bn_tanh_rnn": {}, "bnlstm": {}}
    for gamma in GAMMAS:
        torch.manual_seed(args.seed)
        rnn = BNTanhRNN(1, args.hidden, gamma, torch.float64)
        head = nn.Linear(args.hidden, 10, dtype=torch.float64)
        norms["bn_tanh_rnn"][gamma] = gradient_norms(hidden_states_rnn(rnn, pixels), head, labels)

        torch.manual_seed(args.seed)
        lstm = BNLSTM(1, args.hidden, batch_first=True, max_length=steps, gamma_init=gamma,
                      backend=args.backend, dtype=torch.float64)
        head = nn.Linear(args.hidden, 10, dtype=torch.float64)
        norms["bnlstm"][gamma] = gradient_norms(hidden_states_bnlstm(lstm, pixels), head, labels)
        print(f"gamma {gamma}: ||dL/dh_t|| at t = 1, 100, {steps}: " + "; ".join(
            f"{' '.join(f'{per_gamma[gamma][t - 1]:.2g}' for t in (1, 100, steps))} ({model})"
            for model, per_gamma in norms.items()))

    checkpoints = [t for t in (1, 10, 100, 200, 400, 600, steps) if t <= steps]
    summary = {model: {str(gamma): {str(t): values[t - 1] for t in checkpoints}
                       for gamma, values in per_gamma.items()}
               for model, per_gamma in norms.items()}
    out = Path(args.out)
    common.write_json(out / "gradient_flow.json", {
        "data": "mnist test" if args.mnist else "digits upsampled to 28x28",
        "steps": steps,
        "hidden": args.hidden,
        "batch_size": args.batch_size,
        "seconds": round(time.perf_counter() - started, 1),
        "grad_norm_at_t": summary,
        "grad_norm_per_step": {model: {str(g): v for g, v in per_gamma.items()}
                               for model, per_gamma in norms.items()},
    }, backend=args.backend)
    plot(norms, steps, out / "gradient_flow.png")


def plot(norms: dict, steps: int, path: Path) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(GAMMAS)))
    t = np.arange(1, steps + 1)
    titles = {"bn_tanh_rnn": "(a) BN tanh RNN", "bnlstm": "(b) BN-LSTM (bnlstm_cuda.BNLSTM)"}
    for axis, (model, per_gamma) in zip(axes, norms.items()):
        for colour, (gamma, values) in zip(colours, per_gamma.items()):
            axis.plot(t, values, color=colour, label=f"gamma = {gamma}")
        axis.set(title=f"{titles[model]}: ||d loss / d h_t|| at init", xlabel="t (loss at t = T)",
                 ylabel="gradient norm", yscale="log")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    std = np.linspace(0.0, 1.0, 101)
    axes[2].plot(std, expected_tanh_derivative(std), color="black")
    axes[2].set(title="(c) E[tanh'(x)], x ~ N(0, std^2)", xlabel="std of the pre-activation",
                ylabel="expected derivative")
    axes[2].grid(alpha=0.3)
    common.save_figure(fig, path)


if __name__ == "__main__":
    main()
