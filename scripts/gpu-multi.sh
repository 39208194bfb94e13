#!/usr/bin/env bash
# Issue 17 on a node with several GPUs (one rank per GPU): builds MoKA
# (CUDA) from the bundle, then the items named in MOKA_MULTI_ITEMS (default
# all; each run fits the device tool's 10-minute calls when given alone):
#  1. trace-driven bf16 training at EP = GPUs (the trace gate walking the
#     GPT-MoE fixture; one block of d 2048, d_ff 8192, 32 experts, top-2 by
#     default): the MoE-layer step (median of the metrics' moe_ms after
#     the first re-plans) under balance.policy = static, smartmoe, moka
#     without and with a spare slot per rank, and with the routing forced
#     perfectly balanced at the same token count (gate.trace_balanced); the
#     migration bytes and time of each re-plan; then the token exchange
#     benchmark, whose ncclSend/ncclRecv rows give the bandwidth to compare
#     the migrations with;
#  2. smart scheduling: the fp32 layer step (moka-bench step mode) at EP =
#     GPUs, unscheduled and at comm.schedule_degree = 2 and EP, with the
#     direct exchange and with NCCL messages;
#  3. dynamic shadowing on the trace workload (balance.shadowing, static
#     placement) against replication (item 1's moka with spare slots);
#  4. the cost model: calibration and the GPU sweep at 1, 2 and GPUs ranks
#     (scripts/cost-model-sweep.sh: predicted against measured, mean and
#     worst error);
#  5. checkpoint at step 20 on 4 ranks, restart on 4, 2 and 1 ranks, and
#     SIGTERM (scripts/gpu-restart-ranks.sh; the step-20 file is left in
#     the log directory for the CPU build);
#  6. the whole ctest suite (one rank per GPU where GPUs >= 4) and
#     scripts/gpu-perf.sh.
#
#   scripts/gpu-multi.sh [bundle] [log-dir]
# Environment: MOKA_MULTI_ITEMS ("1 3"), MOKA_MULTI_LAYER (the layer's deck
# overrides for items 1 and 3), MOKA_MULTI_TOKENS (tokens per step over all
# ranks, default 16384), MOKA_MULTI_STEPS (default 60), MOKA_BUILD (a
# build to use instead of building), MOKA_PRECISION (bf16; fp32 runs the
# same on a CPU build), MOKA_MULTI_RANKS (default: the GPUs),
# MOKA_MPI_FLAGS (mpirun's flags), MOKA_MULTI_EXCHANGE_MB (the exchange
# benchmark's largest payload, default 256).
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/gpu-env.sh"
n=${MOKA_MULTI_RANKS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
[ "$n" -ge 2 ] || { echo "gpu-multi: needs 2 or more GPUs (found $n); MOKA_MULTI_RANKS overrides"; exit 2; }
if [ -n "${MOKA_BUILD:-}" ]; then b=$MOKA_BUILD; else build_from_bundle; fi
items=${MOKA_MULTI_ITEMS:-1 2 3 4 5 6}
prec=${MOKA_PRECISION:-bf16}
mpi="mpirun ${MOKA_MPI_FLAGS:-}"
train=$b/drivers/moka-train
bench=$b/drivers/moka-bench
trace=$root/tests/data/gpt_moe_32e_cut.h5
tokens=${MOKA_MULTI_TOKENS:-16384}
steps=${MOKA_MULTI_STEPS:-60}
layer=(${MOKA_MULTI_LAYER:-moe.d_model=2048 moe.d_ff=8192})
work=/tmp/moka-multi
mkdir -p "$work"
echo "gpu-multi: $n ranks, items: $items, $prec"

# The trace workload of items 1 and 3: trace_balance.deck with one block of
# the chosen size and $tokens tokens per step.
trace_run() {  # trace_run <tag> <overrides...>
  local tag=$1; shift
  $mpi -n "$n" "$train" "$root/input_decks/trace_balance.deck" train.precision="$prec" model.blocks=1 "${layer[@]}" \
    gate.trace_file="$trace" train.batch_size="$tokens" task.train_size=$((4 * tokens)) train.steps="$steps" \
    parallel.expert_parallel="$n" io.log_every=20 io.eval_every="$steps" io.metrics_file="$work/$tag.csv" "$@" \
    > "$work/$tag.txt" 2>&1
  local rc=$?
  # moe_ms (column 12) after the first 20 steps; re-plans: migrated bytes and ms (columns 15, 16)
  local med
  med=$(awk -F, 'NR > 21 { print $12 }' "$work/$tag.csv" 2>/dev/null | sort -n |
        awk '{ a[NR] = $1 } END { if (NR) print a[int((NR + 1) / 2)]; else print "-" }')
  local mig
  mig=$(awk -F, 'NR > 1 && $15 > 0 { n++; b += $15; t += $16 } END { if (n) printf "%d re-plans moved %.1f MB in %.2f ms (%.2f GB/s)", n, b / 1e6, t, (t > 0 ? b / t / 1e6 : 0); else print "no migration" }' \
        "$work/$tag.csv" 2>/dev/null)
  printf "  %-22s rc=%d  MoE layer median %s ms  busiest/mean at the end %s  %s\n" "$tag" "$rc" "$med" \
    "$(grep -oE "ranks busiest/mean [0-9.]+" "$work/$tag.txt" | tail -1 | awk '{ print $3 }')" "$mig"
  [ $rc -eq 0 ] || grep -E "error" "$work/$tag.txt" | head -3
}
spare="balance.slots_per_rank=$((32 / n + 1))"

for item in $items; do
  case $item in
    1)
      stamp "1. trace-driven training, EP $n: placement policies and the balanced routing"
      trace_run static balance.policy=static balance.slots_per_rank=0
      trace_run smartmoe balance.policy=smartmoe balance.slots_per_rank=0
      trace_run moka_no_spare balance.policy=moka balance.slots_per_rank=0
      trace_run moka_spare balance.policy=moka "$spare"
      trace_run balanced balance.policy=static balance.slots_per_rank=0 gate.trace_balanced=true
      stamp "1. ncclSend/ncclRecv and the direct exchange at the migrations' sizes"
      $mpi -n "$n" "$bench" "$root/input_decks/bench_exchange.deck" bench.exchange_mb_min=4 bench.exchange_mb_max="${MOKA_MULTI_EXCHANGE_MB:-256}" \
        > "$work/exchange.txt" 2>&1
      grep -vE "^\s*$|WARNING|OMP_PROC_BIND|OpenMP" "$work/exchange.txt" | tail -14
      ;;
    2)
      stamp "2. smart scheduling: fp32 layer step at EP $n"
      for direct in auto off; do  # auto: the direct exchange where the GPUs allow it
        for g in $(printf "%s\n" 1 2 "$n" | sort -un); do
          [ "$direct" = auto ] && [ "$g" != 1 ] && continue  # scheduling takes the message exchange
          echo "  comm.exchange_direct=$direct comm.schedule_degree=$g"
          $mpi -n "$n" "$bench" "$root/input_decks/bench_step.deck" bench.precision=fp32 moe.d_model=1024 moe.d_ff=4096 \
            moe.num_experts=$((4 * n)) bench.tokens=$((tokens / n)) parallel.expert_parallel="$n" \
            comm.exchange_direct="$direct" comm.schedule_degree="$g" 2>&1 | grep -E "layer zero_grad|schedul|error" | head -3
        done
      done
      ;;
    3)
      stamp "3. dynamic shadowing against replication (moka with spare slots: item 1)"
      trace_run shadowing balance.policy=static balance.slots_per_rank=0 balance.shadowing=true
      [ -f "$work/moka_spare.csv" ] || trace_run moka_spare balance.policy=moka "$spare"
      ;;
    4)
      stamp "4. cost model: calibration and sweep at 1, 2, $n ranks"
      MOKA_SWEEP_SET=gpu MOKA_SWEEP_OUT=$logs/sweep MPIEXEC="mpirun --bind-to none ${MOKA_MPI_FLAGS:-}" \
        "$here/cost-model-sweep.sh" "$b" 1 2 "$n" 2>&1 | tail -30
      ;;
    5)
      stamp "5. checkpoint on 4 ranks, restart on 4, 2, 1; SIGTERM"
      MOKA_BUILD=$b "$here/gpu-restart-ranks.sh" "$bundle" "$logs/restart" 2>&1 | grep -vE "^\s*$"
      ;;
    6)
      stamp "6. the whole ctest suite, then scripts/gpu-perf.sh"
      (cd "$b" && ctest -j2 --timeout 600 -E test_shared_traces) > "$work/ctest.txt" 2>&1
      grep -E "tests passed|tests failed|\*\*\*" "$work/ctest.txt"
      "$here/gpu-perf.sh" "$bundle" "$logs/perf" 2>&1 | tail -40
      ;;
    *) echo "gpu-multi: unknown item '$item' (1-6)"; exit 2 ;;
  esac
done
cp "$work"/*.txt "$work"/*.csv "$logs/" 2>/dev/null
stamp done
