#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# The two commands of the README, from the repository root:
#   cmake/run.sh demo   installs what is missing, builds the demo example and runs it
#   cmake/run.sh test   installs what is missing, runs the release and asan workflow presets
#                       (configure, build, test) and prints a summary; non-zero on any failure
#   cmake/run.sh lab [ARGS]  installs what is missing, builds the extrapolation lab and runs it
#                       (examples/extrapolation_lab/; ARGS go to the lab, e.g. --only rope,alibi)
set -euo pipefail

# The demo: an example target of the release preset (examples/<name>.cpp -> posenc_example_<name>)
# and its arguments. The extrapolation report writes its tables, CSV and PNG plots (gnuplot) under
# build/release/examples/extrapolation_report/ and prints their paths.
DEMO_TARGET=posenc_example_extrapolation_report
DEMO_ARGS=(--require-plots)
# Debian 12 packages: toolchain (GCC for the release preset; Clang with its sanitizer and OpenMP
# runtimes for the asan preset), Eigen, GoogleTest, Google Benchmark, the JSON reader of the
# tests and of posenc/io/, pkg-config (packaging test), gnuplot (plots of the demo) and Open MPI
# (the ring-attention example and its test; only that example links it), and the Python standard
# library's sources, the extrapolation lab's corpus.
PACKAGES="cmake g++ make clang libclang-rt-14-dev libomp-14-dev libeigen3-dev libgtest-dev
          libbenchmark-dev nlohmann-json3-dev pkgconf gnuplot-nox libopenmpi-dev openmpi-bin
          libpython3.11-stdlib"

cd "$(dirname "$0")/.."
jobs=$(nproc 2>/dev/null || echo 2)
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$jobs}"

install_missing_packages() {
  local missing=() package
  for package in $PACKAGES; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed"; then
      missing+=("$package")
    fi
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  local install=(apt-get install -y --no-install-recommends "${missing[@]}") sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      sudo=(sudo -n)
    else
      echo "run.sh: missing Debian packages: ${missing[*]}. Install them with:" >&2
      echo "  sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive ${install[*]}" >&2
      exit 1
    fi
  fi
  echo "run.sh: installing ${missing[*]}"
  "${sudo[@]}" apt-get update
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive "${install[@]}"
}

# Runs one workflow preset (output teed to build/<preset>.log) and adds its CTest counts to the
# summary and the totals.
run_workflow() {
  local preset=$1 log="build/$1.log" start=$SECONDS status=0 counts
  cmake --workflow --preset "$preset" 2>&1 | tee "$log" || status=$?
  # CTest's closing line: "100% tests passed, 0 tests failed out of 87".
  counts=$(sed -n 's/^[0-9]*% tests passed, \([0-9]*\) tests\{0,1\} failed out of \([0-9]*\).*/\1 \2/p' \
             "$log" | tail -n 1)
  local elapsed="$(((SECONDS - start) / 60))m$(((SECONDS - start) % 60))s"
  if [ -n "$counts" ]; then
    local failures total
    read -r failures total <<<"$counts"
    passed_total=$((passed_total + total - failures))
    failed_total=$((failed_total + failures))
    summary="$summary $preset: $((total - failures))/$total tests passed ($elapsed);"
  else
    summary="$summary $preset: no test results, configure or build failed ($elapsed);"
    build_failed=1
  fi
  [ "$status" -eq 0 ] || failed=1
}

case "${1:-}" in
  demo)
    install_missing_packages
    cmake --preset release
    cmake --build --preset release --target "$DEMO_TARGET"
    # Run inside the build tree so anything the demo writes (CSV, plots) stays out of the sources.
    cd build/release/examples
    exec "./$DEMO_TARGET" "${DEMO_ARGS[@]}"
    ;;
  test)
    install_missing_packages
    mkdir -p build
    failed=0 build_failed=0 passed_total=0 failed_total=0 summary=""
    run_workflow release
    run_workflow asan
    echo "run.sh test:${summary%;}"
    if [ "$build_failed" -eq 0 ]; then
      # The plain closing line: N passed, N failed.
      echo "tests: $passed_total passed, $failed_total failed"
    fi
    exit "$failed"
    ;;
  lab)
    shift
    install_missing_packages
    cmake --preset release
    cmake --build --preset release --target posenc_extrapolation_lab
    mkdir -p build/release/examples/extrapolation_lab
    cd build/release/examples/extrapolation_lab
    # Passive waiting: on a busy machine, spinning OpenMP threads steal the cores they wait for.
    OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}" exec ../posenc_extrapolation_lab --out . "$@"
    ;;
  *)
    echo "usage: cmake/run.sh demo|test|lab [lab arguments]" >&2
    exit 2
    ;;
esac
