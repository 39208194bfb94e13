#!/usr/bin/env bash
# On a GPU node with Nsight Compute (issue 16): where one bf16 layer step
# goes, kernel by kernel. Builds moka-bench (and, unless MOKA_KERNELS_SKIP_TESTS=1,
# the bf16 layer tests, which run first), then for each shape profiles one
# training step (zero_grad, forward, backward) after a first untimed one:
# moka-bench's bench.profile_step brackets that step with
# moka::profiler_capture and ncu runs with --profile-from-start off, so
# every other kernel runs unprofiled. ncu runs at the card's own clocks
# (--clock-control none), as the timed steps do. Prints the table of
# scripts/ncu-table.py (kernel, us, DRAM %, registers, active warps, part
# of the step) for each shape; the CSVs go into one archive,
# <log-dir>/kernels.tgz (a device job returns a limited number of files).
#
#   scripts/gpu-kernels.sh [bundle] [log-dir]
#
# Shapes: gpu-env.sh's moe_shapes (issue 16's A, C, D, C-swiglu, C-top1),
# experts without biases (the PyTorch reference's layer).
# MOKA_KERNELS_SHAPES="A D" picks shapes (default: A D); MOKA_KERNELS_ARGS
# adds moka-bench overrides (e.g. "expert.bias=true").
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/gpu-env.sh"
command -v ncu > /dev/null || { echo "gpu-kernels.sh: ncu (Nsight Compute) not on PATH"; exit 2; }
nvidia-smi --query-gpu=index,name,clocks.max.sm,power.limit --format=csv,noheader | tee "$logs/gpus.txt"
targets="moka-bench"
[ "${MOKA_KERNELS_SKIP_TESTS:-0}" = 1 ] || targets="$targets test_moe_bf16"
build_targets kernels-build.log $targets
[ "${MOKA_KERNELS_SKIP_TESTS:-0}" = 1 ] || run_bf16_tests
metrics=gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed
metrics=$metrics,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active
mkdir -p "$logs/kernels"
for name in ${MOKA_KERNELS_SHAPES:-A D}; do
  [ -n "${moe_shapes[$name]:-}" ] || { echo "unknown shape $name (${!moe_shapes[*]})"; exit 2; }
  read -r T d f E k act <<< "${moe_shapes[$name]}"
  stamp "shape $name: T=$T d=$d d_ff=$f E=$E top-$k $act"
  ncu --profile-from-start off --clock-control none --kernel-name-base demangled --metrics "$metrics" --csv \
    "$b/drivers/moka-bench" "$root/input_decks/bench_layer.deck" bench.tokens=$T moe.d_model=$d moe.d_ff=$f \
    moe.num_experts=$E moe.top_k=$k expert.activation=$act expert.bias=false bench.profile_step=true \
    bench.warmup=1 bench.iters=1 bench.warmup_seconds=0 ${MOKA_KERNELS_ARGS:-} > "$logs/kernels/$name.csv" 2> "$logs/kernels/$name.err" \
    || { echo "  ncu failed:"; tail -5 "$logs/kernels/$name.err"; continue; }
  python3 "$here/ncu-table.py" "$logs/kernels/$name.csv" --label "$name"
done
tar czf "$logs/kernels.tgz" -C "$logs" kernels && rm -rf "$logs/kernels"
stamp "done"
