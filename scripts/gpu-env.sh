# Sourced by the GPU-node scripts (gpu-validate.sh, gpu-distributed.sh):
# paths from their arguments [bundle] [log-dir], the CUDA toolkit on PATH,
# OpenMPI as root, and a `stamp` that prefixes seconds since the start.
here=$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)
root=$(cd "$here/.." && pwd)
bundle=$(cd "${1:-$root/.bundle}" && pwd)
logs=${2:-${OUT:-/tmp/moka-gpu-logs}}
mkdir -p "$logs"
jobs=${MOKA_JOBS:-$(nproc)}
kokkos=$bundle/kokkos-cuda
export PATH=${CUDA_HOME:-/usr/local/cuda}/bin:$PATH CUDA_ROOT=${CUDA_HOME:-/usr/local/cuda}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_PROC_BIND=false OMP_NUM_THREADS=4
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
# Lists the node's GPUs into $logs/gpus.txt, builds MoKA (CUDA) from the
# bundle into $root/build-gpu (log: $logs/build.log) and sets b to it;
# stops the script when the build fails.
build_from_bundle() {
  nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$logs/gpus.txt"
  stamp "build MoKA (CUDA) from the bundle"
  MOKA_SKIP_TESTS=1 MOKA_JOBS=$jobs "$here/gpu-node-build.sh" "$bundle" "$root/build-gpu" > "$logs/build.log" 2>&1 \
    || { tail -60 "$logs/build.log"; echo "BUILD FAILED"; exit 1; }
  b=$root/build-gpu
}
# Configures MoKA (CUDA, sm_90, NCCL; MOKA_CMAKE_ARGS added) in
# $root/build-gpu and builds only the given targets; the first argument is
# the log's file name in $logs. Sets b to the build; stops the script when
# the build fails.
#   build_targets perf-build.log moka-bench test_moe_bf16
build_targets() {
  local log=$logs/$1
  shift
  stamp "build $* (CUDA, sm_90)"
  cmake -S "$root" -B "$root/build-gpu" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_CXX_COMPILER="$kokkos/bin/nvcc_wrapper" -DKokkos_ROOT="$kokkos" -DKokkosKernels_ROOT="$kokkos" \
    -DMOKA_ENABLE_NCCL=ON ${MOKA_CMAKE_ARGS:-} > "$log" 2>&1 &&
    cmake --build "$root/build-gpu" -j "$jobs" --target "$@" >> "$log" 2>&1 \
    || { tail -40 "$log"; echo "BUILD FAILED"; exit 1; }
  b=$root/build-gpu
}
# Runs $b/tests/test_moe_bf16 (log: $logs/test_moe_bf16.txt) and prints
# "passed", or the failures; returns its exit status.
run_bf16_tests() {
  stamp "test_moe_bf16"
  if "$b/tests/test_moe_bf16" > "$logs/test_moe_bf16.txt" 2>&1; then echo "  passed"; return 0; fi
  echo "  FAILED"
  grep -E "FAILED|Failure|Expected|Which is" "$logs/test_moe_bf16.txt" | head -30
  return 1
}
# Issue 16's shapes, "T d d_ff E k activation" (experts without biases in
# the scripts that use them): A, C (fine-grained), D, and C with SwiGLU
# experts or top-1.
declare -A moe_shapes=(
  [A]="16384 2048 8192 8 2 gelu"
  [C]="16384 2048 1408 64 6 gelu"
  [D]="32768 1024 4096 16 2 gelu"
  [C-swiglu]="16384 2048 1408 64 6 swiglu"
  [C-top1]="16384 2048 1408 64 1 gelu")
