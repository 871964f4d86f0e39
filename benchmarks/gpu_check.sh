#!/usr/bin/env bash
# Everything a session lent a GPU should run, in one call of the device tool:
#
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=600)
#
# Stages, each in its own time box so that one that hangs or fails leaves time for the
# rest: the machine (GPU, torch, triton), the CUDA extension built for this GPU, the CUDA
# backend's GPU suite (tests/test_cuda_backend.py and tests/test_backend_behaviours.py for
# backend="cuda"), the GPU benchmark sweep beside cuDNN's nn.LSTM, and the Triton suite on CUDA
# tensors (tests/test_triton_backend.py and tests/test_backend_behaviours.py for
# backend="triton"). Logs and results land in
# $OUT (the device tool's folder; benchmarks/results/gpu-check elsewhere): at most 8 files,
# which is what the device tool brings back. The last lines printed are the summary.
#
# Time boxes (seconds) can be changed from the environment: BUILD_S, TESTS_S (the CUDA
# suite), BENCH_S, TRITON_S (the Triton suite). Their default total, 570 s, fits the 600 s a call may run; stages that end early
# leave the rest unused. The benchmark comes before the Triton suite: if time runs out, the
# figures the issues' targets are stated on are already written.
set -uo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-benchmarks/results/gpu-check}"
mkdir -p "$out"
py="${PYTHON:-python3}"
# The device machine has torch, triton, pytest and ninja but installs nothing: run the
# package from the working tree, and build into a cache of this call.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export BNLSTM_CACHE_DIR="${BNLSTM_CACHE_DIR:-/tmp/bnlstm-cache}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

summary=()
stage() {  # stage NAME SECONDS COMMAND...: log to $out/NAME.log, note exit status and time
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    echo "== $name (at most ${limit} s)"
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    local verdict="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then verdict="TIMED OUT"; elif [ "$rc" -ne 0 ]; then verdict="FAILED (exit $rc)"; fi
    tail -n 4 "$out/$name.log"
    summary+=("$(printf '%-12s %-18s %4d s   %s' "$name" "$verdict" $((SECONDS - started)) "$out/$name.log")")
}

stage machine 30 bash -c "nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv;
    $py -c 'import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, \"|\", torch.cuda.get_device_name())'"
# This GPU's architecture only (half the nvcc time of the default two); exported, so the
# tests load the library the build stage made (the cache key covers the architectures).
TORCH_CUDA_ARCH_LIST="$($py -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo 9.0)"
export TORCH_CUDA_ARCH_LIST
# 130 s: nvcc's pass over recurrent_cuda.cu for one architecture took 95-110 s on this
# project's 2-core machine (under load) after the tensor-core kernels came in, 16% more than before.
stage build "${BUILD_S:-130}" "$py" -m bnlstm_cuda.build --cuda
# Two processes: the tensor-core GEMM of half-precision inputs (version 2) first ran on a GPU
# here; should it fault, the sticky CUDA error must not fail the version 1 tests after it.
# "cuda" selects every test of test_cuda_backend.py (its file name) and backend="cuda" in
# test_backend_behaviours.py (whose test names avoid backend names).
v2_tests="tensor_core or half_precision or bf16 or fp16"
cuda_files="tests/test_cuda_backend.py tests/test_backend_behaviours.py"
stage tests_cuda "${TESTS_S:-110}" bash -c "
    '$py' -m pytest -q -rs -p no:cacheprovider $cuda_files -k 'cuda and not ($v2_tests)'; v1=\$?
    echo '== the tensor-core GEMM (version 2), in its own process'
    '$py' -m pytest -q -rs -p no:cacheprovider $cuda_files -k 'cuda and ($v2_tests)'; v2=\$?
    exit \$(( v1 || v2 ))"
# Short repetitions: the eager reference at T = 784 takes about a second a call.
# --budget: no configuration starts after that many seconds, so the files are written
# before the time box ends (the sweep's first four configurations are the issues' targets).
bench_s="${BENCH_S:-170}"
# First a bf16 training step through version 2 in a process of its own: if it fails, the
# sweep runs with version 1 (BNLSTM_CUDA_RECURRENT_GEMM=cublas) rather than lose every
# figure to a sticky CUDA error; the log says which.
stage benchmark "$bench_s" bash -c "
    if ! '$py' -m benchmarks.gpu_smoke; then
        echo 'version 2 failed its smoke test: the sweep runs with BNLSTM_CUDA_RECURRENT_GEMM=cublas'
        export BNLSTM_CUDA_RECURRENT_GEMM=cublas
    fi
    '$py' -m benchmarks.run --sweep gpu --min-runs 5 --min-time 0.2 --budget $((bench_s * 2 / 3)) --results-dir '$out'"
# Six processes at once: compiling the kernels for each variant, dtype and mode (about a
# second each, one at a time in a process) dominates this suite, and the machine has 16 cores.
# Each ends itself 15 s before the stage's box, so that their logs, one after another, still
# reach tests_triton.log. A shard is "file|-k expression"; "triton" selects backend="triton"
# in test_backend_behaviours.py (whose test names avoid backend names).
triton_s="${TRITON_S:-130}"
layer_level="layer_matches_reference or odd_sizes or start_step or streaming"
many_calls="gradcheck or float32"
triton_shards=("tests/test_backend_behaviours.py|triton and layer_matches_reference" \
               "tests/test_backend_behaviours.py|triton and (odd_sizes or start_step or streaming)" \
               "tests/test_backend_behaviours.py|triton and ($many_calls)" \
               "tests/test_backend_behaviours.py|triton and not ($layer_level or $many_calls)" \
               "tests/test_triton_backend.py|narrow or gradient_of_h" \
               "tests/test_triton_backend.py|not (narrow or gradient_of_h)")
stage tests_triton "$triton_s" bash -c "
    dir=\$(mktemp -d); status=0; i=0
    for shard in $(printf "'%s' " "${triton_shards[@]}"); do
        timeout --kill-after=5 $((triton_s - 15)) '$py' -m pytest -q -rs -p no:cacheprovider \\
            \"\${shard%%|*}\" -k \"\${shard#*|}\" >\"\$dir/\$i.log\" 2>&1 &
        i=\$((i + 1))
    done
    # The largest exit status: 124 when a shard ran out of time, which the summary reports.
    for pid in \$(jobs -p); do wait \$pid; rc=\$?; [ \$rc -gt \$status ] && status=\$rc; done
    for log in \"\$dir\"/*.log; do echo \"== shard \$(basename \$log .log)\"; cat \"\$log\"; done
    exit \$status"

echo "== summary"
printf '%s\n' "${summary[@]}"
# pytest's closing lines (tests_cuda has two: version 1, then the tensor-core GEMM)
for log in "$out"/tests_*.log; do
    echo "$(basename "$log"): $(grep -E "^[0-9]+ (passed|failed|skipped|errors?|deselected)" "$log" | paste -sd '|')"
done
