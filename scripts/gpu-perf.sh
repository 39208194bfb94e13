#!/usr/bin/env bash
# The performance runs of docs/performance.md on one GPU node, with the GPU
# tests that guard the code they time: builds from the bundle, runs the bf16
# layer tests, the device variants of the distributed and communicator tests
# (1, 2 and 4 GPUs where present), the one-layer benchmark (plain and with
# the stage breakdown; erf GeLU, SwiGLU, and gelu_tanh with and without the
# cuBLASLt epilogues), the token-exchange benchmark on every GPU (direct
# puts into symmetric windows, and NCCL messages), and a
# bf16 quick-start training run on one GPU.
#
#   scripts/gpu-perf.sh [bundle] [log-dir]
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/gpu-env.sh"
nvidia-smi --query-gpu=index,name --format=csv,noheader
ngpu=$(nvidia-smi -L | wc -l)
# MOKA_PERF_LAYER_ONLY=1: only the bf16 layer tests and the one-layer
# benchmarks (one GPU is enough).
layer_only=${MOKA_PERF_LAYER_ONLY:-0}
targets="moka-train moka-bench test_moe_bf16 test_distributed test_comm"
[ "$layer_only" = 1 ] && targets="moka-bench test_moe_bf16"
build_targets perf-build.log $targets
fails=0
check() { local name=$1; shift; stamp "$name"; if "$@" > "$logs/$name.txt" 2>&1; then echo "  passed"; else
  echo "  FAILED (exit $?)"; fails=$((fails + 1)); tail -30 "$logs/$name.txt"; fi; }
check test_moe_bf16 "$b/tests/test_moe_bf16"
grep "bf16 relative errors" "$logs/test_moe_bf16.txt"
if [ "$layer_only" != 1 ]; then
# The direct exchange must run where the GPUs share a node (NCCL symmetric windows).
export MOKA_TEST_REQUIRE_DIRECT=1
check test_distributed_device_np1 "$b/tests/test_distributed" --gtest_filter='*Device*'
for n in 2 4; do
  [ "$ngpu" -ge "$n" ] || continue
  check "test_distributed_device_np$n" mpirun -n $n "$b/tests/test_distributed" --gtest_filter='*Device*'
  # MOKA_PERF_SKIP_COMM=1: the communicator tests are left out (unchanged code).
  [ "${MOKA_PERF_SKIP_COMM:-0}" = 1 ] || check "test_comm_np$n" mpirun -n $n "$b/tests/test_comm"
done
fi
# MOKA_PERF_SKIP_LAYER=1: the one-layer benchmarks are left out (one rank:
# no exchange; for runs about the distributed code only).
if [ "${MOKA_PERF_SKIP_LAYER:-0}" != 1 ]; then
stamp "one layer, issue-3 size (bf16)"
"$b/drivers/moka-bench" "$root/input_decks/bench_layer.deck" 2>&1 | grep -vE "^\s*$|WARNING|OMP_PROC_BIND|OpenMP"
"$b/drivers/moka-bench" "$root/input_decks/bench_layer.deck" bench.breakdown=true > "$logs/bench-breakdown.txt" 2>&1
grep -vE "^\s*$|WARNING|OMP_PROC_BIND|OpenMP" "$logs/bench-breakdown.txt" | tail -40
stamp "one layer, issue-3 size, SwiGLU (d_ff_in = 2 d_ff)"
"$b/drivers/moka-bench" "$root/input_decks/bench_layer.deck" expert.activation=swiglu 2>&1 | grep -E "layer|dense"
for epi in true false; do
  stamp "one layer, issue-3 size, gelu_tanh, expert.gemm_epilogue=$epi"
  "$b/drivers/moka-bench" "$root/input_decks/bench_layer.deck" expert.activation=gelu_tanh expert.gemm_epilogue=$epi \
    2>&1 | grep -E "layer|dense|activation:"
done
"$b/drivers/moka-bench" "$root/input_decks/bench_layer.deck" expert.activation=gelu_tanh bench.breakdown=true \
  > "$logs/bench-breakdown-gelu_tanh.txt" 2>&1
grep -E "expert_|activation|dispatch|combine|gate|undispatch|layer" "$logs/bench-breakdown-gelu_tanh.txt" | tail -24
fi
[ "$layer_only" = 1 ] && { stamp "done (layer only)"; exit 0; }
if [ "$ngpu" -ge 2 ]; then
  stamp "token exchange vs NCCL all-to-all on $ngpu GPUs"
  mpirun -n "$ngpu" "$b/drivers/moka-bench" "$root/input_decks/bench_exchange.deck" > "$logs/exchange-np$ngpu.txt" 2>&1
  grep -vE "^\s*$|WARNING|OMP_PROC_BIND|OpenMP" "$logs/exchange-np$ngpu.txt" | tail -32
  for opt in comm.exchange_direct=off; do
    stamp "token exchange, $opt"
    mpirun -n "$ngpu" "$b/drivers/moka-bench" "$root/input_decks/bench_exchange.deck" $opt \
      > "$logs/exchange-np$ngpu-$opt.txt" 2>&1
    grep -vE "^\s*$|WARNING|OMP_PROC_BIND|OpenMP" "$logs/exchange-np$ngpu-$opt.txt" | grep -v "equal blocks" | tail -20
  done
fi
if [ "$ngpu" -ge 4 ]; then
  deck="$root/input_decks/quickstart.deck"
  stamp "rank failure on 2 GPUs (EP 2, direct exchange): must end with the rank's message, not hang"
  MOKA_TEST_FAIL_RANK=1 timeout 120 mpirun -n 2 -x MOKA_TEST_FAIL_RANK "$b/drivers/moka-train" "$deck" \
    parallel.expert_parallel=2 io.metrics_file=none > "$logs/abort.txt" 2>&1
  echo "exit status $? (124 = hung and killed by timeout)"; grep -E "^\[rank|token exchange" "$logs/abort.txt"
  for run in "parallel.expert_parallel=4" "parallel.expert_parallel=4 comm.exchange_direct=off" \
             "parallel.expert_parallel=2 train.precision=bf16"; do
    stamp "moka-train on 4 GPUs: $run"
    mpirun -n 4 "$b/drivers/moka-train" "$deck" io.metrics_file=none $run 2>&1 |
      grep -E "token exchange|training:|held-out loss|error"
  done
fi
stamp "quick start on one GPU, bf16"
"$b/drivers/moka-train" "$root/input_decks/quickstart.deck" train.precision=bf16 io.metrics_file=none 2>&1 |
  grep -E "training:|held-out loss|error"
stamp "done: $fails failed"
[ "$fails" -eq 0 ]
