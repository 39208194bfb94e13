#!/usr/bin/env bash
# Validates the cost model: calibrates this machine (one profile per rank
# count) and compares the predicted layer and step times of moka-bench's
# step mode with the measured ones over a sweep of configurations (d, d_ff,
# E, k, tokens, EP, EDP, slicing, the trace gate's skewed routing); prints
# each, then the mean absolute percentage error and the worst case.
#
#   scripts/cost-model-sweep.sh [build dir] [ranks ...]     (default: build, 1 2 4)
#
# Environment: MOKA_SWEEP_OUT (profiles and logs; default a fresh
# directory under /tmp), MOKA_SWEEP_PRECISION (fp32; bf16 on CUDA),
# MOKA_SWEEP_SET (cpu: d=128-256 layers, 1024 tokens per rank, at 1, 2 and
# 4 ranks; gpu: d=512-2048 layers, 16384 tokens, bf16, one rank per GPU),
# MPIEXEC (default mpirun with the flags a root shell on a small machine needs).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
build=${1:-$root/build}
shift || true
ranks=("$@")
[ ${#ranks[@]} -gt 0 ] || ranks=(1 2 4)
out=${MOKA_SWEEP_OUT:-$(mktemp -d /tmp/moka-sweep.XXXXXX)}
mkdir -p "$out"
set_name=${MOKA_SWEEP_SET:-cpu}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_PROC_BIND=${OMP_PROC_BIND:-false}
mpiexec=${MPIEXEC:-mpirun --oversubscribe}
bench=$build/drivers/moka-bench
trace=$root/tests/data/gpt_moe_32e_cut.h5
if [ "$set_name" = gpu ]; then
  T=16384; prec=bf16; calib=$root/input_decks/calibrate_gpu.deck
  # warm-up past two passes over the trace fixture's 9 rows: the first steps
  # over new expert-row patterns are slow on the GPU (docs/gpu-validation.md)
  base=(moe.d_model=1024 moe.d_ff=4096 bench.warmup=20 bench.iters=10)
else
  T=1024; prec=fp32; calib=$root/input_decks/calibrate_cpu.deck
  base=()
fi

# The configurations at each rank count: "label|key=value ...".
configs_1=(
  "base d128 f512 E8 k2|"
  "E16|moe.num_experts=16"
  "T/4|bench.tokens=$((T / 4))"
  "top-1|moe.top_k=1"
  "d256 f1024|moe.d_model=256 moe.d_ff=1024"
  "trace E32|moe.num_experts=32 gate.type=trace gate.trace_file=$trace"
)
configs_2=(
  "EP2|parallel.expert_parallel=2"
  "EDP2|parallel.expert_parallel=1"
  "S2|parallel.expert_slicing=2"
  "EP2 trace E32|parallel.expert_parallel=2 moe.num_experts=32 gate.type=trace gate.trace_file=$trace"
)
if [ "$set_name" = gpu ]; then
configs_1=(
  "base d1024 f4096 E8 k2|"
  "E16|moe.num_experts=16"
  "E32 trace|moe.num_experts=32 gate.type=trace gate.trace_file=$trace"
  "T/4|bench.tokens=$((T / 4))"
  "T/16|bench.tokens=$((T / 16))"
  "top-1|moe.top_k=1"
  "top-4 E16|moe.top_k=4 moe.num_experts=16"
  "d2048 f8192 T/2|moe.d_model=2048 moe.d_ff=8192 bench.tokens=$((T / 2))"
  "d512 f2048|moe.d_model=512 moe.d_ff=2048"
  "d2048 f4096 E32 trace|moe.d_model=2048 moe.d_ff=4096 moe.num_experts=32 gate.type=trace gate.trace_file=$trace"
  "d1024 f2048 E64 T/2|moe.d_ff=2048 moe.num_experts=64 bench.tokens=$((T / 2))"
  "d512 f1024 T/4 E8|moe.d_model=512 moe.d_ff=1024 bench.tokens=$((T / 4))"
)
fi
configs_4=(
  "EP4|parallel.expert_parallel=4"
  "EP2xEDP2|parallel.expert_parallel=2"
  "EP2xS2|parallel.expert_parallel=2 parallel.expert_slicing=2"
  "EP4 trace E32|parallel.expert_parallel=4 moe.num_experts=32 gate.type=trace gate.trace_file=$trace"
  "EP4 d256 f1024 T/2|parallel.expert_parallel=4 moe.d_model=256 moe.d_ff=1024 bench.tokens=$((T / 2))"
  "EDP4 E16|parallel.expert_parallel=1 moe.num_experts=16"
)

printf "%-22s %5s %10s %10s %7s %10s %10s %7s\n" "config" "ranks" "layer ms" "predicted" "error" "step ms" \
  "predicted" "error" | tee "$out/sweep.txt"
for n in "${ranks[@]}"; do
  prof=$out/profile-np$n.profile
  if [ ! -f "$prof" ]; then
    $mpiexec -np "$n" "$bench" "$calib" bench.profile_out="$prof" > "$out/calibrate-np$n.log" 2>&1 \
      || { cat "$out/calibrate-np$n.log"; exit 1; }
  fi
  var="configs_$n[@]"
  for c in "${!var}"; do
    label=${c%%|*}
    keys=${c#*|}
    log=$out/step-np$n-${label//[ \/]/_}.log
    # shellcheck disable=SC2086
    line=$($mpiexec -np "$n" "$bench" "$root/input_decks/bench_step.deck" bench.precision=$prec bench.tokens=$T \
      "${base[@]}" bench.profile="$prof" $keys 2>&1 | tee "$log" | grep '^validate:' || true)
    if [ -z "$line" ]; then
      echo "cost-model-sweep: '$label' at $n ranks printed no figures:" >&2
      tail -5 "$log" >&2
      exit 1
    fi
    eval "$(echo "$line" | sed 's/^validate: //')"
    printf "%-22s %5d %10.3f %10.3f %6.1f%% %10.3f %10.3f %6.1f%%\n" "$label" "$n" "$layer_ms" "$predicted_layer_ms" \
      "$(awk "BEGIN { print 100 * ($predicted_layer_ms - $layer_ms) / $layer_ms }")" "$step_ms" "$predicted_step_ms" \
      "$(awk "BEGIN { print 100 * ($predicted_step_ms - $step_ms) / $step_ms }")" | tee -a "$out/sweep.txt"
  done
done
awk 'function abs(x) { return x < 0 ? -x : x }
     NR > 1 {
       le = $(NF - 3); se = $NF; sub("%", "", le); sub("%", "", se);
       le = abs(le + 0); se = abs(se + 0); sl += le; ss += se; n++;
       if (le > wl) wl = le; if (se > ws) ws = se }
     END {
       printf "configurations: %d\n", n;
       printf "layer: mean absolute percentage error %.1f%%, worst %.1f%%\n", sl / n, wl;
       printf "step:  mean absolute percentage error %.1f%%, worst %.1f%%\n", ss / n, ws }' \
  "$out/sweep.txt" | tee -a "$out/sweep.txt"
echo "profiles and logs: $out"
