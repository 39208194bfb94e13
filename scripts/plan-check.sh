#!/usr/bin/env bash
# Checks moka-plan against measurement: plans a run over N ranks with a
# profile measured here, runs every layout it ranked (moka-bench step mode,
# the same layer and routing), and reports whether the layout ranked first
# is within 10% of the fastest measured one. Prints both tables; exits 1
# when it is not.
#
#   scripts/plan-check.sh [build dir] [ranks] [profile]
#
# Without a profile, calibrates one first (input_decks/calibrate_cpu.deck).
# The layer: d=128, d_ff=512, 32 experts, top-2, the trace gate over
# tests/data/gpt_moe_32e_cut.h5 (layer 0), 1024 tokens per rank; the plan's
# workload is the same trace. Placements: static (moka-bench step runs the
# contiguous placement).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
build=${1:-$root/build}
n=${2:-4}
prof=${3:-}
out=${MOKA_PLAN_CHECK_OUT:-$(mktemp -d /tmp/moka-plan-check.XXXXXX)}
mkdir -p "$out"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_PROC_BIND=${OMP_PROC_BIND:-false}
mpiexec=${MPIEXEC:-mpirun --oversubscribe}
trace=$root/tests/data/gpt_moe_32e_cut.h5
T=1024
layer=(moe.d_model=128 moe.d_ff=512 moe.num_experts=32 moe.top_k=2 gate.type=trace gate.trace_file=$trace
       gate.trace_layer=0)
if [ -z "$prof" ]; then
  prof=$out/profile-np$n.profile
  $mpiexec -np "$n" "$build/drivers/moka-bench" "$root/input_decks/calibrate_cpu.deck" bench.profile_out="$prof" \
    > "$out/calibrate.log" 2>&1 || { cat "$out/calibrate.log"; exit 1; }
fi
"$build/drivers/moka-plan" "$root/input_decks/plan_cpu.deck" "${layer[@]}" plan.ranks=$n plan.profile="$prof" \
  plan.tokens_per_rank=$T model.blocks=1 plan.policies=static plan.max_extra_slots=0 plan.trace_file="$trace" \
  plan.out="$out/plan.deck" plan.show=100 run.comm_check=false | tee "$out/plan.txt"
# The ranked layouts: "rank EP S EDP ..." rows of the table.
mapfile -t rows < <(awk '/^ +rank +EP/ { on = 1; next } /refused:|wrote/ { on = 0 } on && NF >= 8 { print $2, $3, $4, $8 }' "$out/plan.txt")
[ ${#rows[@]} -gt 0 ] || { echo "plan-check: moka-plan ranked no layout"; exit 1; }
printf "%-22s %12s %12s\n" "layout" "predicted ms" "measured ms" | tee "$out/check.txt"
best_meas=""; first_meas=""
for r in "${rows[@]}"; do
  read -r ep s edp pred <<< "$r"
  line=$($mpiexec -np "$n" "$build/drivers/moka-bench" "$root/input_decks/bench_step.deck" "${layer[@]}" \
    bench.tokens=$T parallel.expert_parallel=$ep parallel.expert_slicing=$s bench.iters=9 2>&1 \
    | grep "step (+ gradient" || true)
  meas=$(echo "$line" | sed -E 's/.*step \(\+ gradient sums \+ AdamW\): median ([0-9.]+) ms.*/\1/')
  [ -n "$meas" ] || { echo "plan-check: EP $ep x S $s printed no time"; exit 1; }
  printf "%-22s %12s %12s\n" "EP $ep x S $s x EDP $edp" "$pred" "$meas" | tee -a "$out/check.txt"
  [ -n "$first_meas" ] || first_meas=$meas
  if [ -z "$best_meas" ] || awk "BEGIN { exit !($meas < $best_meas) }"; then best_meas=$meas; fi
done
ratio=$(awk "BEGIN { printf \"%.3f\", $first_meas / $best_meas }")
echo "ranked first: measured $first_meas ms; fastest measured: $best_meas ms; ratio $ratio" | tee -a "$out/check.txt"
awk "BEGIN { exit !($ratio <= 1.10) }" && echo "plan-check: PASS (within 10%)" || { echo "plan-check: FAIL"; exit 1; }
