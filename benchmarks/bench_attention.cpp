// SPDX-License-Identifier: MIT
// The attention kernel without positional encoding (NoPE), H = 8, D = 64: the streaming kernel
// on one thread and on all threads, the materialising reference, and the ceiling (a
// single-threaded Eigen GEMM pair of the same shape) measured in the same run, so every row reads
// as a ratio. Also a tile-size sweep, and the heap a 16k-token causal call needs.
//
//   posenc_bench_attention                                       # everything, a few minutes
//   posenc_bench_attention --benchmark_filter='N:4096/'          # one size
//   posenc_bench_attention --benchmark_filter='attention/memory'  # the 16k memory check
#include <benchmark/benchmark.h>

#include <posenc/attention.hpp>
#include <string>
#include <type_traits>

#include "support/alloc_counter.hpp"
#include "support/ceiling.hpp"
#include "support/counters.hpp"
#include "support/flops.hpp"
#include "support/inputs.hpp"
#include "support/main.hpp"
#include "support/timing.hpp"

namespace {

using posenc::AttentionOptions;
using posenc::Index;
using posenc::Mask;
using posenc::NoPositionalEncoding;
namespace bench = posenc::bench;

constexpr Index bench_heads = 8;
constexpr Index head_dim = 64;

template <class Scalar>
const char* scalar_name() {
  return std::is_same_v<Scalar, float> ? "float" : "double";
}

/// One measured shape: N queries and N keys under `mask`.
struct Shape {
  Index n;
  Mask mask;
  std::string mask_name;

  double useful_flops() const {
    return bench::attention_flops(bench_heads, head_dim, head_dim,
                                  bench::allowed_pairs(mask, n, n));
  }
  bench::GemmPairShape ceiling() const { return {bench_heads, n, n, head_dim, head_dim}; }
};

template <class Scalar>
std::string row_name(const std::string& family, const Shape& shape,
                     const std::string& suffix = "") {
  return "attention/" + family + "/" + shape.mask_name + "/N:" + std::to_string(shape.n) + suffix +
         "/" + scalar_name<Scalar>();
}

/// The reference's seconds per call for `shape`, under the name its row records it.
template <class Scalar>
std::string reference_key(const Shape& shape) {
  return row_name<Scalar>("reference", shape);
}

template <class Scalar>
void report_common(benchmark::State& state, const Shape& shape, int threads,
                   bench::Seconds per_call, double peak_extra_mib) {
  const double flops = shape.useful_flops();
  bench::report_flops(state, flops);
  bench::report_ratio_to_ceiling(state, flops, per_call,
                                 bench::gemm_pair_rate<Scalar>(shape.ceiling()), threads == 1);
  bench::report_peak_extra(state, peak_extra_mib);
  bench::report_threads(state, threads);
}

/// posenc::attention into a preallocated output (so the heap figures are the kernel's own).
/// peak_extra_MiB comes from one call on a fresh thread, which counts the tile workspaces the
/// kernel keeps per thread between calls; steady_extra_MiB is the warm loop's (about zero).
template <class Scalar>
void streaming(benchmark::State& state, const std::string& name, const Shape& shape, int threads,
               Index query_block, Index key_block) {
  bench::AttentionInputs<Scalar> x(bench_heads, shape.n, head_dim);
  const AttentionOptions options{
      .mask = shape.mask, .threads = threads, .query_block = query_block, .key_block = key_block};
  bench::gemm_pair_rate<Scalar>(shape.ceiling());  // measured before, not during
  const bench::ColdCallHeap cold = bench::cold_call_heap_once(name, [&] {
    posenc::attention(x.q, x.k, x.v, NoPositionalEncoding{}, x.out.view(), options);
  });
  const bench::HeapPeak peak;
  const bench::LoopClock clock;
  for (auto _ : state) {
    posenc::attention(x.q, x.k, x.v, NoPositionalEncoding{}, x.out.view(), options);
    benchmark::DoNotOptimize(x.out.data());
    benchmark::ClobberMemory();
  }
  const bench::Seconds per_call = clock.per_iteration(state);
  if (!x.out.flat().allFinite()) state.SkipWithError("non-finite output");
  report_common<Scalar>(state, shape, threads, per_call, cold.peak_extra_mib);
  bench::report_steady_extra(state, peak);
  if (const auto reference = bench::recorded_baseline(reference_key<Scalar>(shape))) {
    bench::report_speedup(state, "reference", *reference, per_call);
  }
}

/// posenc::attention_reference (materialises every N × N score matrix); Eigen on one thread.
template <class Scalar>
void reference(benchmark::State& state, const Shape& shape) {
  bench::AttentionInputs<Scalar> x(bench_heads, shape.n, head_dim);
  const AttentionOptions options{.mask = shape.mask};
  bench::gemm_pair_rate<Scalar>(shape.ceiling());
  const bench::HeapPeak peak;
  const bench::LoopClock clock;
  for (auto _ : state) {
    auto out = posenc::attention_reference(x.q, x.k, x.v, options);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const bench::Seconds per_call = clock.per_iteration(state);
  bench::record_baseline(reference_key<Scalar>(shape), per_call);
  report_common<Scalar>(state, shape, 1, per_call, peak.extra_mib());
}

/// The ceiling itself: the GEMM pair of the dense shape, counted as the dense FLOPs it performs.
/// Its ratio_to_ceiling compares this row with the cached best-of-k figure the kernels use.
template <class Scalar>
void ceiling(benchmark::State& state, const Shape& shape) {
  const bench::GemmPairShape gemm = shape.ceiling();
  const bench::FlopRate cached = bench::gemm_pair_rate<Scalar>(gemm);
  bench::GemmPair<Scalar> pair(gemm);
  const bench::HeapPeak peak;
  const bench::LoopClock clock;
  for (auto _ : state) {
    pair.run();
    benchmark::DoNotOptimize(pair.output().data());
    benchmark::ClobberMemory();
  }
  bench::report_flops(state, gemm.flops());
  bench::report_ratio_to_ceiling(state, gemm.flops(), clock.per_iteration(state), cached, true);
  bench::report_peak_extra(state, peak.extra_mib());
  bench::report_threads(state, 1);
}

/// Heap of one long causal call on every thread (made on a fresh thread, so the kernel's
/// per-thread workspaces count), against the N × N scores a materialising kernel would hold
/// (H·N²·sizeof(Scalar)). retained_MiB: what the threads keep for their next call.
template <class Scalar>
void memory(benchmark::State& state, const Shape& shape, int threads) {
  bench::AttentionInputs<Scalar> x(bench_heads, shape.n, head_dim);
  const AttentionOptions options{.mask = shape.mask, .threads = threads};
  const bench::ColdCallHeap cold = bench::cold_call_heap(
      [&] { posenc::attention(x.q, x.k, x.v, NoPositionalEncoding{}, x.out.view(), options); });
  const bench::HeapPeak peak;
  for (auto _ : state) {
    posenc::attention(x.q, x.k, x.v, NoPositionalEncoding{}, x.out.view(), options);
    benchmark::DoNotOptimize(x.out.data());
    benchmark::ClobberMemory();
  }
  if (!x.out.flat().allFinite()) state.SkipWithError("non-finite output");
  const double n = static_cast<double>(shape.n);
  const double scores_mib =
      static_cast<double>(bench_heads) * n * n * sizeof(Scalar) / (1024.0 * 1024.0);
  bench::report_flops(state, shape.useful_flops());
  bench::report_peak_extra(state, cold.peak_extra_mib);
  bench::report_steady_extra(state, peak);
  bench::report_threads(state, threads);
  state.counters["retained_MiB"] = cold.retained_mib;
  state.counters["nxn_scores_MiB"] = scores_mib;
  state.counters["extra_over_nxn"] = cold.peak_extra_mib / scores_mib;
}

template <class Scalar>
void register_shape(const Shape& shape, int all_threads) {
  using benchmark::RegisterBenchmark;
  const Index block = AttentionOptions{}.query_block;
  const Index key_block = AttentionOptions{}.key_block;
  RegisterBenchmark(row_name<Scalar>("reference", shape).c_str(),
                    [=](benchmark::State& s) { reference<Scalar>(s, shape); })
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
  const std::string one = row_name<Scalar>("stream_1t", shape);
  RegisterBenchmark(
      one.c_str(),
      [=](benchmark::State& s) { streaming<Scalar>(s, one, shape, 1, block, key_block); })
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
  if (all_threads > 1) {
    const std::string all = row_name<Scalar>("stream_" + std::to_string(all_threads) + "t", shape);
    RegisterBenchmark(all.c_str(),
                      [=](benchmark::State& s) {
                        streaming<Scalar>(s, all, shape, all_threads, block, key_block);
                      })
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  }
}

template <class Scalar>
void register_size(Index n, int all_threads) {
  const Shape causal{n, Mask::causal(), "causal"};
  const Shape none{n, Mask::none(), "none"};
  const std::string ceiling_name =
      "attention/ceiling/N:" + std::to_string(n) + "/" + scalar_name<Scalar>();
  benchmark::RegisterBenchmark(ceiling_name.c_str(),
                               [=](benchmark::State& s) { ceiling<Scalar>(s, none); })
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
  register_shape<Scalar>(causal, all_threads);
  register_shape<Scalar>(none, all_threads);
}

void register_all() {
  const int all_threads = bench::max_threads();
  for (const Index n : {512, 1024, 2048, 4096}) register_size<float>(n, all_threads);
  register_size<double>(1024, all_threads);

  // Tile sizes at the acceptance shape (N = 4096, causal, one thread).
  const Shape acceptance{4096, Mask::causal(), "causal"};
  for (const Index query_block : {64, 128, 256}) {
    for (const Index key_block : {64, 128, 256}) {
      const std::string tiles =
          "/qb:" + std::to_string(query_block) + "/kb:" + std::to_string(key_block);
      const std::string name = row_name<float>("tiles/stream_1t", acceptance, tiles);
      benchmark::RegisterBenchmark(name.c_str(),
                                   [=](benchmark::State& s) {
                                     streaming<float>(s, name, acceptance, 1, query_block,
                                                      key_block);
                                   })
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime();
    }
  }

  // Heap of a 16k-token causal call (one iteration: it is the slow row).
  const Shape long_causal{16384, Mask::causal(), "causal"};
  benchmark::RegisterBenchmark(
      row_name<float>("memory/stream_" + std::to_string(all_threads) + "t", long_causal).c_str(),
      [=](benchmark::State& s) { memory<float>(s, long_causal, all_threads); })
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime()
      ->Iterations(1);
}

}  // namespace

int main(int argc, char** argv) { return bench::run_benchmarks(argc, argv, register_all); }
