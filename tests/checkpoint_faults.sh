#!/bin/bash
# Checkpoint faults that need whole processes (issue 14):
#  1. rank 0 killed with SIGKILL in the middle of writing a checkpoint: the
#     last complete one is still what io.restart = latest finds, and the run
#     continues from it to the end;
#  2. SIGUSR1 sent to the ranks (as SLURM's --signal does to the tasks of a
#     job step): a checkpoint at the next step boundary, a line saying so,
#     exit 0, and moka-inspect finds the file sound;
#  3. moka-inspect on a damaged file exits 1, on a file that is not HDF5 2.
# usage: checkpoint_faults.sh <mpiexec and its flags, as one string> <moka-train> <moka-inspect> <deck>
set -u
mpi=$1 train=$2 inspect=$3 deck=$4
work=$(pwd)/faults.$$
rm -rf "$work" && mkdir -p "$work" && cd "$work" || exit 1
fail() { echo "FAIL: $*"; exit 1; }
common=(run.comm_check=false io.metrics_file=none io.log_every=1 io.checkpoint_dir=$work/ck)

echo "== 1. SIGKILL while writing the checkpoint of step 8"
MOKA_TEST_KILL_IN_CHECKPOINT=8 $mpi -n 2 "$train" "$deck" "${common[@]}" run.name=kill train.steps=12 \
  io.checkpoint_every=4 > kill.log 2>&1 && fail "the killed run exited 0"
ls -la ck
[ -f ck/kill.step00000004.h5 ] || fail "the checkpoint of step 4 is gone"
[ -f ck/kill.step00000008.h5 ] && fail "a checkpoint of step 8 exists under its final name"
$mpi -n 2 "$train" "$deck" "${common[@]}" run.name=kill train.steps=12 io.checkpoint_every=4 io.restart=latest \
  > restart.log 2>&1 || { cat restart.log; fail "the restart failed"; }
grep -E "^restart: step 4 from .*kill.step00000004.h5" restart.log || { cat restart.log; fail "no restart from step 4"; }
grep -E "^step +12/12" restart.log || fail "the restarted run did not finish"
[ -f ck/kill.step00000012.h5 ] || fail "no final checkpoint"
ls ck/*.tmp 2>/dev/null && fail "a temporary file was left"

echo "== 2. SIGUSR1 to the ranks"
$mpi -n 2 "$train" "$deck" "${common[@]}" run.name=sig train.steps=1000000 > sig.log 2>&1 &
pid=$!
for i in $(seq 1 600); do grep -q "^step " sig.log && break; sleep 0.1; done
grep -q "^step " sig.log || { kill -9 $pid; cat sig.log; fail "the run never started"; }
# The ranks are mpiexec's children on one node (OpenMPI runs them itself).
pkill -USR1 -P $pid -f "run.name=sig" || { kill -9 $pid; fail "no rank process found to signal"; }
# A watchdog: a run that does not stop within 120 s fails the test (with its log).
for i in $(seq 1 1200); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done
if kill -0 $pid 2>/dev/null; then
  kill -9 $pid; pkill -9 -f "run.name=sig" 2>/dev/null
  cat sig.log | grep -v "^  " | tail -20; fail "the run did not stop within 120 s of SIGUSR1"
fi
wait $pid
rc=$?
cat sig.log | grep -v "^  " | tail -5
[ $rc -eq 0 ] || fail "exit status $rc after SIGUSR1"
line=$(grep -E "^stopped by SIGUSR1 after step [0-9]+ of 1000000: checkpoint .*sig.step[0-9]{8}.h5 written" sig.log) \
  || fail "no line saying the run stopped"
file=$(ls ck/sig.step*.h5 | tail -1)
"$inspect" "$file" > inspect.log || { cat inspect.log; fail "moka-inspect: $file is not sound"; }
grep -q "every checksum verified" inspect.log || fail "moka-inspect did not verify"

echo "== 3. moka-inspect on damaged files"
cp "$file" damaged.h5
size=$(stat -c %s damaged.h5)
printf '\xff\xff\xff\xff\xff\xff\xff\xff' | dd of=damaged.h5 bs=1 seek=$((size * 3 / 4)) conv=notrunc status=none
"$inspect" damaged.h5 > damaged.log 2>&1
rc=$?
cat damaged.log | tail -3
[ $rc -eq 1 ] || fail "moka-inspect exited $rc on a damaged file (expected 1)"
echo "not a checkpoint" > text.h5
"$inspect" text.h5 > text.log 2>&1
rc=$?
[ $rc -eq 2 ] || fail "moka-inspect exited $rc on a text file (expected 2)"
grep -q "not a readable HDF5 file" text.log || fail "moka-inspect did not say why"
cd .. && rm -rf "$work"
echo "checkpoint faults: ok"
