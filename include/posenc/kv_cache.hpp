// SPDX-License-Identifier: MIT
// A key/value cache for decoding: append each token's keys and values with their absolute
// positions, attend new queries over everything held. Works with every encoder; keys of a rotary
// encoder (RoPE, XPos with a fixed centre) are transformed once, on insert.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <span>
#include <stdexcept>
#include <utility>
#include <vector>

#include "posenc/attention.hpp"
#include "posenc/attention_options.hpp"
#include "posenc/detail/check.hpp"
#include "posenc/detail/scratch.hpp"
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
  /// Unset: the encoder's natural_mask() when it declares one, else causal.
  std::optional<Mask> mask = std::nullopt;
  /// Rows reserved up front (the cache grows geometrically past it). A sliding-window cache with
  /// capacity >= 2·(window + the rows of its largest append) never grows: it moves its rows to the
  /// front of its buffers in place, so a decoding step then allocates nothing.
  Index capacity = 0;
  /// Threads of every attend call (KvAttendOptions::threads overrides it); 0 = automatic: the
  /// calling thread alone for small problems (a decoding step), OpenMP's default otherwise.
  int threads = 0;
};

/// Options of one KvCache::attend call.
struct KvAttendOptions {
  /// Absolute positions of the N queries; empty = the positions of the last N rows appended (the
  /// usual case: the queries belong to the tokens just appended).
  Positions query_positions = {};
  /// Document ids of the queries when the cache holds segments; empty = those of the last N rows.
  std::span<const Index> query_segments = {};
  /// Logit scale; default the encoder's natural scale, else 1/sqrt(key width after any
  /// QueryKeyTransform).
  std::optional<double> scale = std::nullopt;
  /// Threads of this call; unset = the cache's KvCacheOptions::threads.
  std::optional<int> threads = std::nullopt;
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
///   positions default to those of the last N rows appended; the mask is the cache's (by
///   default the encoder's natural mask, else causal). Equals one attention() call over the same
///   rows (streaming kernel, same tolerance).
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
        mask_(detail::resolve_mask(encoder_, options.mask)),
        threads_(options.threads) {
    constexpr const char* fn = "posenc::KvCache";
    detail::require(kv_heads >= 1 && dim >= 1 && value_dim_ >= 1, fn,
                    "kv_heads, dim and value_dim must be >= 1, got ", kv_heads, ", ", dim, " and ",
                    value_dim_);
    detail::require(options.capacity >= 0, fn, "capacity must be >= 0, got ", options.capacity);
    detail::require(options.threads >= 0, fn, "threads must be >= 0 (0 = automatic), got ",
                    options.threads);
    // The encoder checks the widths now, not at the first append (the query head count is not
    // known yet: the shape has kv_heads query heads and no rows).
    if constexpr (HasValidate<Encoder>) {
      try {
        encoder_.validate(AttentionShape{kv_heads, kv_heads, 0, 0, dim, value_dim_});
      } catch (const std::invalid_argument& error) {
        detail::throw_invalid_argument(fn, "the encoder rejects kv_heads ", kv_heads, ", dim ", dim,
                                       " and value_dim ", value_dim_, " (", error.what(), ")");
      }
    }
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
    detail::require(rows >= 0 && rows <= max_rows(), "posenc::KvCache::reserve",
                    "rows must be in [0, ", max_rows(),
                    "] (kv_heads × rows × width elements must be ", "addressable), got ", rows);
    if (rows > capacity_ - start_) relocate(std::max(rows, capacity_));
  }

  /// The most rows a cache of this shape can address.
  Index max_rows() const {
    const Index row_elements = kv_heads_ * std::max(key_width_, value_dim_);
    return std::numeric_limits<Index>::max() / 4 / static_cast<Index>(sizeof(Scalar)) /
           row_elements;
  }

  /// Drops every row; the next automatic position is 0 again.
  void clear() {
    start_ = size_ = 0;
    next_position_ = 0;
    held_max_ = std::numeric_limits<Index>::min();
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

    if (positions.empty()) {
      detail::require_position_run(fn, "next_position()", next_position_, rows);
    } else {
      detail::require_positions(fn, "positions", positions);
    }
    std::vector<Index>& new_positions = new_positions_;  // grown once: no steady-state allocation
    new_positions.resize(static_cast<std::size_t>(rows));
    for (Index r = 0; r < rows; ++r) {
      new_positions[static_cast<std::size_t>(r)] =
          positions.empty() ? next_position_ + r : positions[static_cast<std::size_t>(r)];
    }
    require_distinct(fn, new_positions, segments);
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
    const Index last_new = *std::max_element(new_positions.begin(), new_positions.end());
    next_position_ = last_new + 1;
    held_max_ = std::max(held_max_, last_new);
  }

  /// Attention of q ([H, N, dim]) over the rows held; returns [H, N, value_dim].
  template <HeadsLike Q>
  Heads<Scalar> attend(const Q& q, const KvAttendOptions& options = {}) const {
    const auto qv = detail::as_const_view(q);
    Heads<Scalar> out(qv.heads(), qv.rows(), value_dim_);
    attend(q, out.view(), options);
    return out;
  }

  /// Attention of q ([H, N, dim]) over the rows held, into `out` ([H, N, value_dim], any strides:
  /// HeadsView::tokens_major for [N, H, Dv] buffers). Once a shape has been seen, a call
  /// allocates nothing. `out` must not share memory with q or the cache.
  template <HeadsLike Q>
  void attend(const Q& q, HeadsView<Scalar> out, const KvAttendOptions& options = {}) const {
    constexpr const char* fn = "posenc::KvCache::attend";
    static_assert(std::is_same_v<heads_scalar_t<Q>, Scalar>,
                  "posenc::KvCache::attend: q must have the cache's scalar type");
    const auto qv = detail::as_const_view(q);
    const Index n = qv.rows();
    detail::require(qv.dim() == dim_, fn, "q has dim ", qv.dim(), " but the cache holds dim ",
                    dim_);
    detail::require(qv.heads() >= 1 && qv.heads() % kv_heads_ == 0, fn, "q has ", qv.heads(),
                    " heads, which is not a multiple of the cache's ", kv_heads_, " kv heads");
    detail::require(out.heads() == qv.heads() && out.rows() == n && out.dim() == value_dim_, fn,
                    "out has shape [", out.heads(), ", ", out.rows(), ", ", out.dim(),
                    "] but must be [", qv.heads(), ", ", n, ", ", value_dim_, "]");
    detail::require(!options.threads || *options.threads >= 0, fn,
                    "threads must be >= 0 (0 = automatic), got ", options.threads.value_or(0));
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
                                       .threads = options.threads.value_or(threads_),
                                       .query_block = options.query_block,
                                       .key_block = options.key_block};
    if (query_segments.empty()) attention_options.key_segments = {};
    if constexpr (CentreFreeKeyTransform<Encoder>) {
      if (stores_transformed_keys_) {
        if constexpr (HasValidate<Encoder>) {
          encoder_.validate(AttentionShape{qv.heads(), kv_heads_, n, size_, dim_, value_dim_});
        }
        detail::ScratchLease<TransformedQueries> lease;
        Vector<Scalar>& buffer = lease.get().values;
        detail::grow(buffer, qv.heads() * n * key_width_);
        const auto transformed =
            HeadsView<Scalar>::heads_major(buffer.data(), qv.heads(), n, key_width_);
        for (Index h = 0; h < qv.heads(); ++h) {
          encoder_.transform_queries(h, query_positions,
                                     query_positions.empty() ? 0 : query_positions[0], qv.head(h),
                                     transformed.head(h));
        }
        attention_options.scale = detail::resolve_scale(encoder_, options.scale, key_width_);
        attention(transformed, keys(), values(), NoPositionalEncoding{}, out, attention_options);
        return;
      }
    }
    attention(qv, keys(), values(), encoder_, out, attention_options);
  }

 private:
  /// The queries of one attend call after the encoder's transform (leased per thread).
  struct TransformedQueries {
    Vector<Scalar> values;
  };

  /// Every row holds a distinct (document, position): rejects a new position already held (in
  /// the same document) or repeated within one append. O(1) when positions increase (the usual
  /// decoding), else a sort.
  void require_distinct(const char* fn, const std::vector<Index>& new_positions,
                        std::span<const Index> new_segments) const {
    const Index rows = static_cast<Index>(new_positions.size());
    bool increasing = size_ == 0 || new_positions[0] > held_max_;
    for (Index r = 1; r < rows && increasing; ++r) {
      increasing = new_positions[static_cast<std::size_t>(r)] >
                   new_positions[static_cast<std::size_t>(r - 1)];
    }
    if (increasing) return;
    const auto held_segments = segments();
    std::vector<std::pair<Index, Index>> keys;  // (document, position), held then new
    keys.reserve(static_cast<std::size_t>(size_ + rows));
    for (Index r = 0; r < size_; ++r) {
      keys.emplace_back(held_segments.empty() ? 0 : held_segments[static_cast<std::size_t>(r)],
                        positions()[static_cast<std::size_t>(r)]);
    }
    for (Index r = 0; r < rows; ++r) {
      keys.emplace_back(new_segments.empty() ? 0 : new_segments[static_cast<std::size_t>(r)],
                        new_positions[static_cast<std::size_t>(r)]);
    }
    std::sort(keys.begin(), keys.end());
    const auto repeated = std::adjacent_find(keys.begin(), keys.end());
    if (repeated == keys.end()) return;
    const Index position = repeated->second;
    const bool held =
        std::find(positions().begin(), positions().end(), position) != positions().end();
    detail::throw_invalid_argument(
        fn, "position ", position, held ? " is already held" : " appears twice in this append",
        held_segments.empty() && new_segments.empty() ? "" : " (in the same document)",
        "; every row of a cache needs its own position");
  }

  Scalar* key_row(Index h, Index row) { return keys_.data() + (h * capacity_ + row) * key_width_; }
  Scalar* value_row(Index h, Index row) {
    return values_.data() + (h * capacity_ + row) * value_dim_;
  }

  /// Ensures `rows` more rows fit after the live ones: compacts when at most half the capacity
  /// would be used, else grows geometrically.
  void make_room(Index rows) {
    if (start_ + size_ + rows <= capacity_) return;
    const Index needed = size_ + rows;
    detail::require(needed <= max_rows(), "posenc::KvCache::append", "the cache would hold ",
                    needed, " rows, more than the ", max_rows(), " it can address");
    relocate(needed <= capacity_ / 2 ? capacity_
                                     : std::min(max_rows(), std::max(2 * capacity_, 2 * needed)));
  }

  /// Moves the live rows to the front of a buffer of `capacity` rows: in place when the capacity
  /// stays (the compaction a sliding-window cache does every so often while decoding, which must
  /// not allocate), else into new buffers.
  void relocate(Index capacity) {
    if (capacity == capacity_) {
      if (start_ == 0) return;
      // Each copy moves rows towards the front of their head's block, so the destination starts
      // before the source: std::copy is correct for such overlapping ranges.
      for (Index h = 0; h < kv_heads_; ++h) {
        Scalar* head_keys = keys_.data() + h * capacity_ * key_width_;
        std::copy(head_keys + start_ * key_width_, head_keys + (start_ + size_) * key_width_,
                  head_keys);
        Scalar* head_values = values_.data() + h * capacity_ * value_dim_;
        std::copy(head_values + start_ * value_dim_, head_values + (start_ + size_) * value_dim_,
                  head_values);
      }
      std::copy_n(positions_.begin() + start_, size_, positions_.begin());
      if (!segments_.empty()) std::copy_n(segments_.begin() + start_, size_, segments_.begin());
      start_ = 0;
      return;
    }
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
  Index held_max_ = std::numeric_limits<Index>::min();  // upper bound of the positions held
  int threads_ = 0;
  std::vector<Index> new_positions_;  // append's scratch
  Vector<Scalar> keys_;               // [H_kv, capacity, key_width]
  Vector<Scalar> values_;             // [H_kv, capacity, value_dim]
  std::vector<Index> positions_;
  std::vector<Index> segments_;  // empty, or capacity entries
};

template <class Encoder>
KvCache(Encoder, Index, Index, KvCacheOptions = {}) -> KvCache<typename Encoder::Scalar, Encoder>;

}  // namespace posenc
