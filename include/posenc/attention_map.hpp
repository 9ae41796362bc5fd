// SPDX-License-Identifier: MIT
// AttentionMap: the [H, N, M] scores or probabilities of one attention call together with the
// absolute positions of its query rows and key columns and the mask that applied, so an analysis
// of the map measures distances with the positions of the pass that made it.
#pragma once

#include <cstddef>
#include <utility>
#include <vector>

#include "posenc/attention_options.hpp"
#include "posenc/detail/check.hpp"
#include "posenc/mask.hpp"
#include "posenc/tensor.hpp"

namespace posenc {

/// Heads<Scalar> of shape [H, N, M] (row r of head h: query r against every key) that also
/// carries query_positions()[r] and key_positions()[c], the absolute positions of row r and column
/// c, and mask(), the mask of the call (the caller's or the encoder's natural one). Returned by
/// attention_weights and attention_scores; the analysis functions read the positions from it.
/// Everything a Heads<Scalar> offers (views, head(h), element access) works unchanged.
template <class Scalar>
class AttentionMap : public Heads<Scalar> {
 public:
  AttentionMap() = default;

  /// A zero map over `query_positions` × `key_positions` for `heads` heads.
  AttentionMap(Index heads, std::vector<Index> query_positions, std::vector<Index> key_positions,
               Mask mask)
      : Heads<Scalar>(heads, static_cast<Index>(query_positions.size()),
                      static_cast<Index>(key_positions.size())),
        query_positions_(std::move(query_positions)),
        key_positions_(std::move(key_positions)),
        mask_(mask) {}

  /// Absolute position of each query row, [N].
  const std::vector<Index>& query_positions() const { return query_positions_; }
  /// Absolute position of each key column, [M].
  const std::vector<Index>& key_positions() const { return key_positions_; }
  /// The mask the call applied.
  const Mask& mask() const { return mask_; }

 private:
  std::vector<Index> query_positions_;
  std::vector<Index> key_positions_;
  Mask mask_ = Mask::none();
};

namespace detail {

template <class Scalar>
struct heads_scalar<AttentionMap<Scalar>> {
  using type = Scalar;
};

template <class T>
inline constexpr bool is_attention_map_v = false;
template <class Scalar>
inline constexpr bool is_attention_map_v<AttentionMap<Scalar>> = true;

/// The positions an analysis function `fn` uses for `map` ([H, N, M]) when the caller also passes
/// `options`: the positions of `options`, and when `map` is an AttentionMap they must equal the
/// ones it carries (a mismatch throws, naming the first differing row or column).
template <class Map>
ResolvedPositions analysis_positions(const char* fn, const Map& map, Index rows, Index cols,
                                     const AttentionOptions& options) {
  ResolvedPositions positions = resolve_positions(fn, options, rows, cols);
  if constexpr (is_attention_map_v<Map>) {
    for (Index r = 0; r < rows; ++r) {
      const auto i = static_cast<std::size_t>(r);
      require(positions.queries[i] == map.query_positions()[i], fn, "the options place query row ",
              r, " at ", positions.queries[i], " but the attention map was computed at ",
              map.query_positions()[i], " (pass the map alone to use its positions)");
    }
    for (Index c = 0; c < cols; ++c) {
      const auto i = static_cast<std::size_t>(c);
      require(positions.keys[i] == map.key_positions()[i], fn, "the options place key column ", c,
              " at ", positions.keys[i], " but the attention map was computed at ",
              map.key_positions()[i], " (pass the map alone to use its positions)");
    }
  }
  return positions;
}

/// The positions an AttentionMap carries.
template <class Scalar>
ResolvedPositions analysis_positions(const AttentionMap<Scalar>& map) {
  return ResolvedPositions{map.query_positions(), map.key_positions()};
}

}  // namespace detail

}  // namespace posenc
