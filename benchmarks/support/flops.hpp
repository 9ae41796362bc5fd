// SPDX-License-Identifier: MIT
// FLOP counts of attention that count only useful work: the (query, key) pairs a mask allows,
// 2·D FLOPs each for q·k and 2·Dv for p·v. Masked-out pairs are never counted, so a kernel that
// skips forbidden tiles and one that computes them are compared on the same work.
#pragma once

#include <algorithm>

#include "posenc/mask.hpp"
#include "posenc/tensor.hpp"

namespace posenc::bench {

/// Number of (i, j) pairs `mask` allows for queries at query_offset … query_offset+queries−1
/// and keys at 0 … keys−1 (as a double: 16k² overflows nothing, and rates are doubles anyway).
inline double allowed_pairs(const Mask& mask, Index queries, Index keys, Index query_offset = 0) {
  double pairs = 0.0;
  for (Index r = 0; r < queries; ++r) {
    const KeyRange range = mask.key_range(query_offset + r);
    const Index first = std::max<Index>(range.first, 0);
    const Index last = std::min<Index>(range.last, keys - 1);
    if (last >= first) pairs += static_cast<double>(last - first + 1);
  }
  return pairs;
}

/// Useful FLOPs of one attention call: heads · pairs · (2·dim + 2·value_dim).
inline double attention_flops(Index heads, Index dim, Index value_dim, double pairs) {
  return static_cast<double>(heads) * pairs * 2.0 * static_cast<double>(dim + value_dim);
}

}  // namespace posenc::bench
