#!/usr/bin/env bash
# Checkpoints on a GPU node (docs/checkpoints.md, docs/gpu-validation.md):
# builds MoKA (CUDA) from the bundle, then
#  1. the checkpoint tests (serial HDF5 there: the gathered path);
#  2. bf16 training on the GPU checkpointed at step 20 and continued on the
#     GPU (against the run that never stopped); a CPU build's fp32
#     checkpoint (<bundle>/gpu-in/cpu.step00000020.h5, when there) continued
#     on the GPU in bf16; the GPU's files are left in the log directory for
#     the CPU build to continue;
#  3. PyTorch <-> MoKA: scripts/torch-moka.py export / moka-layer / check in
#     fp32 and bf16, and a moka-train bf16 checkpoint read by PyTorch;
#  4. scripts/checkpoint-bench.sh (about 1.6 GB of state) on the node's disk.
#
#   scripts/gpu-checkpoint.sh [bundle] [log-dir]
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/gpu-env.sh"
build_from_bundle
grep -E "HDF5|ParallelHDF5" "$logs/build.log" | head -3

stamp "ctest: checkpoint tests"
(cd "$b" && ctest -j4 --output-on-failure --timeout 300 -R "checkpoint|inspect|torch_moka") > "$logs/ctest-checkpoint.log" 2>&1
grep -E "Test +#|tests passed|tests failed" "$logs/ctest-checkpoint.log"

q=$root/input_decks/quickstart.deck
common=(run.comm_check=false io.log_every=20 train.steps=40 io.checkpoint_final=true)
diffpy='import sys, h5py, numpy as np
a, b = h5py.File(sys.argv[1], "r"), h5py.File(sys.argv[2], "r")
w = 0.0
def visit(n, o):
    global w
    if isinstance(o, h5py.Dataset) and n.startswith("model/") and o.dtype.kind == "f":
        x, y = o[()].astype(np.float64), b[n][()].astype(np.float64)
        w = max(w, np.abs(x - y).max() / max(np.abs(x).max(), 1e-30))
a.visititems(visit)
print("largest difference of a model tensor, relative to its max: %.3e" % w)'
stamp "bf16 on the GPU: 40 steps, checkpoint at 20; continued on the GPU from 20"
# Work files stay on the node's disk; the logs and the small GPU checkpoints
# (for the CPU build to continue) go to the log directory.
out=$logs
logs=/tmp/moka-ckpt-work
rm -rf "$logs" && mkdir -p "$logs" && cd "$logs"
"$b/drivers/moka-train" "$q" "${common[@]}" train.precision=bf16 run.name=gpu io.checkpoint_every=20 \
  io.checkpoint_dir="$logs/gpu" io.metrics_file="$logs/gpu.csv" > gpu_full.txt 2>&1
grep -E "^step +(20|40)/|^checkpoint" gpu_full.txt
"$b/drivers/moka-train" "$q" "${common[@]}" train.precision=bf16 run.name=gpu_re io.checkpoint_dir="$logs/gpu_re" \
  io.restart="$logs/gpu/gpu.step00000020.h5" io.metrics_file=none > gpu_re.txt 2>&1
grep -E "^restart|^step +40/|error" gpu_re.txt
python3 -c "$diffpy" "$logs/gpu/gpu.step00000040.h5" "$logs/gpu_re/gpu_re.step00000040.h5"
cp "$logs/gpu/gpu.step00000020.h5" "$logs/gpu/gpu.step00000040.h5" "$logs/gpu.csv" "$out/"
if [ -f "$bundle/gpu-in/cpu.step00000020.h5" ]; then
  stamp "a CPU build's fp32 checkpoint of step 20 continued on the GPU in bf16 (CPU's own continuation: $bundle/gpu-in/cpu.step00000040.h5)"
  "$b/drivers/moka-train" "$q" "${common[@]}" train.precision=bf16 run.name=cpu_on_gpu io.checkpoint_dir="$logs/cpu_on_gpu" \
    io.restart="$bundle/gpu-in/cpu.step00000020.h5" io.metrics_file=none > cpu_on_gpu.txt 2>&1
  grep -E "^restart|^step +40/|held-out loss|error" cpu_on_gpu.txt
  python3 -c "$diffpy" "$bundle/gpu-in/cpu.step00000040.h5" "$logs/cpu_on_gpu/cpu_on_gpu.step00000040.h5"
fi

stamp "PyTorch <-> MoKA (scripts/torch-moka.py)"
tm=$root/scripts/torch-moka.py
python3 "$tm" export "$logs/torch_layer.h5" 4096 256 512 8 2 2>&1 | tail -1
for p in fp32 bf16; do
  "$b/drivers/moka-layer" "$logs/torch_layer.h5" "$logs/torch_layer.batch.h5" "$logs/moka_out_$p.h5" 0 $p 2>&1 | tail -1
  python3 "$tm" check "$logs/torch_layer.h5" "$logs/torch_layer.batch.h5" "$logs/moka_out_$p.h5" $p; echo "check $p rc=$?"
done
"$b/tests/../drivers/moka-inspect" "$logs/torch_layer.h5" > inspect_torch.txt 2>&1; echo "moka-inspect of the PyTorch file: rc=$?"
# The other way: a moka-train bf16 checkpoint of the reference's layer shape, read by PyTorch.
"$b/drivers/moka-train" "$q" run.comm_check=false train.steps=30 io.checkpoint_final=true train.precision=bf16 run.name=tl gate.type=softmax \
  gate.renormalize=true expert.bias=false moe.d_model=128 moe.d_ff=256 moe.num_experts=8 io.checkpoint_dir="$logs/tl" \
  io.metrics_file=none > tl.txt 2>&1; grep -E "^checkpoint|error" tl.txt
python3 "$tm" batch "$logs/tl/tl.step00000030.h5" "$logs/tl.batch.h5" 2048
for p in fp32 bf16; do
  "$b/drivers/moka-layer" "$logs/tl/tl.step00000030.h5" "$logs/tl.batch.h5" "$logs/tl_out_$p.h5" 1 $p 2>&1 | tail -1
  python3 "$tm" check "$logs/tl/tl.step00000030.h5" "$logs/tl.batch.h5" "$logs/tl_out_$p.h5" $p 1; echo "check trained block 1 $p rc=$?"
done

cp "$logs"/*.txt "$out/" 2>/dev/null
stamp "checkpoint write / read speed, about 1.6 GB of state, 1 rank on the GPU (serial HDF5: gathered)"
MOKA_MPIEXEC="mpirun" MOKA_CKPT_DIR=/tmp/moka-ckpt-bench "$root/scripts/checkpoint-bench.sh" "$b/drivers/moka-train" 1 2>&1 | tail -6
rm -rf /tmp/moka-ckpt-bench
stamp "done"
