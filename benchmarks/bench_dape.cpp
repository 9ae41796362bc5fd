// SPDX-License-Identifier: MIT
// DAPE (over KERPLE-log, W = 32) streamed by the attention kernel, against the materialising
// reference and NoPE, at H = 8, D = 64, float, causal. Every timed iteration is preceded by an
// untimed NoPE call on the same inputs, so `x_nope` (best DAPE time / best NoPE time) compares
// the two under the same machine load. `mix_tile` times the network alone on one 128 × 128 tile
// of all heads; `peak_memory` runs one call in a fresh child process and reports its peak
// resident memory beyond the inputs and the output, beside the N × N tensors the authors' code
// materialises.
//
//   build/<dir>/benchmarks/posenc_bench_dape --benchmark_min_time=1
//   build/<dir>/benchmarks/posenc_bench_dape --benchmark_filter='dape/4096|peak'
#include <benchmark/benchmark.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <limits>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "posenc/attention.hpp"
#include "posenc/encoders/alibi.hpp"
#include "posenc/encoders/dape.hpp"
#include "posenc/encoders/fire.hpp"
#include "posenc/encoders/kerple.hpp"
#include "support/inputs.hpp"
#include "support/timing.hpp"

namespace {

using posenc::Heads;
using posenc::Index;

constexpr Index bench_heads = 8;
constexpr Index head_dim = 64;
constexpr Index dape_width = 32;  // D_DAPE, as in every released config

using DapeKerple = posenc::Dape<float, posenc::Kerple<float>>;

DapeKerple make_dape() {
  std::mt19937_64 rng(5);
  return DapeKerple::random(
      posenc::Kerple<float>::random(posenc::KerpleKernel::log, bench_heads, rng), dape_width, rng);
}

using Inputs = posenc::bench::NormalQkv;
using Timing = posenc::bench::ProcessTiming;

Inputs make_inputs(Index tokens) {
  return posenc::bench::normal_qkv(bench_heads, tokens, head_dim, 20261123);
}

const Inputs& inputs(Index tokens) {
  static Index cached_tokens = 0;
  static Inputs cached{Heads<float>(0, 0, 0), Heads<float>(0, 0, 0), Heads<float>(0, 0, 0)};
  if (cached_tokens != tokens) {
    cached = make_inputs(tokens);
    cached_tokens = tokens;
  }
  return cached;
}

template <class Run>
Timing time_one(const Run& run) {
  return posenc::bench::time_with_process_cpu(run);
}

/// Bytes of the N × N tensors one layer of the authors' DAPE materialises (batch 1, float):
/// A (H planes), the tiled bias (H), the concatenation (2H), its channel-last copy (2H), the
/// hidden layer before and after the activation (2W), the output (H): 7H + 2W planes.
double reference_footprint_bytes(Index tokens) {
  const double planes = static_cast<double>(7 * bench_heads + 2 * dape_width);
  return planes * static_cast<double>(tokens) * static_cast<double>(tokens) * sizeof(float);
}

/// Times `run(out, threads)` (the benchmark's time) and, untimed before each iteration, NoPE.
template <class Run>
void against_nope(benchmark::State& state, const Run& run) {
  const Index tokens = state.range(0);
  const int threads = static_cast<int>(state.range(1));
  const Inputs& in = inputs(tokens);
  Heads<float> out(bench_heads, tokens, head_dim);
  constexpr double infinity = std::numeric_limits<double>::infinity();
  Timing best{infinity, infinity};
  Timing best_nope{infinity, infinity};
  for (auto _ : state) {
    state.PauseTiming();
    const Timing nope = time_one([&] {
      posenc::attention(in.q, in.k, in.v, posenc::NoPositionalEncoding{}, out.view(),
                        {.mask = posenc::Mask::causal(), .threads = threads});
    });
    state.ResumeTiming();
    const Timing mine = time_one([&] { run(in, out, threads); });
    benchmark::DoNotOptimize(out.data());
    best = {std::min(best.wall, mine.wall), std::min(best.cpu, mine.cpu)};
    best_nope = {std::min(best_nope.wall, nope.wall), std::min(best_nope.cpu, nope.cpu)};
  }
  if (!out.flat().allFinite()) state.SkipWithError("non-finite attention output");
  state.counters["x_nope"] = best.wall / best_nope.wall;
  state.counters["x_nope_cpu"] = best.cpu / best_nope.cpu;
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(tokens),
                                                  benchmark::Counter::kIsIterationInvariantRate);
}

void nope(benchmark::State& state) {
  against_nope(state, [](const Inputs& in, Heads<float>& out, int threads) {
    posenc::attention(in.q, in.k, in.v, posenc::NoPositionalEncoding{}, out.view(),
                      {.mask = posenc::Mask::causal(), .threads = threads});
  });
}

template <class Encoder>
void streaming(benchmark::State& state, const Encoder& encoder) {
  against_nope(state, [&](const Inputs& in, Heads<float>& out, int threads) {
    posenc::attention(in.q, in.k, in.v, encoder, out.view(),
                      {.mask = posenc::Mask::causal(), .threads = threads});
  });
}

void dape(benchmark::State& state) { streaming(state, make_dape()); }

/// The materialising oracle with the same DAPE: every N × N score matrix at once (3H planes in
/// attention_reference), single-threaded.
void dape_reference(benchmark::State& state) {
  const DapeKerple encoder = make_dape();
  against_nope(state, [&](const Inputs& in, Heads<float>& out, int) {
    out = posenc::attention_reference(in.q, in.k, in.v, encoder, {.mask = posenc::Mask::causal()});
  });
  state.counters["authors_NxN_GiB"] =
      reference_footprint_bytes(state.range(0)) / static_cast<double>(1 << 30);
}

void dape_alibi(benchmark::State& state) {
  std::mt19937_64 rng(6);
  streaming(state, posenc::Dape<float, posenc::Alibi<float>>::random(
                       posenc::Alibi<float>(bench_heads, posenc::BiasForm::causal,
                                            posenc::AlibiSlopes::float32),
                       dape_width, rng));
}

void dape_fire(benchmark::State& state) {
  std::mt19937_64 rng(7);
  auto fire =
      posenc::Fire<float>::random(bench_heads, dape_width, rng, posenc::FireOptions::dape(128));
  streaming(state, posenc::Dape<float, posenc::Fire<float>>::random(fire, dape_width, rng));
}

void dape_v2_conv3(benchmark::State& state) {
  std::mt19937_64 rng(8);
  streaming(state, posenc::DapeV2<float, posenc::Kerple<float>>::random(
                       posenc::Kerple<float>::random(posenc::KerpleKernel::log, bench_heads, rng),
                       dape_width, 3, rng));
}

/// The network alone on one 128 × 128 tile of all heads (consecutive positions), as the kernel
/// calls it; GFLOP/s of its 3·H·W multiply-adds per pair.
void mix_tile(benchmark::State& state) {
  constexpr Index tile_size = 128;
  const DapeKerple encoder = make_dape();
  std::vector<Index> queries(tile_size);
  std::vector<Index> keys(tile_size);
  for (Index r = 0; r < tile_size; ++r) {
    queries[static_cast<std::size_t>(r)] = 2048 + r;
    keys[static_cast<std::size_t>(r)] = 1920 + r;
  }
  std::mt19937_64 rng(9);
  std::normal_distribution<float> normal;
  posenc::Matrix<float> logits(bench_heads, tile_size * tile_size);
  for (Index i = 0; i < logits.size(); ++i) logits.data()[i] = normal(rng);
  posenc::Matrix<float> scores(bench_heads, tile_size * tile_size);
  for (auto _ : state) {
    encoder.mix(queries, keys, 0, tile_size, logits, scores);
    benchmark::DoNotOptimize(scores.data());
  }
  state.counters["GFLOP"] =
      benchmark::Counter(2.0 * 3.0 * bench_heads * dape_width * tile_size * tile_size * 1e-9,
                         benchmark::Counter::kIsIterationInvariantRate);
}

// --- Peak memory, measured in a fresh process -------------------------------------------------

constexpr std::string_view peak_flag = "--posenc_peak_memory=";

long max_rss_bytes() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss * 1024L;  // kilobytes on Linux
}

/// The child: inputs and output allocated and touched, then one streaming call (DAPE or NoPE) on
/// all threads; prints the growth of the peak resident set during the call.
int measure_peak(std::string_view what, Index tokens) {
  const Inputs in = make_inputs(tokens);
  Heads<float> out(bench_heads, tokens, head_dim);
  const long before = max_rss_bytes();
  const auto start = std::chrono::steady_clock::now();
  if (what == "dape") {
    posenc::attention(in.q, in.k, in.v, make_dape(), out.view());
  } else {
    posenc::attention(in.q, in.k, in.v, posenc::NoPositionalEncoding{}, out.view());
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (!out.flat().allFinite()) return 1;
  std::printf("%ld %ld %.3f\n", max_rss_bytes() - before, before, seconds);
  return 0;
}

void peak_memory(benchmark::State& state, const char* what) {
  const Index tokens = state.range(0);
  std::array<char, 4096> self{};
  const ssize_t length = readlink("/proc/self/exe", self.data(), self.size() - 1);
  if (length <= 0) {
    state.SkipWithError("cannot find /proc/self/exe");
    return;
  }
  const std::string command = std::string(self.data(), static_cast<std::size_t>(length)) + " " +
                              std::string(peak_flag) + what + "," + std::to_string(tokens);
  long extra = 0;
  long baseline = 0;
  double seconds = 0.0;
  for (auto _ : state) {
    FILE* child = popen(command.c_str(), "r");
    if (child == nullptr || std::fscanf(child, "%ld %ld %lf", &extra, &baseline, &seconds) != 3) {
      if (child != nullptr) pclose(child);
      state.SkipWithError("the measuring child process failed");
      return;
    }
    pclose(child);
  }
  constexpr double mib = 1 << 20;
  state.counters["extra_MiB"] = static_cast<double>(extra) / mib;
  state.counters["inputs_output_MiB"] =
      static_cast<double>(4 * bench_heads * tokens * head_dim) * sizeof(float) / mib;
  state.counters["child_seconds"] = seconds;
  state.counters["authors_NxN_GiB"] = reference_footprint_bytes(tokens) / (1024.0 * mib);
}

void peak_memory_dape(benchmark::State& state) { peak_memory(state, "dape"); }
void peak_memory_nope(benchmark::State& state) { peak_memory(state, "nope"); }

void sizes_and_threads(benchmark::internal::Benchmark* b) {
  b->ArgNames({"N", "threads"})
      ->ArgsProduct({{1024, 4096, 16384}, {1, 2}})
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);
}

BENCHMARK(mix_tile)->Unit(benchmark::kMicrosecond);
BENCHMARK(nope)->Apply(sizes_and_threads);
BENCHMARK(dape)->Apply(sizes_and_threads);
// The reference keeps 3·H N × N float planes: 1.5 GiB at N = 4096, 24 GiB at 16384 (not run).
BENCHMARK(dape_reference)
    ->ArgNames({"N", "threads"})
    ->Args({1024, 1})
    ->Args({4096, 1})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(dape_alibi)
    ->ArgNames({"N", "threads"})
    ->Args({4096, 1})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(dape_fire)
    ->ArgNames({"N", "threads"})
    ->Args({4096, 1})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(dape_v2_conv3)
    ->ArgNames({"N", "threads"})
    ->Args({4096, 1})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(peak_memory_nope)->ArgName("N")->Arg(32768)->Iterations(1)->Unit(benchmark::kSecond);
BENCHMARK(peak_memory_dape)->ArgName("N")->Arg(32768)->Iterations(1)->Unit(benchmark::kSecond);

}  // namespace

int main(int argc, char** argv) {
  // The peak-memory child: `--posenc_peak_memory=dape,32768`.
  if (argc == 2 && std::string_view(argv[1]).starts_with(peak_flag)) {
    const std::string_view spec = std::string_view(argv[1]).substr(peak_flag.size());
    const std::size_t comma = spec.find(',');
    if (comma == std::string_view::npos) return 2;
    return measure_peak(spec.substr(0, comma),
                        std::strtol(std::string(spec.substr(comma + 1)).c_str(), nullptr, 10));
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
