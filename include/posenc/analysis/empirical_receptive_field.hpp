// SPDX-License-Identifier: MIT
// The empirical receptive field (ERF): the TRF's rule applied to measured attention weights or
// gradients, per query or over a whole [H, N, M] weight tensor.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "posenc/analysis/series_convergence.hpp"
#include "posenc/attention_map.hpp"
#include "posenc/attention_options.hpp"
#include "posenc/detail/check.hpp"
#include "posenc/tensor.hpp"

namespace posenc {

// ---------------------------------------------------------------------------------------------
// Empirical receptive field: the same rule on measured weights. For a query at position i and
// weights w_j ≥ 0 on keys at positions j (distance |i − j|):
//   ERF_ε = min { K ≥ 1 : Σ_{j : |i−j| < K} w_j ≥ (1 − ε)·Σ_j w_j },
// accumulated from the nearest key outwards (for causal attention: backwards from the query).
// ---------------------------------------------------------------------------------------------

namespace detail {

/// ERF of (distance, weight) pairs; 0 when the total weight is 0. Sorts `entries`.
inline Index erf_of_entries(const char* fn, std::vector<std::pair<Index, double>>& entries,
                            double eps) {
  for (const auto& [distance, weight] : entries) {
    require(std::isfinite(weight) && weight >= 0.0, fn,
            "weights must be finite and non-negative, got ", weight, " at distance ", distance);
  }
  std::sort(entries.begin(), entries.end());
  // tail[k] = Σ of the weights of entries k, k+1, … (suffix sums, smallest terms first).
  std::vector<long double> tail(entries.size() + 1, 0.0L);
  for (std::size_t k = entries.size(); k-- > 0;) tail[k] = tail[k + 1] + entries[k].second;
  const long double total = tail[0];
  if (total == 0.0L) return 0;
  const long double threshold = static_cast<long double>(eps) * total * (1.0L + trf_tie_slack);
  if (threshold >= total) return 1;
  for (std::size_t k = 0; k < entries.size(); ++k) {
    // after every entry at this distance is included
    if (k + 1 < entries.size() && entries[k + 1].first == entries[k].first) continue;
    if (tail[k + 1] <= threshold) return entries[k].first + 1;
  }
  return entries.back().first + 1;  // not reached (rounding): everything
}

}  // namespace detail

/// ERF of weights indexed by distance (weights[t] at distance t, t = 0 the nearest key).
/// Returns 0 when every weight is 0. Throws for ε outside (0, 1) or a negative / non-finite
/// weight.
template <class Derived>
Index erf_from_distance_weights(const Eigen::MatrixBase<Derived>& weights, double eps) {
  constexpr const char* fn = "posenc::erf_from_distance_weights";
  detail::require_eps(fn, eps);
  std::vector<std::pair<Index, double>> entries(static_cast<std::size_t>(weights.size()));
  for (Index t = 0; t < weights.size(); ++t) {
    entries[static_cast<std::size_t>(t)] = {t, static_cast<double>(weights(t))};
  }
  return detail::erf_of_entries(fn, entries, eps);
}

/// ERF from gradients (the cumulative normalised gradient of Chi et al., ACL 2023, as the TRF
/// paper uses it; docs/reference/xpos_bca_resolution_trf.md §4.4, details unconfirmed):
/// gradients[t] is the gradient (magnitude or signed component) of the loss at the last position
/// with respect to the input at distance t (t = 0 is the last token itself; reverse a per-position
/// array). |g| is normalised to sum 1 and accumulated from the nearest position: the smallest K
/// with Σ_{t<K} |g_t| ≥ (1 − ε)·Σ|g|. For gradient vectors pass their norms. Throws when every
/// gradient is 0 or one is not finite.
template <class Derived>
Index erf_from_gradients(const Eigen::MatrixBase<Derived>& gradients, double eps) {
  constexpr const char* fn = "posenc::erf_from_gradients";
  detail::require_eps(fn, eps);
  std::vector<std::pair<Index, double>> entries(static_cast<std::size_t>(gradients.size()));
  for (Index t = 0; t < gradients.size(); ++t) {
    const auto g = static_cast<double>(gradients(t));
    detail::require(std::isfinite(g), fn, "gradients[", t, "] is not finite (", g, ")");
    entries[static_cast<std::size_t>(t)] = {t, std::fabs(g)};
  }
  const Index erf = detail::erf_of_entries(fn, entries, eps);
  detail::require(erf > 0, fn, "every one of the ", gradients.size(), " gradients is 0");
  return erf;
}

/// ERF of one row of attention weights: the query at `query_position`, keys at
/// `key_positions` (empty: 0 … M−1). Returns 0 for a row without weight (every key masked).
template <class Derived>
Index empirical_receptive_field(const Eigen::MatrixBase<Derived>& weights, Index query_position,
                                double eps, Positions key_positions = {}) {
  constexpr const char* fn = "posenc::empirical_receptive_field";
  detail::require_eps(fn, eps);
  detail::require_position(fn, "query_position", query_position);
  detail::require_positions(fn, "key_positions", key_positions);
  detail::require(
      key_positions.empty() || static_cast<Index>(key_positions.size()) == weights.size(), fn,
      "weights has ", weights.size(), " entries but ", key_positions.size(),
      " key positions were given");
  std::vector<std::pair<Index, double>> entries(static_cast<std::size_t>(weights.size()));
  for (Index c = 0; c < weights.size(); ++c) {
    const Index key = key_positions.empty() ? c : key_positions[static_cast<std::size_t>(c)];
    const Index distance = query_position >= key ? query_position - key : key - query_position;
    entries[static_cast<std::size_t>(c)] = {distance, static_cast<double>(weights(c))};
  }
  return detail::erf_of_entries(fn, entries, eps);
}

/// Per-query and per-head ERF of attention weights.
struct EmpiricalReceptiveField {
  Eigen::Matrix<Index, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> per_query;  // [H, N]; 0:
                                                                                    // no weight
  Vector<double> mean;  // [H]: mean over the query rows with weight (NaN if there is none)
  Eigen::Matrix<Index, Eigen::Dynamic, 1> max;  // [H]: largest per-query ERF
};

namespace detail {

/// empirical_receptive_field of `view` ([H, N, M]) with resolved positions.
template <class Scalar>
EmpiricalReceptiveField empirical_receptive_field_at(HeadsView<const Scalar> view, double eps,
                                                     const ResolvedPositions& positions) {
  EmpiricalReceptiveField result{
      decltype(EmpiricalReceptiveField::per_query)::Zero(view.heads(), view.rows()),
      Vector<double>(view.heads()), Eigen::Matrix<Index, Eigen::Dynamic, 1>::Zero(view.heads())};
  for (Index h = 0; h < view.heads(); ++h) {
    long double sum = 0.0L;
    Index rows = 0;
    for (Index r = 0; r < view.rows(); ++r) {
      const Index erf = empirical_receptive_field(
          view.head(h).row(r), positions.queries[static_cast<std::size_t>(r)], eps, positions.keys);
      result.per_query(h, r) = erf;
      if (erf > 0) {
        sum += erf;
        ++rows;
        result.max[h] = std::max(result.max[h], erf);
      }
    }
    result.mean[h] =
        rows > 0 ? static_cast<double>(sum / rows) : std::numeric_limits<double>::quiet_NaN();
  }
  return result;
}

}  // namespace detail

/// ERF_ε of every query row of the [H, N, M] weights of attention_weights, at the positions the
/// map carries. Throws for ε outside (0, 1) or negative or non-finite weights.
template <class Scalar>
EmpiricalReceptiveField empirical_receptive_field(const AttentionMap<Scalar>& weights, double eps) {
  detail::require_eps("posenc::empirical_receptive_field", eps);
  return detail::empirical_receptive_field_at<Scalar>(weights.view(), eps,
                                                      detail::analysis_positions(weights));
}

/// As above for weights without positions (a Heads or a view), placed by `options`
/// (query_offset or query_positions, key_positions; the other fields are ignored). Given an
/// AttentionMap, the options must place its rows and columns where the map says (else throws).
/// Throws also for positions of the wrong size or outside the supported range.
template <HeadsLike Weights>
EmpiricalReceptiveField empirical_receptive_field(const Weights& weights, double eps,
                                                  const AttentionOptions& options) {
  constexpr const char* fn = "posenc::empirical_receptive_field";
  detail::require_eps(fn, eps);
  const auto view = detail::as_const_view(weights);
  return detail::empirical_receptive_field_at<heads_scalar_t<Weights>>(
      view, eps, detail::analysis_positions(fn, weights, view.rows(), view.dim(), options));
}

}  // namespace posenc
