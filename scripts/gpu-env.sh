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
