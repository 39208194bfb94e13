#!/usr/bin/env bash
# One command from a fresh Debian 12 machine to a finished run: installs the
# dependencies, builds MoKA (CPU: OpenMP) and runs moka-train on
# input_decks/quickstart.deck with 2 MPI ranks. Extra arguments are passed
# to moka-train as key=value overrides.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
"$here/build.sh" host
build=${MOKA_BUILD_DIR:-$root/build}
ranks=${MOKA_RANKS:-2}
launcher=(mpiexec -n "$ranks")
if [ "$(id -u)" = 0 ]; then launcher+=(--allow-run-as-root); fi
launcher+=(--oversubscribe)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OMP_PROC_BIND=${OMP_PROC_BIND:-false} OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
exec "${launcher[@]}" "$build/drivers/moka-train" "$root/input_decks/quickstart.deck" "$@"
