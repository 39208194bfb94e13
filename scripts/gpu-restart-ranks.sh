#!/usr/bin/env bash
# Issue 17, item 5 (checkpoint at step N on 4 ranks, restart on 2 and on 1
# and on the CPU build; SIGTERM writes a checkpoint and the restart
# continues), for correctness on whatever GPUs the node has: with fewer
# GPUs than ranks the ranks share them (the MPI backend stages the
# exchange through the host). Workload: bf16 trace-driven training
# (input_decks/trace_balance.deck: the trace gate walking the GPT-MoE
# fixture, the moka balancer re-planning every 5 steps, one spare slot per
# rank), 40 steps, a checkpoint at step 20.
#   - the run that never stops, on 4 ranks (EP 4);
#   - continued from its step-20 checkpoint on 4 ranks (bitwise expected),
#     on 2 (EP 2) and 1 rank (within bf16 round-off: another layout sums
#     in another order);
#   - SIGTERM to the ranks of a long run: a checkpoint, exit 0, and a
#     restart with io.restart=latest that continues to its end.
# The step-20 and step-40 files are copied to the log directory, for the
# CPU build to continue (docs/gpu-validation.md says how).
#
#   scripts/gpu-restart-ranks.sh [bundle] [log-dir]
# MOKA_BUILD=dir: a build to use instead of building one from the bundle;
# MOKA_PRECISION=fp32: the same runs on a CPU build; MOKA_MPI_FLAGS: mpirun's flags.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/gpu-env.sh"
if [ -n "${MOKA_BUILD:-}" ]; then b=$MOKA_BUILD; else build_from_bundle; fi
nvidia-smi --query-gpu=index,name --format=csv,noheader 2>/dev/null
train=$b/drivers/moka-train
deck=$root/input_decks/trace_balance.deck
work=/tmp/moka-restart-ranks
rm -rf "$work" && mkdir -p "$work" && cd "$work" || exit 1
# balance.row_ns fixed: the balancer's decisions do not depend on timings,
# so the 4-rank continuation can be compared bitwise.
common=(train.precision=${MOKA_PRECISION:-bf16} train.steps=40 balance.row_ns=50 io.log_every=10 io.eval_every=40 io.checkpoint_final=true
        gate.trace_file="$root/tests/data/gpt_moe_32e_cut.h5" io.checkpoint_dir="$work/ck")
# one spare slot per rank (none on one rank: a replica needs another rank)
ep() { echo "parallel.expert_parallel=$1 balance.slots_per_rank=$(( 32 / $1 + ($1 > 1) ))"; }
mpi="mpirun ${MOKA_MPI_FLAGS:-}"  # e.g. --oversubscribe where the machine has fewer cores than ranks
# step 40 of a run's metrics: loss, held-out loss, gradient norm (6 digits)
losses() { awk -F, '$1 == 40 { print "  step 40: loss " $2 ", held-out " $4 ", gradient norm " $6 }' "$1"; }

stamp "4 ranks, 40 steps, checkpoint at 20"
$mpi -n 4 "$train" "$deck" "${common[@]}" $(ep 4) run.name=full io.checkpoint_every=20 io.metrics_file=full.csv \
  > full.txt 2>&1; echo "rc=$?"
grep -E "^balance|^checkpoint|error" full.txt | head -6; losses full.csv
for n in 4 2 1; do
  stamp "continued from step 20 on $n rank(s)"
  $mpi -n $n "$train" "$deck" "${common[@]}" $(ep $n) run.name=re$n io.metrics_file=re$n.csv \
    io.restart="$work/ck/full.step00000020.h5" > re$n.txt 2>&1; echo "rc=$?"
  grep -E "^restart|error" re$n.txt | head -3; losses re$n.csv
done
if python3 -c "import h5py, numpy" 2>/dev/null; then
  for n in 4 2 1; do
    python3 - "$work/ck/full.step00000040.h5" "$work/ck/re$n.step00000040.h5" <<'EOF'
import sys, h5py, numpy as np
a, b = h5py.File(sys.argv[1], "r"), h5py.File(sys.argv[2], "r")
worst = [0.0]
def visit(n, o):
    if isinstance(o, h5py.Dataset) and n.startswith("model/") and o.dtype.kind == "f" and n in b:
        x, y = o[()].astype(np.float64), b[n][()].astype(np.float64)
        if x.shape == y.shape:
            worst[0] = max(worst[0], np.abs(x - y).max() / max(np.abs(x).max(), 1e-30))
a.visititems(visit)
print("%s: largest difference of a model tensor from the uninterrupted run, relative to its max: %.3e"
      % (sys.argv[2].split("/")[-1], worst[0]))
EOF
  done
else
  echo "(no h5py here: the losses above are the comparison)"
fi

stamp "SIGTERM to the 4 ranks of a long run, then io.restart=latest"
$mpi -n 4 "$train" "$deck" "${common[@]}" $(ep 4) run.name=sig train.steps=100000 io.checkpoint_final=false \
  io.metrics_file=none > sig.txt 2>&1 &
pid=$!
for i in $(seq 1 900); do grep -q "^step " sig.txt && break; sleep 0.1; done
sleep 2
pkill -TERM -P $pid -f "run.name=sig" || echo "no rank process found to signal"
for i in $(seq 1 1200); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done
kill -0 $pid 2>/dev/null && { kill -9 $pid; pkill -9 -f "run.name=sig"; echo "did not stop within 120 s"; }
wait $pid; echo "rc=$?"
grep -E "^stopped by|error" sig.txt | head -3
stopped=$(grep -oE "after step [0-9]+" sig.txt | grep -oE "[0-9]+" | head -1)
if [ -n "$stopped" ]; then
  stamp "restart=latest on 2 ranks, to step $((stopped + 10)) (train.steps may change on a restart)"
  $mpi -n 2 "$train" "$deck" "${common[@]}" $(ep 2) run.name=sig train.steps=$((stopped + 10)) \
    io.restart=latest io.metrics_file=none > sig_re.txt 2>&1; echo "rc=$?"
  grep -E "^restart|^step +$((stopped + 10))/|held-out loss|error" sig_re.txt | head -4
fi
cp "$work/ck/full.step00000020.h5" "$work/ck/full.step00000040.h5" "$logs/" 2>/dev/null
cp "$work"/*.txt "$logs/" 2>/dev/null
stamp done
