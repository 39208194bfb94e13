#!/usr/bin/env bash
# On a GPU node (issue 16): why the multi-expert bf16 layer's unfenced step
# costs several times its fenced stages. Builds from the bundle, runs the
# device tests of the shadowing and bf16 layers, then times one layer (E32,
# trace gate, d 1024, d_ff 4096, 16384 tokens, erf GeLU) in moka-bench
# layer mode under variants that each remove one suspect:
#   plain, CUDA_LAUNCH_BLOCKING=1 (no queue), MOKA_FENCE_REGIONS=1 (a fence
#   per stage), CUBLAS_WORKSPACE_CONFIG=:4096:8 (a fixed cuBLAS workspace),
#   and the uniform top-k gate (routing that does not change per step);
#   then moka-bench step mode with and without the optimizer between the
#   layer steps (MOKA_DIAG_STEP_ONLY=1: that part alone).
#   scripts/gpu-step-diagnose.sh [bundle] [log-dir]
set -uo pipefail
source "$(dirname "$0")/gpu-env.sh"
build_from_bundle
if [ -z "${MOKA_GPU_SKIP_TESTS:-}" ]; then
  stamp "device tests: shadowing, bf16 layer"
  (cd "$b" && ctest --output-on-failure -R "test_shadowing|test_moe_bf16|test_gpu_np1") > "$logs/tests.log" 2>&1
  grep -E "tests passed|Failed|largest" "$logs/tests.log"
fi
trace=$root/tests/data/gpt_moe_32e_cut.h5
base="input_decks/bench_layer.deck moe.d_model=1024 moe.d_ff=4096 bench.iters=20"
run() {  # label, env..., -- extra keys
  local label=$1; shift
  local envs=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  stamp "$label"
  (cd "$root" && env "${envs[@]}" "$b/drivers/moka-bench" $base "$@") > "$logs/$label.log" 2>&1
  grep -E "layer zero_grad\+forward\+backward|forward only|error" "$logs/$label.log" | sed "s/^/  $label: /"
}
if [ -z "${MOKA_DIAG_STEP_ONLY:-}" ]; then
  g="moe.num_experts=32 gate.type=trace gate.trace_file=$trace"
  run "E32_trace_plain" X=1 -- $g
  run "E32_trace_blocking" CUDA_LAUNCH_BLOCKING=1 -- $g
  run "E32_trace_fenced" MOKA_FENCE_REGIONS=1 -- $g
  run "E32_trace_cublasws" CUBLAS_WORKSPACE_CONFIG=:4096:8 -- $g
  run "E32_topk_plain" X=1 -- moe.num_experts=32
  run "E8_topk_plain" X=1 -- moe.num_experts=8
fi
# Layer mode (a layer without process groups) against step mode without
# the optimizer (a layer on one-rank process groups), the same iterations,
# with the trace walking and standing still, and step mode's fenced stages.
if [ -n "${MOKA_DIAG_GROUPS:-}" ]; then
  S="input_decks/bench_step.deck bench.precision=bf16 moe.d_model=1024 moe.d_ff=4096 bench.tokens=16384 bench.step_optimizer=false"
  L="input_decks/bench_layer.deck moe.d_model=1024 moe.d_ff=4096"
  tg="moe.num_experts=32 gate.type=trace gate.trace_file=$trace"
  for v in "S moe.num_experts=32" "S $tg bench.iters=20 bench.warmup=3" "L $tg bench.iters=11 bench.warmup=2" \
           "S $tg gate.trace_stride=0" "L $tg gate.trace_stride=0" "S $tg bench.breakdown=true"; do
    set -- $v; m=$1; shift; d=${!m}
    stamp "$m $*" | sed "s|$trace|trace|"
    (cd "$root" && "$b/drivers/moka-bench" $d "$@") 2>&1 | grep -E "layer zero_grad|moka::MoELayer|error" | head -24
  done
  stamp "done"
  exit 0
fi
# Step mode (the layer between optimizer updates, as in training) against
# the same layer steps back to back.
step="input_decks/bench_step.deck bench.precision=bf16 moe.d_model=1024 moe.d_ff=4096 bench.tokens=16384"
for E in 8 32; do
  g="moe.num_experts=$E"
  [ "$E" = 32 ] && g="$g gate.type=trace gate.trace_file=$trace"
  for opt in true false; do
    stamp "step E$E optimizer $opt"
    (cd "$root" && "$b/drivers/moka-bench" $step $g bench.step_optimizer=$opt) 2>&1 | grep -E "layer zero_grad|error" | sed "s/^/  E$E opt=$opt: /"
  done
done
stamp "done"
