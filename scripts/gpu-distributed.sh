#!/usr/bin/env bash
# The distributed runs of docs/gpu-validation.md on one GPU node, without
# the whole suite: builds the drivers from the bundle, then moka-train on 2
# and 4 GPUs with several layouts (NCCL), the rank-failure abort on 2 GPUs,
# and the token-exchange benchmark on 4 GPUs.
#
#   scripts/gpu-distributed.sh [bundle] [log-dir]
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/gpu-env.sh"
nvidia-smi --query-gpu=index,name --format=csv,noheader
stamp "build moka-train and moka-bench (CUDA)"
cmake -S "$root" -B "$root/build-gpu" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CXX_COMPILER="$kokkos/bin/nvcc_wrapper" -DKokkos_ROOT="$kokkos" -DKokkosKernels_ROOT="$kokkos" \
  -DMOKA_ENABLE_NCCL=ON ${MOKA_CMAKE_ARGS:-} > "$logs/dist-build.log" 2>&1 &&
  cmake --build "$root/build-gpu" -j "$jobs" --target moka-train moka-bench >> "$logs/dist-build.log" 2>&1 \
  || { tail -40 "$logs/dist-build.log"; echo "BUILD FAILED"; exit 1; }
train="$root/build-gpu/drivers/moka-train"
deck="$root/input_decks/quickstart.deck"
stamp "rank failure on 2 GPUs (EP 2, NCCL): must end with the rank's message, not hang"
MOKA_TEST_FAIL_RANK=1 timeout 120 mpirun -n 2 -x MOKA_TEST_FAIL_RANK "$train" "$deck" parallel.expert_parallel=2 \
  io.metrics_file=none > "$logs/abort.txt" 2>&1
echo "exit status $? (124 = hung and killed by timeout)"; grep -E "^\[rank" "$logs/abort.txt"
ngpu=$(nvidia-smi -L | wc -l)
for run in "2 parallel.expert_parallel=2" "4 parallel.expert_parallel=4" "4 parallel.expert_parallel=2 parallel.expert_slicing=2" \
           "4 parallel.expert_parallel=2 train.precision=bf16" "4 parallel.expert_slicing=4"; do
  set -- $run; n=$1; shift
  [ "$ngpu" -ge "$n" ] || continue
  stamp "moka-train on $n GPUs: $*"
  mpirun -n $n "$train" "$deck" io.metrics_file=none "$@" 2>&1 | grep -E "comm check|training:|held-out loss|error"
done
stamp "token exchange vs NCCL all-to-all on $ngpu GPUs"
mpirun -n "$ngpu" "$root/build-gpu/drivers/moka-bench" "$root/input_decks/bench_exchange.deck" > "$logs/exchange-np$ngpu.txt" 2>&1
grep -vE "^\s*$|WARNING|OMP_PROC_BIND|OpenMP" "$logs/exchange-np$ngpu.txt" | tail -24
stamp done
