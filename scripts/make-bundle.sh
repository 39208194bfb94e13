#!/usr/bin/env bash
# Assembles a relocatable bundle for building and testing MoKA on a GPU node
# that has no network access (air-gapped clusters, the project's lent H100
# machines): the Kokkos + Kokkos Kernels CUDA prefix built here, with its
# absolute paths made relative, plus the Kokkos sources of the upstream unit
# tests used to validate that build on the node.
#
#   scripts/make-bundle.sh [dest]        (default: .bundle in the repo root)
#
# The node needs what every CUDA cluster node has: nvcc, CMake (>= 3.16),
# Ninja or Make, an MPI, NCCL, HDF5 (serial is fine), GoogleTest. Then:
#   scripts/gpu-node-build.sh <dest>     (configure, build, test)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
prefix_root=${MOKA_DEPS_PREFIX:-${HOME}/.cache/moka}
dest=${1:-$root/.bundle}
"$here/setup-deps.sh" cuda
src=$prefix_root/kokkos-3.4.01-cuda
tree=$prefix_root/src/trilinos-13.2.0

rm -rf "$dest"
mkdir -p "$dest"
cp -a "$src" "$dest/kokkos-cuda"
# Relocate: every absolute path to the build prefix or the source tree
# becomes relative to the installed CMake config files.
for f in $(grep -rl "$src\|$tree" "$dest/kokkos-cuda/lib/cmake" || true); do
  sed -i -e "s|$tree/kokkos/bin/nvcc_wrapper|\${CMAKE_CURRENT_LIST_DIR}/../../../bin/nvcc_wrapper|g" \
         -e "s|$src|\${CMAKE_CURRENT_LIST_DIR}/../../..|g" "$f"
done
# The CUDA toolkit: found on the node where it is (CMake's CUDAToolkit),
# not where it was on the build machine.
cuda_home=${CUDA_HOME:-/usr/local/cuda}
preamble='# MoKA bundle: locate the CUDA toolkit on this machine.
if(NOT DEFINED _MOKA_CUDA_LIBDIR)
  find_package(CUDAToolkit REQUIRED)
  set(_MOKA_CUDA_LIBDIR "${CUDAToolkit_LIBRARY_DIR}")
  set(_MOKA_CUDA_INCDIR "${CUDAToolkit_INCLUDE_DIRS}")
endif()'
for f in "$dest/kokkos-cuda/lib/cmake/Kokkos/KokkosConfig.cmake" "$dest/kokkos-cuda/lib/cmake/KokkosKernels/KokkosKernelsConfig.cmake"; do
  { echo "$preamble"; cat "$f"; } > "$f.new" && mv "$f.new" "$f"
done
for f in $(grep -rl "$cuda_home" "$dest/kokkos-cuda/lib/cmake" || true); do
  sed -i -e "s|\"$cuda_home/lib64/|\"\${_MOKA_CUDA_LIBDIR}/|g" -e "s|\"$cuda_home/lib/|\"\${_MOKA_CUDA_LIBDIR}/|g" \
         -e "s|\"$cuda_home/include\"|\"\${_MOKA_CUDA_INCDIR}\"|g" "$f"
done
if grep -rq "$prefix_root\|$cuda_home" "$dest/kokkos-cuda/lib/cmake"; then
  echo "make-bundle: absolute build paths left in the CMake files:" >&2
  grep -rn "$prefix_root\|$cuda_home" "$dest/kokkos-cuda/lib/cmake" >&2
  exit 1
fi
# Upstream unit-test sources (headers and mains only; a few MB).
mkdir -p "$dest/src"
(cd "$tree" && tar -cf - kokkos/tpls/gtest kokkos/core/unit_test kokkos/containers/unit_tests \
   kokkos/algorithms/unit_tests kokkos-kernels/unit_test/Test_Main.cpp \
   kokkos-kernels/unit_test/blas/Test_Blas3_gemm.hpp kokkos-kernels/unit_test/cuda/Test_Cuda.hpp \
   kokkos-kernels/unit_test/cuda/Test_Cuda_Blas3_gemm.cpp kokkos-kernels/test_common) | tar -xf - -C "$dest/src"
cat > "$dest/README.txt" <<TXT
MoKA GPU bundle, made $(date -u +%Y-%m-%dT%H:%MZ) on $(hostname) by scripts/make-bundle.sh.
kokkos-cuda/  Kokkos + Kokkos Kernels 3.4.01 (CUDA sm_90 + OpenMP, cuBLAS TPL), relocatable.
src/          upstream Kokkos / Kokkos Kernels unit-test sources for scripts/kokkos-upstream-tests.
Use: scripts/gpu-node-build.sh $(basename "$dest")
TXT
du -sh "$dest"
