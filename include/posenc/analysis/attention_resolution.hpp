// SPDX-License-Identifier: MIT
// Attention resolution R(s) of the XPos paper: how sharply an expected-score curve s[n] over
// distance n ranks near tokens above far ones. The metric itself, the design-time curve of a
// rotary encoder (RoPE, XPos), and the empirical curve measured from logits.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <optional>
#include <span>
#include <vector>

#include "posenc/attention.hpp"
#include "posenc/attention_map.hpp"
#include "posenc/attention_options.hpp"
#include "posenc/detail/check.hpp"
#include "posenc/encoders/rope.hpp"
#include "posenc/encoders/xpos.hpp"
#include "posenc/tensor.hpp"

namespace posenc {

/// Attention resolution (Sun et al. 2023, "A Length-Extrapolatable Transformer", arXiv
/// 2212.10554, Eq. 3):
///
///   R(s) = Σ_{i=0}^{N} e^{s[i]} (e^{s[i]} − e^{s[i+1]}) / (Σ_{i=0}^{N} e^{s[i]})²
///
/// `score_curve` (any Eigen vector, N + 2 ≥ 2 entries s[0..N+1], s[n] the expected score at
/// distance n): both sums run over i = 0..N; the last entry appears only in the difference (the
/// convention of tests/data/attention_resolution.json). R is shift-invariant, so it is evaluated
/// with e_i = e^{s_i − m}, m = max(s[0..N]) (every e_i <= 1, the sum >= 1), and each term
/// e_i·(e_i − e_{i+1}) as e^{2(s_i − m)}·(−expm1(Δ)) for a fall Δ = s[i+1] − s[i] <= 0 and as
/// −e^{(s_i − m) + (s[i+1] − m)}·(−expm1(−Δ)) for a rise, so no step forms inf·0: any finite
/// curve, scores near ±1e308 included, gives R correct to rounding (s = [1000, 999, 998] and
/// [−1e308, 3, 2, 1] are fine; the latter equals R([3, 2, 1])). The one non-finite result is −inf,
/// when the true R is below −DBL_MAX (a final rise: R([0, 1000]) = 1 − e^1000). R is not
/// scale-invariant, so how s is normalised is part of the result (see ScoreNormalization).
/// R < 1 always; it is negative when s mostly increases. Computed in long double.
/// Throws std::invalid_argument for fewer than 2 entries or a non-finite entry.
template <class Derived>
double attention_resolution(const Eigen::MatrixBase<Derived>& score_curve) {
  constexpr const char* fn = "posenc::attention_resolution";
  const Index size = score_curve.size();
  detail::require(size >= 2, fn, "score_curve needs at least 2 entries (s[0..N+1]), got ", size);
  const auto at = [&](Index n) { return static_cast<long double>(score_curve(n)); };
  long double max = -std::numeric_limits<long double>::infinity();  // over s[0..N]
  for (Index n = 0; n < size; ++n) {
    detail::require(std::isfinite(at(n)), fn, "score_curve[", n, "] is not finite (",
                    score_curve(n), ")");
    if (n + 1 < size) max = std::max(max, at(n));
  }
  long double numerator = 0.0L;
  long double denominator = 0.0L;
  for (Index n = 0; n + 1 < size; ++n) {
    const long double a = at(n) - max;            // <= 0
    const long double delta = at(n + 1) - at(n);  // from the inputs, not the shifted values
    const long double e = std::exp(a);
    if (delta <= 0.0L) {
      // e_n − e_{n+1} = −e_n·expm1(Δ): exact for nearly equal neighbours; every factor in [0, 1].
      numerator += e * e * -std::expm1(delta);
    } else {
      // e_n·(e_n − e_{n+1}) = −e_n·e_{n+1}·(1 − e^{−Δ}); e_n·e_{n+1} formed as one exponential so
      // that an underflowed e_n never meets an overflowed e^Δ.
      numerator -= std::exp(a + (at(n + 1) - max)) * -std::expm1(-delta);
    }
    denominator += e;
  }
  return static_cast<double>(numerator / (denominator * denominator));
}

/// The free factor of a design-time score curve (R is not scale-invariant). With
/// g[n] = Σ_i cos(n θ_i) ζ_i^(n/scale_base) over the d/2 frequency pairs:
///   raw  — 2·g: the reference XPos/RoPE logit q·k for all-ones q and k (|1 + 1i|² = 2 per pair);
///   sum  — g, the paper's Eq. 8;
///   mean — g / (d/2), the mean over pairs (values in [−1, 1]).
/// tests/data/attention_resolution.json gives R for all three ("R_of_s_raw", "R_of_g",
/// "R_of_mean").
enum class ScoreNormalization { raw, sum, mean };

/// XPos's per-pair decay ζ_i = (2i + γ·d) / ((1 + γ)·d), applied as ζ_i^(n/scale_base)
/// (torchscale's constants: γ = 0.4, scale_base = 512; scale_base = 1 is the paper's literal ζ^n).
struct XPosDecay {
  double gamma = 0.4;
  double scale_base = 512.0;
};

/// Options of rotary_score_curve(head_dim, ...): RoPE by default, XPos with `.decay = XPosDecay{}`.
struct RotaryScoreCurve {
  double base = 10000.0;                // θ_i = base^(−2i/d)
  std::optional<XPosDecay> decay = {};  // none: RoPE (ζ_i = 1)
  ScoreNormalization normalization = ScoreNormalization::sum;
};

/// Design-time expected score of a rotary encoder over distance (XPos paper Sec. 3.2, Eq. 7–8,
/// with the code's exponent n/scale_base):
///
///   g[n] = Σ_i cos(n θ_i) · ζ_i^(n/scale_base),   n = 0 … max_distance,
///
/// scaled by `normalization` (the pair count is frequencies.size()). `frequencies`: θ_i, one per
/// rotated pair (e.g. RotaryEncoding::frequencies(), any scaling included); `decay_bases`: ζ_i,
/// the same length, or empty for no decay (RoPE). Pairs left unrotated by a partial rotary
/// encoder add a constant and are not part of this curve. Returns max_distance + 1 values; for
/// R with N distances pass max_distance = N + 1. Formed in double.
/// Throws for an empty or non-finite frequency list, a decay list of another length or with
/// entries ≤ 0, scale_base ≤ 0, or max_distance < 0.
inline Vector<double> rotary_score_curve(
    std::span<const double> frequencies, std::span<const double> decay_bases, double scale_base,
    Index max_distance, ScoreNormalization normalization = ScoreNormalization::sum) {
  constexpr const char* fn = "posenc::rotary_score_curve";
  const auto pairs = static_cast<Index>(frequencies.size());
  detail::require(pairs >= 1, fn, "needs at least one frequency, got none");
  detail::require(decay_bases.empty() || decay_bases.size() == frequencies.size(), fn,
                  "decay_bases has ", decay_bases.size(), " entries but frequencies has ", pairs,
                  " (give one per pair, or none for RoPE)");
  detail::require(std::isfinite(scale_base) && scale_base > 0.0, fn,
                  "scale_base must be finite and positive, got ", scale_base);
  detail::require(max_distance >= 0, fn, "max_distance must be >= 0, got ", max_distance);
  for (std::size_t i = 0; i < frequencies.size(); ++i) {
    detail::require(std::isfinite(frequencies[i]), fn, "frequencies[", i, "] is not finite");
    detail::require(decay_bases.empty() || (std::isfinite(decay_bases[i]) && decay_bases[i] > 0.0),
                    fn, "decay_bases[", i, "] must be finite and positive, got ",
                    decay_bases.empty() ? 1.0 : decay_bases[i]);
  }
  const double factor = normalization == ScoreNormalization::raw ? 2.0
                        : normalization == ScoreNormalization::mean
                            ? 1.0 / static_cast<double>(pairs)
                            : 1.0;
  Vector<double> curve(max_distance + 1);
  for (Index n = 0; n <= max_distance; ++n) {
    const auto distance = static_cast<double>(n);
    double g = 0.0;
    for (std::size_t i = 0; i < frequencies.size(); ++i) {
      const double decay =
          decay_bases.empty() ? 1.0 : std::pow(decay_bases[i], distance / scale_base);
      g += std::cos(distance * frequencies[i]) * decay;
    }
    curve[n] = factor * g;
  }
  return curve;
}

/// The same curve for the standard frequencies θ_i = base^(−2i/d), i < d/2, and, with
/// options.decay, XPos's ζ_i = (2i + γ·d)/((1 + γ)·d) (tests/data/attention_resolution.json:
/// "rope", "xpos_code_default" = {0.4, 512}, "xpos_scale_base_16", "xpos_scale_base_1").
/// Example: `rotary_score_curve(64, 63, {.decay = XPosDecay{}})`.
/// Throws for an odd or non-positive head_dim, base ≤ 1, γ ≤ 0 (ζ must be positive) or a bad
/// scale_base / max_distance (as above).
inline Vector<double> rotary_score_curve(Index head_dim, Index max_distance,
                                         const RotaryScoreCurve& options = {}) {
  constexpr const char* fn = "posenc::rotary_score_curve";
  detail::require(head_dim >= 2 && head_dim % 2 == 0, fn, "head_dim must be even and >= 2, got ",
                  head_dim);
  detail::require(std::isfinite(options.base) && options.base > 1.0, fn,
                  "base must be finite and > 1, got ", options.base);
  const Index pairs = head_dim / 2;
  const auto d = static_cast<double>(head_dim);
  std::vector<double> theta(static_cast<std::size_t>(pairs));
  std::vector<double> zeta;
  for (Index i = 0; i < pairs; ++i) {
    theta[static_cast<std::size_t>(i)] = std::pow(options.base, -2.0 * static_cast<double>(i) / d);
  }
  double scale_base = 1.0;
  if (options.decay) {
    const double gamma = options.decay->gamma;
    detail::require(std::isfinite(gamma) && gamma > 0.0, fn,
                    "XPosDecay::gamma must be finite and positive, got ", gamma);
    scale_base = options.decay->scale_base;
    zeta.resize(static_cast<std::size_t>(pairs));
    for (Index i = 0; i < pairs; ++i) {
      zeta[static_cast<std::size_t>(i)] =
          (2.0 * static_cast<double>(i) + gamma * d) / ((1.0 + gamma) * d);
    }
  }
  return rotary_score_curve(theta, zeta, scale_base, max_distance, options.normalization);
}

/// The design-time curve of a RoPE encoder as built: its frequencies() (any RopeScaling included;
/// dynamic NTK at the encoder's sequence length) over the rotary_dim/2 rotated pairs, times
/// magnitude()² (YaRN multiplies cos and sin by it, so every logit by its square; 1 otherwise):
///
///   g[n] = magnitude² · Σ_k cos(n θ_k),   n = 0 … max_distance,
///
/// then normalised as above (raw: 2·g, mean: g over the rotated pairs). Channels a partial rotary
/// encoder leaves unrotated add a constant and are left out (R is shift-invariant; only `mean`
/// would see them). E.g. linear(s) stretches the curve: g_linear[s·n] = g[n].
/// Throws for max_distance < 0.
template <class T>
Vector<double> rotary_score_curve(const RotaryEncoding<T>& rope, Index max_distance,
                                  ScoreNormalization normalization = ScoreNormalization::sum) {
  Vector<double> curve =
      rotary_score_curve(rope.frequencies(), {}, 1.0, max_distance, normalization);
  curve *= rope.magnitude() * rope.magnitude();
  return curve;
}

/// The design-time curve of an XPos encoder as built: its θ_k (frequencies()), ζ_k (zeta(k)) and
/// scale_base, g[n] = Σ_k cos(n θ_k)·ζ_k^(n/scale_base) (the centring cancels in q·k and does not
/// enter). Equals rotary_score_curve(head_dim, max_distance, {.base, .decay = XPosDecay{γ,
/// scale_base}}) up to rounding (tests/data/attention_resolution.json xpos variants).
/// Throws for max_distance < 0.
template <class T>
Vector<double> rotary_score_curve(const XPosEncoding<T>& xpos, Index max_distance,
                                  ScoreNormalization normalization = ScoreNormalization::sum) {
  const Index pairs = xpos.head_dim() / 2;
  std::vector<double> zeta(static_cast<std::size_t>(pairs));
  for (Index k = 0; k < pairs; ++k) zeta[static_cast<std::size_t>(k)] = xpos.zeta(k);
  return rotary_score_curve(xpos.frequencies(), zeta, xpos.options().scale_base, max_distance,
                            normalization);
}

namespace detail {

/// Sub-diagonal means of one N × M score matrix whose row r sits at query_position(r) and column
/// c at key_position(c). See empirical_score_curve.
template <class Derived, class QueryPosition, class KeyPosition>
Vector<double> sub_diagonal_means(const char* fn, const Eigen::MatrixBase<Derived>& scores,
                                  QueryPosition query_position, KeyPosition key_position) {
  std::vector<long double> sum;
  std::vector<Index> count;
  for (Index r = 0; r < scores.rows(); ++r) {
    for (Index c = 0; c < scores.cols(); ++c) {
      const auto value = static_cast<long double>(scores(r, c));
      const Index distance = query_position(r) - key_position(c);
      if (distance < 0) continue;                                            // a future key
      if (value == -std::numeric_limits<long double>::infinity()) continue;  // masked
      require(std::isfinite(value), fn, "scores(", r, ", ", c, ") is not finite (", scores(r, c),
              ")");
      const auto n = static_cast<std::size_t>(distance);
      if (n >= sum.size()) {
        sum.resize(n + 1, 0.0L);
        count.resize(n + 1, 0);
      }
      sum[n] += value;
      ++count[n];
    }
  }
  require(!count.empty() && count[0] > 0, fn,
          "no finite score at distance 0 (query position == key position) in a ", scores.rows(),
          " x ", scores.cols(), " score matrix");
  std::size_t length = 0;
  while (length < count.size() && count[length] > 0) ++length;
  Vector<double> curve(static_cast<Index>(length));
  for (std::size_t n = 0; n < length; ++n) {
    curve[static_cast<Index>(n)] = static_cast<double>(sum[n] / static_cast<long double>(count[n]));
  }
  return curve;
}

}  // namespace detail

/// Empirical expected-score curve (XPos paper Sec. 4.3, Eq. 11): the mean of each sub-diagonal
/// of pre-softmax scores,
///
///   s_hat[n] = mean over (r, c) with query_offset + r − c = n of scores(r, c),
///
/// for a square causal T × T matrix with query_offset 0 exactly Eq. 11,
/// s_hat[n] = 1/(T − n) Σ_{i=n}^{T−1} e[i][i−n]. `scores`: N × M (any Eigen matrix; e.g. one head
/// of attention_scores), query row r at position query_offset + r, key column c at position c
/// (the kernel's defaults, so the last rows of a long sequence can be analysed alone with
/// query_offset = T − N). Entries at negative distance (future keys) and masked entries (−inf)
/// are skipped; the curve stops before the first distance with no remaining entry (e.g. beyond
/// a sliding window). Whether the scores include 1/sqrt(d) is the caller's choice (the golden
/// uses the kernel's scaled logits). Returns doubles, accumulated in long double.
/// Throws when no finite score lies at distance 0, or on NaN / +inf.
template <class Derived>
Vector<double> empirical_score_curve(const Eigen::MatrixBase<Derived>& scores,
                                     Index query_offset = 0) {
  detail::require_position_run("posenc::empirical_score_curve", "query_offset", query_offset,
                               scores.rows());
  return detail::sub_diagonal_means(
      "posenc::empirical_score_curve", scores, [query_offset](Index r) { return query_offset + r; },
      [](Index c) { return c; });
}

/// As above with explicit absolute positions (N query positions, M key positions).
template <class Derived>
Vector<double> empirical_score_curve(const Eigen::MatrixBase<Derived>& scores,
                                     Positions query_positions, Positions key_positions) {
  constexpr const char* fn = "posenc::empirical_score_curve";
  detail::require(static_cast<Index>(query_positions.size()) == scores.rows() &&
                      static_cast<Index>(key_positions.size()) == scores.cols(),
                  fn, "scores is ", scores.rows(), " x ", scores.cols(), " but ",
                  query_positions.size(), " query and ", key_positions.size(),
                  " key positions were given");
  detail::require_positions(fn, "query_positions", query_positions);
  detail::require_positions(fn, "key_positions", key_positions);
  return detail::sub_diagonal_means(
      fn, scores, [&](Index r) { return query_positions[static_cast<std::size_t>(r)]; },
      [&](Index c) { return key_positions[static_cast<std::size_t>(c)]; });
}

namespace detail {

/// empirical_attention_resolution of `view` ([H, N, M]) with resolved positions.
template <class Scalar>
Vector<double> empirical_attention_resolution_at(HeadsView<const Scalar> view,
                                                 const ResolvedPositions& positions) {
  Vector<double> result(view.heads());
  for (Index h = 0; h < view.heads(); ++h) {
    const Vector<double> curve =
        empirical_score_curve(view.head(h), positions.queries, positions.keys);
    result[h] =
        curve.size() >= 2 ? attention_resolution(curve) : std::numeric_limits<double>::quiet_NaN();
  }
  return result;
}

}  // namespace detail

/// Per-head empirical resolution R(s_hat_h) of the [H, N, M] pre-softmax scores of
/// attention_scores, at the positions the map carries. A head whose curve has fewer than 2
/// entries gets NaN.
template <class Scalar>
Vector<double> empirical_attention_resolution(const AttentionMap<Scalar>& scores) {
  return detail::empirical_attention_resolution_at<Scalar>(scores.view(),
                                                           detail::analysis_positions(scores));
}

/// As above for scores without positions (a Heads or a view), placed by `options`
/// (query_offset or query_positions, key_positions; the other fields are ignored). Given an
/// AttentionMap, the options must place its rows and columns where the map says (else throws).
template <HeadsLike Scores>
Vector<double> empirical_attention_resolution(const Scores& scores,
                                              const AttentionOptions& options) {
  const auto view = detail::as_const_view(scores);
  return detail::empirical_attention_resolution_at<heads_scalar_t<Scores>>(
      view, detail::analysis_positions("posenc::empirical_attention_resolution", scores,
                                       view.rows(), view.dim(), options));
}

}  // namespace posenc
