// SPDX-License-Identifier: MIT
// Heap accounting for benchmarks: every benchmark binary links alloc_counter.cpp, which wraps
// malloc and its relatives (glibc), so the live and peak heap bytes of the process are known.
// HeapPeak measures the peak extra heap a piece of code needs (Eigen, OpenMP and operator new
// all allocate through malloc); cold_call_heap does so for one call on a fresh thread, so that
// per-thread caches kept between calls (the kernel's tile workspaces) are counted too.
#pragma once

#include <cstdint>
#include <limits>
#include <map>
#include <string>
#include <thread>

namespace posenc::bench {

/// Whether the malloc wrappers are active in this binary: false under sanitizers (which own
/// malloc) and off glibc; then every figure below is 0 and HeapPeak reports NaN.
bool allocation_counter_available();

/// Bytes of heap live now (malloc_usable_size of every live block, counted since start-up).
std::int64_t live_heap_bytes();

/// Highest live_heap_bytes() since the last reset_peak_heap_bytes().
std::int64_t peak_heap_bytes();

/// Sets the peak to the current live bytes.
void reset_peak_heap_bytes();

/// Number of successful allocations since start-up.
std::int64_t allocation_count();

/// Peak extra heap from construction on: peak live bytes minus the live bytes at construction.
/// One at a time (the peak is process-wide); threads started by the measured code count too.
class HeapPeak {
 public:
  HeapPeak() : baseline_(live_heap_bytes()) { reset_peak_heap_bytes(); }

  std::int64_t extra_bytes() const { return peak_heap_bytes() - baseline_; }

  /// extra_bytes() in MiB, or NaN when the counter is not available.
  double extra_mib() const;

 private:
  std::int64_t baseline_;
};

/// Heap of one call made on a fresh thread (whose thread-local caches, and OpenMP team, start
/// empty): the peak extra bytes during the call, and the bytes still held when it returns
/// (caches the thread keeps for its next call; freed when the thread exits). NaN without the
/// counter.
struct ColdCallHeap {
  double peak_extra_mib;
  double retained_mib;
};

template <class Call>
ColdCallHeap cold_call_heap(Call&& call) {
  const std::int64_t before = live_heap_bytes();
  reset_peak_heap_bytes();
  std::int64_t after_call = before;
  std::thread worker([&] {
    call();
    after_call = live_heap_bytes();
  });
  worker.join();
  if (!allocation_counter_available()) {
    constexpr double nan = std::numeric_limits<double>::quiet_NaN();
    return {nan, nan};
  }
  constexpr double mib = 1024.0 * 1024.0;
  return {static_cast<double>(peak_heap_bytes() - before) / mib,
          static_cast<double>(after_call - before) / mib};
}

/// cold_call_heap once per `key` in this process (a benchmark function runs several times per
/// row; the figure does not change), then the cached figure.
template <class Call>
ColdCallHeap cold_call_heap_once(const std::string& key, Call&& call) {
  static std::map<std::string, ColdCallHeap> cache;
  const auto found = cache.find(key);
  if (found != cache.end()) return found->second;
  return cache.emplace(key, cold_call_heap(call)).first->second;
}

}  // namespace posenc::bench
