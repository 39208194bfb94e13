#!/usr/bin/env bash
# The GPU proof, in one command on a GPU node (docs/gpu-validation.md):
# environment, MoKA CUDA build from the bundle, the MoKA test suite (GPU
# tests included), moka-train on 1 and 2 GPUs, distributed training and the
# token-exchange benchmark on 2 and 4 GPUs, and the upstream Kokkos /
# Kokkos Kernels unit tests of the features MoKA uses (built concurrently).
#
#   scripts/gpu-validate.sh [bundle] [log-dir]
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/gpu-env.sh"

{
  stamp "environment"
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
  nvcc --version | tail -2
  cmake --version | head -1; ninja --version; mpirun --version | head -1
  ls -d ${CUDA_HOME:-/usr/local/cuda}/lib* 2>&1
  env | grep -E '^NCCL_' || true
} > "$logs/env.txt" 2>&1
cat "$logs/env.txt"

stamp "build MoKA (CUDA) from the bundle"
MOKA_SKIP_TESTS=1 MOKA_JOBS=$jobs "$here/gpu-node-build.sh" "$bundle" "$root/build-gpu" > "$logs/build.log" 2>&1 \
  || { tail -60 "$logs/build.log"; echo "BUILD FAILED"; exit 1; }
tail -3 "$logs/build.log"

upstream=${MOKA_UPSTREAM_TESTS:-1}
stamp "start the upstream Kokkos tests build in the background (MOKA_UPSTREAM_TESTS=$upstream)"
( [ "$upstream" = 1 ] || exit 0; cmake -S "$here/kokkos-upstream-tests" -B "$root/build-upstream" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_CXX_COMPILER="$kokkos/bin/nvcc_wrapper" -DKokkos_ROOT="$kokkos" -DKokkosKernels_ROOT="$kokkos" \
    -DKOKKOS_SRC="$bundle/src/kokkos" -DKK_SRC="$bundle/src/kokkos-kernels" -DTAG=Cuda \
  && cmake --build "$root/build-upstream" -j "$jobs" ) > "$logs/upstream-build.log" 2>&1 &
upstream_pid=$!

stamp "MoKA ctest (all labels)"
(cd "$root/build-gpu" && ctest --output-on-failure --timeout 600) > "$logs/ctest.log" 2>&1
ctest_rc=$?
grep -E "tests passed|tests failed|Test +#|Skipped|Failed" "$logs/ctest.log" | tail -40
stamp "GPU test output"
(cd "$root/build-gpu" && ./tests/test_gpu --gtest_brief=0 2>&1 | grep -E "CUDA device|comm check|OK|FAIL" ) | tee "$logs/test_gpu_np1.txt"
(cd "$root/build-gpu" && mpirun -n 2 ./tests/test_gpu 2>&1 | grep -E "CUDA device|comm check|OK|FAIL|PASSED" ) | tee "$logs/test_gpu_np2.txt"

for n in 1 2; do
  stamp "moka-train on $n rank(s)"
  mpirun -n $n "$root/build-gpu/drivers/moka-train" "$root/input_decks/quickstart.deck" > "$logs/moka-train-np$n.txt" 2>&1
  echo "rc=$?" >> "$logs/moka-train-np$n.txt"
  grep -vE "^\s*$" "$logs/moka-train-np$n.txt" | grep -E "MoKA|MPI:|Kokkos|CUDA device|NCCL|HDF5|comm check|done|rc=|error"
done

stamp "distributed runs (scripts/gpu-distributed.sh)"
"$here/gpu-distributed.sh" "$bundle" "$logs"

stamp "moka-bench: one layer, bf16, the issue-3 size"
"$root/build-gpu/drivers/moka-bench" "$root/input_decks/bench_layer.deck" bench.breakdown=true > "$logs/bench.txt" 2>&1
tail -30 "$logs/bench.txt"
stamp "moka-bench: the same layer in fp32 (Kokkos Kernels -> cuBLAS sgemm)"
"$root/build-gpu/drivers/moka-bench" "$root/input_decks/bench_layer.deck" bench.precision=fp32 bench.iters=5 > "$logs/bench-fp32.txt" 2>&1
tail -4 "$logs/bench-fp32.txt"
stamp "bf16 accuracy and training (test_moe_bf16)"
(cd "$root/build-gpu" && ./tests/test_moe_bf16 2>&1 | grep -E "relative errors|held-out loss|OK \]|FAILED") | tee "$logs/bf16.txt"
stamp "moka-train quickstart, bf16 and fp32, 1 GPU"
for p in bf16 fp32; do
  "$root/build-gpu/drivers/moka-train" "$root/input_decks/quickstart.deck" train.precision=$p io.metrics_file=none 2>&1 | grep -E "training:|held-out loss"
done | tee "$logs/train-1gpu.txt"

stamp "compute-sanitizer: memcheck, initcheck, racecheck (scripts/gpu-sanitize.sh)"
"$here/gpu-sanitize.sh" "$bundle" "$logs"

stamp "wait for the upstream build"
wait $upstream_pid; up_rc=$?
tail -3 "$logs/upstream-build.log"
if [ "$upstream" != 1 ]; then
  echo "upstream tests not requested"
elif [ $up_rc = 0 ]; then
  stamp "upstream Kokkos / Kokkos Kernels unit tests"
  (cd "$root/build-upstream" && ctest --output-on-failure --timeout 600) > "$logs/upstream-ctest.log" 2>&1
  grep -E "tests passed|tests failed|Test +#" "$logs/upstream-ctest.log"
  grep -E "\[==========\] .* ran|\[  PASSED  \]|\[  FAILED  \]|\[  SKIPPED \]" "$logs/upstream-ctest.log"
else
  echo "UPSTREAM BUILD FAILED"; grep -E "error" -A3 "$logs/upstream-build.log" | head -40
fi
stamp "done (MoKA ctest rc=$ctest_rc, upstream build rc=$up_rc)"
