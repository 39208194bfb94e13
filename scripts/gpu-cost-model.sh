#!/usr/bin/env bash
# The cost model on a GPU node (docs/cost-model.md, docs/gpu-validation.md):
# builds MoKA (CUDA) from the bundle, runs the cost-model and topology-gate
# tests, calibrates the GPU (bf16) and runs the GPU sweep of
# scripts/cost-model-sweep.sh (predicted against measured layer and step
# times, one rank on one GPU).
#
#   scripts/gpu-cost-model.sh [bundle] [log-dir]
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/gpu-env.sh"
build_from_bundle

stamp "ctest: cost model, topology gate, shadowing, smart scheduling"
[ -n "${MOKA_GPU_SKIP_TESTS:-}" ] || (cd "$b" && ctest -j4 --output-on-failure --timeout 300 -R "cost_model|topology_gate|test_shadowing|test_schedule") > "$logs/ctest.log" 2>&1
grep -E "Test +#|tests passed|tests failed" "$logs/ctest.log"

stamp "calibrate and sweep (one GPU)"
# One rank, its host threads free to use the node's cores (mpirun binds a
# rank to one core by default; OpenMP threads sharing it spin).
[ -z "${MOKA_GPU_BREAKDOWN:-}" ] || for c in "moe.num_experts=32 gate.type=trace gate.trace_file=$root/tests/data/gpt_moe_32e_cut.h5" "bench.tokens=1024"; do
  # shellcheck disable=SC2086
  mpirun --bind-to none -np 1 "$b/drivers/moka-bench" "$root/input_decks/bench_step.deck" bench.precision=bf16 \
    moe.d_model=1024 moe.d_ff=4096 bench.tokens=16384 bench.breakdown=true $c 2>&1 | grep -v "^$" | head -40
done
MOKA_SWEEP_SET=gpu MOKA_SWEEP_OUT=$logs/sweep MPIEXEC="mpirun --oversubscribe --bind-to none" \
  "$here/cost-model-sweep.sh" "$b" 1
cat "$logs/sweep/profile-np1.profile" | head -24
stamp "done"
