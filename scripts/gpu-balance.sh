#!/usr/bin/env bash
# The balancer on a GPU node (docs/balance.md, docs/gpu-validation.md):
# builds MoKA (CUDA) from the bundle, then on the GPU(s) there: the layer
# with replicas against one rank (test_distributed's device cases: direct
# puts into symmetric windows and messages, ranks sharing the GPU), expert
# migration of device state (test_migration at 1, 2, 4 ranks), the host
# parts, trace-driven bf16 training under the moka policy on 4 ranks, and
# compute-sanitizer's memcheck on the device migration test.
#
#   scripts/gpu-balance.sh [bundle] [log-dir]
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/gpu-env.sh"
build_from_bundle

stamp "ctest: balancer, migration, replicas, layer and GPU tests"
(cd "$b" && ctest -j4 --output-on-failure --timeout 450 \
   -R "test_migration|test_balance|test_placement|test_distributed|test_gpu|test_moe_bf16|replay|trace_balance|balance_bad") \
   > "$logs/ctest-balance.log" 2>&1
grep -E "Test +#|tests passed|tests failed" "$logs/ctest-balance.log"
grep -E "spare slot|largest relative" "$logs/ctest-balance.log" | head -20

stamp "trace-driven training, bf16, 4 ranks on the GPU(s): static, moka without spare slots, moka with one per rank"
for p in static moka1 moka; do
  extra=""; [ $p != moka ] && extra="balance.slots_per_rank=0"; [ $p = moka1 ] && p=moka && tag=moka1 || tag=$p
  mpirun -n 4 "$b/drivers/moka-train" "$root/input_decks/trace_balance.deck" train.precision=bf16 \
    gate.trace_file="$root/tests/data/gpt_moe_32e_cut.h5" balance.policy=$p $extra io.metrics_file="$logs/train_$tag.csv" \
    > "$logs/train_$tag.txt" 2>&1; echo "rc=$?" >> "$logs/train_$tag.txt"
  echo "-- $tag"; grep -E "^balance|step +60/60|held-out loss|rc=|error" "$logs/train_$tag.txt" | head -8
  # median step time over the last 40 steps (after the re-plans)
  awk -F, 'NR > 21 { print $11 }' "$logs/train_$tag.csv" | sort -n | awk '{ a[NR] = $1 } END { print "median step ms", a[int((NR + 1) / 2)] }'
done

stamp "where the time goes (MOKA_FENCE_REGIONS=1: each stage fenced), static and moka"
for p in static moka; do
  extra=""; [ $p = static ] && extra="balance.slots_per_rank=0"
  MOKA_FENCE_REGIONS=1 mpirun -n 4 "$b/drivers/moka-train" "$root/input_decks/trace_balance.deck" train.precision=bf16 \
    gate.trace_file="$root/tests/data/gpt_moe_32e_cut.h5" balance.policy=$p $extra io.metrics_file=none \
    > "$logs/regions_$p.txt" 2>&1
  echo "-- $p"; grep -E "region|GradSync|MoELayer::(forward|backward|dispatch|exchange|exchange_back|exchange_plan)|MoEModel|migrate" "$logs/regions_$p.txt"
done

stamp "compute-sanitizer memcheck: device migration test, one rank"
compute-sanitizer --tool memcheck --error-exitcode 9 "$b/tests/test_migration" \
  --gtest_filter='*Device*' > "$logs/memcheck-migration.txt" 2>&1
echo "memcheck rc=$?"; grep -E "ERROR SUMMARY|PASSED|FAILED" "$logs/memcheck-migration.txt" | tail -3
echo "reports of MoKA's: $(grep -E '^========= (Invalid|Uninitialized|Race|Error|Program hit|Leaked)' "$logs/memcheck-migration.txt" \
  | grep -vc cudaFuncGetAttributes); NCCL start-up probe lines: $(grep -c cudaFuncGetAttributes "$logs/memcheck-migration.txt")"
stamp "done"
