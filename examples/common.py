"""What the examples share: set-up, data, the training loop with checkpoints, and records.

Every result (JSON, PNG) carries the command that made it. Runs are deterministic given
their seed: a model is built right after `torch.manual_seed(seed)`, and the batch of each
update is a pure function of the update number, so a resumed run sees the data it would
have seen without the interruption.
"""
from __future__ import annotations

import ast
import copy
import gzip
import json
import os
import platform
import shlex
import struct
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import bnlstm_cuda
from bnlstm_cuda import BNLSTM
from bnlstm_cuda.backends import resolve_backend

RESULTS = Path(__file__).resolve().parent / "results"


# Set-up and records ---------------------------------------------------------------------

def command_line() -> str:
    """The command that is running, as a user would type it from the repository root."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]))
    return shlex.join(["python", script, *sys.argv[1:]])


def setup(threads: int) -> None:
    # These models run time loops of small ops: one thread wastes little, and two threads
    # on a 2-core machine that others were loading ran 5-7x slower. Results depend on the
    # thread count (the order of reductions), so it is recorded with them.
    torch.set_num_threads(threads)


def source_version() -> str:
    """`git describe --always --dirty` of the checkout the package comes from, if any."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                              cwd=Path(bnlstm_cuda.__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(backend: str = "auto") -> Dict[str, str]:
    layer = resolve_backend(backend, torch.device("cpu"))
    return {
        "bnlstm_cuda_source": source_version(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "bnlstm_cuda": bnlstm_cuda.__version__,
        "bnlstm_backend": f"{backend}: {layer.__module__}.{layer.__name__}",
        "threads": str(torch.get_num_threads()),
        "machine": platform.machine(),
    }


def write_json(path: Path, payload: dict, backend: str = "auto") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": command_line(), "environment": environment(backend), **payload}
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")


def pyplot():
    """matplotlib.pyplot, drawing to files only (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Save `fig` with the command that made it as a caption under the plots (and in the
    PNG's Description field)."""
    command = command_line()
    caption = "\n".join(textwrap.wrap(command, 150))
    fig.text(0.5, 0.005, caption, ha="center", va="bottom", fontsize=7, family="monospace")
    fig.tight_layout(rect=(0, 0.03 + 0.015 * caption.count("\n"), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Description": command})
    print(f"wrote {path}")


def make_rnn(kind: str, input_size: int, hidden_size: int, *, max_length: int,
             gamma_init: float = 0.1, backend: str = "auto") -> nn.Module:
    """A batch-first single-layer recurrent net: "lstm" (torch.nn.LSTM) or "bnlstm"."""
    if kind == "lstm":
        return nn.LSTM(input_size, hidden_size, batch_first=True)
    if kind == "bnlstm":
        return BNLSTM(input_size, hidden_size, batch_first=True, max_length=max_length,
                      gamma_init=gamma_init, backend=backend)
    raise ValueError(f"unknown model kind {kind!r}")


def with_population_statistics(model: nn.Module, rnn_inputs: Callable[[nn.Module], Iterable]) -> nn.Module:
    """A copy of `model`, in evaluation mode, whose BNLSTM `model.rnn` holds population
    statistics over the inputs that `rnn_inputs(copy)` yields: the paper's evaluation
    statistics, estimated over the training set rather than by running averages."""
    calibrated = copy.deepcopy(model)
    calibrated.rnn.calibrate(rnn_inputs(calibrated))
    return calibrated.eval()


MODEL_LABELS = {"lstm": "LSTM", "bnlstm": "BN-LSTM"}
MODEL_COLOURS = {"lstm": "tab:blue", "bnlstm": "tab:orange"}
LINE_STYLES = ("-", "--", ":", "-.")  # one per learning rate


# Data: digits, MNIST idx files, a text corpus ---------------------------------------------

def load_digits_images() -> Dict[str, torch.Tensor]:
    """scikit-learn's 1797 8x8 digits: images [N, 8, 8] in [0, 1] and labels [N]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    return {"images": images, "labels": torch.tensor(digits.target, dtype=torch.long)}


def split_digits(data: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, torch.Tensor]]:
    """Train 70%, validation 10%, test 20%, from one fixed shuffle (independent of --seed)."""
    n = data["labels"].shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1234))
    n_test, n_val = n // 5, n // 10
    parts = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    return {name: {key: value[index] for key, value in data.items()} for name, index in parts.items()}


_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> torch.Tensor:
    """Read an idx file (MNIST's format; gzip-compressed if the name ends in .gz).

    Layout: two zero bytes, a type code, the number of dimensions n, n big-endian uint32
    sizes, then the data in row-major order, big-endian.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an idx file (first bytes {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_TYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path}: {len(data) - header} data bytes for shape {shape}, expected {expected}")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an idx file (gzip-compressed if the name ends in .gz)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as handle:
        handle.write(header + array.tobytes())


_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}


def _find_mnist_file(directory: Path, stem: str) -> Path:
    # Both spellings circulate ("...-idx3-ubyte" and "....idx3-ubyte"), compressed or not.
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{directory}: no {stem}[.gz] (nor {dotted}[.gz])")


def load_mnist(directory: Path) -> Dict[str, Dict[str, torch.Tensor]]:
    """MNIST from the four standard idx files: the last 5000 training images (or a tenth,
    for a small set) are the validation set. Images [N, 28, 28] in [0, 1], labels [N]."""
    raw = {key: read_idx(_find_mnist_file(Path(directory), stem)) for key, stem in _MNIST_FILES.items()}
    images = {key: raw[f"{key}_images"].float() / 255.0 for key in ("train", "test")}
    labels = {key: raw[f"{key}_labels"].long() for key in ("train", "test")}
    n_val = min(5000, images["train"].shape[0] // 10)
    n_train = images["train"].shape[0] - n_val
    return {
        "train": {"images": images["train"][:n_train], "labels": labels["train"][:n_train]},
        "val": {"images": images["train"][n_train:], "labels": labels["train"][n_train:]},
        "test": {"images": images["test"], "labels": labels["test"]},
    }


def check_idx_reader() -> None:
    """Write a small MNIST-shaped set of idx files (plain and gzip) and read it back."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(30, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=30, dtype=np.uint8)
    for suffix in ("", ".gz"):
        with tempfile.TemporaryDirectory() as directory:
            for key, stem in _MNIST_FILES.items():
                array = images if key.endswith("images") else labels
                write_idx(Path(directory) / (stem + suffix), array)
            data = load_mnist(Path(directory))
        train_val = torch.cat([data["train"]["images"], data["val"]["images"]])
        assert torch.equal((train_val * 255).round().to(torch.uint8), torch.from_numpy(images))
        assert torch.equal(data["test"]["labels"], torch.from_numpy(labels).long())
        assert data["val"]["images"].shape == (3, 28, 28)
    print("idx reader: OK (plain and gzip, 30 images of 28x28, 27 train / 3 val / 30 test)")


def stdlib_docstrings() -> str:
    """The docstrings of the standard library's top-level modules, in file-name order:
    English prose with some code, present on every Python installation (its exact text
    changes with the Python version)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                docstring = ast.get_docstring(node)
                if docstring:
                    parts.append(docstring)
    return "\n\n".join(parts)


# Training with checkpoints ------------------------------------------------------------------

class Checkpoint:
    """One file holding the state of every run of a command, written atomically.

    Without a path nothing is written. With `resume`, an existing file is loaded; its
    configuration must equal this command's, so that a resumed run continues the same run.
    """

    def __init__(self, path: Optional[str], config: dict, resume: bool) -> None:
        self.path = Path(path) if path else None
        self.state = {"config": config, "runs": {}}
        if resume:
            if self.path is None:
                raise SystemExit("--resume needs --checkpoint PATH")
            if self.path.exists():
                saved = torch.load(self.path, weights_only=False)
                if saved["config"] != config:
                    raise SystemExit(f"{self.path} was written with other settings:\n"
                                     f"  saved {saved['config']}\n  now   {config}")
                self.state = saved
                print(f"resuming from {self.path}: {self._summary()}")
            else:
                print(f"{self.path} does not exist yet: starting afresh")

    def _summary(self) -> str:
        runs = self.state["runs"]
        return ", ".join(f"{name} at update {run['update']}" for name, run in runs.items()) or "no run"

    def run(self, name: str) -> Optional[dict]:
        return self.state["runs"].get(name)

    def save(self, name: str, run: dict) -> None:
        self.state["runs"][name] = run
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        torch.save(self.state, partial)
        os.replace(partial, self.path)


def train_run(
    name: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    checkpoint: Checkpoint,
    *,
    batch_at: Callable[[int], tuple],
    loss_of: Callable[[nn.Module, tuple], torch.Tensor],
    evaluate: Callable[[nn.Module], Dict[str, float]],
    updates: int,
    eval_every: int,
    clip: float,
    select: str,
    higher_is_better: bool,
) -> dict:
    """Train `model` for `updates` updates, or finish the run `checkpoint` holds under `name`.

    batch_at(update) gives that update's batch; loss_of(model, batch) its mean loss;
    evaluate(model) validation metrics by name, in evaluation mode and without gradients.
    Every `eval_every` updates the mean training loss since the last record and the
    metrics are recorded, the model is kept if metric `select` is the best so far, and the
    checkpoint is written. Returns the run's record: "update", "seconds", "history" (lists
    "update", "train_loss" and one per metric) and "best" ("update", "value", "model": the
    state dict at the best `select`). `model` ends in its final state.
    """
    run = checkpoint.run(name)
    if run is None:
        run = {"update": 0, "seconds": 0.0, "history": {"update": [], "train_loss": []}}
    else:
        model.load_state_dict(run["model"])
        optimizer.load_state_dict(run["optimizer"])
        torch.set_rng_state(run["rng"])
    history = run["history"]
    losses = []
    started = time.perf_counter() - run["seconds"]
    bar = tqdm(range(run["update"], updates), initial=run["update"], total=updates, desc=name,
               dynamic_ncols=True)
    for update in bar:
        model.train()
        loss = loss_of(model, batch_at(update))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        losses.append(loss.item())
        if (update + 1) % eval_every == 0 or update + 1 == updates:
            model.eval()
            with torch.no_grad():
                metrics = evaluate(model)
            history["update"].append(update + 1)
            history["train_loss"].append(sum(losses) / len(losses))
            for key, value in metrics.items():
                history.setdefault(key, []).append(value)
            value = metrics[select]
            if "best" not in run or _improves(value, run["best"]["value"], higher_is_better):
                run["best"] = {"update": update + 1, "value": value, "model": copy.deepcopy(model.state_dict())}
            losses = []
            bar.set_postfix({"loss": f"{history['train_loss'][-1]:.3f}",
                             **{key: f"{value:.3f}" for key, value in metrics.items()}})
            run.update(update=update + 1, seconds=time.perf_counter() - started,
                       model=model.state_dict(), optimizer=optimizer.state_dict(),
                       rng=torch.get_rng_state())
            checkpoint.save(name, run)
    bar.close()
    return run


def evaluate_best_and_last(model: nn.Module, run: dict, evaluate: Callable[[nn.Module], dict]) -> dict:
    """evaluate() the model kept at the best validation metric (model selection as usual)
    and the final one (its keys suffixed "_last"). Leaves `model` in the best state."""
    model.eval()
    with torch.no_grad():
        last = evaluate(model)
        model.load_state_dict(run["best"]["model"])
        best = evaluate(model)
    return {"best_update": run["best"]["update"], **best, **{f"{key}_last": value for key, value in last.items()}}


def _improves(value: float, best: float, higher_is_better: bool) -> bool:
    return value > best if higher_is_better else value < best
