#!/usr/bin/env bash
# On a GPU node (no network needed): configure and build MoKA for CUDA
# against the bundle from scripts/make-bundle.sh, and run the tests.
#
#   scripts/gpu-node-build.sh [bundle] [build-dir]
#
# Environment: MOKA_JOBS (build jobs), MOKA_CTEST_ARGS (extra ctest
# arguments, e.g. "-L gpu"), MOKA_SKIP_TESTS=1 (build only),
# MOKA_UPSTREAM_TESTS=1 (also build and run the upstream Kokkos tests).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
bundle=$(cd "${1:-$root/.bundle}" && pwd)
build=${2:-$root/build-gpu}
jobs=${MOKA_JOBS:-$(nproc)}
kokkos=$bundle/kokkos-cuda
export PATH=${CUDA_HOME:-/usr/local/cuda}/bin:$PATH
export CUDA_ROOT=${CUDA_HOME:-/usr/local/cuda}
gen=Ninja; command -v ninja >/dev/null || gen="Unix Makefiles"

echo "== configure MoKA (CUDA) in $build"
cmake -S "$root" -B "$build" -G "$gen" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CXX_COMPILER="$kokkos/bin/nvcc_wrapper" -DKokkos_ROOT="$kokkos" -DKokkosKernels_ROOT="$kokkos" \
  -DMOKA_ENABLE_NCCL=ON ${MOKA_CMAKE_ARGS:-}
echo "== build"
cmake --build "$build" -j "$jobs"
if [ "${MOKA_SKIP_TESTS:-0}" != 1 ]; then
  echo "== ctest"
  (cd "$build" && ctest --output-on-failure --timeout 300 ${MOKA_CTEST_ARGS:-})
fi
if [ "${MOKA_UPSTREAM_TESTS:-0}" = 1 ]; then
  echo "== upstream Kokkos / Kokkos Kernels unit tests"
  cmake -S "$here/kokkos-upstream-tests" -B "$build-upstream" -G "$gen" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_CXX_COMPILER="$kokkos/bin/nvcc_wrapper" -DKokkos_ROOT="$kokkos" -DKokkosKernels_ROOT="$kokkos" \
    -DKOKKOS_SRC="$bundle/src/kokkos" -DKK_SRC="$bundle/src/kokkos-kernels" -DTAG=Cuda
  cmake --build "$build-upstream" -j "$jobs"
  (cd "$build-upstream" && ctest --output-on-failure --timeout 600)
fi
