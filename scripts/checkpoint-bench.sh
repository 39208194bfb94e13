#!/bin/bash
# Checkpoint write and read speed for a model of about 1.6 GB of state
# (2 MoE blocks, E 8, d 1024, d_ff 4096: 134 M parameters, fp32, Adam's two
# moments), against dd and cp of the same bytes on the same disk.
#
#   scripts/checkpoint-bench.sh [moka-train] [ranks...]     (default: build/drivers/moka-train, 1 2 4)
#
# MOKA_MPIEXEC (default: mpiexec --allow-run-as-root --oversubscribe),
# MOKA_CKPT_DIR (default: ./checkpoint-bench), MOKA_CKPT_IO (auto | parallel | gather).
# Prints one line per rank count: write s and GB/s (verification read-back
# included), restart read s and GB/s (checksums verified, then each rank's
# blocks), then dd / cp lines for the same bytes.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exe=${1:-$here/../build/drivers/moka-train}
shift || true
ranks=${*:-1 2 4}
mpi=${MOKA_MPIEXEC:-mpiexec --allow-run-as-root --oversubscribe}
dir=${MOKA_CKPT_DIR:-$(pwd)/checkpoint-bench}
io=${MOKA_CKPT_IO:-auto}
deck=$here/../input_decks/quickstart.deck
keys=(run.comm_check=false io.metrics_file=none io.log_every=1 io.eval_every=1000 task.train_size=1024
      task.test_size=64 train.batch_size=64 model.blocks=2 moe.d_model=1024 moe.d_ff=4096 moe.num_experts=8
      io.checkpoint_dir=$dir io.checkpoint_keep=1 io.checkpoint_final=true io.checkpoint_io=$io)
mkdir -p "$dir"
for n in $ranks; do
  rm -f "$dir"/bench*.h5*
  ep=$n; [ $n -gt 8 ] && ep=8
  out=$($mpi -n $n "$exe" "$deck" "${keys[@]}" run.name=bench train.steps=1 parallel.expert_parallel=$ep 2>&1) \
    || { echo "$out" | tail -5; exit 1; }
  w=$(echo "$out" | sed -n 's/^checkpoint: step 1 -> .* (\([0-9.]*\) MB in \([0-9.]*\) s, \([0-9.]*\) s of it.*/\1 \2 \3/p')
  out=$($mpi -n $n "$exe" "$deck" "${keys[@]}" run.name=bench train.steps=2 parallel.expert_parallel=$ep \
        io.restart=latest 2>&1) || { echo "$out" | tail -5; exit 1; }
  r=$(echo "$out" | awk '$1 == "moka::load_checkpoint" {print $4}')
  file=$(ls "$dir"/bench.step00000001.h5 2>/dev/null || ls "$dir"/bench*.h5 | head -1)
  bytes=$(stat -c %s "$file")
  set -- $w
  echo "$n rank(s), io=$io: state $(awk "BEGIN{printf \"%.2f\", $1/1024}") GiB (file $(awk "BEGIN{printf \"%.2f\", $bytes/2^30}") GiB):" \
       "write $2 s = $(awk "BEGIN{printf \"%.2f\", $1/1024/$2}") GiB/s ($3 s of it reading back)," \
       "read $r s = $(awk "BEGIN{printf \"%.2f\", $1/1024/$r}") GiB/s (checksums verified, max over ranks)"
done
file=$(ls "$dir"/bench*.h5 | tail -1)
bytes=$(stat -c %s "$file")
mb=$(( (bytes + 1048575) / 1048576 ))
t0=$(date +%s.%N); dd if=/dev/zero of="$dir/dd.bin" bs=1M count=$mb status=none; t1=$(date +%s.%N)
sync; t2=$(date +%s.%N)
echo "dd write $mb MiB (no sync): $(awk "BEGIN{printf \"%.3f s = %.2f GB/s\", $t1-$t0, $mb*1048576/1e9/($t1-$t0)}"); sync after: $(awk "BEGIN{printf \"%.3f s\", $t2-$t1}")"
# A second file while the first stays: page-cache pages that no deleted
# file just gave back (what a checkpoint written beside older ones gets).
t0=$(date +%s.%N); dd if=/dev/zero of="$dir/dd2.bin" bs=8M count=$(( (mb + 7) / 8 )) status=none; t1=$(date +%s.%N)
echo "dd write to a second new file (first kept): $(awk "BEGIN{printf \"%.3f s = %.2f GB/s\", $t1-$t0, $mb*1048576/1e9/($t1-$t0)}")"
rm -f "$dir/dd2.bin"
t0=$(date +%s.%N); cp "$file" "$dir/cp.h5"; t1=$(date +%s.%N)
echo "cp of the checkpoint: $(awk "BEGIN{printf \"%.3f s = %.2f GB/s\", $t1-$t0, $bytes/1e9/($t1-$t0)}")"
t0=$(date +%s.%N); dd if="$file" of=/dev/null bs=1M status=none; t1=$(date +%s.%N)
echo "dd read of the checkpoint: $(awk "BEGIN{printf \"%.3f s = %.2f GB/s\", $t1-$t0, $bytes/1e9/($t1-$t0)}") (page cache: the file was just written)"
df -h "$dir" | tail -1
rm -f "$dir/dd.bin" "$dir/cp.h5"
