// SPDX-License-Identifier: MIT
// The streaming kernel's steady state allocates nothing: after a first call of a shape, a second
// call (output into a caller's buffer) performs zero heap allocations. This binary counts every
// malloc-family call by interposing glibc's allocator, so it is built without sanitizers (which
// interpose the allocator themselves).
#include <gtest/gtest.h>

#include <atomic>
#include <cstddef>
#include <cstdlib>

#include "posenc/posenc.hpp"
#include "support/test_support.hpp"

extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
void __libc_free(void*);
}

namespace {
std::atomic<long> allocations{0};
}  // namespace

extern "C" {
void* malloc(std::size_t size) {
  allocations.fetch_add(1, std::memory_order_relaxed);
  return __libc_malloc(size);
}
void* calloc(std::size_t count, std::size_t size) {
  allocations.fetch_add(1, std::memory_order_relaxed);
  return __libc_calloc(count, size);
}
void* realloc(void* pointer, std::size_t size) {
  allocations.fetch_add(1, std::memory_order_relaxed);
  return __libc_realloc(pointer, size);
}
void* memalign(std::size_t alignment, std::size_t size) {
  allocations.fetch_add(1, std::memory_order_relaxed);
  return __libc_memalign(alignment, size);
}
void* aligned_alloc(std::size_t alignment, std::size_t size) {
  allocations.fetch_add(1, std::memory_order_relaxed);
  return __libc_memalign(alignment, size);
}
int posix_memalign(void** out, std::size_t alignment, std::size_t size) {
  allocations.fetch_add(1, std::memory_order_relaxed);
  *out = __libc_memalign(alignment, size);
  return *out == nullptr ? 12 /* ENOMEM */ : 0;
}
void free(void* pointer) { __libc_free(pointer); }
}

namespace posenc {
namespace {

/// Allocations performed by `run`.
template <class Run>
long count_allocations(Run&& run) {
  const long before = allocations.load();
  run();
  return allocations.load() - before;
}

template <class Scalar, class Encoder>
void expect_second_call_allocates_nothing(const Encoder& encoder, const AttentionOptions& options,
                                          const char* what) {
  auto rng = test::make_rng(71);
  const auto q = test::random_heads<Scalar>(8, 300, 64, rng);
  const auto k = test::random_heads<Scalar>(8, 300, 64, rng);
  const auto v = test::random_heads<Scalar>(8, 300, 64, rng);
  Heads<Scalar> out(8, 300, 64);
  // First calls: every thread builds its workspace, encoders fill their caches.
  for (int warm_up = 0; warm_up < 3; ++warm_up) attention(q, k, v, encoder, out.view(), options);
  const Heads<Scalar> first = out;
  const long count = count_allocations([&] { attention(q, k, v, encoder, out.view(), options); });
  EXPECT_EQ(count, 0) << what;
  EXPECT_EQ((out.flat() - first.flat()).cwiseAbs().maxCoeff(), Scalar(0)) << what;
}

TEST(SteadyStateAllocation, HookCountsAllocations) {
  EXPECT_GT(count_allocations([] { Heads<float> x(2, 3, 4); }), 0);
}

TEST(SteadyStateAllocation, SecondCallOfAShapeAllocatesNothing) {
  for (const int threads : {1, 2}) {
    const AttentionOptions causal{.threads = threads};
    expect_second_call_allocates_nothing<float>(NoPositionalEncoding{}, causal, "NoPE float");
    expect_second_call_allocates_nothing<double>(NoPositionalEncoding{}, causal, "NoPE double");
    expect_second_call_allocates_nothing<float>(
        NoPositionalEncoding{}, {.mask = Mask::sliding_window(50), .threads = threads},
        "NoPE sliding window");
    expect_second_call_allocates_nothing<float>(
        RotaryEncoding<float>(64, {.pairing = RotaryPairing::interleaved}), causal, "RoPE");
    expect_second_call_allocates_nothing<float>(XPosEncoding<float>(64), causal, "XPos");
  }
}

}  // namespace
}  // namespace posenc
