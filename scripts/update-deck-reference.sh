#!/usr/bin/env bash
# Regenerates the deck-key table of docs/input-decks.md from the schema
# (`moka-train --deck-reference`); test_input_deck checks they agree.
#
#   scripts/update-deck-reference.sh [build-dir]     (default: build)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${1:-$root/build}
doc=$root/docs/input-decks.md
table=$(mktemp)
OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_PROC_BIND=false OMP_NUM_THREADS=1 \
  "$build/drivers/moka-train" --deck-reference 2>/dev/null > "$table"
awk -v table="$table" '
  /<!-- deck-reference:begin -->/ { print; while ((getline line < table) > 0) print line; skip = 1; next }
  /<!-- deck-reference:end -->/ { skip = 0 }
  !skip { print }' "$doc" > "$doc.new"
mv "$doc.new" "$doc"
rm -f "$table"
echo "updated $doc"
