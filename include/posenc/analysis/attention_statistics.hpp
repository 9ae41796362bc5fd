// SPDX-License-Identifier: MIT
// Per-head statistics of attention probabilities: how spread out each query's distribution is
// (entropy), how far it reaches (mean distance), and how much of it lies beyond a training
// length. Inputs are the [H, N, M] weights of attention_weights (an AttentionMap, which carries
// the positions the distances are measured with).
#pragma once

#include <cmath>
#include <cstddef>
#include <limits>

#include "posenc/attention_map.hpp"
#include "posenc/attention_options.hpp"
#include "posenc/detail/check.hpp"
#include "posenc/tensor.hpp"

namespace posenc {

/// Statistics of one query row: p_j = w_j / Σ w (rows need not be normalised), distance
/// |i − j| between the absolute positions of the query and key j.
struct RowAttentionStatistics {
  double entropy = 0.0;        // −Σ p_j ln p_j (nats; 0·ln 0 = 0)
  double mean_distance = 0.0;  // Σ p_j |i − j|
  double mass_beyond = 0.0;    // Σ_{|i − j| ≥ training_length} p_j
  bool empty = true;           // every weight is 0 (all keys masked): the others are 0
};

/// Per-head means over the query rows with weight.
struct AttentionStatistics {
  Index training_length = 0;
  Vector<double> entropy;        // [H] nats; NaN for a head with no row with weight
  Vector<double> mean_distance;  // [H] tokens
  Vector<double> mass_beyond;    // [H] share of attention at distance >= training_length
  Eigen::Matrix<Index, Eigen::Dynamic, 1> rows;  // [H] rows with weight that were averaged
};

namespace detail {

/// attention_row_statistics for the public function `fn`; `head` >= 0 and `row` name the row of
/// an [H, N, M] tensor in messages (attention_statistics), head < 0 a lone row.
template <class Derived>
RowAttentionStatistics row_attention_statistics(const char* fn,
                                                const Eigen::MatrixBase<Derived>& weights,
                                                Index query_position, Index training_length,
                                                Positions key_positions, Index head, Index row) {
  require(training_length >= 0, fn, "training_length must be >= 0, got ", training_length);
  require_position(fn, "query_position", query_position);
  require_positions(fn, "key_positions", key_positions);
  require(key_positions.empty() || static_cast<Index>(key_positions.size()) == weights.size(), fn,
          "weights has ", weights.size(), " entries but ", key_positions.size(),
          " key positions were given");
  long double total = 0.0L;
  for (Index c = 0; c < weights.size(); ++c) {
    const auto w = static_cast<long double>(weights(c));
    if (!(std::isfinite(w) && w >= 0.0L)) {
      if (head >= 0) {
        throw_invalid_argument(fn, "weights must be finite and non-negative, got ", weights(c),
                               " at head ", head, ", row ", row, ", column ", c);
      }
      throw_invalid_argument(fn, "weights must be finite and non-negative, got ", weights(c),
                             " at column ", c);
    }
    total += w;
  }
  RowAttentionStatistics result;
  if (total == 0.0L) return result;
  long double entropy = 0.0L;
  long double distance = 0.0L;
  long double beyond = 0.0L;
  for (Index c = 0; c < weights.size(); ++c) {
    const long double p = static_cast<long double>(weights(c)) / total;
    if (p == 0.0L) continue;
    const Index key = key_positions.empty() ? c : key_positions[static_cast<std::size_t>(c)];
    const Index d = query_position >= key ? query_position - key : key - query_position;
    entropy -= p * std::log(p);
    distance += p * static_cast<long double>(d);
    if (d >= training_length) beyond += p;
  }
  result.entropy = static_cast<double>(entropy);
  result.mean_distance = static_cast<double>(distance);
  result.mass_beyond = static_cast<double>(beyond);
  result.empty = false;
  return result;
}

}  // namespace detail

/// Statistics of one row of weights for a query at `query_position` and keys at `key_positions`
/// (empty: 0 … M−1). Throws for a negative or non-finite weight, training_length < 0 or
/// positions of the wrong size.
template <class Derived>
RowAttentionStatistics attention_row_statistics(const Eigen::MatrixBase<Derived>& weights,
                                                Index query_position, Index training_length,
                                                Positions key_positions = {}) {
  return detail::row_attention_statistics("posenc::attention_row_statistics", weights,
                                          query_position, training_length, key_positions, -1, 0);
}

namespace detail {

/// attention_statistics of `view` ([H, N, M]) with resolved positions.
template <class Scalar>
AttentionStatistics attention_statistics_at(const char* fn, HeadsView<const Scalar> view,
                                            Index training_length,
                                            const ResolvedPositions& positions) {
  const Index H = view.heads();
  constexpr double nan = std::numeric_limits<double>::quiet_NaN();
  AttentionStatistics stats{training_length, Vector<double>::Constant(H, nan),
                            Vector<double>::Constant(H, nan), Vector<double>::Constant(H, nan),
                            Eigen::Matrix<Index, Eigen::Dynamic, 1>::Zero(H)};
  for (Index h = 0; h < H; ++h) {
    long double entropy = 0.0L;
    long double distance = 0.0L;
    long double beyond = 0.0L;
    Index rows = 0;
    for (Index r = 0; r < view.rows(); ++r) {
      const RowAttentionStatistics row = row_attention_statistics(
          fn, view.head(h).row(r), positions.queries[static_cast<std::size_t>(r)], training_length,
          positions.keys, h, r);
      if (row.empty) continue;
      entropy += row.entropy;
      distance += row.mean_distance;
      beyond += row.mass_beyond;
      ++rows;
    }
    stats.rows[h] = rows;
    if (rows == 0) continue;
    const auto n = static_cast<long double>(rows);
    stats.entropy[h] = static_cast<double>(entropy / n);
    stats.mean_distance[h] = static_cast<double>(distance / n);
    stats.mass_beyond[h] = static_cast<double>(beyond / n);
  }
  return stats;
}

}  // namespace detail

/// Per-head entropy, mean attention distance and mass beyond `training_length`, averaged over
/// the query rows with weight, of the [H, N, M] weights of attention_weights, at the positions
/// the map carries. Distances are |i − j| on absolute positions. Throws as
/// attention_row_statistics (messages name attention_statistics and the head, row and column of
/// a bad weight).
template <class Scalar>
AttentionStatistics attention_statistics(const AttentionMap<Scalar>& weights,
                                         Index training_length) {
  constexpr const char* fn = "posenc::attention_statistics";
  detail::require(training_length >= 0, fn, "training_length must be >= 0, got ", training_length);
  return detail::attention_statistics_at<Scalar>(fn, weights.view(), training_length,
                                                 detail::analysis_positions(weights));
}

/// As above for weights without positions (a Heads or a view), placed by `options`
/// (query_offset or query_positions, key_positions; the other fields are ignored). Given an
/// AttentionMap, the options must place its rows and columns where the map says (else throws).
template <HeadsLike Weights>
AttentionStatistics attention_statistics(const Weights& weights, Index training_length,
                                         const AttentionOptions& options) {
  constexpr const char* fn = "posenc::attention_statistics";
  detail::require(training_length >= 0, fn, "training_length must be >= 0, got ", training_length);
  const auto view = detail::as_const_view(weights);
  return detail::attention_statistics_at<heads_scalar_t<Weights>>(
      fn, view, training_length,
      detail::analysis_positions(fn, weights, view.rows(), view.dim(), options));
}

}  // namespace posenc
