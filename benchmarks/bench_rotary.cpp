// SPDX-License-Identifier: MIT
// Rotary encodings: q/k transform throughput against a memcpy of the same bytes, attention with
// RoPE / XPos against NoPE, and blockwise causal attention against full causal attention.
//
//   posenc_bench_rotary --benchmark_min_time=0.2                      (everything, ~1 min)
//   posenc_bench_rotary --benchmark_filter='Attention/.*4096'         (the N = 4096 ratios)
#include <benchmark/benchmark.h>

#include <cstring>
#include <random>
#include <vector>

#include "posenc/attention.hpp"
#include "posenc/encoders/rope.hpp"
#include "posenc/encoders/xpos.hpp"

namespace {

using posenc::Heads;
using posenc::Index;
using posenc::Matrix;

template <class Scalar>
Heads<Scalar> random_heads(Index heads, Index rows, Index dim, unsigned seed) {
  Heads<Scalar> x(heads, rows, dim);
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal;
  for (Index i = 0; i < x.flat().size(); ++i) x.flat()[i] = static_cast<Scalar>(normal(rng));
  return x;
}

constexpr Index tile_rows = 4096;
constexpr Index head_dim = 64;

// ---- transform throughput (one key tile per call, as the kernel does) ----------------------

template <class Scalar>
void BM_CopyBaseline(benchmark::State& state) {
  const Matrix<Scalar> in = random_heads<Scalar>(1, tile_rows, head_dim, 1).head(0);
  Matrix<Scalar> out(tile_rows, head_dim);
  for (auto _ : state) {
    std::memcpy(out.data(), in.data(), sizeof(Scalar) * static_cast<std::size_t>(in.size()));
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.counters["bytes/s"] = benchmark::Counter(static_cast<double>(sizeof(Scalar) * in.size()),
                                                 benchmark::Counter::kIsIterationInvariantRate);
}

template <class Encoder>
void BM_TransformKeys(benchmark::State& state, Encoder encoder) {
  using Scalar = typename Encoder::Scalar;
  const Matrix<Scalar> in = random_heads<Scalar>(1, tile_rows, head_dim, 1).head(0);
  Matrix<Scalar> out(tile_rows, head_dim);
  std::vector<Index> positions(static_cast<std::size_t>(tile_rows));
  for (Index r = 0; r < tile_rows; ++r) positions[static_cast<std::size_t>(r)] = r;
  encoder.transform_keys(0, positions, 0, in, out);  // fills the cos/sin caches
  for (auto _ : state) {
    encoder.transform_keys(0, positions, 0, in, out);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.counters["bytes/s"] = benchmark::Counter(static_cast<double>(sizeof(Scalar) * in.size()),
                                                 benchmark::Counter::kIsIterationInvariantRate);
}

BENCHMARK(BM_CopyBaseline<float>)->Name("Transform/memcpy/float");
BENCHMARK_CAPTURE(BM_TransformKeys, rope_interleaved,
                  posenc::RotaryEncoding<float>(head_dim,
                                                {.pairing = posenc::RotaryPairing::interleaved}))
    ->Name("Transform/rope_interleaved/float");
BENCHMARK_CAPTURE(BM_TransformKeys, rope_half,
                  posenc::RotaryEncoding<float>(head_dim, {.pairing = posenc::RotaryPairing::half}))
    ->Name("Transform/rope_half/float");
BENCHMARK_CAPTURE(BM_TransformKeys, xpos, posenc::XPosEncoding<float>(head_dim))
    ->Name("Transform/xpos/float");

// ---- attention: NoPE vs RoPE vs XPos ------------------------------------------------------

template <class Encoder>
void BM_Attention(benchmark::State& state, Encoder encoder) {
  using Scalar = float;
  const Index n = state.range(0);
  const int threads = static_cast<int>(state.range(1));
  const Index heads = 8;
  const auto q = random_heads<Scalar>(heads, n, head_dim, 1);
  const auto k = random_heads<Scalar>(heads, n, head_dim, 2);
  const auto v = random_heads<Scalar>(heads, n, head_dim, 3);
  Heads<Scalar> out(heads, n, head_dim);
  const posenc::AttentionOptions options{.threads = threads};
  posenc::attention(q, k, v, encoder, out.view(), options);  // warm caches
  for (auto _ : state) {
    posenc::attention(q, k, v, encoder, out.view(), options);
    benchmark::DoNotOptimize(out.data());
  }
  // Causal: ~N²/2 logits per head, 2·D flops each for q·k and for p·v.
  const double flops = 4.0 * static_cast<double>(head_dim) * static_cast<double>(heads) *
                       static_cast<double>(n) * static_cast<double>(n + 1) / 2.0;
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

void attention_args(benchmark::internal::Benchmark* b) {
  b->ArgsProduct({{4096}, {1, 2}})
      ->ArgNames({"N", "threads"})
      ->UseRealTime()  // wall time: the kernel runs its own threads
      ->Unit(benchmark::kMillisecond);
}
BENCHMARK_CAPTURE(BM_Attention, nope, posenc::NoPositionalEncoding{})
    ->Name("Attention/nope")
    ->Apply(attention_args);
BENCHMARK_CAPTURE(BM_Attention, rope,
                  posenc::RotaryEncoding<float>(head_dim,
                                                {.pairing = posenc::RotaryPairing::interleaved}))
    ->Name("Attention/rope")
    ->Apply(attention_args);
BENCHMARK_CAPTURE(BM_Attention, xpos, posenc::XPosEncoding<float>(head_dim))
    ->Name("Attention/xpos")
    ->Apply(attention_args);

// ---- blockwise causal attention vs causal at N = 16384 --------------------------------------

void BM_Blockwise(benchmark::State& state, posenc::Mask mask) {
  using Scalar = float;
  const Index n = 16384;
  const Index heads = 2;
  const auto q = random_heads<Scalar>(heads, n, head_dim, 1);
  const auto k = random_heads<Scalar>(heads, n, head_dim, 2);
  const auto v = random_heads<Scalar>(heads, n, head_dim, 3);
  Heads<Scalar> out(heads, n, head_dim);
  const posenc::XPosEncoding<Scalar> xpos(head_dim);
  const posenc::AttentionOptions options{.mask = mask, .threads = static_cast<int>(state.range(0))};
  for (auto _ : state) {
    posenc::attention(q, k, v, xpos, out.view(), options);
    benchmark::DoNotOptimize(out.data());
  }
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(n * heads),
                                                  benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK_CAPTURE(BM_Blockwise, causal, posenc::Mask::causal())
    ->Name("Blockwise/xpos_causal/N:16384")
    ->ArgName("threads")
    ->Arg(2)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_Blockwise, bca_w1024, posenc::Mask::blockwise_causal(1024))
    ->Name("Blockwise/xpos_bca_w1024/N:16384")
    ->ArgName("threads")
    ->Arg(2)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
