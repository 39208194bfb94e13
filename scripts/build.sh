#!/usr/bin/env bash
# Configures and builds MoKA, installing its dependencies first.
#
#   scripts/build.sh [host|cuda]      (default: host)
#
# host: OpenMP + Serial Kokkos, build directory build/ (or $MOKA_BUILD_DIR).
# cuda: CUDA (sm_90) + OpenMP Kokkos, build directory build-cuda/.
# Set KOKKOS_ROOT to use a Kokkos (>= 3.4, with Kokkos Kernels in the same
# or KokkosKernels_ROOT prefix) you already have; then nothing is built here.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
backend=${1:-host}
case "$backend" in host|cuda) ;; *) echo "build.sh: backend must be host or cuda, got '$backend'" >&2; exit 2;; esac
prefix_root=${MOKA_DEPS_PREFIX:-${HOME}/.cache/moka}
jobs=${MOKA_JOBS:-$(nproc)}

if [ -n "${KOKKOS_ROOT:-}" ]; then
  kokkos_root=$KOKKOS_ROOT
  "$here/setup-deps.sh" --apt-only
else
  "$here/setup-deps.sh" "$backend"
  kokkos_root=$prefix_root/kokkos-3.4.01-$backend
fi
kk_root=${KokkosKernels_ROOT:-$kokkos_root}

if [ "$backend" = cuda ]; then
  build=${MOKA_BUILD_DIR:-$root/build-cuda}
  cxx=$kokkos_root/bin/nvcc_wrapper
  export PATH=${CUDA_HOME:-/usr/local/cuda}/bin:$PATH
  extra=(-DMOKA_ENABLE_NCCL=ON)
else
  build=${MOKA_BUILD_DIR:-$root/build}
  cxx=${CXX:-g++}
  extra=()
fi

cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=${MOKA_BUILD_TYPE:-Release} \
  -DCMAKE_CXX_COMPILER="$cxx" -DKokkos_ROOT="$kokkos_root" -DKokkosKernels_ROOT="$kk_root" \
  "${extra[@]}" ${MOKA_CMAKE_ARGS:-} > "$build.configure.log" 2>&1 \
  || { cat "$build.configure.log"; exit 1; }
cmake --build "$build" -j "$jobs"
