"""Character-level language modelling in bits per character: torch.nn.LSTM against BNLSTM.

The paper's Penn Treebank and text8 task (Cooijmans et al., 2017, sections 5.2 and 5.3):
predict each next character; report bits per character (bpc, the mean negative log2
likelihood). Both models read one-hot characters, get the same hyper-parameters, seed and
batches, and keep their own initialisation; each runs at every learning rate given (two
by default). Training sequences are `--length` characters (BNLSTM's max_length) from
random offsets, each from a zero state.

Evaluation, from a zero state: on the non-overlapping test sequences of the training
length, and on sequences of `--long-length` (1000 by default) starting every `--length`
characters (overlapping, so each position is averaged over many contexts). In the long
ones steps t >= max_length use the statistics of the last slot: the paper's rule for
sequences longer than any seen in training. BN-LSTM is evaluated with population
statistics estimated over training sequences, as in the paper (`BNLSTM.calibrate`, on a
copy of the model), and also with the module's running averages ("..._running"). Test
numbers are those of the model at its best validation bpc (evaluated every
`--eval-every` updates); the final model's are recorded too ("..._last").

Corpus: `--text PATH`, any UTF-8 text (Penn Treebank, text8, a book), split 90/5/5 by
position into train, validation and test. By default, the docstrings of the Python
standard library's top-level modules (`sysconfig.get_paths()["stdlib"]/*.py`, in file-name
order), which every Python installation has on disk; the exact text, so the numbers,
change with the Python version (its SHA-256 is in the JSON).

    PYTHONPATH=. python examples/char_lm.py                      # about 6 minutes here
    PYTHONPATH=. python examples/char_lm.py --text text8 --hidden 1000 --lr 2e-3 --updates 20000

Writes examples/results/char_lm_<corpus>.json and .png (training and validation bpc against
updates; test bpc against position in the long sequences).
"""
from __future__ import annotations

import argparse
import hashlib
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import common
from bnlstm_cuda import BNLSTM

PAPER = {"penn_treebank": {"lstm": 1.38, "bnlstm": 1.32}, "text8": {"lstm": 1.43, "bnlstm": 1.36}}
CALIBRATION_SEQUENCES = 640  # training sequences that estimate the population statistics


class CharLM(nn.Module):
    def __init__(self, kind: str, vocab: int, hidden: int, length: int, gamma: float, backend: str) -> None:
        super().__init__()
        self.vocab = vocab
        self.rnn = common.make_rnn(kind, vocab, hidden, max_length=length, gamma_init=gamma, backend=backend)
        self.head = nn.Linear(hidden, vocab)

    def rnn_input(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [B, T] int64 -> one-hot [B, T, V]."""
        return F.one_hot(ids, self.vocab).float()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [B, T] -> logits [B, T, V] for the next characters."""
        output, _ = self.rnn(self.rnn_input(ids))
        return self.head(output)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", metavar="PATH", help="a UTF-8 text file (default: stdlib docstrings)")
    parser.add_argument("--models", nargs="+", choices=list(common.MODEL_LABELS),
                        default=list(common.MODEL_LABELS))
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--length", type=int, default=100, help="training length and BNLSTM's max_length")
    parser.add_argument("--long-length", type=int, default=1000, help="length of the long test sequences")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, nargs="+", default=[2e-3, 1e-2],
                        help="Adam's learning rates: every model runs with each")
    parser.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping")
    parser.add_argument("--gamma", type=float, default=0.1, help="BNLSTM's gamma_init")
    parser.add_argument("--backend", default="auto", help="BNLSTM's backend")
    parser.add_argument("--updates", type=int, default=1500)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint", metavar="PATH", help="save the state of every run here")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    parser.add_argument("--out", default=str(common.RESULTS), help="directory for JSON and PNG")
    return parser.parse_args()


def load_corpus(args) -> tuple:
    """(name, text, description)."""
    if args.text:
        path = Path(args.text)
        return path.stem.replace(".", "_"), path.read_text(encoding="utf-8", errors="replace"), str(path)
    return "stdlib", common.stdlib_docstrings(), "docstrings of the standard library's top-level modules"


def bits_per_position(model: nn.Module, ids: torch.Tensor, length: int, stride: int,
                      chunk: int = 64) -> torch.Tensor:
    """Mean bits per character at each position of the sequences of `length` that start
    every `stride` characters of ids: [length]."""
    inputs = ids[:-1].unfold(0, length, stride)  # [N, length]
    targets = ids[1:].unfold(0, length, stride)
    total = torch.zeros(length)
    for x, y in zip(inputs.split(chunk), targets.split(chunk)):
        nats = F.cross_entropy(model(x).transpose(1, 2), y, reduction="none")  # [b, length]
        total += nats.sum(0)
    return total / inputs.shape[0] / math.log(2)


def main() -> None:
    args = parse_args()
    common.setup(args.threads)
    corpus, text, description = load_corpus(args)
    # Code points, then their ranks in the sorted alphabet: fast enough for text8's 10^8.
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    alphabet, ids = np.unique(codes, return_inverse=True)
    ids = torch.from_numpy(ids.astype(np.int64))
    n_val = n_test = len(text) // 20
    n_train = len(text) - n_val - n_test
    split = {"train": ids[:n_train], "val": ids[n_train:n_train + n_val], "test": ids[n_train + n_val:]}
    if n_test <= args.long_length:
        raise SystemExit(f"the test split ({n_test} characters) is shorter than --long-length {args.long_length}")
    train = split["train"]
    # Population statistics come from evenly spaced training sequences, the same at every evaluation.
    spacing = (n_train - args.length) // CALIBRATION_SEQUENCES
    calibration_ids = train.unfold(0, args.length, spacing)[:CALIBRATION_SEQUENCES]  # [N, length]

    def batch_at(update: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(args.seed * 100003 + update)
        starts = torch.randint(0, n_train - args.length, (args.batch_size,), generator=generator)
        return torch.stack([train[s:s + args.length + 1] for s in starts.tolist()])  # [B, length + 1]

    def loss_of(model, batch) -> torch.Tensor:
        return F.cross_entropy(model(batch[:, :-1]).transpose(1, 2), batch[:, 1:]) / math.log(2)

    def population(model):
        # Calibrate with the training batch size: each step's statistics are per batch.
        return common.with_population_statistics(
            model, lambda copy: (copy.rnn_input(x) for x in calibration_ids.split(args.batch_size)))

    def evaluate_on(model, ids_, length: int, prefix: str) -> dict:
        """{prefix}: mean bpc, {prefix}_per_position; BN-LSTM also with running averages."""
        models = {prefix: model}
        if isinstance(model.rnn, BNLSTM):
            models = {prefix: population(model), f"{prefix}_running": model}
        result = {}
        for key, evaluated in models.items():
            per_position = bits_per_position(evaluated, ids_, length, stride=args.length)
            result[key] = per_position.mean().item()
            if length > args.length:
                result[f"{key}_per_position"] = [round(value, 4) for value in per_position.tolist()]
        return result

    config = {key: value for key, value in vars(args).items()
              if key not in ("checkpoint", "resume", "threads", "out")}
    checkpoint = common.Checkpoint(args.checkpoint, config, args.resume)
    started = time.perf_counter()
    runs = []
    for lr in args.lr:
        for kind in args.models:
            name = f"lr={lr:g}/{kind}"
            torch.manual_seed(args.seed)
            model = CharLM(kind, len(alphabet), args.hidden, args.length, args.gamma, args.backend)
            optimizer = torch.optim.Adam(model.parameters(), lr=lr)
            run = common.train_run(
                name, model, optimizer, checkpoint, batch_at=batch_at, loss_of=loss_of,
                evaluate=lambda m: evaluate_on(m, split["val"], args.length, "val_bpc"),
                updates=args.updates, eval_every=args.eval_every, clip=args.clip,
                select="val_bpc", higher_is_better=False,
            )
            if "test" not in run:
                run["test"] = common.evaluate_best_and_last(model, run, lambda m: {
                    **evaluate_on(m, split["test"], args.length, "test_bpc"),
                    **evaluate_on(m, split["test"], args.long_length, "test_bpc_long")})
                checkpoint.save(name, run)
            runs.append({"lr": lr, "model": kind, **run["test"], "best_val_bpc": run["best"]["value"],
                         "seconds": round(run["seconds"], 1), "history": run["history"]})
            print(f"{name}: test bpc {run['test']['test_bpc']:.3f} at length {args.length}, "
                  f"{run['test']['test_bpc_long']:.3f} at length {args.long_length} ({run['seconds']:.0f} s)")

    out = Path(args.out)
    common.write_json(out / f"char_lm_{corpus}.json", {
        "corpus": {"name": corpus, "source": description, "characters": len(text),
                   "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
                   "alphabet_size": len(alphabet),
                   "split": {name: part.shape[0] for name, part in split.items()}},
        "config": config,
        "characters_seen_in_training": args.updates * args.batch_size * args.length,
        "seconds_this_invocation": round(time.perf_counter() - started, 1),
        "paper_test_bpc": PAPER,
        "runs": runs,
    }, backend=args.backend)
    plot(runs, corpus, args, out / f"char_lm_{corpus}.png")


def plot(runs: list, corpus: str, args, path: Path) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    # Long sequences start every args.length characters, so each bin of args.length positions
    # averages over the same characters: bins differ by position only, not by content.
    bin_width = args.length
    for run in runs:
        style = {"color": common.MODEL_COLOURS[run["model"]],
                 "linestyle": common.LINE_STYLES[args.lr.index(run["lr"]) % len(common.LINE_STYLES)]}
        label = f"{common.MODEL_LABELS[run['model']]}, lr {run['lr']:g}"
        history = run["history"]
        axes[0].plot(history["update"], history["train_loss"], label=label, **style)
        axes[1].plot(history["update"], history["val_bpc"], label=f"{label} (test {run['test_bpc']:.3f})", **style)
        per_position = torch.tensor(run["test_bpc_long_per_position"])
        binned = per_position[:len(per_position) // bin_width * bin_width].view(-1, bin_width).mean(1)
        centres = torch.arange(binned.shape[0]) * bin_width + bin_width / 2
        axes[2].plot(centres, binned, marker="o", label=f"{label} ({run['test_bpc_long']:.3f})", **style)
    axes[0].set(title=f"training bpc ({corpus}, length {args.length})", xlabel="updates",
                ylabel="bits per character (mean since last point)")
    axes[1].set(title=f"validation bpc (length {args.length})", xlabel="updates", ylabel="bits per character")
    axes[2].axvline(args.length, color="grey", linestyle="--", label=f"max_length = {args.length}")
    axes[2].set(title=f"test bpc by position, sequences of {args.long_length}",
                xlabel=f"position (mean over bins of {bin_width})", ylabel="bits per character")
    axes[2].set_xlim(0, args.long_length)
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    common.save_figure(fig, path)


if __name__ == "__main__":
    main()
