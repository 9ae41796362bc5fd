// SPDX-License-Identifier: MIT
// The streaming kernel's steady state allocates nothing: after a first call of a shape, a second
// call (output into a caller's buffer) performs zero heap allocations; so does a KvCache decoding
// step (append a token's keys and values, attend its query into a caller's buffer) once the
// cache's capacity is reserved. This binary counts every malloc-family call by interposing glibc's
// allocator, so it is built without sanitizers (which interpose the allocator themselves).
#include <gtest/gtest.h>

#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <string>
#include <vector>

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

/// A training step's attention, forward (out and lse into the caller's buffers) and backward
/// (gradients into the caller's AttentionGradients), allocates nothing once warm, for encoders
/// with and without learnable parameters; the encoder gradient accumulates across calls.
template <class Encoder>
void expect_training_step_allocates_nothing(const Encoder& encoder, int threads, const char* what) {
  auto rng = test::make_rng(72);
  const auto q = test::random_heads<float>(4, 200, 32, rng);
  const auto k = test::random_heads<float>(4, 200, 32, rng);
  const auto v = test::random_heads<float>(4, 200, 32, rng);
  const auto dout = test::random_heads<float>(4, 200, 32, rng);
  Heads<float> out(4, 200, 32);
  Matrix<float> lse(4, 200);
  const AttentionOptions options{.threads = threads, .query_block = 64, .key_block = 64};
  AttentionGradients<float, Encoder> grads =
      attention_backward(q, k, v, encoder, out, lse, dout, options);
  const auto step = [&] {
    attention(q, k, v, encoder, out.view(), lse, options);
    if constexpr (HasLearnableParameters<Encoder>) grads.encoder.set_zero();
    attention_backward(q, k, v, encoder, out, lse, dout, grads, options);
  };
  for (int warm_up = 0; warm_up < 3; ++warm_up) step();
  const Heads<float> dq = grads.dq;
  EXPECT_EQ(count_allocations(step), 0) << what << ", threads " << threads;
  EXPECT_EQ((grads.dq.flat() - dq.flat()).cwiseAbs().maxCoeff(), 0.0f) << what;
}

TEST(SteadyStateAllocation, TrainingStepAllocatesNothing) {
  auto rng = test::make_rng(73);
  for (const int threads : {1, 2}) {
    expect_training_step_allocates_nothing(NoPositionalEncoding{}, threads, "NoPE");
    expect_training_step_allocates_nothing(Kerple<float>::random(KerpleKernel::log, 4, rng),
                                           threads, "KERPLE");
    expect_training_step_allocates_nothing(
        T5RelativeBias<float>::random(4, 0.1, rng, {.bidirectional = false}), threads, "T5");
    expect_training_step_allocates_nothing(RotaryEncoding<float>(32), threads, "RoPE");
  }
}

/// Decodes with a KvCache of `encoder` (capacity reserved by `cache_options`): a prefill, a few
/// warm-up steps (threads build their workspaces, leases grow), then measured steps that must
/// allocate nothing. A step appends `tokens` rows of k and v and attends their queries into a
/// preallocated buffer, heads-major [H, N, Dv] or tokens-major [N, H, Dv]; its output must equal
/// the allocating attend overload's (called outside the count). Positions stay below 256: the
/// rotary encoders fill their cos/sin table in 256-row chunks on a position range's first use (a
/// cache fill of the encoder, like the warm-up's, not a cost of each step). `compacts`: the
/// measured steps must include a compaction (a sliding-window cache moving its rows to the front).
template <class Scalar, class Encoder>
void expect_decode_steps_allocate_nothing(const Encoder& encoder,
                                          const KvCacheOptions& cache_options, bool compacts,
                                          const char* what) {
  constexpr Index heads = 8;
  constexpr Index kv_heads = 2;  // grouped-query attention
  constexpr Index dim = 64;
  constexpr Index prefill = 64;
  constexpr Index warm_up_steps = 3;
  constexpr Index measured_steps = 40;
  for (const int threads : {0, 1, 2}) {  // 0: automatic (the calling thread for a decoding step)
    for (const Index tokens : {Index{1}, Index{3}}) {
      for (const bool tokens_major : {false, true}) {
        const std::string where = std::string(what) + ", threads " + std::to_string(threads) +
                                  ", " + std::to_string(tokens) + " token(s) per step, " +
                                  (tokens_major ? "tokens-major" : "heads-major") + " output";
        const Index rows = prefill + (warm_up_steps + measured_steps) * tokens;
        auto rng = test::make_rng(73);
        const auto q = test::random_heads<Scalar>(heads, rows, dim, rng);
        const auto k = test::random_heads<Scalar>(kv_heads, rows, dim, rng);
        const auto v = test::random_heads<Scalar>(kv_heads, rows, dim, rng);
        KvCacheOptions options = cache_options;
        options.threads = threads;
        KvCache<Scalar, Encoder> cache(encoder, kv_heads, dim, options);
        std::vector<Scalar> buffer(static_cast<std::size_t>(heads * tokens * dim));
        const auto out = tokens_major
                             ? HeadsView<Scalar>::tokens_major(buffer.data(), tokens, heads, dim)
                             : HeadsView<Scalar>::heads_major(buffer.data(), heads, tokens, dim);
        cache.append(k.view().middle_rows(0, prefill), v.view().middle_rows(0, prefill));
        long allocated = 0;
        Index compactions = 0;
        for (Index step = 0; step < warm_up_steps + measured_steps; ++step) {
          const Index first = prefill + step * tokens;
          const auto q_t = q.view().middle_rows(first, tokens);
          const auto k_t = k.view().middle_rows(first, tokens);
          const auto v_t = v.view().middle_rows(first, tokens);
          const Scalar* oldest = cache.keys().data();
          const long count = count_allocations([&] {
            cache.append(k_t, v_t);
            cache.attend(q_t, out);
          });
          if (step >= warm_up_steps) {
            allocated += count;
            if (cache.keys().data() < oldest) ++compactions;
          }
          const Heads<Scalar> want = cache.attend(q_t);
          for (Index h = 0; h < heads; ++h) {
            ASSERT_EQ((out.head(h) - want.head(h)).cwiseAbs().maxCoeff(), Scalar(0))
                << where << ", step " << step << ", head " << h;
          }
        }
        EXPECT_EQ(allocated, 0) << where;
        EXPECT_EQ(cache.capacity(), cache_options.capacity) << where;
        if (compacts) {
          EXPECT_GT(compactions, 0) << where;
        }
      }
    }
  }
}

TEST(SteadyStateAllocation, KvCacheDecodingStepAllocatesNothing) {
  const KvCacheOptions reserved{.capacity = 256};
  expect_decode_steps_allocate_nothing<float>(NoPositionalEncoding{}, reserved, /*compacts=*/false,
                                              "NoPE float");
  expect_decode_steps_allocate_nothing<double>(NoPositionalEncoding{}, reserved, /*compacts=*/false,
                                               "NoPE double");
  // Stored rotated keys; the queries are rotated into a leased buffer at attend time.
  expect_decode_steps_allocate_nothing<float>(RotaryEncoding<float>(64), reserved,
                                              /*compacts=*/false, "RoPE float");
  expect_decode_steps_allocate_nothing<double>(RotaryEncoding<double>(64), reserved,
                                               /*compacts=*/false, "RoPE double");
  // Raw keys and the cache's positions: a score bias, a tile-centred transform, both composed.
  expect_decode_steps_allocate_nothing<float>(Alibi<float>(8), reserved, /*compacts=*/false,
                                              "ALiBi float");
  expect_decode_steps_allocate_nothing<double>(Alibi<double>(8), reserved, /*compacts=*/false,
                                               "ALiBi double");
  expect_decode_steps_allocate_nothing<float>(XPosEncoding<float>(64), reserved, /*compacts=*/false,
                                              "XPos float");
  expect_decode_steps_allocate_nothing<float>(compose(RotaryEncoding<float>(64), Alibi<float>(8)),
                                              reserved, /*compacts=*/false, "RoPE + ALiBi float");
}

TEST(SteadyStateAllocation, SlidingWindowKvCacheDecodingStepAllocatesNothing) {
  // Window 32 in a capacity of 96: evicted rows free the front, and the live rows are moved back
  // to it every ~64 rows appended, inside the measured steps; the buffers keep their capacity.
  const KvCacheOptions window{.mask = Mask::sliding_window(32), .capacity = 96};
  expect_decode_steps_allocate_nothing<float>(NoPositionalEncoding{}, window, /*compacts=*/true,
                                              "NoPE float, sliding window");
  expect_decode_steps_allocate_nothing<double>(NoPositionalEncoding{}, window, /*compacts=*/true,
                                               "NoPE double, sliding window");
  expect_decode_steps_allocate_nothing<float>(RotaryEncoding<float>(64), window, /*compacts=*/true,
                                              "RoPE float, sliding window");
  expect_decode_steps_allocate_nothing<float>(Alibi<float>(8), window, /*compacts=*/true,
                                              "ALiBi float, sliding window");
}

}  // namespace
}  // namespace posenc
