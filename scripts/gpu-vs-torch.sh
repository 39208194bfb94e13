#!/usr/bin/env bash
# Issue 16's comparison on one GPU node, MoKA and PyTorch in the same job:
# for each shape, moka-bench (bf16, erf GeLU unless named; layer step,
# dense GEMMs of the same FLOPs, forward only, peak memory) and then
# scripts/torch_moe_reference.py (PyTorch's loop over experts and its
# torch._grouped_mm layer, with their peak extra memory) on the same card.
# First the bf16 layer tests (test_moe_bf16). Shapes: A d2048 f8192 E8 top-2 T16384; C d2048 f1408 E64 top-6 T16384
# (fine-grained); D d1024 f4096 E16 top-2 T32768; C with SwiGLU; C top-1.
#
#   scripts/gpu-vs-torch.sh [bundle] [log-dir]
# MOKA_VS_SHAPES="A C" limits the shapes; MOKA_VS_VARIANTS the MoKA runs of
# each shape, ';'-separated sets of moka-bench overrides (default: experts
# without biases, the reference's layer, and with them, MoKA's default;
# e.g. "expert.gemm_streams=4;expert.gemm_grouped=true" for the GEMM
# variants); MOKA_VS_ARGS adds overrides (e.g. "expert.gemm_epilogue=false")
# to every MoKA run.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/gpu-env.sh"
nvidia-smi --query-gpu=index,name,clocks.max.sm --format=csv,noheader | tee "$logs/gpus.txt"
build_targets vs-build.log moka-bench test_moe_bf16
# The code the figures time, checked first: the bf16 layer against the
# double reference, the epilogues, the GEMM streams against one stream.
run_bf16_tests
for name in ${MOKA_VS_SHAPES:-A C D C-swiglu C-top1}; do
  [ -n "${moe_shapes[$name]:-}" ] || { echo "unknown shape $name (${!moe_shapes[*]})"; exit 2; }
  read -r T d f E k act <<< "${moe_shapes[$name]}"
  stamp "shape $name: T=$T d=$d d_ff=$f E=$E top-$k $act"
  IFS=';' read -r -a variants <<< "${MOKA_VS_VARIANTS:-expert.bias=false;expert.bias=true}"
  v=0
  for variant in "${variants[@]}"; do
    v=$((v + 1))
    echo "MoKA, $variant"
    "$b/drivers/moka-bench" "$root/input_decks/bench_layer.deck" bench.tokens=$T moe.d_model=$d moe.d_ff=$f \
      moe.num_experts=$E moe.top_k=$k expert.activation=$act $variant ${MOKA_VS_ARGS:-} \
      > "$logs/moka-$name-v$v.txt" 2>&1
    grep -E "layer|dense|peak|forward only|streams|grouped|error" "$logs/moka-$name-v$v.txt"
  done
  torch_act=""; [ "$act" = swiglu ] && torch_act=swiglu
  python3 "$here/torch_moe_reference.py" $T $d $f $E $k $torch_act > "$logs/torch-$name.txt" 2>&1
  grep -vE "^\s*$|Warning" "$logs/torch-$name.txt" | tail -6
done
stamp "done"
