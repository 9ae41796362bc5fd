// SPDX-License-Identifier: MIT
// The parts of one streaming-attention tile, each on its own (float, 128 queries × 128 keys,
// D = 64, one thread, data in cache): the Q·Kᵀ and P·V register-blocked micro-kernels, the
// softmax exponential over the tile, and packing the key tile transposed. Together with the
// performance report they show where a tile's time goes.
//
//   posenc_bench_tile_kernels --benchmark_min_time=0.3
#include <benchmark/benchmark.h>

#include "posenc/kernel/tile_kernels.hpp"
#include "posenc/tensor.hpp"

namespace {

using posenc::Index;
using posenc::Matrix;
namespace kernel = posenc::kernel;

constexpr Index tile_rows = 128;
constexpr Index tile_cols = 128;
constexpr Index head_dim = 64;
constexpr double tile_flops =
    2.0 * tile_rows * tile_cols * head_dim;  // one of the tile's two products

void BM_TileLogits(benchmark::State& state) {
  const Matrix<float> queries = Matrix<float>::Random(tile_rows, head_dim);
  const Matrix<float> keys_t = Matrix<float>::Random(head_dim, tile_cols);
  Matrix<float> logits(tile_rows, tile_cols);
  for (auto _ : state) {
    kernel::tile_logits(queries.data(), head_dim, tile_rows, head_dim, keys_t.data(), tile_cols,
                        tile_cols, logits.data(), tile_cols);
    benchmark::DoNotOptimize(logits.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(tile_flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_TileLogits)->Name("Tile/logits_QKt");

void BM_TileAccumulate(benchmark::State& state) {
  const Matrix<float> weights = Matrix<float>::Random(tile_rows, tile_cols);
  const Matrix<float> values = Matrix<float>::Random(tile_cols, head_dim);
  Matrix<float> output = Matrix<float>::Zero(tile_rows, head_dim);
  for (auto _ : state) {
    kernel::tile_accumulate(weights.data(), tile_cols, tile_rows, tile_cols, values.data(),
                            head_dim, head_dim, output.data(), head_dim);
    benchmark::DoNotOptimize(output.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(tile_flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_TileAccumulate)->Name("Tile/accumulate_PV");

void BM_TileExp(benchmark::State& state) {
  // Scores in [-1, 1], shifted by max 1: exp(x - 1) lands in (0, 1], and so does every repeat, so
  // the arguments stay in the range the softmax uses (x - max <= 0) without a reset.
  Matrix<float> scores = Matrix<float>::Random(tile_rows, tile_cols);
  for (auto _ : state) {
    float total = 0;
    for (Index r = 0; r < tile_rows; ++r) {
      total += kernel::exp_shifted_row(scores.row(r).data(), tile_cols, 1.0f);
    }
    benchmark::DoNotOptimize(total);
  }
  state.counters["elements/s"] = benchmark::Counter(static_cast<double>(tile_rows * tile_cols),
                                                    benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_TileExp)->Name("Tile/softmax_exp");

void BM_PackTransposed(benchmark::State& state) {
  const Matrix<float> keys = Matrix<float>::Random(tile_cols, head_dim);
  Matrix<float> keys_t(head_dim, tile_cols);
  for (auto _ : state) {
    kernel::pack_transposed(keys.data(), head_dim, tile_cols, head_dim, keys_t.data(), tile_cols);
    benchmark::DoNotOptimize(keys_t.data());
    benchmark::ClobberMemory();
  }
}
BENCHMARK(BM_PackTransposed)->Name("Tile/pack_keys_transposed");

}  // namespace

BENCHMARK_MAIN();
