// SPDX-License-Identifier: MIT
// Linear attention against softmax attention as the sequence grows (the crossover and the
// linear growth), decoding steps, and the cost of stochastic PE codes against a plain
// projection of the same output shape. All in float, H = 8 heads of D = 64.
//
//   posenc_bench_linear_attention --benchmark_filter='Causal' --benchmark_min_time=0.2
//   posenc_bench_linear_attention --benchmark_filter='Spe|Projection'
#include <benchmark/benchmark.h>

#include <random>

#include "posenc/attention.hpp"
#include "posenc/encoders/conv_spe.hpp"
#include "posenc/encoders/sine_spe.hpp"
#include "posenc/linear_attention.hpp"

namespace {

using posenc::Heads;
using posenc::Index;

constexpr Index bench_heads = 8;
constexpr Index head_dim = 64;
constexpr Index realizations = 64;  // SPE's R (every experiment of the reference uses 64)

Heads<float> random_heads(Index heads, Index rows, Index dim, std::uint64_t seed) {
  Heads<float> x(heads, rows, dim);
  std::mt19937_64 engine(seed);
  std::normal_distribution<float> normal;
  for (Index i = 0; i < x.flat().size(); ++i) x.flat()[i] = normal(engine);
  return x;
}

struct Inputs {
  Heads<float> q, k, v;
  explicit Inputs(Index n)
      : q(random_heads(bench_heads, n, head_dim, 1)),
        k(random_heads(bench_heads, n, head_dim, 2)),
        v(random_heads(bench_heads, n, head_dim, 3)) {}
};

void set_rates(benchmark::State& state, Index n, double flops_per_call) {
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(n), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops_per_call * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

/// Causal softmax attention (the streaming kernel, NoPE): 2·H·N²·D flops (QKᵀ and PV over the
/// allowed half).
void BM_SoftmaxCausal(benchmark::State& state) {
  const Index n = state.range(0);
  const auto threads = static_cast<int>(state.range(1));
  const Inputs x(n);
  Heads<float> out(bench_heads, n,
                   head_dim);  // allocated once: large fresh buffers would time page faults
  for (auto _ : state) {
    posenc::attention(x.q, x.k, x.v, posenc::NoPositionalEncoding{}, out.view(),
                      {.threads = threads});
    benchmark::DoNotOptimize(out.data());
  }
  set_rates(state, n,
            2.0 * bench_heads * static_cast<double>(n) * static_cast<double>(n) * head_dim);
}

/// Causal linear attention, chunks of 64: per row 4·F·Dv (state read + update) and
/// 2·64·(F + Dv) (the masked chunk), plus the feature map.
template <class Map>
void linear_causal(benchmark::State& state, const Map& map, Index features) {
  const Index n = state.range(0);
  const auto threads = static_cast<int>(state.range(1));
  const Inputs x(n);
  Heads<float> out(bench_heads, n, head_dim);
  for (auto _ : state) {
    posenc::linear_attention(x.q, x.k, x.v, map, posenc::NoPositionalEncoding{}, out.view(),
                             {.threads = threads});
    benchmark::DoNotOptimize(out.data());
  }
  const double per_row = 4.0 * features * head_dim + 2.0 * 64 * (features + head_dim);
  set_rates(state, n, bench_heads * static_cast<double>(n) * per_row);
}

void BM_LinearCausalEluPlusOne(benchmark::State& state) {
  linear_causal(state, posenc::EluPlusOne{}, head_dim);
}
void BM_LinearCausalFavor256(benchmark::State& state) {
  linear_causal(state, posenc::Favor<float>(head_dim, 256, 7), 256);
}

/// One decoding step (H heads, one token) after `range(0)` tokens of prompt: constant in the
/// prompt length for linear attention.
void BM_LinearDecodeStep(benchmark::State& state) {
  const Index prompt = state.range(0);
  const Inputs x(prompt + 1);
  posenc::LinearAttentionState<float> decoder;
  decoder.append(x.q.view().middle_rows(0, prompt), x.k.view().middle_rows(0, prompt),
                 x.v.view().middle_rows(0, prompt));
  const auto q = x.q.view().middle_rows(prompt, 1);
  const auto k = x.k.view().middle_rows(prompt, 1);
  const auto v = x.v.view().middle_rows(prompt, 1);
  for (auto _ : state) {
    auto out = decoder.step(q, k, v);  // the state grows by a token; the cost does not
    benchmark::DoNotOptimize(out.data());
  }
  state.counters["tokens/s"] =
      benchmark::Counter(1.0, benchmark::Counter::kIsIterationInvariantRate);
}

/// Baseline: one softmax decoding step over a KV cache of `range(0)` keys (linear in it).
void BM_SoftmaxDecodeStep(benchmark::State& state) {
  const Index prompt = state.range(0);
  const Inputs x(prompt + 1);
  const auto q = x.q.view().middle_rows(prompt, 1);
  for (auto _ : state) {
    auto out = posenc::attention(q, x.k, x.v, {.query_offset = prompt, .threads = 1});
    benchmark::DoNotOptimize(out.data());
  }
  state.counters["tokens/s"] =
      benchmark::Counter(1.0, benchmark::Counter::kIsIterationInvariantRate);
}

/// Baseline of the SPE benchmarks: a [N, D] × [D, R] projection per head (the cost of
/// filtering with a position-independent code).
void BM_ProjectionGemm(benchmark::State& state) {
  const Index n = state.range(0);
  const Heads<float> q = random_heads(bench_heads, n, head_dim, 1);
  const posenc::Matrix<float> w = posenc::Matrix<float>::Random(head_dim, realizations);
  Heads<float> out(bench_heads, n, realizations);
  Eigen::setNbThreads(1);  // one thread, as the SPE benchmarks
  for (auto _ : state) {
    for (Index h = 0; h < bench_heads; ++h) out.head(h).noalias() = q.head(h) * w;
    benchmark::DoNotOptimize(out.data());
  }
  Eigen::setNbThreads(0);  // back to OpenMP's default
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(n), benchmark::Counter::kIsIterationInvariantRate);
}

/// sineSPE codes + filtering of q and k (K = 10 sines, R = 64), one thread.
void BM_SineSpeFilter(benchmark::State& state) {
  const Index n = state.range(0);
  const Inputs x(n);
  const posenc::SineSpe<float> spe(
      posenc::SineSpeParameters<float>::initial(bench_heads, head_dim, 10, 1), realizations, 2,
      posenc::Matrix<float>::Zero(bench_heads, head_dim));
  for (auto _ : state) {
    auto q_hat = spe.filter_queries(x.q, 0, 1);
    auto k_hat = spe.filter_keys(x.k, 0, 1);
    benchmark::DoNotOptimize(q_hat.data());
    benchmark::DoNotOptimize(k_hat.data());
  }
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(n), benchmark::Counter::kIsIterationInvariantRate);
}

/// convSPE codes (seeded noise generated on the fly, ks = 128) + filtering of q and k, one
/// thread.
void BM_ConvSpeFilter(benchmark::State& state) {
  const Index n = state.range(0);
  const Inputs x(n);
  const posenc::ConvSpe<float> spe(
      posenc::ConvSpeParameters<float>::initial(bench_heads, head_dim, 128, 1), realizations, 2,
      posenc::Matrix<float>::Zero(bench_heads, head_dim));
  for (auto _ : state) {
    auto q_hat = spe.filter_queries(x.q, 0, 1);
    auto k_hat = spe.filter_keys(x.k, 0, 1);
    benchmark::DoNotOptimize(q_hat.data());
    benchmark::DoNotOptimize(k_hat.data());
  }
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(n), benchmark::Counter::kIsIterationInvariantRate);
}

/// End to end: gated sineSPE inside causal FAVOR attention (codes per chunk), one thread.
void BM_LinearCausalFavorSineSpe(benchmark::State& state) {
  const Index n = state.range(0);
  const Inputs x(n);
  const posenc::SineSpe<float> spe(
      posenc::SineSpeParameters<float>::initial(bench_heads, head_dim, 10, 1), realizations, 2,
      posenc::Matrix<float>::Zero(bench_heads, head_dim));
  const posenc::Favor<float> favor(realizations, 256, 7);
  Heads<float> out(bench_heads, n, head_dim);
  for (auto _ : state) {
    posenc::linear_attention(x.q, x.k, x.v, favor, spe, out.view(), {.threads = 1});
    benchmark::DoNotOptimize(out.data());
  }
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(n), benchmark::Counter::kIsIterationInvariantRate);
}

/// Gated sineSPE in causal softmax attention, one thread: range(1) = 0 lets the kernel transform
/// each tile (key tiles are transformed once per query block), 1 filters q and k once with
/// filter_queries/filter_keys and runs the kernel without encoder (same result, scale 1/sqrt(R)).
void BM_SoftmaxCausalSineSpe(benchmark::State& state) {
  const Index n = state.range(0);
  const bool prefilter = state.range(1) != 0;
  const Inputs x(n);
  const posenc::SineSpe<float> spe(
      posenc::SineSpeParameters<float>::initial(bench_heads, head_dim, 10, 1), realizations, 2,
      posenc::Matrix<float>::Zero(bench_heads, head_dim));
  Heads<float> out(bench_heads, n, head_dim);
  for (auto _ : state) {
    if (prefilter) {
      const Heads<float> q_hat = spe.filter_queries(x.q, 0, 1);
      const Heads<float> k_hat = spe.filter_keys(x.k, 0, 1);
      posenc::attention(q_hat, k_hat, x.v, posenc::NoPositionalEncoding{}, out.view(),
                        {.threads = 1});
    } else {
      posenc::attention(x.q, x.k, x.v, spe, out.view(), {.threads = 1});
    }
    benchmark::DoNotOptimize(out.data());
  }
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(n), benchmark::Counter::kIsIterationInvariantRate);
}

// Sequence lengths 128 … 65536; softmax's largest (quadratic) sizes run once each.
BENCHMARK(BM_SoftmaxCausal)
    ->ArgsProduct({{128, 256, 512, 1024, 2048, 4096, 8192}, {1, 2}})
    ->ArgNames({"N", "threads"})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_SoftmaxCausal)
    ->Name("BM_SoftmaxCausal/long")
    ->ArgsProduct({{16384, 32768, 65536}, {1, 2}})
    ->ArgNames({"N", "threads"})
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_LinearCausalEluPlusOne)
    ->ArgsProduct({benchmark::CreateRange(128, 65536, 2), {1, 2}})
    ->ArgNames({"N", "threads"})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_LinearCausalFavor256)
    ->ArgsProduct({benchmark::CreateRange(128, 65536, 2), {1, 2}})
    ->ArgNames({"N", "threads"})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_LinearDecodeStep)
    ->Arg(1024)
    ->Arg(16384)
    ->ArgName("prompt")
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_SoftmaxDecodeStep)
    ->Arg(1024)
    ->Arg(16384)
    ->ArgName("prompt")
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_ProjectionGemm)->Arg(4096)->ArgName("N")->Unit(benchmark::kMillisecond);
BENCHMARK(BM_SineSpeFilter)->Arg(4096)->ArgName("N")->Unit(benchmark::kMillisecond);
BENCHMARK(BM_ConvSpeFilter)->Arg(4096)->ArgName("N")->Unit(benchmark::kMillisecond);
BENCHMARK(BM_LinearCausalFavorSineSpe)->Arg(4096)->ArgName("N")->Unit(benchmark::kMillisecond);
BENCHMARK(BM_SoftmaxCausalSineSpe)
    ->ArgsProduct({{4096}, {0, 1}})
    ->ArgNames({"N", "prefiltered"})
    ->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
