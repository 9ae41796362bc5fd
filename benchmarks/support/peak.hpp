// SPDX-License-Identifier: MIT
// The FMA peak of this machine, measured in the running process (so every "fraction of peak" a
// report prints divides two numbers taken in the same run, on the same clock: wall time).
#pragma once

#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <vector>

#include "posenc/tensor.hpp"
#include "support/timing.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace posenc::bench {

/// Single-thread FMA throughput in GFLOP/s: 12 independent chains of packet FMAs (enough to
/// cover the FMA latency × throughput of current x86 cores), long enough to dwarf loop overhead.
/// Each chain starts from its own value: chains that start equal are equal forever, and GCC 12
/// computes such identical chains once (with equal starts this probe reported 1.5× the
/// machine's real peak: 333 GFLOP/s on a 3.5 GHz core whose two 16-lane FMA pipes give 224).
template <class Scalar>
double fma_peak_gflops_one_thread() {
  using Packet = typename Eigen::internal::packet_traits<Scalar>::type;
  constexpr int chains = 12;
  constexpr Index width = Eigen::internal::packet_traits<Scalar>::size;
  const Packet multiplier = Eigen::internal::pset1<Packet>(Scalar(0.999999));
  const Packet addend = Eigen::internal::pset1<Packet>(Scalar(1e-7));
  const long iterations = 20'000'000;
  const auto run = [&] {
    Packet acc[chains];
    for (int c = 0; c < chains; ++c) {
      acc[c] = Eigen::internal::pset1<Packet>(Scalar(1) + Scalar(c) / Scalar(64));
    }
    for (long i = 0; i < iterations; ++i) {
      for (auto& a : acc) a = Eigen::internal::pmadd(a, multiplier, addend);
    }
    Scalar sink = 0;
    for (const Packet& a : acc) sink += Eigen::internal::pfirst(a);
    benchmark::DoNotOptimize(sink);
  };
  const Seconds best = best_seconds(run, 5, 0.5);
  return 2.0 * chains * width * static_cast<double>(iterations) / best.wall * 1e-9;
}

/// Peak of `threads` threads: the one-thread probe run on each thread at once, summed.
template <class Scalar>
double fma_peak_gflops(int threads) {
  if (threads == 1) return fma_peak_gflops_one_thread<Scalar>();
  std::vector<double> per_thread(static_cast<std::size_t>(threads));
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
  per_thread[static_cast<std::size_t>(omp_get_thread_num())] = fma_peak_gflops_one_thread<Scalar>();
#endif
  double total = 0;
  for (double p : per_thread) total += p;
  return total;
}

}  // namespace posenc::bench
