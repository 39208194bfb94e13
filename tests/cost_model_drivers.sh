#!/bin/bash
# The cost model's drivers end to end, small (issue 15):
#  1. moka-bench calibrate at 2 ranks writes a profile that reads back;
#  2. moka-bench step at 2 ranks (EP 2) predicts with it and prints the
#     validate line;
#  3. moka-plan ranks the layouts of 2 ranks with it and writes a fragment;
#     moka-train includes the fragment and trains 3 steps on that layout;
#  4. bad input: a profile with an unknown key (moka-plan, step mode), no
#     profile, no plan.ranks, a calibration output directory that does not
#     exist: each named, exit 2.
# usage: cost_model_drivers.sh <mpiexec and flags> <moka-bench> <moka-plan> <moka-train> <input_decks dir> <trace>
set -u
mpi=$1 bench=$2 plan=$3 train=$4 decks=$5 trace=$6
work=$(pwd)/cm.$$
rm -rf "$work" && mkdir -p "$work" && cd "$work" || exit 1
fail() { echo "FAIL: $*"; exit 1; }
small=(moe.d_model=32 moe.d_ff=64 bench.tokens=128 bench.warmup=1 bench.iters=2 run.comm_check=false)

echo "== 1. calibrate"
$mpi -n 2 "$bench" "$decks/calibrate_cpu.deck" "${small[@]}" "bench.calibrate_shapes=\"16x32 32x32\"" bench.calibrate_rows_max=128 \
  bench.profile_out=$work/m.profile > cal.log 2>&1 || { cat cal.log; fail "calibration failed"; }
grep -q "^moka_profile *= 1" m.profile || fail "no profile written"
grep -q "^exchange *= mpi " m.profile || fail "no exchange line at 2 ranks"
grep -q "^ranks_per_node *= 2" m.profile || fail "ranks_per_node is not 2"

echo "== 2. step mode predicts"
$mpi -n 2 "$bench" "$decks/bench_step.deck" "${small[@]}" parallel.expert_parallel=2 bench.profile=$work/m.profile \
  > step.log 2>&1 || { cat step.log; fail "step mode failed"; }
grep -E "^validate: layer_ms=[0-9.]+ predicted_layer_ms=[0-9.]+ step_ms=[0-9.]+ predicted_step_ms=[0-9.]+" step.log \
  || { cat step.log; fail "no validate line"; }

echo "== 3. moka-plan, then moka-train with its fragment"
"$plan" "$decks/plan_cpu.deck" moe.d_model=32 moe.d_ff=64 plan.ranks=2 plan.profile=$work/m.profile \
  plan.trace_file=$trace plan.out=$work/plan.deck run.comm_check=false > plan.log 2>&1 \
  || { cat plan.log; fail "moka-plan failed"; }
cat plan.log
grep -E "^ +1 +[12] +[12] +[12] " plan.log || fail "no ranked layout"
grep -q "^parallel.expert_parallel" plan.deck || fail "no fragment"
ep=$(awk '/^parallel.expert_parallel/ { print $3 }' plan.deck)
cat > run.deck <<DECK
model.blocks      = 1
moe.d_model       = 32
moe.d_ff          = 64
moe.num_experts   = 32
moe.top_k         = 2
train.steps       = 3
train.batch_size  = 128
io.metrics_file   = none
run.comm_check    = false
include "plan.deck"
DECK
$mpi -n 2 "$train" run.deck > train.log 2>&1 || { cat train.log; fail "moka-train with the fragment failed"; }
grep -E "EP $ep x" train.log || { cat train.log; fail "moka-train did not run EP $ep"; }
grep -E "^step +3/3" train.log || fail "moka-train did not finish"

echo "== 4. bad input"
sed 's/^card /cards /' m.profile > bad.profile
"$plan" "$decks/plan_cpu.deck" plan.ranks=2 plan.profile=$work/bad.profile run.comm_check=false > bad.log 2>&1
[ $? -eq 2 ] || fail "a bad profile did not exit 2"
grep -q "bad.profile', line [0-9]*: unknown key 'cards'" bad.log || { cat bad.log; fail "the bad key is not named"; }
"$plan" "$decks/plan_cpu.deck" plan.ranks=2 run.comm_check=false > none.log 2>&1
[ $? -eq 2 ] && grep -q "plan.profile is not set" none.log || { cat none.log; fail "a missing profile is not named"; }
"$plan" "$decks/plan_cpu.deck" plan.ranks=0 plan.profile=$work/m.profile run.comm_check=false > r.log 2>&1
[ $? -eq 2 ] && grep -q "plan.ranks is not set" r.log || { cat r.log; fail "missing plan.ranks is not named"; }
$mpi -n 2 "$bench" "$decks/bench_step.deck" "${small[@]}" bench.profile=$work/bad.profile > bs.log 2>&1
[ $? -eq 2 ] && grep -q "unknown key 'cards'" bs.log || { cat bs.log; fail "step mode: the bad profile is not named"; }
"$bench" "$decks/calibrate_cpu.deck" bench.profile_out=/no/such/dir/m.profile > bo.log 2>&1
[ $? -eq 2 ] && grep -q "the directory '/no/such/dir' does not exist" bo.log || { cat bo.log; fail "calibrate: bad output path"; }
echo "cost model drivers: ok"
