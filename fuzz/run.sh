#!/bin/sh
# Runs one fuzz target for SECONDS (default 300) from the repository root: new inputs go to
# fuzz/corpus/<target> (not committed), the committed seeds are read from fuzz/seeds/<target>.
set -eu
target=$1
seconds=${2:-300}
cd "$(dirname "$0")/.."
mkdir -p "fuzz/corpus/$target"
exec cargo +nightly fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
    -max_total_time="$seconds" -timeout=10 -print_final_stats=1
