"""One bf16 training step of BNLSTM(backend="cuda") on the GPU at a target shape (B = 64,
I = H = 512, T = 4), compared with the same step through the version 1 GEMM
(BNLSTM_CUDA_RECURRENT_GEMM=cublas): exits non-zero if it faults or disagrees.
benchmarks/gpu_check.sh runs it before the sweep, in a process of its own."""
import sys

import torch

from benchmarks.providers import cublas_recurrent_gemm
from bnlstm_cuda import BNLSTM


def training_step(module, x):
    x = x.clone().requires_grad_(True)
    out = module(x)[0]
    out.float().pow(2).mean().backward()
    torch.cuda.synchronize()
    return out.float(), x.grad.float()


def main() -> int:
    torch.manual_seed(0)
    module = BNLSTM(512, 512, max_length=4, backend="cuda", device="cuda").to(torch.bfloat16)
    x = torch.randn(4, 64, 512, device="cuda").to(torch.bfloat16)
    out, grad = training_step(module, x)
    with cublas_recurrent_gemm():
        want_out, want_grad = training_step(module, x)
    out_error = (out - want_out).abs().max().item()
    grad_error = ((grad - want_grad).abs().max() / want_grad.abs().max()).item()
    print(f"version 2 against version 1, bf16 B=64 H=512 T=4: output {out_error:.2e}, "
          f"input gradient {grad_error:.2e} (relative to its largest)")
    # bf16 rounding of h_{t-1} in the GEMM against TF32's: differences of a few bf16 ulps.
    ok = torch.isfinite(out).all().item() and out_error < 0.1 and grad_error < 0.1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
