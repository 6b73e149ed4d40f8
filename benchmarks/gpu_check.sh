#!/usr/bin/env bash
# One command on a CUDA machine (< 6 min on an H100/H200, torch 2.11 / triton 3.6):
#   1. install the package offline if iapt_fast.kernels is not importable yet,
#   2. run the kernel tests natively on the GPU,
#   3. time the kernels at realistic shapes (benchmarks/gpu_check.py): the autograd.Function of
#      eager calls and the custom operator torch.compile calls, against the eager and compiled
#      reference, writing
#      benchmarks/results/gpu_check_<card>_<date>.{md,json} and printing a short table,
#   4. time the one-launch vs the multi-launch inference forward (gpu_check_fused_<card>_<date>.*).
# Extra arguments go to gpu_check.py (e.g. --adapters 1).
set -uo pipefail
cd "$(dirname "$0")/.."
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
if ! python -c "import iapt_fast.kernels" 2>/dev/null; then
    pip install --no-deps --no-build-isolation -e . -q || exit 1
fi
mkdir -p benchmarks/results
status=0
# Time budget (H100/H200): tests ~3 min (mostly Triton JIT compiles of each configuration),
# benchmark ~2.5 min (torch.compile of the reference dominates). Fewer hypothesis examples on
# the GPU: every new shape class compiles fresh kernels.
# The custom operator's opcheck and the CUDA-graph decode step (tests/test_compile_model.py
# "cuda") run natively too.
IAPT_HYPOTHESIS_EXAMPLES="${IAPT_HYPOTHESIS_EXAMPLES:-4}" timeout 220 \
    python -m pytest -q -x tests/test_kernels.py tests/test_kernels_fused.py tests/test_kernels_hypothesis.py tests/test_custom_op.py \
    "tests/test_compile_model.py::test_compiled_decode_step_with_a_static_cache_gives_the_eager_tokens[llama-cuda]" 2>&1 \
    | tee benchmarks/results/gpu_check_tests.log | tail -15
test_status=${PIPESTATUS[0]}
[ "$test_status" -ne 0 ] && { echo "gpu_check: kernel tests FAILED (status $test_status)"; status=1; }
timeout 180 python benchmarks/gpu_check.py "$@" || status=1
# One-launch vs multi-launch inference forward, B·N 1×32..64×1024, A = 1 and 32 (~1 min): the
# measurement the default per shape (kernels/launch.py fused_forward_pays) is to follow.
timeout 150 python benchmarks/gpu_check.py --fused-sweep "$@" || status=1
timeout 420 python benchmarks/run.py --suite serve --device cuda --no-progress || status=1  # vLLM: base vs IAPT vs multi-LoRA (rows skipped, saying how, without .venv-serve)
exit $status
