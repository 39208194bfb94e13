#!/usr/bin/env bash
# On a GPU node, after the CUDA build (build-gpu/): NVIDIA's compute-sanitizer
# over the GPU code paths (docs/gpu-validation.md). Each tool must report
# nothing of MoKA's; NCCL's own start-up probes (cudaFuncGetAttributes on
# kernels without an image for this card) are filtered out and listed.
#
#   scripts/gpu-sanitize.sh [bundle] [log-dir]
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/gpu-env.sh"
cs=${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer
command -v "$cs" >/dev/null || cs=compute-sanitizer
b=$root/build-gpu
fail=0
# check <name> <tool> <command...>: runs the tool, keeps its log, and counts
# its errors outside NCCL's probes.
check() {
  local name=$1 tool=$2; shift 2
  stamp "compute-sanitizer --tool $tool: $name"
  timeout "${MOKA_SANITIZE_TIMEOUT:-240}" "$cs" --tool "$tool" --print-limit 50 --error-exitcode 99 "$@" \
    > "$logs/sanitize-$name.log" 2>&1
  local rc=$?
  if [ $rc = 124 ]; then echo "  TIMED OUT after ${MOKA_SANITIZE_TIMEOUT:-240} s (what ran is in the log)"; fail=1; fi
  local ours; ours=$(grep -E "^========= (Invalid|Uninitialized|Race|Error|Program hit|Leaked)" "$logs/sanitize-$name.log" \
                      | grep -vc "cudaFuncGetAttributes")
  local probes; probes=$(grep -c "cudaFuncGetAttributes" "$logs/sanitize-$name.log")
  grep -E "ERROR SUMMARY|LEAK SUMMARY|RACECHECK SUMMARY" "$logs/sanitize-$name.log" | tail -2
  echo "  exit $rc; reports of MoKA's: $ours; NCCL start-up probe lines: $probes"
  if [ "$ours" != 0 ]; then
    fail=1
    grep -E "^=========" "$logs/sanitize-$name.log" | grep -v cudaFuncGetAttributes | head -20
  fi
}
check initcheck-train-bf16 initcheck "$b/drivers/moka-train" "$root/input_decks/quickstart.deck" train.precision=bf16 \
  train.steps=20 io.metrics_file=none
# The bf16 layer cases (the training case runs 300 steps: too slow under
# the tools; the quick start above trains under initcheck instead).
bf16_cases=--gtest_filter=-Bf16.TrainingConverges
check memcheck-test_moe_bf16 memcheck --leak-check full "$b/tests/test_moe_bf16" $bf16_cases
check initcheck-test_moe_bf16 initcheck "$b/tests/test_moe_bf16" $bf16_cases
check racecheck-epilogue racecheck "$b/tests/test_moe_bf16" --gtest_filter=Bf16.EpilogueMatchesKernels
check memcheck-test_moe_layer memcheck "$b/tests/test_moe_layer"
stamp "sanitizers: $([ $fail = 0 ] && echo clean || echo 'REPORTS OF OURS')"
exit $fail
