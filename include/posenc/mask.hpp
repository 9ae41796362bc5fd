// SPDX-License-Identifier: MIT
// Attention masks on absolute positions: none, causal, sliding window and the XPos paper's
// blockwise causal attention. Every mask allows a contiguous range of key positions per query,
// which lets the kernel classify whole tiles and skip the forbidden ones.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include "posenc/detail/check.hpp"
#include "posenc/tensor.hpp"

namespace posenc {

/// How much of a (query block × key block) tile a mask allows.
enum class TileCoverage { none, partial, all };

/// Inclusive range [first, last] of key positions one query may attend to.
struct KeyRange {
  Index first;
  Index last;
  constexpr bool contains(Index key_position) const {
    return first <= key_position && key_position <= last;
  }
};

/// Which keys each query may attend to, in absolute positions i (query) and j (key).
///
///   none()                j anything
///   causal()              j <= i
///   sliding_window(w)     i - w < j <= i            (the query and the w - 1 keys before it)
///   blockwise_causal(w)   (floor(i/h) - 1)·h <= j <= i,  h = w/2
///
/// blockwise_causal is the XPos paper's BCA (Sun et al. 2022, arXiv 2212.10554, §3.3; the
/// closed form of sunyt32/torchscale's block loop): query blocks of h = w/2 positions attend to
/// their own block and the one before. For sequences of at most w positions it equals causal,
/// which is the reference's "only when T > w" rule. The reference's token-by-token decoding is
/// a different window: sliding_window(w + 1).
class Mask {
 public:
  enum class Kind : std::uint8_t { none, causal, sliding_window, blockwise_causal };

  static constexpr Mask none() { return Mask(Kind::none, 0); }
  static constexpr Mask causal() { return Mask(Kind::causal, 0); }

  /// Each query sees itself and the `window - 1` keys before it. Throws when window < 1.
  static Mask sliding_window(Index window) {
    detail::require(window >= 1 && window <= position_limit, "posenc::Mask::sliding_window",
                    "window must be in [1, 2^62], got ", window);
    return Mask(Kind::sliding_window, window);
  }

  /// XPos blockwise causal attention with block size `window` (the training length); queries are
  /// cut into blocks of window/2. Throws unless window is even and >= 2.
  static Mask blockwise_causal(Index window) {
    detail::require(window >= 2 && window % 2 == 0 && window <= position_limit,
                    "posenc::Mask::blockwise_causal",
                    "window must be even and in [2, 2^62] (blocks of window/2), got ", window);
    return Mask(Kind::blockwise_causal, window);
  }

  constexpr Kind kind() const { return kind_; }
  /// The window size for sliding_window and blockwise_causal; 0 otherwise.
  constexpr Index window() const { return window_; }

  /// Key positions query position `i` may attend to.
  constexpr KeyRange key_range(Index i) const {
    constexpr Index lowest = std::numeric_limits<Index>::min();
    constexpr Index highest = std::numeric_limits<Index>::max();
    switch (kind_) {
      case Kind::none:
        return {lowest, highest};
      case Kind::causal:
        return {lowest, i};
      case Kind::sliding_window:
        return {i - window_ + 1, i};
      case Kind::blockwise_causal: {
        const Index half = window_ / 2;
        return {(floor_div(i, half) - 1) * half, i};
      }
    }
    return {lowest, highest};
  }

  /// Whether query position i may attend to key position j.
  constexpr bool allows(Index i, Index j) const { return key_range(i).contains(j); }

  /// Classifies a tile from the extreme positions it holds (inclusive; any order of positions
  /// inside the tile). Exact for `none` and `all`: every pair is then forbidden or allowed.
  constexpr TileCoverage classify(Index query_min, Index query_max, Index key_min,
                                  Index key_max) const {
    // key_range(i).first and .last are non-decreasing in i for every kind.
    const KeyRange lo = key_range(query_min);
    const KeyRange hi = key_range(query_max);
    if (key_min > hi.last || key_max < lo.first) return TileCoverage::none;
    if (key_min >= hi.first && key_max <= lo.last) return TileCoverage::all;
    return TileCoverage::partial;
  }

  friend constexpr bool operator==(const Mask&, const Mask&) = default;

 private:
  constexpr Mask(Kind kind, Index window) : kind_(kind), window_(window) {}

  static constexpr Index floor_div(Index a, Index b) {
    const Index q = a / b;
    return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
  }

  Kind kind_ = Kind::causal;
  Index window_ = 0;
};

/// The key window of the LEX reference's token-by-token decoding with blockwise causal attention
/// of block size `window`: its cache keeps the last `window` keys and appends the new one, so each
/// token sees at most window + 1 keys. This is Mask::sliding_window(window + 1), not
/// Mask::blockwise_causal(window): parallel BCA and reference decoding differ (golden bca.json).
inline Mask blockwise_causal_decoding_window(Index window) {
  detail::require(window >= 1 && window < position_limit,
                  "posenc::blockwise_causal_decoding_window", "window must be in [1, 2^62), got ",
                  window);
  return Mask::sliding_window(window + 1);
}

}  // namespace posenc
