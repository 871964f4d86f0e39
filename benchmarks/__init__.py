"""How much slower than torch.nn.LSTM is a batch-normalized LSTM, here, with this package?

`python -m benchmarks.run` measures every provider over a sweep and writes the results to
`./bnlstm-benchmarks/` (`--out DIR`; `--update-committed` refreshes the committed
`benchmarks/results/`); `python -m pytest benchmarks` is the pytest-benchmark suite for
regression tracking (`--benchmark-autosave`, then `--benchmark-compare`).
"""
