#!/usr/bin/env bash
# One command from a fresh Debian 12 machine to the whole test suite:
# installs the dependencies, builds MoKA (CPU: OpenMP) and runs ctest (unit,
# MPI at 1, 2 and 4 ranks, driver and install-consumer tests; GPU tests are
# skipped on a machine without a GPU). Extra arguments go to ctest (-L mpi).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
"$here/build.sh" host
build=${MOKA_BUILD_DIR:-$root/build}
cd "$build"
ctest --output-on-failure --timeout 600 "$@"
