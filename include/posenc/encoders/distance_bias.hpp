// SPDX-License-Identifier: MIT
// What the relative-position biases share: the causal or symmetric form of the distance i − j,
// and the tile filler for a bias that depends on i − j alone (ALiBi, KERPLE, T5), which evaluates
// the bias once per distinct distance of a tile instead of once per element.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdlib>

#include "posenc/encoding.hpp"
#include "posenc/tensor.hpp"

namespace posenc {

/// How a distance bias treats the query position i and the key position j.
///
///   causal      δ = max(i − j, 0): the bias of a future key (j > i) equals the bias at j = i. The
///               form of gpt-neox's ALiBi, of the KERPLE code (`tril(i − j)`) and of the DAPE code;
///               a causal mask removes the future keys anyway.
///   symmetric   δ = |i − j|: both directions (OpenNMT-py / x-transformers ALiBi, the abs inside
///               the FIRE listing, the KERPLE paper's kernels), for bidirectional attention.
enum class BiasForm { causal, symmetric };

namespace detail {

/// The distance δ ≥ 0 a bias of the given form sees for i − j = `query_minus_key`.
constexpr Index form_distance(BiasForm form, Index query_minus_key) {
  if (form == BiasForm::causal) return query_minus_key > 0 ? query_minus_key : 0;
  return query_minus_key < 0 ? -query_minus_key : query_minus_key;
}

/// Whether `positions` are p[0], p[0] + 1, …, p[0] + n − 1 (the kernel's default positions).
/// O(n), cheap next to the O(rows · cols) tile it decides about.
inline bool is_consecutive(Positions positions) {
  for (std::size_t r = 1; r < positions.size(); ++r) {
    if (positions[r] != positions[0] + static_cast<Index>(r)) return false;
  }
  return true;
}

/// Rows and columns of a tile handled per distance window (the window holds 2·chunk − 1 values).
inline constexpr Index kDistanceChunk = 256;

/// Adds `value(qpos[r] − kpos[c])` (a double, cast to Scalar) to tile(r, c).
///
/// With consecutive query and key positions, the tile holds only rows + cols − 1 distinct
/// distances: they are evaluated once into a window w, with w[m] the value at distance
/// top − m (top = the distance of the last row and the first column), so that row r is the
/// contiguous slice w[rows − 1 − r, rows − 1 − r + cols) and the tile is filled by vectorised row
/// additions. Any other positions are evaluated element by element. The window lives on the
/// stack: no allocation, no O(N) table.
template <class Scalar, class Value>
void add_distance_bias(Positions qpos, Positions kpos, TileRef<Scalar> tile, const Value& value) {
  const Index rows = tile.rows();
  const Index cols = tile.cols();
  if (rows == 0 || cols == 0) return;
  if (!is_consecutive(qpos) || !is_consecutive(kpos)) {
    for (Index r = 0; r < rows; ++r) {
      const Index i = qpos[static_cast<std::size_t>(r)];
      for (Index c = 0; c < cols; ++c) {
        tile(r, c) += static_cast<Scalar>(value(i - kpos[static_cast<std::size_t>(c)]));
      }
    }
    return;
  }
  using RowMap = Eigen::Map<const Eigen::Matrix<Scalar, 1, Eigen::Dynamic>>;
  alignas(64) std::array<Scalar, 2 * kDistanceChunk - 1> window;
  for (Index r0 = 0; r0 < rows; r0 += kDistanceChunk) {
    const Index chunk_rows = std::min(kDistanceChunk, rows - r0);
    for (Index c0 = 0; c0 < cols; c0 += kDistanceChunk) {
      const Index chunk_cols = std::min(kDistanceChunk, cols - c0);
      const Index top =
          qpos[static_cast<std::size_t>(r0 + chunk_rows - 1)] - kpos[static_cast<std::size_t>(c0)];
      for (Index m = 0; m < chunk_rows + chunk_cols - 1; ++m) {
        window[static_cast<std::size_t>(m)] = static_cast<Scalar>(value(top - m));
      }
      for (Index r = 0; r < chunk_rows; ++r) {
        tile.row(r0 + r).segment(c0, chunk_cols) +=
            RowMap(window.data() + (chunk_rows - 1 - r), chunk_cols);
      }
    }
  }
}

}  // namespace detail

}  // namespace posenc
