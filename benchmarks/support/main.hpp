// SPDX-License-Identifier: MIT
// The main() of a posenc benchmark binary: pins Eigen to one thread (so a GEMM baseline or the
// reference kernel never forks behind our back), starts OpenMP's thread pool before anything is
// measured, records the context (SIMD, threads, heap counter), registers and runs.
#pragma once

#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <string>

#include "support/alloc_counter.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace posenc::bench {

/// Threads an unconstrained posenc call uses (OpenMP's default; 1 without OpenMP).
inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

/// Runs the benchmarks that `register_benchmarks()` registers, with the usual command line.
template <class Register>
int run_benchmarks(int argc, char** argv, Register&& register_benchmarks) {
  Eigen::setNbThreads(1);
#ifdef _OPENMP
  // Create the pool now so that no measured call pays for (or allocates) thread start-up.
#pragma omp parallel num_threads(max_threads())
  { benchmark::DoNotOptimize(omp_get_thread_num()); }
#endif
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("eigen_simd", Eigen::SimdInstructionSetsInUse());
  benchmark::AddCustomContext("eigen_threads", std::to_string(Eigen::nbThreads()));
  benchmark::AddCustomContext("posenc_max_threads", std::to_string(max_threads()));
  benchmark::AddCustomContext("heap_counter", allocation_counter_available() ? "on" : "off");
  register_benchmarks();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

}  // namespace posenc::bench
