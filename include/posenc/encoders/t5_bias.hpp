// SPDX-License-Identifier: MIT
// T5's relative position bias: a learned per-head scalar for each of a few log-spaced buckets of
// the relative position, with the bucket function bit-exact with Hugging Face's
// T5Attention._relative_position_bucket (including its float32 logarithm).
#pragma once

#include <cmath>
#include <random>
#include <utility>
#include <vector>

#include "posenc/detail/check.hpp"
#include "posenc/detail/random.hpp"
#include "posenc/encoders/distance_bias.hpp"
#include "posenc/encoding.hpp"
#include "posenc/tensor.hpp"

namespace posenc {

/// How T5 buckets relative positions. Defaults are T5's (and HF's `_relative_position_bucket`).
struct T5BucketOptions {
  /// Total number of buckets (rows of the learned table).
  Index num_buckets = 32;
  /// Distances from here on share the last bucket (of each direction).
  Index max_distance = 128;
  /// true: encoder self-attention, past and future keys get separate halves of the buckets;
  /// false: decoder (causal) self-attention, every future key falls into bucket 0.
  bool bidirectional = true;
};

/// The T5 bucket of `relative_position` = j − i (key minus query; positive = key in the future),
/// bit-exact with HF T5Attention._relative_position_bucket:
///   bidirectional: nb = num_buckets/2, base = nb if rel > 0 else 0, n = |rel|;
///   causal:        nb = num_buckets,   base = 0,                    n = max(−rel, 0);
///   max_exact = nb/2; bucket = base + n if n < max_exact, else
///   base + min(nb − 1, max_exact + trunc(log(n/max_exact) / log(max_distance/max_exact)
///                                         · (nb − max_exact)))
/// with n/max_exact, the log, the quotient and the product in float32 as HF does (the divisor is
/// the double log rounded to float32), and the branch taken before the log (HF evaluates
/// log(0) = −inf and discards it; we never do). Unchecked: the options must be valid (see
/// T5RelativeBias), and |relative_position| must not be the most negative Index.
inline Index t5_bucket(Index relative_position, const T5BucketOptions& options) {
  Index buckets = options.num_buckets;
  Index base = 0;
  Index n = 0;
  if (options.bidirectional) {
    buckets /= 2;
    if (relative_position > 0) base = buckets;
    n = relative_position < 0 ? -relative_position : relative_position;
  } else {
    n = relative_position < 0 ? -relative_position : 0;
  }
  const Index max_exact = buckets / 2;
  if (n < max_exact) return base + n;
  // float32 steps of HF; the logarithm is the correctly rounded float32 log (as torch's).
  const float ratio = static_cast<float>(n) / static_cast<float>(max_exact);
  const float log_ratio = static_cast<float>(std::log(static_cast<double>(ratio)));
  const float log_range = static_cast<float>(
      std::log(static_cast<double>(options.max_distance) / static_cast<double>(max_exact)));
  const float scaled = log_ratio / log_range * static_cast<float>(buckets - max_exact);
  const Index large = max_exact + static_cast<Index>(scaled);  // truncation; scaled >= 0
  return base + (large < buckets - 1 ? large : buckets - 1);
}

/// T5 relative position bias (Raffel et al. 2020, "Exploring the Limits of Transfer Learning…",
/// arXiv 1910.10683, §2.1; HF `T5Attention.compute_bias`): a ScoreBias
///
///   B_h(i, j) = table[bucket(j − i)][h]
///
/// - table: [num_buckets, heads], learned (HF `relative_attention_bias.weight`, nn.Embedding
///   layout); one table per stack, shared by its layers.
/// - i, j: absolute query and key positions; only j − i matters (so decoding at query position t
///   reads row t of the full bias, like HF with `cache_position`).
/// - T5 attention has NO 1/sqrt(d) scaling (scores = q·k + B; the scale is folded into the init):
///   natural_scale() is 1, which the kernel uses when the caller sets no scale.
/// - Direction: a bidirectional table (encoder self-attention) has natural_mask() none, a causal
///   one (decoder) causal; the kernel uses it when the caller sets no mask. A bidirectional bias
///   under a causal mask is then an explicit choice (`.mask = Mask::causal()`).
/// - The buckets of relative positions up to the distance where both directions saturate
///   (91 for the defaults) are tabulated on construction; a tile then costs one lookup per
///   distinct distance and one add per element. Matches golden
///   t5_buckets.json (601 relative positions × 15 configurations, bucket matrices, bias lookup).
/// - Training: Gradient::table, [num_buckets, heads] in T (accumulate_bias_gradient).
/// - Example: examples/relative_biases.cpp.
template <class T>
class T5RelativeBias {
 public:
  using Scalar = T;
  /// B_h(i, j) is a function of i − j (DistanceBias).
  static constexpr bool depends_only_on_distance = true;

  /// Throws when the options are degenerate (bidirectional with fewer than 4 buckets or causal
  /// with fewer than 2, i.e. no exact bucket; max_distance not above the exact range) or the
  /// table is not [num_buckets, heads >= 1] and finite.
  T5RelativeBias(Matrix<T> table, T5BucketOptions options = {})
      : table_(std::move(table)), options_(options) {
    constexpr const char* fn = "posenc::T5RelativeBias";
    check_options(fn, options_);
    detail::require(table_.rows() == options_.num_buckets && table_.cols() >= 1, fn,
                    "table must be [num_buckets, heads] = [", options_.num_buckets,
                    ", heads >= 1], got [", table_.rows(), ", ", table_.cols(), "]");
    detail::require(table_.allFinite(), fn, "table must be finite");
    build_lookup();
  }

  /// HF's initialisation: every entry ~ N(0, stddev²) (HF uses stddev = initializer_factor ·
  /// d_model^(−1/2)), drawn row by row with detail::standard_normal.
  static T5RelativeBias random(Index heads, double stddev, std::mt19937_64& rng,
                               T5BucketOptions options = {}) {
    constexpr const char* fn = "posenc::T5RelativeBias::random";
    check_options(fn, options);
    detail::require(heads >= 1, fn, "heads must be >= 1, got ", heads);
    detail::require(std::isfinite(stddev) && stddev >= 0.0, fn,
                    "stddev must be finite and non-negative, got ", stddev);
    Matrix<T> table(options.num_buckets, heads);
    for (Index b = 0; b < table.rows(); ++b) {
      for (Index h = 0; h < heads; ++h) {
        table(b, h) = static_cast<T>(stddev * detail::standard_normal(rng));
      }
    }
    return T5RelativeBias(std::move(table), options);
  }

  Index heads() const { return table_.cols(); }
  const Matrix<T>& table() const { return table_; }
  const T5BucketOptions& options() const { return options_; }

  /// T5 does not scale its logits (encoding.hpp's HasNaturalScale hook).
  double natural_scale() const { return 1.0; }
  /// Encoder self-attention for a bidirectional table, decoder (causal) otherwise (HasNaturalMask).
  Mask natural_mask() const { return options_.bidirectional ? Mask::none() : Mask::causal(); }

  /// The bucket of relative_position = j − i (key minus query).
  Index bucket(Index relative_position) const { return t5_bucket(relative_position, options_); }

  /// B_h(i, j) for query position i and key position j. Unchecked head.
  T bias(Index head, Index i, Index j) const { return table_(bucket(j - i), head); }

  /// Adds B_h(query_positions[r], key_positions[c]) to tile(r, c).
  void add_bias(Index head, Positions query_positions, Positions key_positions,
                TileRef<T> tile) const {
    detail::add_distance_bias<T>(
        query_positions, key_positions, tile, [&](Index top, Index count, double* out) {
          for (Index m = 0; m < count; ++m) {
            out[m] = static_cast<double>(table_(tabulated_bucket(m - top), head));
          }
        });
  }

  /// ∂L/∂table, [num_buckets, heads] like table() (HasLearnableParameters).
  struct Gradient {
    Matrix<T> table;
    Gradient& operator+=(const Gradient& other) {
      table += other.table;
      return *this;
    }
    void set_zero() { table.setZero(); }
  };
  Gradient zero_gradient() const { return {Matrix<T>::Zero(table_.rows(), table_.cols())}; }

  /// Adds Σ_{r,c} dbias(r, c)·∂B_h/∂table to gradient.table (LearnableScoreBias): ∂B_h(i, j) /
  /// ∂table[b][h'] = [b = bucket(j − i)]·[h' = h], so d_table[bucket(j − i)][head] += dbias.
  /// dbias is reduced to one sum per distance (in double); a run of consecutive distances in one
  /// bucket (most of them, beyond the exact range) is summed in double and added once.
  /// Unchecked head and shapes.
  void accumulate_bias_gradient(Index head, Positions query_positions, Positions key_positions,
                                ConstTileRef<T> dbias, Gradient& gradient) const {
    detail::reduce_distance_gradient<T>(
        query_positions, key_positions, dbias, [&](Index top, Index count, const double* sums) {
          Index bucket_of_run = tabulated_bucket(-top);
          double run = 0.0;
          for (Index m = 0; m < count; ++m) {  // relative position j − i = m − top
            const Index b = tabulated_bucket(m - top);
            if (b != bucket_of_run) {
              gradient.table(bucket_of_run, head) += static_cast<T>(run);
              bucket_of_run = b;
              run = 0.0;
            }
            run += sums[m];
          }
          gradient.table(bucket_of_run, head) += static_cast<T>(run);
        });
  }

 private:
  /// Relative positions tabulated at most, per side (beyond a saturated reach, buckets repeat).
  static constexpr Index max_reach = 4096;

  /// bucket(relative_position) from the table of buckets built on construction.
  Index tabulated_bucket(Index relative_position) const {
    if (relative_position < -reach_ || relative_position > reach_) {
      if (!saturated_) return bucket(relative_position);
      relative_position = relative_position < 0 ? -reach_ : reach_;
    }
    return buckets_[static_cast<std::size_t>(relative_position + reach_)];
  }

  /// Tabulates the buckets of −reach..reach, reach the smallest distance at which both
  /// directions have reached their last bucket. The bucket is non-decreasing in the distance
  /// (every float32 step is monotone) and capped by its last value, so it stays there beyond.
  /// Pathological configurations that do not saturate within max_reach compute the buckets
  /// beyond it directly.
  void build_lookup() {
    const Index per_direction =
        options_.bidirectional ? options_.num_buckets / 2 : options_.num_buckets;
    const Index last_past = per_direction - 1;
    const Index last_future = options_.bidirectional ? options_.num_buckets - 1 : 0;
    reach_ = 0;
    while (reach_ < max_reach && (bucket(-reach_) != last_past || bucket(reach_) != last_future)) {
      ++reach_;
    }
    saturated_ = bucket(-reach_) == last_past && bucket(reach_) == last_future;
    buckets_.resize(static_cast<std::size_t>(2 * reach_ + 1));
    for (Index r = -reach_; r <= reach_; ++r) {
      buckets_[static_cast<std::size_t>(r + reach_)] = bucket(r);
    }
  }

  static void check_options(const char* fn, const T5BucketOptions& options) {
    const Index per_direction =
        options.bidirectional ? options.num_buckets / 2 : options.num_buckets;
    const Index max_exact = per_direction / 2;
    detail::require(max_exact >= 1, fn, "num_buckets ", options.num_buckets, " is too small for ",
                    options.bidirectional ? "bidirectional" : "causal", " buckets: need at least ",
                    options.bidirectional ? 4 : 2, " (one exact bucket per direction)");
    detail::require(options.max_distance > max_exact, fn, "max_distance ", options.max_distance,
                    " must exceed the exact range ", max_exact, " of num_buckets ",
                    options.num_buckets);
  }

  Matrix<T> table_;
  T5BucketOptions options_;
  Index reach_ = 0;
  bool saturated_ = false;
  std::vector<Index> buckets_;  // buckets of relative positions −reach_..reach_
};

static_assert(DistanceBias<T5RelativeBias<float>>);
static_assert(ScoreBias<T5RelativeBias<float>>);
static_assert(ScoreBias<T5RelativeBias<double>>);
static_assert(LearnableScoreBias<T5RelativeBias<float>>);
static_assert(LearnableScoreBias<T5RelativeBias<double>>);

}  // namespace posenc
