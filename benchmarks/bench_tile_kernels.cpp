// SPDX-License-Identifier: MIT
// The parts of one streaming-attention tile, each on its own (float, 128 queries × 128 keys,
// D = 64, one thread, data in cache): the Q·Kᵀ and P·V register-blocked micro-kernels, the
// softmax exponential over the tile, and packing the key tile transposed. Together with the
// performance report they show where a tile's time goes.
//
//   posenc_bench_tile_kernels --benchmark_min_time=0.3
#include <benchmark/benchmark.h>

#include "posenc/detail/tile_kernels.hpp"
#include "posenc/tensor.hpp"

namespace {

using posenc::Index;
using posenc::Matrix;
namespace detail = posenc::detail;

constexpr Index kRows = 128;
constexpr Index kCols = 128;
constexpr Index kDim = 64;
constexpr double kTileFlops = 2.0 * kRows * kCols * kDim;  // one of the tile's two products

void BM_TileLogits(benchmark::State& state) {
  const Matrix<float> queries = Matrix<float>::Random(kRows, kDim);
  const Matrix<float> keys_t = Matrix<float>::Random(kDim, kCols);
  Matrix<float> logits(kRows, kCols);
  for (auto _ : state) {
    detail::tile_logits(queries.data(), kDim, kRows, kDim, keys_t.data(), kCols, kCols,
                        logits.data(), kCols);
    benchmark::DoNotOptimize(logits.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(kTileFlops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_TileLogits)->Name("Tile/logits_QKt");

void BM_TileAccumulate(benchmark::State& state) {
  const Matrix<float> weights = Matrix<float>::Random(kRows, kCols);
  const Matrix<float> values = Matrix<float>::Random(kCols, kDim);
  Matrix<float> output = Matrix<float>::Zero(kRows, kDim);
  for (auto _ : state) {
    detail::tile_accumulate(weights.data(), kCols, kRows, kCols, values.data(), kDim, kDim,
                            output.data(), kDim);
    benchmark::DoNotOptimize(output.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(kTileFlops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_TileAccumulate)->Name("Tile/accumulate_PV");

void BM_TileExp(benchmark::State& state) {
  // Scores in [-1, 1], shifted by max 1: exp(x - 1) lands in (0, 1], and so does every repeat, so
  // the arguments stay in the range the softmax uses (x - max <= 0) without a reset.
  Matrix<float> scores = Matrix<float>::Random(kRows, kCols);
  for (auto _ : state) {
    float total = 0;
    for (Index r = 0; r < kRows; ++r) {
      total += detail::exp_shifted_row(scores.row(r).data(), kCols, 1.0f);
    }
    benchmark::DoNotOptimize(total);
  }
  state.counters["elements/s"] = benchmark::Counter(static_cast<double>(kRows * kCols),
                                                    benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_TileExp)->Name("Tile/softmax_exp");

void BM_PackTransposed(benchmark::State& state) {
  const Matrix<float> keys = Matrix<float>::Random(kCols, kDim);
  Matrix<float> keys_t(kDim, kCols);
  for (auto _ : state) {
    detail::pack_transposed(keys.data(), kDim, kCols, kDim, keys_t.data(), kCols);
    benchmark::DoNotOptimize(keys_t.data());
    benchmark::ClobberMemory();
  }
}
BENCHMARK(BM_PackTransposed)->Name("Tile/pack_keys_transposed");

}  // namespace

BENCHMARK_MAIN();
