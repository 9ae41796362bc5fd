// SPDX-License-Identifier: MIT
// Streaming attention with each relative-position bias against NoPE (no positional encoding) at
// N = 4096, H = 8, D = 64, float, causal, on 1 and 2 threads. Every iteration times one NoPE call
// and one call with the bias back to back, so `x_nope` (best bias time / best NoPE time) compares
// the two under the same machine load. The tile_* benchmarks time add_bias alone on one
// 128 × 128 tile (the kernel's default tile), the part of the cost the bias adds.
//
//   build/<dir>/benchmarks/posenc_bench_biases --benchmark_min_time=2
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <limits>
#include <random>
#include <vector>

#include "posenc/attention.hpp"
#include "posenc/encoders/alibi.hpp"
#include "posenc/encoders/fire.hpp"
#include "posenc/encoders/kerple.hpp"
#include "posenc/encoders/t5_bias.hpp"
#include "support/inputs.hpp"
#include "support/timing.hpp"

namespace {

using posenc::Heads;
using posenc::Index;

constexpr Index bench_heads = 8;
constexpr Index bench_tokens = 4096;
constexpr Index head_dim = 64;

using Inputs = posenc::bench::NormalQkv;
using Timing = posenc::bench::ProcessTiming;

const Inputs& inputs() {
  static const Inputs x = posenc::bench::normal_qkv(bench_heads, bench_tokens, head_dim, 20261123);
  return x;
}

/// Wall-clock and process CPU seconds of one streaming attention call into `out`.
template <class Encoder>
Timing time_one(const Encoder& encoder, Heads<float>& out, int threads) {
  const Inputs& in = inputs();
  return posenc::bench::time_with_process_cpu([&] {
    posenc::attention(in.q, in.k, in.v, encoder, out.view(),
                      {.mask = posenc::Mask::causal(), .threads = threads});
    benchmark::DoNotOptimize(out.data());
  });
}

/// Times `encoder` (the benchmark's time) and, untimed before each iteration, NoPE. Counters:
/// x_nope = best wall time / best NoPE wall time; x_nope_cpu the same with process CPU time
/// (steadier on a shared machine, where wall time also measures other processes).
template <class Encoder>
void attention_with(benchmark::State& state, const Encoder& encoder) {
  const int threads = static_cast<int>(state.range(0));
  Heads<float> out(bench_heads, bench_tokens, head_dim);
  constexpr double infinity = std::numeric_limits<double>::infinity();
  Timing best{infinity, infinity};
  Timing best_nope{infinity, infinity};
  for (auto _ : state) {
    state.PauseTiming();
    const Timing nope = time_one(posenc::NoPositionalEncoding{}, out, threads);
    state.ResumeTiming();
    const Timing mine = time_one(encoder, out, threads);
    best = {std::min(best.wall, mine.wall), std::min(best.cpu, mine.cpu)};
    best_nope = {std::min(best_nope.wall, nope.wall), std::min(best_nope.cpu, nope.cpu)};
  }
  if (!out.flat().allFinite()) state.SkipWithError("non-finite attention output");
  state.counters["x_nope"] = best.wall / best_nope.wall;
  state.counters["x_nope_cpu"] = best.cpu / best_nope.cpu;
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(bench_tokens),
                                                  benchmark::Counter::kIsIterationInvariantRate);
}

void nope(benchmark::State& state) { attention_with(state, posenc::NoPositionalEncoding{}); }

void alibi(benchmark::State& state) { attention_with(state, posenc::Alibi<float>(bench_heads)); }

void t5(benchmark::State& state) {
  std::mt19937_64 rng(1);
  attention_with(state, posenc::T5RelativeBias<float>::random(bench_heads, 1.0 / 32.0, rng,
                                                              {.bidirectional = false}));
}

void kerple_log(benchmark::State& state) {
  std::mt19937_64 rng(2);
  attention_with(state, posenc::Kerple<float>::random(posenc::KerpleKernel::log, bench_heads, rng));
}

void fire(benchmark::State& state) {
  std::mt19937_64 rng(3);
  attention_with(state, posenc::Fire<float>::random(bench_heads, 32, rng));
}

void fire_dape(benchmark::State& state) {
  std::mt19937_64 rng(4);
  attention_with(state,
                 posenc::Fire<float>::random(bench_heads, 32, rng, posenc::FireOptions::dape(128)));
}

/// One bias tile (128 × 128, consecutive positions, all heads in turn): the cost the kernel
/// pays per tile for the bias, as elements per second.
template <class Encoder>
void tile_with(benchmark::State& state, const Encoder& encoder) {
  constexpr Index tile_size = 128;
  std::vector<Index> queries(tile_size);
  std::vector<Index> keys(tile_size);
  for (Index r = 0; r < tile_size; ++r) {
    queries[static_cast<std::size_t>(r)] = 2048 + r;
    keys[static_cast<std::size_t>(r)] = 1920 + r;
  }
  posenc::Matrix<float> tile = posenc::Matrix<float>::Zero(tile_size, tile_size);
  Index head = 0;
  for (auto _ : state) {
    encoder.add_bias(head, queries, keys, tile);
    benchmark::DoNotOptimize(tile.data());
    head = (head + 1) % bench_heads;
  }
  state.counters["elements/s"] = benchmark::Counter(static_cast<double>(tile_size * tile_size),
                                                    benchmark::Counter::kIsIterationInvariantRate);
}

void arguments(benchmark::internal::Benchmark* b) {
  b->ArgName("threads")->Arg(1)->Arg(2)->UseRealTime()->Unit(benchmark::kMillisecond);
}

void tile_alibi(benchmark::State& state) { tile_with(state, posenc::Alibi<float>(bench_heads)); }
void tile_t5(benchmark::State& state) {
  std::mt19937_64 rng(1);
  tile_with(state, posenc::T5RelativeBias<float>::random(bench_heads, 1.0 / 32.0, rng,
                                                         {.bidirectional = false}));
}
void tile_kerple_log(benchmark::State& state) {
  std::mt19937_64 rng(2);
  tile_with(state, posenc::Kerple<float>::random(posenc::KerpleKernel::log, bench_heads, rng));
}
void tile_fire(benchmark::State& state) {
  std::mt19937_64 rng(3);
  tile_with(state, posenc::Fire<float>::random(bench_heads, 32, rng));
}
void tile_fire_dape(benchmark::State& state) {
  std::mt19937_64 rng(4);
  tile_with(state,
            posenc::Fire<float>::random(bench_heads, 32, rng, posenc::FireOptions::dape(128)));
}

BENCHMARK(tile_alibi);
BENCHMARK(tile_t5);
BENCHMARK(tile_kerple_log);
BENCHMARK(tile_fire);
BENCHMARK(tile_fire_dape);

BENCHMARK(nope)->Apply(arguments);
BENCHMARK(alibi)->Apply(arguments);
BENCHMARK(t5)->Apply(arguments);
BENCHMARK(kerple_log)->Apply(arguments);
BENCHMARK(fire)->Apply(arguments);
BENCHMARK(fire_dape)->Apply(arguments);

}  // namespace

BENCHMARK_MAIN();
