// SPDX-License-Identifier: MIT
// The options of one attention call and the one rule that places its rows at absolute positions
// (queries at query_offset + r or the explicit query_positions, keys at c or the explicit
// key_positions). The kernel, the KV cache and the analysis tools all resolve positions here.
#pragma once

#include <cmath>
#include <cstddef>
#include <optional>
#include <span>
#include <vector>

#include "posenc/detail/check.hpp"
#include "posenc/encoding.hpp"
#include "posenc/mask.hpp"
#include "posenc/tensor.hpp"

namespace posenc {

/// Options of one attention call. An aggregate: write `{.mask = Mask::none(), .query_offset = 7}`.
struct AttentionOptions {
  /// Which keys each query sees, on absolute positions. Unset: the encoder's natural_mask() when
  /// it declares one (a bidirectional T5 bias: none), else causal.
  std::optional<Mask> mask = std::nullopt;
  /// Absolute position of query row 0 (queries sit at query_offset … query_offset+N−1) when no
  /// explicit query positions are given. Keys sit at 0 … M−1 unless given explicitly.
  Index query_offset = 0;
  /// Explicit absolute positions (packed sequences, evicted caches): N resp. M entries, or empty.
  Positions query_positions = {};
  Positions key_positions = {};
  /// Document ids for packed sequences: a query attends only to keys of its own document.
  /// Either both empty or N resp. M entries (an empty side is right when it has no rows).
  std::span<const Index> query_segments = {};
  std::span<const Index> key_segments = {};
  /// Logit scale. Unset: the encoder's natural_scale() when it declares one (T5: 1), else
  /// 1/sqrt(width of the dot product after any QueryKeyTransform).
  std::optional<double> scale = std::nullopt;
  /// Threads of the streaming kernel; 0 = automatic: the calling thread for a small call (below
  /// 2^24 multiply-adds, e.g. a decoding step), OpenMP's default otherwise.
  int threads = 0;
  /// Tile sizes of the streaming kernel (queries × keys).
  Index query_block = 128;
  Index key_block = 128;
};

/// Options of one linear attention call. An aggregate: `{.causal = false}`.
struct LinearAttentionOptions {
  /// Causal: row i attends to key rows 0 … i (q and k are the same N tokens). Otherwise every
  /// query attends to every key.
  bool causal = true;
  /// Absolute position of row 0 of q and of k: row i sits at first_position + i (what a
  /// QueryKeyTransform such as stochastic PE sees).
  Index first_position = 0;
  /// Threads (over heads); 0 = OpenMP's default.
  int threads = 0;
  /// Rows per chunk of the causal scan (a chunk is a small masked quadratic form).
  Index chunk = 64;
};

namespace detail {

/// The mask of a call: the caller's, else the encoder's natural mask, else causal.
template <class Encoder>
Mask resolve_mask(const Encoder& encoder, const std::optional<Mask>& mask) {
  if (mask) return *mask;
  if constexpr (HasNaturalMask<Encoder>) {
    return encoder.natural_mask();
  } else {
    (void)encoder;
    return Mask::causal();
  }
}

/// The logit scale of a call: the caller's, else the encoder's natural scale, else 1/√width.
template <class Encoder>
double resolve_scale(const Encoder& encoder, const std::optional<double>& scale,
                     Index logit_width) {
  if (scale) return *scale;
  if constexpr (HasNaturalScale<Encoder>) {
    return static_cast<double>(encoder.natural_scale());
  } else {
    (void)encoder;
    return 1.0 / std::sqrt(static_cast<double>(logit_width));
  }
}

/// Throws unless |position| < position_limit (tensor.hpp).
inline void require_position(const char* fn, const char* name, Index position) {
  require(position > -position_limit && position < position_limit, fn, name, " is ", position,
          ", outside the supported position range (-2^62, 2^62)");
}

/// Throws unless every explicit position is inside the supported range.
inline void require_positions(const char* fn, const char* name, Positions positions) {
  for (std::size_t i = 0; i < positions.size(); ++i) {
    if (positions[i] <= -position_limit || positions[i] >= position_limit) {
      throw_invalid_argument(fn, name, "[", i, "] is ", positions[i],
                             ", outside the supported position range (-2^62, 2^62)");
    }
  }
}

/// Throws unless first, first + 1, …, first + count − 1 are all inside the supported range.
inline void require_position_run(const char* fn, const char* name, Index first, Index count) {
  require_position(fn, name, first);
  require(count <= 1 || first < position_limit - (count - 1), fn, name, " = ", first, " places ",
          count, " rows beyond the supported position range (-2^62, 2^62)");
}

/// Checks the positions an AttentionOptions places N queries at, and the explicit key positions
/// (keys at 0 … M − 1 are always in range).
inline void require_option_positions(const char* fn, const AttentionOptions& options,
                                     Index queries) {
  if (options.query_positions.empty()) {
    require_position_run(fn, "query_offset", options.query_offset, queries);
  }
  require_positions(fn, "query_positions", options.query_positions);
  require_positions(fn, "key_positions", options.key_positions);
}

/// The position rule. Query row r: query_positions[r] when given, else query_offset + r.
inline Index query_position_of(Positions query_positions, Index query_offset, Index r) {
  return query_positions.empty() ? query_offset + r : query_positions[static_cast<std::size_t>(r)];
}
/// Key row c: key_positions[c] when given, else c.
inline Index key_position_of(Positions key_positions, Index c) {
  return key_positions.empty() ? c : key_positions[static_cast<std::size_t>(c)];
}

/// The absolute positions of `rows` queries and `cols` keys under `options`.
struct ResolvedPositions {
  std::vector<Index> queries;
  std::vector<Index> keys;
};

/// Positions of `rows` queries and `cols` keys (the rows and columns of an [H, N, M] weight or
/// score tensor). Throws when explicit positions have another size.
inline ResolvedPositions resolve_positions(const char* fn, const AttentionOptions& options,
                                           Index rows, Index cols) {
  require_option_positions(fn, options, rows);
  require(
      options.query_positions.empty() || static_cast<Index>(options.query_positions.size()) == rows,
      fn, "options.query_positions has ", options.query_positions.size(), " entries but there are ",
      rows, " query rows");
  require(options.key_positions.empty() || static_cast<Index>(options.key_positions.size()) == cols,
          fn, "options.key_positions has ", options.key_positions.size(), " entries but there are ",
          cols, " key columns");
  ResolvedPositions p{std::vector<Index>(static_cast<std::size_t>(rows)),
                      std::vector<Index>(static_cast<std::size_t>(cols))};
  for (Index r = 0; r < rows; ++r) {
    p.queries[static_cast<std::size_t>(r)] =
        query_position_of(options.query_positions, options.query_offset, r);
  }
  for (Index c = 0; c < cols; ++c) {
    p.keys[static_cast<std::size_t>(c)] = key_position_of(options.key_positions, c);
  }
  return p;
}

}  // namespace detail

}  // namespace posenc
