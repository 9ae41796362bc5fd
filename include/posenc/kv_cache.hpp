// SPDX-License-Identifier: MIT
// A key/value cache for decoding: append each token's keys and values with their absolute
// positions, attend new queries over everything held. Works with every encoder; keys of a rotary
// encoder (RoPE, XPos with a fixed centre) are transformed once, on insert.
#pragma once

#include <algorithm>
#include <cmath>
#include <optional>
#include <span>
#include <vector>

#include "posenc/attention.hpp"
#include "posenc/attention_options.hpp"
#include "posenc/detail/check.hpp"
#include "posenc/encoding.hpp"
#include "posenc/mask.hpp"
#include "posenc/tensor.hpp"

namespace posenc {

/// An encoder whose only stage is a QueryKeyTransform declaring `keys_ignore_centre()`
/// (encoding.hpp's DeclaresCentreFreeKeys hook). When that returns true, KvCache stores
/// transformed keys.
template <class E>
concept CentreFreeKeyTransform =
    DeclaresCentreFreeKeys<E> && models_only<E, Stage::query_key_transform>;

/// Construction options of KvCache. An aggregate: `{.mask = Mask::sliding_window(1024)}`.
struct KvCacheOptions {
  /// Width of the values; 0 = the key width.
  Index value_dim = 0;
  /// The mask of every attend call (on absolute positions). With Mask::sliding_window(w) the
  /// cache also drops, on append, the keys that no query at or after the first new position can
  /// see, so its size stays bounded; positions must then increase from one append to the next.
  Mask mask = Mask::causal();
  /// Rows reserved up front (the cache grows geometrically past it).
  Index capacity = 0;
};

/// Options of one KvCache::attend call.
struct KvAttendOptions {
  /// Absolute positions of the N queries; empty = the positions of the last N rows appended (the
  /// usual case: the queries belong to the tokens just appended).
  Positions query_positions = {};
  /// Document ids of the queries when the cache holds segments; empty = those of the last N rows.
  std::span<const Index> query_segments = {};
  /// Logit scale; default 1/sqrt(key width after any QueryKeyTransform).
  std::optional<double> scale = std::nullopt;
  int threads = 0;
  Index query_block = 128;
  Index key_block = 128;
};

/// Keys and values of past tokens for decoding, [H_kv, rows, D] and [H_kv, rows, Dv], with the
/// absolute position (and optionally the document id) of every row.
///
///   KvCache cache(RotaryEncoding<float>(64), /*kv_heads=*/8, /*dim=*/64);
///   for (...) {
///     cache.append(k_t, v_t);          // [8, 1, 64] each, at the next position
///     auto o = cache.attend(q_t);      // [H, 1, 64]: the query of the token just appended
///   }
///
/// - append(k, v[, positions[, segments]]): rows at `positions` (T entries), or continuing from
///   the last position held plus one (0 for an empty cache).
/// - attend(q[, options]): q is [H, N, D] (H a multiple of H_kv: grouped-query attention); query
///   positions default to those of the last N rows appended; the mask is the cache's (causal by
///   default). Equals one attention() call over the same rows (streaming kernel, same tolerance).
/// - Encoders: with a CentreFreeKeyTransform whose keys_ignore_centre() is true the cache stores
///   transformed keys (each key is rotated once) and rotates only the queries at attend time;
///   every other encoder (biases, mixers, DAPE, XPos with tile centring, NoPE) gets raw keys and
///   the cache's positions, so it sees exactly the positions of a full pass.
/// - Storage grows geometrically (amortised O(1) per row); reserve() preallocates.
template <class ScalarType, AttentionEncoder Encoder = NoPositionalEncoding>
class KvCache {
 public:
  using Scalar = ScalarType;
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                "posenc::KvCache: Scalar must be float or double");

  KvCache(Encoder encoder, Index kv_heads, Index dim, KvCacheOptions options = {})
      : encoder_(std::move(encoder)),
        kv_heads_(kv_heads),
        dim_(dim),
        value_dim_(options.value_dim == 0 ? dim : options.value_dim),
        mask_(options.mask) {
    constexpr const char* fn = "posenc::KvCache";
    detail::require(kv_heads >= 1 && dim >= 1 && value_dim_ >= 1, fn,
                    "kv_heads, dim and value_dim must be >= 1, got ", kv_heads, ", ", dim, " and ",
                    value_dim_);
    detail::require(options.capacity >= 0, fn, "capacity must be >= 0, got ", options.capacity);
    if constexpr (CentreFreeKeyTransform<Encoder>) {
      stores_transformed_keys_ = static_cast<bool>(encoder_.keys_ignore_centre());
    }
    key_width_ = stores_transformed_keys_ ? detail::transformed_width(encoder_, dim_) : dim_;
    reserve(options.capacity);
  }

  KvCache(Index kv_heads, Index dim,
          KvCacheOptions options = {}) requires std::default_initializable<Encoder>
      : KvCache(Encoder{}, kv_heads, dim, options) {}

  Index kv_heads() const { return kv_heads_; }
  Index dim() const { return dim_; }
  Index value_dim() const { return value_dim_; }
  /// Rows held.
  Index size() const { return size_; }
  Index capacity() const { return capacity_; }
  const Encoder& encoder() const { return encoder_; }
  const Mask& mask() const { return mask_; }
  /// Whether keys are stored after the encoder's key transform.
  bool stores_transformed_keys() const { return stores_transformed_keys_; }
  /// The position the next automatically positioned row gets.
  Index next_position() const { return next_position_; }

  /// Absolute positions of the rows held (oldest first).
  Positions positions() const {
    return Positions(positions_.data() + start_, static_cast<std::size_t>(size_));
  }
  /// Document ids of the rows held, or empty.
  std::span<const Index> segments() const {
    if (segments_.empty()) return {};
    return {segments_.data() + start_, static_cast<std::size_t>(size_)};
  }
  /// The keys held, [H_kv, size, key width] (transformed when stores_transformed_keys()).
  HeadsView<const Scalar> keys() const {
    return HeadsView<const Scalar>(keys_.data() + start_ * key_width_, kv_heads_, size_, key_width_,
                                   capacity_ * key_width_, key_width_);
  }
  /// The values held, [H_kv, size, value_dim].
  HeadsView<const Scalar> values() const {
    return HeadsView<const Scalar>(values_.data() + start_ * value_dim_, kv_heads_, size_,
                                   value_dim_, capacity_ * value_dim_, value_dim_);
  }

  /// Makes room for `rows` rows in total without further allocation.
  void reserve(Index rows) {
    detail::require(rows >= 0, "posenc::KvCache::reserve", "rows must be >= 0, got ", rows);
    if (rows > capacity_ - start_) relocate(std::max(rows, capacity_));
  }

  /// Drops every row; the next automatic position is 0 again.
  void clear() {
    start_ = size_ = 0;
    next_position_ = 0;
    segments_.clear();
  }

  /// Drops the rows at positions below `position` (oldest first; stops at the first row at or
  /// above it).
  void evict_before(Index position) {
    while (size_ > 0 && positions_[static_cast<std::size_t>(start_)] < position) {
      ++start_;
      --size_;
    }
    if (size_ == 0) start_ = 0;
  }

  /// Appends T rows: k [H_kv, T, dim], v [H_kv, T, value_dim], at `positions` (T entries; empty =
  /// next_position() onwards) with document ids `segments` (T entries, or empty when the cache
  /// holds none).
  template <HeadsLike K, HeadsLike V>
  void append(const K& k, const V& v, Positions positions = {},
              std::span<const Index> segments = {}) {
    constexpr const char* fn = "posenc::KvCache::append";
    const auto kv = detail::as_const_view(k);
    const auto vv = detail::as_const_view(v);
    static_assert(
        std::is_same_v<heads_scalar_t<K>, Scalar> && std::is_same_v<heads_scalar_t<V>, Scalar>,
        "posenc::KvCache::append: k and v must have the cache's scalar type");
    const Index rows = kv.rows();
    detail::require(kv.heads() == kv_heads_ && kv.dim() == dim_, fn, "k has shape [", kv.heads(),
                    ", ", kv.rows(), ", ", kv.dim(), "] but the cache holds [", kv_heads_,
                    ", rows, ", dim_, "]");
    detail::require(vv.heads() == kv_heads_ && vv.rows() == rows && vv.dim() == value_dim_, fn,
                    "v has shape [", vv.heads(), ", ", vv.rows(), ", ", vv.dim(), "] but must be [",
                    kv_heads_, ", ", rows, ", ", value_dim_, "]");
    detail::require(positions.empty() || static_cast<Index>(positions.size()) == rows, fn,
                    "positions has ", positions.size(), " entries but k has ", rows, " rows");
    const bool first_rows = size_ == 0 && segments_.empty();
    detail::require(segments.empty() ? (first_rows || segments_.empty())
                                     : (static_cast<Index>(segments.size()) == rows &&
                                        (first_rows || !segments_.empty())),
                    fn, "segments has ", segments.size(), " entries for ", rows,
                    " rows; give one per row, on every append or on none");
    if (rows == 0) return;

    std::vector<Index> new_positions(static_cast<std::size_t>(rows));
    for (Index r = 0; r < rows; ++r) {
      new_positions[static_cast<std::size_t>(r)] =
          positions.empty() ? next_position_ + r : positions[static_cast<std::size_t>(r)];
    }
    const Index first_new = *std::min_element(new_positions.begin(), new_positions.end());
    if (mask_.kind() == Mask::Kind::sliding_window) {
      if (size_ > 0) {
        const Index last = positions_[static_cast<std::size_t>(start_ + size_ - 1)];
        detail::require(first_new > last, fn,
                        "with a sliding-window cache positions must increase, but ", first_new,
                        " follows ", last);
      }
      evict_before(first_new - mask_.window() + 1);
    }
    make_room(rows);
    const Index at = start_ + size_;
    for (Index h = 0; h < kv_heads_; ++h) {
      Eigen::Map<Matrix<Scalar>> key_rows(key_row(h, at), rows, key_width_);
      if constexpr (CentreFreeKeyTransform<Encoder>) {
        if (stores_transformed_keys_) {
          encoder_.transform_keys(h, new_positions, first_new, kv.head(h), key_rows);
        } else {
          key_rows = kv.head(h);
        }
      } else {
        key_rows = kv.head(h);
      }
      Eigen::Map<Matrix<Scalar>>(value_row(h, at), rows, value_dim_) = vv.head(h);
    }
    std::copy(new_positions.begin(), new_positions.end(), positions_.begin() + at);
    if (!segments.empty()) {
      segments_.resize(static_cast<std::size_t>(capacity_));
      std::copy(segments.begin(), segments.end(), segments_.begin() + at);
    }
    size_ += rows;
    next_position_ = *std::max_element(new_positions.begin(), new_positions.end()) + 1;
  }

  /// Attention of q ([H, N, dim]) over the rows held; returns [H, N, value_dim].
  template <HeadsLike Q>
  Heads<Scalar> attend(const Q& q, const KvAttendOptions& options = {}) const {
    constexpr const char* fn = "posenc::KvCache::attend";
    static_assert(std::is_same_v<heads_scalar_t<Q>, Scalar>,
                  "posenc::KvCache::attend: q must have the cache's scalar type");
    const auto qv = detail::as_const_view(q);
    const Index n = qv.rows();
    detail::require(qv.dim() == dim_, fn, "q has dim ", qv.dim(), " but the cache holds dim ",
                    dim_);
    detail::require(qv.heads() >= 1 && qv.heads() % kv_heads_ == 0, fn, "q has ", qv.heads(),
                    " heads, which is not a multiple of the cache's ", kv_heads_, " kv heads");
    detail::require(!options.query_positions.empty() || n <= size_, fn, "q has ", n,
                    " rows but the cache holds only ", size_,
                    " (give query_positions for queries that are not the last rows appended)");
    detail::require(
        options.query_positions.empty() || static_cast<Index>(options.query_positions.size()) == n,
        fn, "query_positions has ", options.query_positions.size(), " entries but q has ", n,
        " rows");
    detail::require(
        options.query_segments.empty() || static_cast<Index>(options.query_segments.size()) == n,
        fn, "query_segments has ", options.query_segments.size(), " entries but q has ", n,
        " rows");
    detail::require(options.query_segments.empty() || !segments_.empty(), fn,
                    "query_segments given but the cache holds no segments");
    const Positions query_positions = options.query_positions.empty()
                                          ? positions().subspan(static_cast<std::size_t>(size_ - n))
                                          : options.query_positions;
    std::span<const Index> query_segments = options.query_segments;
    if (query_segments.empty() && !segments_.empty()) {
      detail::require(n <= size_, fn, "q has ", n,
                      " rows; give query_segments for queries that are not the last rows appended");
      query_segments = segments().subspan(static_cast<std::size_t>(size_ - n));
    }
    AttentionOptions attention_options{.mask = mask_,
                                       .query_positions = query_positions,
                                       .key_positions = positions(),
                                       .query_segments = query_segments,
                                       .key_segments = segments(),
                                       .scale = options.scale,
                                       .threads = options.threads,
                                       .query_block = options.query_block,
                                       .key_block = options.key_block};
    if (query_segments.empty()) attention_options.key_segments = {};
    if constexpr (CentreFreeKeyTransform<Encoder>) {
      if (stores_transformed_keys_) {
        if constexpr (HasValidate<Encoder>) {
          encoder_.validate(AttentionShape{qv.heads(), kv_heads_, n, size_, dim_, value_dim_});
        }
        Heads<Scalar> transformed(qv.heads(), n, key_width_);
        for (Index h = 0; h < qv.heads(); ++h) {
          encoder_.transform_queries(h, query_positions,
                                     query_positions.empty() ? 0 : query_positions[0], qv.head(h),
                                     transformed.head(h));
        }
        if (!attention_options.scale) {
          attention_options.scale = 1.0 / std::sqrt(static_cast<double>(key_width_));
        }
        return attention(transformed, keys(), values(), NoPositionalEncoding{}, attention_options);
      }
    }
    return attention(qv, keys(), values(), encoder_, attention_options);
  }

 private:
  Scalar* key_row(Index h, Index row) { return keys_.data() + (h * capacity_ + row) * key_width_; }
  Scalar* value_row(Index h, Index row) {
    return values_.data() + (h * capacity_ + row) * value_dim_;
  }

  /// Ensures `rows` more rows fit after the live ones: compacts when at most half the capacity
  /// would be used, else grows geometrically.
  void make_room(Index rows) {
    if (start_ + size_ + rows <= capacity_) return;
    const Index needed = size_ + rows;
    relocate(needed <= capacity_ / 2 ? capacity_ : std::max(2 * capacity_, 2 * needed));
  }

  /// Moves the live rows to the front of a buffer of `capacity` rows.
  void relocate(Index capacity) {
    Vector<Scalar> keys(kv_heads_ * capacity * key_width_);
    Vector<Scalar> values(kv_heads_ * capacity * value_dim_);
    for (Index h = 0; h < kv_heads_; ++h) {
      keys.segment(h * capacity * key_width_, size_ * key_width_) =
          keys_.segment((h * capacity_ + start_) * key_width_, size_ * key_width_);
      values.segment(h * capacity * value_dim_, size_ * value_dim_) =
          values_.segment((h * capacity_ + start_) * value_dim_, size_ * value_dim_);
    }
    std::vector<Index> positions(static_cast<std::size_t>(capacity));
    std::copy_n(positions_.begin() + start_, size_, positions.begin());
    if (!segments_.empty()) {
      std::vector<Index> segments(static_cast<std::size_t>(capacity));
      std::copy_n(segments_.begin() + start_, size_, segments.begin());
      segments_.swap(segments);
    }
    keys_.swap(keys);
    values_.swap(values);
    positions_.swap(positions);
    capacity_ = capacity;
    start_ = 0;
  }

  Encoder encoder_;
  Index kv_heads_;
  Index dim_;
  Index value_dim_;
  Mask mask_;
  bool stores_transformed_keys_ = false;
  Index key_width_ = 0;
  Index capacity_ = 0;
  Index start_ = 0;  // first live row
  Index size_ = 0;
  Index next_position_ = 0;
  Vector<Scalar> keys_;    // [H_kv, capacity, key_width]
  Vector<Scalar> values_;  // [H_kv, capacity, value_dim]
  std::vector<Index> positions_;
  std::vector<Index> segments_;  // empty, or capacity entries
};

template <class Encoder>
KvCache(Encoder, Index, Index, KvCacheOptions = {}) -> KvCache<typename Encoder::Scalar, Encoder>;

}  // namespace posenc
