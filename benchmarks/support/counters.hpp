// SPDX-License-Identifier: MIT
// The counters every posenc benchmark row reports, with one spelling across binaries:
//   GFLOP              useful GFLOP per call, as a rate: the console shows GFLOP=…/s
//   ratio_to_ceiling   this row's FLOP/s ÷ the same-run ceiling's FLOP/s (wall time)
//   cpu_ratio_to_ceiling  the same by CPU time of the calling thread; single-threaded rows
//                      only, where it is the figure a loaded machine does not distort
//   speedup_vs_<name>  baseline seconds per call ÷ this row's seconds per call (> 1: faster)
//   peak_extra_MiB     peak heap of a call above what was live before it (a HeapPeak around
//                      the timed loop, or cold_call_heap for code with per-thread caches)
//   steady_extra_MiB   peak heap of the warm timed loop, caches already allocated
//   threads            threads the measured code was asked to use
// Rates use the row's time, so register rows with UseRealTime() when they run threads. Ratios
// use the timed loop's own clock (LoopClock), which reads what Google Benchmark reports.
#pragma once

#include <benchmark/benchmark.h>

#include <string>

#include "support/alloc_counter.hpp"
#include "support/ceiling.hpp"
#include "support/timing.hpp"

namespace posenc::bench {

/// GFLOP: `flops` useful FLOPs per iteration, as a rate (GFLOP/s).
inline void report_flops(benchmark::State& state, double flops) {
  state.counters["GFLOP"] =
      benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

/// ratio_to_ceiling: (flops / seconds per call) ÷ the ceiling's FLOP/s, by wall time; and when
/// the measured code ran on the calling thread alone, cpu_ratio_to_ceiling by its CPU time.
inline void report_ratio_to_ceiling(benchmark::State& state, double flops, Seconds per_call,
                                    FlopRate ceiling, bool single_threaded) {
  state.counters["ratio_to_ceiling"] = flops / per_call.wall / ceiling.wall;
  if (single_threaded) state.counters["cpu_ratio_to_ceiling"] = flops / per_call.cpu / ceiling.cpu;
}

/// speedup_vs_<name>: the baseline's wall seconds per call ÷ this row's (> 1: faster).
inline void report_speedup(benchmark::State& state, const std::string& name, Seconds baseline,
                           Seconds per_call) {
  state.counters["speedup_vs_" + name] = baseline.wall / per_call.wall;
}

/// peak_extra_MiB, in MiB (NaN without the heap counter).
inline void report_peak_extra(benchmark::State& state, double mib) {
  state.counters["peak_extra_MiB"] = mib;
}

/// steady_extra_MiB from a HeapPeak started before the warm timed loop.
inline void report_steady_extra(benchmark::State& state, const HeapPeak& peak) {
  state.counters["steady_extra_MiB"] = peak.extra_mib();
}

inline void report_threads(benchmark::State& state, int threads) {
  state.counters["threads"] = threads;
}

}  // namespace posenc::bench
