#!/bin/sh
# SPDX-License-Identifier: MIT
# Builds the safetensors validator's libFuzzer target with Clang (ASan + UBSan) and runs it for
# SECONDS (default 60), seeded with tests/data/fixture.safetensors. From the repository root:
#   fuzz/run_safetensors_fuzz.sh 60
# Work files go to $POSENC_FUZZ_DIR (default /tmp/posenc_fuzz); a finding leaves a crash-* file
# there and a non-zero exit status.
set -eu
seconds=${1:-60}
root=$(cd "$(dirname "$0")/.." && pwd)
work=${POSENC_FUZZ_DIR:-/tmp/posenc_fuzz}
mkdir -p "$work/corpus" "$work/seed"
cp "$root/tests/data/fixture.safetensors" "$work/seed/"
clang++ -std=c++20 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
  -I"$root/include" -isystem /usr/include/eigen3 \
  "$root/fuzz/safetensors_header_fuzz.cpp" -o "$work/safetensors_header_fuzz"
cd "$work"
exec ./safetensors_header_fuzz -max_total_time="$seconds" -dict="$root/fuzz/safetensors.dict" \
  corpus seed
