// SPDX-License-Identifier: MIT
// Sinusoidal absolute position encoding (Vaswani et al. 2017) in the three channel layouts that
// published code uses: interleaved (paper, HF DistilBERT), concatenated (HF Marian, gpt-neox) and
// concatenated with tensor2tensor's frequency ladder (t2t, fairseq). Long contexts stay exact:
// the angle is reduced modulo 2π in extended precision before sin/cos.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <span>
#include <vector>

#include "posenc/detail/check.hpp"
#include "posenc/encoding.hpp"
#include "posenc/tensor.hpp"

namespace posenc {

/// Which channel holds which sinusoid. With d channels and frequencies w_k:
enum class SinusoidalLayout {
  /// Channel j = sin(p·w_{j/2}) for even j, cos(p·w_{(j-1)/2}) for odd j; w_k = base^(-2k/d).
  /// Vaswani et al. 2017 §3.5; HF DistilBERT/XLM `_create_sinusoidal_embeddings`.
  /// Odd d: the last channel is a sine.
  interleaved,
  /// ceil(d/2) sines sin(p·w_k), then floor(d/2) cosines cos(p·w_k); w_k = base^(-2k/d).
  /// HF Marian `MarianSinusoidalPositionalEmbedding`; gpt-neox `SinusoidalPositionalEmbedding`
  /// for even d (also the sin/cos table HF GPT-J builds for its rotary embedding). Odd d: one
  /// more sine than cosines (gpt-neox instead returns d + 1 channels, the extra one a cosine;
  /// posenc's d channels are its first d).
  concatenated,
  /// floor(d/2) sines, then floor(d/2) cosines; w_k = min_timescale ·
  /// exp(−k · ln(max_timescale/min_timescale) / max(floor(d/2) − 1, 1)), so the last frequency is
  /// exactly min_timescale/max_timescale. tensor2tensor `get_timing_signal_1d`; fairseq
  /// `SinusoidalPositionalEmbedding` (and HF's fairseq ports: M2M100, Speech2Text). Odd d: the
  /// last channel is zero (deliberate: t2t's zero padding, kept for exactness against the
  /// references); d = 1 would be that channel alone and is rejected. d = 2 or 3 uses t2t's guard
  /// (one frequency, min_timescale); fairseq divides by zero there.
  concatenated_t2t,
};

/// Parameters of a SinusoidalEncoding. Every field is validated by the constructor.
struct SinusoidalOptions {
  SinusoidalLayout layout = SinusoidalLayout::interleaved;
  /// Absolute position of token index 0 (the contiguous forms add it; explicit positions do not).
  /// 0 for the paper, t2t and HF; padding_idx + 1 (= 2) for fairseq.
  Index origin = 0;
  /// Frequency base of the interleaved and concatenated layouts (w_k = base^(-2k/d)); > 1.
  double base = 10000.0;
  /// Timescales of the concatenated_t2t layout; 0 < min_timescale <= max_timescale. As in t2t's
  /// code, the first frequency is min_timescale itself (not 1/min_timescale).
  double min_timescale = 1.0;
  double max_timescale = 1.0e4;
};

namespace detail::sinusoid {

/// 2π as an unevaluated sum of two doubles (error 6e-33), and 1/(2π) rounded.
inline constexpr double two_pi_hi = 0x1.921fb54442d18p+2;
inline constexpr double two_pi_lo = 0x1.1a62633145c07p-52;
inline constexpr double inv_two_pi = 0x1.45f306dc9c883p-3;

/// Largest |position| converted to double without rounding.
inline constexpr Index max_exact_position = Index{1} << 53;

/// |p| <= 2^53 (written without std::abs, which overflows for INT64_MIN).
inline bool is_exact_position(Index p) {
  return p >= -max_exact_position && p <= max_exact_position;
}

/// One frequency w = hi + lo (w carried to long double precision where long double is wider than
/// double) and the channels holding sin(p·w) and cos(p·w) (-1: none).
struct Frequency {
  double hi;
  double lo;
  Index sin_channel;
  Index cos_channel;
};

inline Frequency make_frequency(long double w, Index sin_channel, Index cos_channel) {
  const auto hi = static_cast<double>(w);
  return {hi, static_cast<double>(w - hi), sin_channel, cos_channel};
}

/// p·w reduced to about [−π, π], with an absolute error of a few 1e-16 for any |p| < 2^53
/// (beyond the error of w itself): p·hi is split exactly into a + e by an FMA, a is reduced by
/// the two-part 2π, and the small terms e + p·lo are added after the reduction.
inline double reduced_angle(double p, const Frequency& w) {
  const double a = p * w.hi;
  const double a_error = std::fma(p, w.hi, -a);
  const double turns = std::nearbyint(a * inv_two_pi);
  const double r = std::fma(-turns, two_pi_lo, std::fma(-turns, two_pi_hi, a));
  return r + (a_error + p * w.lo);
}

}  // namespace detail::sinusoid

/// Sinusoidal absolute position encoding: x[r, :] += PE(origin + first_position + r), where
/// PE(p) holds sin(p·w_k) and cos(p·w_k) in the channels given by the layout.
///
/// Paper: Vaswani et al. 2017, "Attention Is All You Need", §3.5, arXiv:1706.03762.
///
/// Shapes: x is [rows, dim] (token embeddings, one row per token); `table(first, count)` is
/// [count, dim]; explicit `positions` has x.rows() entries.
///
/// Conventions: layouts and odd-d behaviour are documented on SinusoidalLayout. Token index t
/// sits at absolute position origin + t; explicit positions are absolute (origin not added), so
/// fairseq's position ids (`padding_aware_positions`, learned_absolute.hpp) are used as they are
/// with origin 0. fairseq adds a zero row for pad tokens: leave pad rows out of `x`.
/// The paper (and fairseq, and HF Marian with `scale_embedding`) multiplies the token embeddings
/// by sqrt(d) before adding PE; that scale is not part of PE:
///   `x *= std::sqrt(Scalar(d)); pe.add_to(x, 0);`
///
/// Numerics: frequencies in long double, angles p·w_k reduced modulo 2π in double-double, sin/cos
/// in double, cast to Scalar last. Against quad precision the error stays below 1e-12 up to
/// position 1e7 at any width (5e-13 measured for d = 512), where plain double angles are off by
/// 1e-9. Where long double is double (MSVC), frequencies carry double precision and the error
/// grows as |p·w|·1e-16. Positions must satisfy |p| <= 2^53.
///
/// Golden: tests/data/sinusoidal.json (t2t, fairseq, gpt-neox, HF DistilBERT and Marian).
template <class Scalar_>
class SinusoidalEncoding {
 public:
  using Scalar = Scalar_;

  /// Throws std::invalid_argument for dim <= 0, dim = 1 with concatenated_t2t (no sinusoid at
  /// all), base <= 1 or not finite, or timescales that are not finite with 0 < min_timescale <=
  /// max_timescale.
  explicit SinusoidalEncoding(Index dim, SinusoidalOptions options = {})
      : dim_(dim), options_(options) {
    constexpr const char* fn = "posenc::SinusoidalEncoding";
    detail::require(dim > 0, fn, "dim must be positive, got ", dim);
    detail::require(
        options.layout != SinusoidalLayout::concatenated_t2t || dim >= 2, fn,
        "the concatenated_t2t layout needs dim >= 2 (floor(dim/2) sine/cosine pairs), got dim ",
        dim, ": its only channel would be all zero");
    detail::require(std::isfinite(options.base) && options.base > 1.0, fn,
                    "base must be finite and > 1, got ", options.base);
    detail::require(
        std::isfinite(options.min_timescale) && std::isfinite(options.max_timescale) &&
            options.min_timescale > 0.0 && options.max_timescale >= options.min_timescale,
        fn, "timescales must be finite with 0 < min_timescale <= max_timescale, got ",
        "min_timescale ", options.min_timescale, ", max_timescale ", options.max_timescale);
    detail::require(detail::sinusoid::is_exact_position(options.origin), fn, "origin ",
                    options.origin, " is beyond +-2^53");
    build_frequencies();
  }

  /// fairseq's SinusoidalPositionalEmbedding: concatenated_t2t with origin padding_idx + 1, so
  /// token t of an unpadded (or right-padded) sequence gets fairseq's row padding_idx + 1 + t.
  static SinusoidalEncoding fairseq(Index dim, Index padding_idx = 1) {
    detail::require(padding_idx >= 0, "posenc::SinusoidalEncoding::fairseq",
                    "padding_idx must be non-negative, got ", padding_idx);
    return SinusoidalEncoding(
        dim, {.layout = SinusoidalLayout::concatenated_t2t, .origin = padding_idx + 1});
  }

  Index dim() const { return dim_; }
  SinusoidalLayout layout() const { return options_.layout; }
  Index origin() const { return options_.origin; }
  const SinusoidalOptions& options() const { return options_; }

  /// Angular frequency (radians per position) of `channel`; 0 for t2t's odd zero channel.
  double frequency(Index channel) const {
    check_channel(channel, "posenc::SinusoidalEncoding::frequency");
    for (const auto& w : frequencies_) {
      if (w.sin_channel == channel || w.cos_channel == channel) return w.hi + w.lo;
    }
    return 0.0;
  }

  /// PE(position)[channel] at an absolute position (origin not added).
  Scalar value(Index position, Index channel) const {
    constexpr const char* fn = "posenc::SinusoidalEncoding::value";
    check_channel(channel, fn);
    detail::require(detail::sinusoid::is_exact_position(position), fn, "position ", position,
                    " is beyond +-2^53 (not exact in double)");
    for (const auto& w : frequencies_) {
      if (w.sin_channel != channel && w.cos_channel != channel) continue;
      const double angle = detail::sinusoid::reduced_angle(static_cast<double>(position), w);
      return static_cast<Scalar>(w.sin_channel == channel ? std::sin(angle) : std::cos(angle));
    }
    return Scalar(0);
  }

  /// [count, dim]: row r = PE(origin + first_position + r).
  Matrix<Scalar> table(Index first_position, Index count) const {
    constexpr const char* fn = "posenc::SinusoidalEncoding::table";
    detail::require(count >= 0, fn, "count must be non-negative, got ", count);
    check_range(first_position, count, fn);
    Matrix<Scalar> out = Matrix<Scalar>::Zero(count, dim_);
    for (Index r = 0; r < count; ++r) {
      accumulate_row(options_.origin + first_position + r, out.row(r).data());
    }
    return out;
  }

  /// x[r, :] += PE(origin + first_position + r). x: [rows, dim].
  void add_to(Eigen::Ref<Matrix<Scalar>> x, Index first_position) const {
    constexpr const char* fn = "posenc::SinusoidalEncoding::add_to";
    check_width(x, fn);
    check_range(first_position, x.rows(), fn);
    for (Index r = 0; r < x.rows(); ++r) {
      accumulate_row(options_.origin + first_position + r, x.row(r).data());
    }
  }

  /// x[r, :] += PE(positions[r]) at explicit absolute positions (origin not added): packed
  /// sequences, fairseq position ids. x: [rows, dim]; positions: rows entries.
  void add_to(Eigen::Ref<Matrix<Scalar>> x, std::span<const Index> positions) const {
    constexpr const char* fn = "posenc::SinusoidalEncoding::add_to";
    check_width(x, fn);
    detail::require(static_cast<Index>(positions.size()) == x.rows(), fn, "x has ", x.rows(),
                    " rows but positions has ", positions.size(), " entries");
    for (std::size_t r = 0; r < positions.size(); ++r) {
      detail::require(detail::sinusoid::is_exact_position(positions[r]), fn, "positions[", r,
                      "] = ", positions[r], " is beyond +-2^53 (not exact in double)");
    }
    for (Index r = 0; r < x.rows(); ++r) {
      accumulate_row(positions[static_cast<std::size_t>(r)], x.row(r).data());
    }
  }

 private:
  void build_frequencies() {
    const Index d = dim_;
    const auto base = static_cast<long double>(options_.base);
    // Paper frequency w_k = base^(-2k/d), formed in long double.
    const auto paper = [&](Index k) {
      return std::pow(base, -2.0L * static_cast<long double>(k) / static_cast<long double>(d));
    };
    switch (options_.layout) {
      case SinusoidalLayout::interleaved:
        for (Index k = 0; 2 * k < d; ++k) {
          frequencies_.push_back(
              detail::sinusoid::make_frequency(paper(k), 2 * k, 2 * k + 1 < d ? 2 * k + 1 : -1));
        }
        break;
      case SinusoidalLayout::concatenated: {
        const Index sines = (d + 1) / 2;
        for (Index k = 0; k < sines; ++k) {
          frequencies_.push_back(
              detail::sinusoid::make_frequency(paper(k), k, k < d / 2 ? sines + k : -1));
        }
        break;
      }
      case SinusoidalLayout::concatenated_t2t: {
        const Index half = d / 2;
        const auto min_ts = static_cast<long double>(options_.min_timescale);
        const auto max_ts = static_cast<long double>(options_.max_timescale);
        const long double increment =
            std::log(max_ts / min_ts) / static_cast<long double>(std::max<Index>(half - 1, 1));
        for (Index k = 0; k < half; ++k) {
          const long double w = min_ts * std::exp(-static_cast<long double>(k) * increment);
          frequencies_.push_back(detail::sinusoid::make_frequency(w, k, half + k));
        }
        break;
      }
    }
  }

  /// row[c] += PE(position)[c] for every channel.
  void accumulate_row(Index position, Scalar* row) const {
    const auto p = static_cast<double>(position);
    for (const auto& w : frequencies_) {
      const double angle = detail::sinusoid::reduced_angle(p, w);
      row[w.sin_channel] += static_cast<Scalar>(std::sin(angle));
      if (w.cos_channel >= 0) row[w.cos_channel] += static_cast<Scalar>(std::cos(angle));
    }
  }

  void check_channel(Index channel, const char* fn) const {
    detail::require(channel >= 0 && channel < dim_, fn, "channel ", channel,
                    " is out of range for dim ", dim_);
  }

  /// The positions origin + first_position + [0, count) stay within +-2^53.
  void check_range(Index first_position, Index count, const char* fn) const {
    using detail::sinusoid::is_exact_position;
    const Index origin = options_.origin;
    detail::require(is_exact_position(first_position) && is_exact_position(count) &&
                        is_exact_position(origin + first_position) &&
                        is_exact_position(origin + first_position + count),
                    fn, "positions origin ", origin, " + first_position ", first_position,
                    " + [0, ", count, ") go beyond +-2^53 (not exact in double)");
  }

  void check_width(const Eigen::Ref<Matrix<Scalar>>& x, const char* fn) const {
    detail::require(x.cols() == dim_, fn, "x has ", x.cols(), " columns but the encoding has dim ",
                    dim_);
  }

  Index dim_;
  SinusoidalOptions options_;
  std::vector<detail::sinusoid::Frequency> frequencies_;
};

static_assert(AbsoluteEncoding<SinusoidalEncoding<float>>);
static_assert(AbsoluteEncoding<SinusoidalEncoding<double>>);

}  // namespace posenc
