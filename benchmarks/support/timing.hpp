// SPDX-License-Identifier: MIT
// Timing helpers for baselines measured in the same run: a clock around a benchmark's timed
// loop, a best-of-k timer for one-off measurements, and a registry of baseline times by name
// (e.g. the reference kernel's time for a shape, read by the streaming kernel's row). Each
// measures wall time and the CPU time of the calling thread: on a shared machine the second is
// the load-robust figure for single-threaded code (which runs on the calling thread).
#pragma once

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <limits>
#include <map>
#include <optional>
#include <string>

namespace posenc::bench {

using Clock = std::chrono::steady_clock;

inline double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

/// CPU seconds the calling thread has run (POSIX thread CPU clock).
inline double thread_cpu_seconds() {
  timespec now{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now);
  return static_cast<double>(now.tv_sec) + 1e-9 * static_cast<double>(now.tv_nsec);
}

/// CPU seconds of the whole process, every thread (POSIX process CPU clock).
inline double process_cpu_seconds() {
  timespec now{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &now);
  return static_cast<double>(now.tv_sec) + 1e-9 * static_cast<double>(now.tv_nsec);
}

/// Wall and whole-process CPU seconds of one call (every thread's CPU time counted).
struct ProcessTiming {
  double wall;
  double cpu;
};

template <class Run>
ProcessTiming time_with_process_cpu(const Run& run) {
  const double cpu = process_cpu_seconds();
  const auto start = Clock::now();
  run();
  return {seconds_since(start), process_cpu_seconds() - cpu};
}

/// Wall and calling-thread CPU seconds of one thing.
struct Seconds {
  double wall;
  double cpu;
};

/// Time of a benchmark's timed loop: construct just before `for (auto _ : state)`.
class LoopClock {
 public:
  LoopClock() : wall_start_(Clock::now()), cpu_start_(thread_cpu_seconds()) {}

  /// Mean seconds per iteration of the loop that just finished.
  Seconds per_iteration(const benchmark::State& state) const {
    const double iterations = std::max(1.0, static_cast<double>(state.iterations()));
    return {seconds_since(wall_start_) / iterations,
            (thread_cpu_seconds() - cpu_start_) / iterations};
  }

 private:
  Clock::time_point wall_start_;
  double cpu_start_;
};

/// Best (smallest) wall and CPU times of `run()`, each over at least `min_reps` runs and
/// `min_seconds` of wall time in total, after one untimed warm-up run.
template <class Run>
Seconds best_seconds(Run&& run, int min_reps = 3, double min_seconds = 0.3) {
  run();
  Seconds best{std::numeric_limits<double>::infinity(), std::numeric_limits<double>::infinity()};
  double total = 0.0;
  for (int rep = 0; rep < min_reps || total < min_seconds; ++rep) {
    const Clock::time_point start = Clock::now();
    const double cpu_start = thread_cpu_seconds();
    run();
    const double cpu = thread_cpu_seconds() - cpu_start;
    const double wall = seconds_since(start);
    best.wall = std::min(best.wall, wall);
    best.cpu = std::min(best.cpu, cpu);
    total += wall;
  }
  return best;
}

/// Seconds per call of named baselines measured earlier in this process. Benchmarks run one at
/// a time on the main thread, in registration order: register a baseline before its readers.
inline std::map<std::string, Seconds>& baseline_registry() {
  static std::map<std::string, Seconds> registry;
  return registry;
}

inline void record_baseline(const std::string& name, Seconds seconds) {
  baseline_registry()[name] = seconds;
}

inline std::optional<Seconds> recorded_baseline(const std::string& name) {
  const auto& registry = baseline_registry();
  const auto found = registry.find(name);
  if (found == registry.end()) return std::nullopt;
  return found->second;
}

}  // namespace posenc::bench
