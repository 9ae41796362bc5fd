// SPDX-License-Identifier: MIT
// The mask and the segments on tiles: whether a tile is wholly allowed, wholly forbidden or
// partial, the allowed columns of each row, and the −inf written over forbidden entries.
// IWYU pragma: private, include "posenc/attention.hpp"
#pragma once

#include <algorithm>
#include <limits>
#include <span>
#include <utility>

#include "posenc/encoding.hpp"
#include "posenc/kernel/problem.hpp"
#include "posenc/kernel/tile_kernels.hpp"
#include "posenc/kernel/workspace.hpp"
#include "posenc/mask.hpp"
#include "posenc/tensor.hpp"

namespace posenc::kernel {

/// Mask and segments together, for one tile.
inline TileCoverage tile_coverage(const Mask& mask, bool segmented, const BlockExtent& queries,
                                  const BlockExtent& keys) {
  TileCoverage coverage = mask.classify(queries.position_min, queries.position_max,
                                        keys.position_min, keys.position_max);
  if (coverage == TileCoverage::none || !segmented) return coverage;
  if (queries.segment_max < keys.segment_min || keys.segment_max < queries.segment_min) {
    return TileCoverage::none;
  }
  const bool one_document = queries.segment_min == queries.segment_max &&
                            keys.segment_min == keys.segment_max &&
                            queries.segment_min == keys.segment_min;
  return one_document ? coverage : TileCoverage::partial;
}

/// The columns [first, last) of a tile whose keys sit at first_key, first_key + 1, … that the mask
/// allows for a query at `query_position` (first >= last: none).
inline std::pair<Index, Index> allowed_columns(const Mask& mask, Index query_position,
                                               Index first_key, Index cols) {
  const KeyRange range = mask.key_range(query_position);
  // Compare in differences so that extreme ranges (±2^63) do not overflow.
  const Index lo = range.first <= first_key ? 0 : std::min<Index>(range.first - first_key, cols);
  const Index hi =
      range.last < first_key ? 0 : std::min<Index>(range.last - first_key, cols - 1) + 1;
  return {lo, hi};
}

/// Sets the entries of a score tile that the mask or the segments forbid to −inf.
/// `keys_consecutive`: the key positions are kpos[0], kpos[0]+1, … (the default), so each row's
/// allowed keys form one column interval.
template <class Scalar, class Tile>
void apply_mask(const Mask& mask, Positions qpos, Positions kpos, bool keys_consecutive,
                std::span<const Index> qseg, std::span<const Index> kseg, Tile& tile) {
  constexpr Scalar minus_infinity = -std::numeric_limits<Scalar>::infinity();
  const Index rows = tile.rows();
  const Index cols = tile.cols();
  for (Index r = 0; r < rows; ++r) {
    if (keys_consecutive) {
      const auto [lo, hi] = allowed_columns(mask, qpos[static_cast<std::size_t>(r)], kpos[0], cols);
      if (hi <= lo) {
        tile.row(r).setConstant(minus_infinity);
      } else {
        tile.row(r).head(lo).setConstant(minus_infinity);
        tile.row(r).tail(cols - hi).setConstant(minus_infinity);
      }
    } else {
      const KeyRange range = mask.key_range(qpos[static_cast<std::size_t>(r)]);
      for (Index c = 0; c < cols; ++c) {
        if (!range.contains(kpos[static_cast<std::size_t>(c)])) tile(r, c) = minus_infinity;
      }
    }
    if (!qseg.empty()) {
      const Index document = qseg[static_cast<std::size_t>(r)];
      for (Index c = 0; c < cols; ++c) {
        if (kseg[static_cast<std::size_t>(c)] != document) tile(r, c) = minus_infinity;
      }
    }
  }
}

/// On a partial tile with consecutive keys, each row's allowed columns (in the workspace): they
/// bound the work of both products, since the entries outside are masked to −inf and get weight
/// 0. No limits on other tiles.
template <class Scalar>
ColumnLimits column_limits(const AttentionProblem<Scalar>& p, TileCoverage coverage, Positions qpos,
                           Index key_first, Index cols, TileWorkspace<Scalar>& ws) {
  if (coverage != TileCoverage::partial || !p.key_positions.empty()) return {};
  for (std::size_t r = 0; r < qpos.size(); ++r) {
    const auto [lo, hi] = allowed_columns(p.mask, qpos[r], key_first, cols);
    ws.column_begin[r] = lo;
    ws.column_end[r] = hi;
  }
  return {ws.column_begin.data(), ws.column_end.data()};
}

}  // namespace posenc::kernel
