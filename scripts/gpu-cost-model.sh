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
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$logs/gpus.txt"

stamp "build MoKA (CUDA) from the bundle"
MOKA_SKIP_TESTS=1 MOKA_JOBS=$jobs "$here/gpu-node-build.sh" "$bundle" "$root/build-gpu" > "$logs/build.log" 2>&1 \
  || { tail -60 "$logs/build.log"; echo "BUILD FAILED"; exit 1; }
b=$root/build-gpu

stamp "ctest: cost model, topology gate"
(cd "$b" && ctest -j4 --output-on-failure --timeout 300 -R "cost_model|topology_gate") > "$logs/ctest.log" 2>&1
grep -E "Test +#|tests passed|tests failed" "$logs/ctest.log"

stamp "calibrate and sweep (one GPU)"
MOKA_SWEEP_SET=gpu MOKA_SWEEP_OUT=$logs/sweep MPIEXEC="mpirun --oversubscribe" "$here/cost-model-sweep.sh" "$b" 1
cat "$logs/sweep/profile-np1.profile" | head -24
stamp "done"
