"""Sequential and permuted pixel classification: torch.nn.LSTM against BNLSTM.

The paper's sequential MNIST task (Cooijmans et al., 2017, section 5.1): an image is read
one pixel per step, in scan-line order ("sequential") or in one fixed random order
("permuted", which puts dependencies far apart in time); a linear layer classifies the
last hidden state. Both models get the same hyper-parameters, seed and batches; each keeps
its own initialisation (nn.LSTM's uniform one; BNLSTM's orthogonal W_hh, gamma 0.1). Each
runs at every learning rate given (two by default), since the two models do not prefer
the same one.

BN-LSTM is evaluated as the paper does, with population statistics estimated over the
training set (`BNLSTM.calibrate`, on a copy of the model; the first 3200 images, which is
all of digits'); the accuracy with the module's running averages (momentum 0.1) is
recorded beside it ("..._running").

By default the data are scikit-learn's 8x8 digits (64 steps, 1797 images, no download);
`--mnist DIR` reads the four standard MNIST idx files (784 steps) instead.

    PYTHONPATH=. python examples/pixel_digits.py                 # digits, about 7 minutes here
    PYTHONPATH=. python examples/pixel_digits.py --mnist ~/mnist --updates 20000 --eval-every 500
    PYTHONPATH=. python examples/pixel_digits.py --check-idx     # check the idx reader only

Test accuracy is that of the model at its best validation accuracy (evaluated every
`--eval-every` updates); the final model's is recorded too ("..._last").

Writes examples/results/pixel_<dataset>.json (test accuracies, curves) and .png (training
loss and validation accuracy against updates).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import common
from bnlstm_cuda import BNLSTM

TASKS = ("sequential", "permuted")
CALIBRATION_IMAGES = 3200  # population statistics from the first training images (all of digits')
PAPER = {"sequential": {"lstm": 0.989, "bnlstm": 0.990}, "permuted": {"lstm": 0.902, "bnlstm": 0.954}}


class PixelClassifier(nn.Module):
    def __init__(self, kind: str, hidden: int, steps: int, gamma: float, backend: str) -> None:
        super().__init__()
        self.rnn = common.make_rnn(kind, 1, hidden, max_length=steps, gamma_init=gamma, backend=backend)
        self.head = nn.Linear(hidden, 10)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: [B, T, 1] -> logits [B, 10]."""
        _, (h_n, _) = self.rnn(pixels)
        return self.head(h_n[-1])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mnist", metavar="DIR", help="directory with the MNIST idx files")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--models", nargs="+", choices=list(common.MODEL_LABELS),
                        default=list(common.MODEL_LABELS))
    parser.add_argument("--hidden", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, nargs="+", default=[2e-3, 1e-2],
                        help="Adam's learning rates: every model runs with each")
    parser.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping")
    parser.add_argument("--gamma", type=float, default=0.1, help="BNLSTM's gamma_init")
    parser.add_argument("--backend", default="auto", help="BNLSTM's backend")
    parser.add_argument("--updates", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint", metavar="PATH", help="save the state of every run here")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    parser.add_argument("--out", default=str(common.RESULTS), help="directory for JSON and PNG")
    parser.add_argument("--check-idx", action="store_true",
                        help="check the idx reader on generated files, then exit")
    return parser.parse_args()


def load_data(args) -> tuple:
    """(name, splits): splits maps train/val/test to images [N, T, 1] and labels [N]."""
    if args.mnist:
        name, splits = "mnist", common.load_mnist(args.mnist)
    else:
        name, splits = "digits", common.split_digits(common.load_digits_images())
    for split in splits.values():
        split["images"] = split["images"].flatten(1).unsqueeze(-1)  # [N, T, 1], scan-line order
    return name, splits


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, chunk: int = 1000) -> float:
    correct = sum((model(x).argmax(1) == y).sum().item()
                  for x, y in zip(images.split(chunk), labels.split(chunk)))
    return correct / labels.shape[0]


def evaluate_split(model: nn.Module, pixels: dict, splits: dict, split: str, batch_size: int) -> dict:
    """{split}_acc, and for BNLSTM also {split}_acc_running (the running averages')."""
    labels = splits[split]["labels"]
    if not isinstance(model.rnn, BNLSTM):
        return {f"{split}_acc": accuracy(model, pixels[split], labels)}
    # Calibration batches as large as training's, since each step's statistics are per batch.
    calibrated = common.with_population_statistics(
        model, lambda _: pixels["train"][:CALIBRATION_IMAGES].split(batch_size))
    return {f"{split}_acc": accuracy(calibrated, pixels[split], labels),
            f"{split}_acc_running": accuracy(model, pixels[split], labels)}


def main() -> None:
    args = parse_args()
    common.setup(args.threads)
    if args.check_idx:
        common.check_idx_reader()
        return
    dataset, splits = load_data(args)
    steps = splits["train"]["images"].shape[1]
    train = splits["train"]
    num_train = train["labels"].shape[0]
    per_epoch = num_train // args.batch_size
    # One fixed permutation of the pixels for the permuted task, whatever --seed says.
    permutation = torch.randperm(steps, generator=torch.Generator().manual_seed(4321))
    order = {"sequential": torch.arange(steps), "permuted": permutation}

    config = {key: value for key, value in vars(args).items()
              if key not in ("checkpoint", "resume", "threads", "out", "check_idx")}
    checkpoint = common.Checkpoint(args.checkpoint, config, args.resume)
    started = time.perf_counter()
    runs = []
    for task in args.tasks:
        pixels = {name: split["images"][:, order[task]] for name, split in splits.items()}

        def batch_at(update: int) -> tuple:
            # Epoch e visits the training set in the order of a shuffle seeded by (seed, e).
            epoch, position = divmod(update, per_epoch)
            shuffle = torch.randperm(num_train, generator=torch.Generator().manual_seed(args.seed * 100003 + epoch))
            index = shuffle[position * args.batch_size:(position + 1) * args.batch_size]
            return pixels["train"][index], train["labels"][index]

        def loss_of(model, batch) -> torch.Tensor:
            images, labels = batch
            return F.cross_entropy(model(images), labels)

        def evaluate(model, split: str = "val") -> dict:
            return evaluate_split(model, pixels, splits, split, args.batch_size)

        for lr in args.lr:
            for kind in args.models:
                name = f"{task}/lr={lr:g}/{kind}"
                torch.manual_seed(args.seed)
                model = PixelClassifier(kind, args.hidden, steps, args.gamma, args.backend)
                optimizer = torch.optim.Adam(model.parameters(), lr=lr)
                run = common.train_run(
                    name, model, optimizer, checkpoint, batch_at=batch_at, loss_of=loss_of,
                    evaluate=evaluate, updates=args.updates, eval_every=args.eval_every,
                    clip=args.clip, select="val_acc", higher_is_better=True,
                )
                if "test" not in run:
                    run["test"] = common.evaluate_best_and_last(model, run, lambda m: evaluate(m, "test"))
                    checkpoint.save(name, run)
                runs.append({"task": task, "lr": lr, "model": kind, **run["test"],
                             "best_val_acc": run["best"]["value"], "seconds": round(run["seconds"], 1),
                             "history": run["history"]})
                print(f"{name}: test accuracy {run['test']['test_acc']:.4f} ({run['seconds']:.0f} s)")

    out = Path(args.out)
    common.write_json(out / f"pixel_{dataset}.json", {
        "dataset": dataset,
        "steps": steps,
        "sizes": {name: split["labels"].shape[0] for name, split in splits.items()},
        "config": config,
        "epochs": args.updates / per_epoch,
        "seconds_this_invocation": round(time.perf_counter() - started, 1),
        "paper_mnist_test_accuracy": PAPER,
        "runs": runs,
    }, backend=args.backend)
    plot(runs, args, dataset, steps, out / f"pixel_{dataset}.png")


def plot(runs: list, args, dataset: str, steps: int, path) -> None:
    plt = common.pyplot()
    tasks = list(dict.fromkeys(run["task"] for run in runs))
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 4 * len(tasks)), squeeze=False)
    for run in runs:
        row = axes[tasks.index(run["task"])]
        style = {"color": common.MODEL_COLOURS[run["model"]],
                 "linestyle": common.LINE_STYLES[args.lr.index(run["lr"]) % len(common.LINE_STYLES)]}
        history = run["history"]
        label = f"{common.MODEL_LABELS[run['model']]}, lr {run['lr']:g}"
        row[0].plot(history["update"], history["train_loss"], label=label, **style)
        row[1].plot(history["update"], history["val_acc"], label=f"{label} (test {run['test_acc']:.1%})", **style)
    for task, row in zip(tasks, axes):
        row[0].set(title=f"{task} {dataset} ({steps} steps): training loss", xlabel="updates",
                   ylabel="cross-entropy (mean since last point)", yscale="log")
        row[1].set(title=f"{task} {dataset}: validation accuracy", xlabel="updates", ylabel="accuracy")
        for axis in row:
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)
    common.save_figure(fig, path)


if __name__ == "__main__":
    main()
