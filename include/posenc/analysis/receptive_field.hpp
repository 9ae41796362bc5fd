// SPDX-License-Identifier: MIT
// Receptive fields of causal attention: the theoretical one of an additive positional bias
// (TRF, Qin et al.: how many recent tokens carry a 1 − ε share of Σ_t exp(b_t), and whether that
// series converges at all) and the empirical one measured on attention weights or gradients (ERF).
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "posenc/attention.hpp"
#include "posenc/compose.hpp"
#include "posenc/detail/analysis_positions.hpp"
#include "posenc/detail/check.hpp"
#include "posenc/encoders/alibi.hpp"
#include "posenc/encoders/fire.hpp"
#include "posenc/encoders/kerple.hpp"
#include "posenc/encoders/t5_bias.hpp"
#include "posenc/encoding.hpp"
#include "posenc/tensor.hpp"

namespace posenc {

// ---------------------------------------------------------------------------------------------
// Definitions (reference/xpos_bca_resolution_trf.md §4; the TRF paper, Qin, Zhong & Deng,
// "Exploring Transformer Extrapolation", arXiv 2307.10156, AAAI 2024, could only be read in its
// abstract, so the definition below is the reconstruction of golden/trf.json):
//
//   causal distance t = i − j ≥ 0, bias b_t, weight w_t = exp(b_t), S = Σ_{t≥0} w_t;
//   the series converges  <=>  the RPE extrapolates (the paper's condition);
//   TRF_ε = min { K ≥ 1 : Σ_{t<K} w_t ≥ (1 − ε)·S }  = the count of most recent tokens (distances
//           0 … K−1) carrying a 1 − ε share; "infinite" when S diverges.
//
// Equivalently tail(K) = Σ_{t≥K} w_t ≤ ε·S. The engine compares tails, never 1 − (partial sum),
// so small ε keeps full relative accuracy. A tail within 16 double ulps of ε·S counts as reaching
// it: the inputs cannot resolve a tie more finely, and an exact tie (a uniform window whose
// (1 − ε)·w is an integer) then gives the mathematically exact count.
// ---------------------------------------------------------------------------------------------

/// The theoretical (or empirical) receptive field of one head.
struct ReceptiveField {
  bool finite = false;  // false: Σ exp(b_t) diverges (or could not be decided, see `reason`)
  Index tokens = 0;     // K: distances 0 … K−1 carry the 1 − ε share (0 when not finite;
                        // numeric_limits<Index>::max() when it exceeds 2^62, see `reason`)
  std::string reason;   // why: the convergence test and the rule that gave K
  double total_weight = std::numeric_limits<double>::infinity();  // S = Σ_t exp(b_t); NaN
                                                                  // when not additive
  bool additive = true;  // false: the encoder is not an additive bias, no TRF (see below)
};

/// Whether Σ_t exp(b_t) converges, and why.
struct Convergence {
  bool converges = false;
  bool determined = true;  // false: the large-distance form of the bias could not be identified
  std::string reason;
};

/// The large-distance form of a causal bias b_t (up to an additive constant), which decides the
/// convergence of Σ exp(b_t) and supplies the tail of the series beyond what is summed directly.
struct BiasAsymptote {
  enum class Kind {
    detect,        // not declared: detect_asymptote() probes the bias
    linear,        // b_t ≈ −rate·t                    (ALiBi: geometric weights)
    logarithmic,   // b_t ≈ −rate·log t                (KERPLE-log: a p-series, exponent rate)
    power,         // b_t ≈ −rate·t^exponent           (KERPLE-power: stretched exponential)
    constant,      // b_t → constant                   (NoPE, T5 beyond its last bucket)
    growing,       // b_t increases without bound
    unidentified,  // none of the above (e.g. oscillating): convergence undetermined
  };
  Kind kind = Kind::detect;
  double rate = 0.0;
  double exponent = 0.0;
  std::string note = {};  // how it was obtained (declared, closed form, or detection evidence)

  static BiasAsymptote linear(double slope) { return {Kind::linear, slope, 1.0, "declared"}; }
  static BiasAsymptote logarithmic(double r1) { return {Kind::logarithmic, r1, 0.0, "declared"}; }
  static BiasAsymptote power(double coefficient, double exponent) {
    return {Kind::power, coefficient, exponent, "declared"};
  }
  static BiasAsymptote constant() { return {Kind::constant, 0.0, 0.0, "declared"}; }
};

namespace detail {

inline std::string format_number(double x) {
  std::ostringstream out;
  out.precision(6);
  out << x;
  return out.str();
}

/// Relative slack of the tail-vs-threshold comparison (see the definitions above).
inline constexpr long double trf_tie_slack = 16.0L * DBL_EPSILON;

/// Largest receptive field reported as a number; beyond it the result saturates.
inline constexpr Index trf_max_tokens = Index{1} << 62;

/// Bernoulli numbers B_2, B_4, …, B_24.
inline constexpr long double bernoulli_even[12] = {
    1.0L / 6.0L,       -1.0L / 30.0L,       1.0L / 42.0L,       -1.0L / 30.0L,
    5.0L / 66.0L,      -691.0L / 2730.0L,   7.0L / 6.0L,        -3617.0L / 510.0L,
    43867.0L / 798.0L, -174611.0L / 330.0L, 854513.0L / 138.0L, -236364091.0L / 2730.0L};

/// q^s·ζ(s, q) = Σ_{k≥0} (1 + k/q)^(−s) for s > 1, q > 0 (scaled so that it neither overflows nor
/// underflows): direct terms up to w = q + n ≥ s + 30, then Euler–Maclaurin with B_2 … B_24,
///   Σ_{k≥n} (q+k)^(−s) = w^(1−s)/(s−1) + w^(−s)/2 + Σ_j B_2j/(2j)!·s(s+1)…(s+2j−2)·w^(−s−2j+1).
/// Each correction shrinks the previous by ≤ (s+2j)²/(4π²w²) < 1/39, so the truncation error is
/// far below long double rounding; the result is accurate to a few 1e-19 relative.
inline long double hurwitz_zeta_scaled(long double s, long double q) {
  const long double w_min = s + 30.0L;
  const Index direct = q >= w_min ? 0 : static_cast<Index>(std::ceil(w_min - q));
  long double sum = 0.0L;
  for (Index k = direct - 1; k >= 0; --k) {  // smallest terms first
    sum += std::exp(-s * std::log1p(static_cast<long double>(k) / q));
  }
  const long double w = q + static_cast<long double>(direct);
  long double series = w / (s - 1.0L) + 0.5L;
  long double rising = s;  // s(s+1)…(s+2j−2)
  long double factorial = 2.0L;
  long double power = 1.0L / w;  // w^(−2j+1)
  for (int j = 1; j <= 12; ++j) {
    series += bernoulli_even[j - 1] / factorial * rising * power;
    rising *= (s + 2.0L * j - 1.0L) * (s + 2.0L * j);
    factorial *= (2.0L * j + 1.0L) * (2.0L * j + 2.0L);
    power /= w * w;
  }
  return sum + std::exp(-s * std::log1p(static_cast<long double>(direct) / q)) * series;
}

/// e^x·x^(−a)·Γ(a, x) for a > 0, x > 0 (the upper incomplete gamma function, scaled): series
/// for x < a + 1, Lentz's continued fraction otherwise (Numerical Recipes §6.2 formulas).
inline long double scaled_upper_gamma(long double a, long double x) {
  constexpr long double tiny = std::numeric_limits<long double>::min() / LDBL_EPSILON;
  if (x < a + 1.0L) {
    long double term = 1.0L / a;
    long double sum = term;
    for (int n = 1; n < 100000; ++n) {
      term *= x / (a + n);
      sum += term;
      if (term < sum * LDBL_EPSILON) break;
    }
    return std::exp(x - a * std::log(x) + std::lgamma(a)) - sum;
  }
  long double b = x + 1.0L - a;
  long double c = 1.0L / tiny;
  long double d = 1.0L / b;
  long double h = d;
  for (int i = 1; i < 100000; ++i) {
    const long double an = -i * (i - a);
    b += 2.0L;
    d = an * d + b;
    if (std::fabs(d) < tiny) d = tiny;
    c = b + an / c;
    if (std::fabs(c) < tiny) c = tiny;
    d = 1.0L / d;
    const long double delta = d * c;
    h *= delta;
    if (std::fabs(delta - 1.0L) < LDBL_EPSILON) break;
  }
  return h;
}

/// x^p for x ≥ 0 in long double as exp(p·ln x): as accurate here and ~7× faster than powl.
inline long double power_of(long double x, long double p) {
  return x == 0.0L ? (p > 0.0L ? 0.0L : 1.0L) : std::exp(p * std::log(x));
}

/// ρ(t) = d/dt (c·t^p) = p·g/t for g = c·t^p (at t = 0: ∞, c or 0 for p <, =, > 1).
inline long double local_decay_rate(long double c, long double p, long double t, long double g) {
  if (t == 0.0L) {
    return p < 1.0L ? std::numeric_limits<long double>::infinity() : (p == 1.0L ? c : 0.0L);
  }
  return p * g / t;
}

/// Σ_{t≥K} exp(−c·(t^p − K^p)) for c > 0, p > 0: the tail of a stretched-exponential series
/// relative to its first term. Terms are summed directly while the local decay rate
/// ρ(t) = c·p·t^(p−1) is ≥ 0.01 (or t < 64) until the rest is below 1e-21 of the sum; then
/// Euler–Maclaurin from that t: ∫ + f/2 − f'/12 + f'''/720 with the integral
/// ∫_t^∞ f = (t/p)·e^(−x)·x^(−1/p)… = f(t)·(t/p)·scaled_upper_gamma(1/p, x), x = c·t^p. With
/// ρ < 0.01 and t ≥ 64 the next Euler–Maclaurin term is below 1e-17 of the tail. At most a few
/// thousand direct terms (each step multiplies the term by ≤ e^(−0.01)). Exact for p = 1.
inline long double power_tail_ratio(long double c, long double p, Index first) {
  if (p == 1.0L) return 1.0L / -std::expm1(-c);  // geometric: exact
  const long double g_first = c * power_of(static_cast<long double>(first), p);
  long double sum = 0.0L;
  for (Index t = first;; ++t) {
    const auto tt = static_cast<long double>(t);
    const long double g = c * power_of(tt, p);
    const long double rho = local_decay_rate(c, p, tt, g);
    const long double term = std::exp(g_first - g);
    if (t >= 64 && rho < 0.01L) {
      const long double a = 1.0L / p;
      const long double g1 = rho;                                  // g'
      const long double g2 = g1 * (p - 1.0L) / tt;                 // g''
      const long double g3 = g2 * (p - 2.0L) / tt;                 // g'''
      const long double f3 = -g1 * g1 * g1 + 3.0L * g1 * g2 - g3;  // f'''/f for f = e^(−g)
      const long double integral = tt / p * scaled_upper_gamma(a, g);
      sum += term * (integral + 0.5L + g1 / 12.0L + f3 / 720.0L);
      return sum;
    }
    sum += term;
    const long double a = 1.0L / p;
    const long double bound = 1.0L + (2.0L + a / std::max(1.0L, g)) / rho;  // rest ≤ term·bound
    if (t >= 64 || rho >= 0.01L) {
      if (term * bound < 1e-21L * sum) return sum;
    }
  }
}

/// Smallest K in [first, trf_max_tokens] with below(K), for `below` false…false true…true;
/// nullopt when none. Doubling, then bisection.
template <class Below>
std::optional<Index> first_satisfying(Index first, Below below) {
  if (below(first)) return first;
  Index bad = first;
  Index step = 1;
  Index good = 0;
  for (;;) {
    if (bad > trf_max_tokens - step) {
      if (bad < trf_max_tokens && below(trf_max_tokens)) {
        good = trf_max_tokens;
        break;
      }
      return std::nullopt;
    }
    const Index probe = bad + step;
    if (below(probe)) {
      good = probe;
      break;
    }
    bad = probe;
    step *= 2;
  }
  while (good - bad > 1) {
    const Index mid = bad + (good - bad) / 2;
    (below(mid) ? good : bad) = mid;
  }
  return good;
}

/// The directly summed head of a series: partial[K] = Σ_{K ≤ t < head} w_t·e^(−shift) for
/// K = 0 … head (partial[head] = 0), summed smallest terms first.
struct SummedHead {
  long double shift = 0.0L;
  std::vector<long double> partial;

  Index head() const { return static_cast<Index>(partial.size()) - 1; }

  /// From the scaled weights w_t·e^(−shift), t < head.
  static SummedHead from_terms(long double shift, const std::vector<long double>& terms) {
    SummedHead s{shift, std::vector<long double>(terms.size() + 1, 0.0L)};
    for (std::size_t t = terms.size(); t-- > 0;) s.partial[t] = s.partial[t + 1] + terms[t];
    return s;
  }
};

/// TRF search over a summed head plus the tail beyond it: tail(K) = partial[K] + tail_at_head
/// for K ≤ head, tail_beyond(K) for K > head (both non-increasing). Sets `total` (scaled).
template <class TailBeyond>
std::optional<Index> trf_search(const SummedHead& summed, long double tail_at_head,
                                TailBeyond tail_beyond, double eps, long double& total) {
  total = summed.partial[0] + tail_at_head;
  const long double threshold = static_cast<long double>(eps) * total * (1.0L + trf_tie_slack);
  const auto first = summed.partial.begin() + 1;
  const auto found = std::partition_point(
      first, summed.partial.end(), [&](long double p) { return p + tail_at_head > threshold; });
  if (found != summed.partial.end()) return static_cast<Index>(found - summed.partial.begin());
  return first_satisfying(summed.head() + 1, [&](Index K) { return tail_beyond(K) <= threshold; });
}

/// The head of exp(−c·t^p) up to the first t where power_tail_ratio would switch to
/// Euler–Maclaurin (t ≥ 64 and ρ(t) < 0.01) or the rest is negligible (< 1e-21 of the sum),
/// at most 2^20 terms; returns the tail beyond it in `tail_at_head`.
inline SummedHead power_series_head(long double c, long double p, long double& tail_at_head) {
  std::vector<long double> terms;
  long double sum = 0.0L;
  const long double a = 1.0L / p;
  Index t = 0;
  for (; t < (Index{1} << 20); ++t) {
    const auto tt = static_cast<long double>(t);
    const long double g = c * power_of(tt, p);
    const long double rho = local_decay_rate(c, p, tt, g);
    if (t >= 64 && rho < 0.01L) break;
    const long double term = std::exp(-g);
    if ((t >= 64 || rho >= 0.01L) &&
        term * (1.0L + (2.0L + a / std::max(1.0L, g)) / rho) < 1e-21L * sum) {
      break;
    }
    terms.push_back(term);
    sum += term;
  }
  tail_at_head =
      std::exp(-c * power_of(static_cast<long double>(t), p)) * power_tail_ratio(c, p, t);
  return SummedHead::from_terms(0.0L, terms);
}

inline void require_eps(const char* fn, double eps) {
  require(std::isfinite(eps) && eps > 0.0 && eps < 1.0, fn, "eps must lie in (0, 1), got ", eps);
}

inline ReceptiveField divergent(std::string reason) {
  return ReceptiveField{false, 0, std::move(reason), std::numeric_limits<double>::infinity()};
}

/// Finishes a finite result: K from a search (nullopt: saturated) and the rule's description.
inline ReceptiveField finite_field(std::optional<Index> tokens, std::string reason, double eps,
                                   long double total) {
  ReceptiveField field{true, 0, std::move(reason), static_cast<double>(total)};
  if (tokens) {
    field.tokens = *tokens;
  } else {
    field.tokens = std::numeric_limits<Index>::max();
    field.reason += "; the 1 - eps share (eps = " + format_number(eps) +
                    ") needs more than 2^62 tokens: saturated";
  }
  return field;
}

}  // namespace detail

/// Whether Σ_t exp(b_t) converges for a bias with this large-distance form, and why
/// ("geometric decay with slope m > 0", "p-series with exponent r1 ≤ 1 diverges", "bias tends to
/// a constant: divergent", …).
inline Convergence convergence(const BiasAsymptote& asymptote) {
  using Kind = BiasAsymptote::Kind;
  const std::string rate = detail::format_number(asymptote.rate);
  switch (asymptote.kind) {
    case Kind::linear:
      if (asymptote.rate > 0.0) {
        return {true, true,
                "geometric decay with slope m = " + rate +
                    " > 0: sum exp(b_t) = sum e^(-m t) converges"};
      }
      if (asymptote.rate == 0.0) {
        return {false, true, "slope 0: the bias is constant, sum exp(b_t) diverges"};
      }
      return {false, true, "slope " + rate + " < 0: the bias grows with distance, diverges"};
    case Kind::logarithmic:
      if (asymptote.rate > 1.0) {
        return {true, true,
                "p-series: exp(b_t) ~ C t^(-r1) with exponent r1 = " + rate + " > 1 converges"};
      }
      return {false, true, "p-series with exponent r1 = " + rate + " <= 1 diverges"};
    case Kind::power:
      if (asymptote.rate > 0.0 && asymptote.exponent > 0.0) {
        return {true, true,
                "stretched-exponential decay exp(-c t^p) with c = " + rate +
                    " > 0, p = " + detail::format_number(asymptote.exponent) + " > 0 converges"};
      }
      return {false, true,
              "bias -c t^p with c = " + rate +
                  ", p = " + detail::format_number(asymptote.exponent) +
                  " does not decrease: sum exp(b_t) diverges"};
    case Kind::constant:
      return {false, true, "bias tends to a constant: sum exp(b_t) diverges"};
    case Kind::growing:
      return {false, true, "bias grows with distance: sum exp(b_t) diverges"};
    case Kind::unidentified:
      return {false, false,
              "undetermined: the large-distance form of the bias was not identified (" +
                  asymptote.note + "); declare it with BiasAsymptote"};
    case Kind::detect:
      break;
  }
  return {false, false, "undetermined: the asymptote was not detected yet"};
}

/// Identifies the large-distance form of a bias b(t) by probing T = probe·{1, 2, 4, 8}: with
/// D_k = b(2^k T) − b(2^(k+1) T) (how much the bias falls when the distance doubles),
///   all D ≈ 0                      → constant (|D| ≤ 1e-6·max(1, |b|));
///   all D < 0                      → growing;
///   D > 0 and D_{k+1}/D_k = 2^p:
///     p ≈ 0 (|p| < 1e-3)           → logarithmic, r1 = D/ln 2;
///     p < 0                        → constant (the bias levels off);
///     p ≈ 1                        → linear, slope D/(4T);
///     otherwise                    → power, b ≈ −c t^p with c = D/((4T)^p (2^p − 1));
///   anything else (signs change, p not stable) → unidentified.
/// A heuristic for biases whose asymptotic regime starts well before `probe` (2^30 by
/// default); the per-family functions (trf_alibi, …) are exact and should be preferred.
/// Throws when probe < 16 or a probed value is NaN or +inf.
inline BiasAsymptote detect_asymptote(const std::function<double(Index)>& bias,
                                      Index probe = Index{1} << 30) {
  constexpr const char* fn = "posenc::detect_asymptote";
  detail::require(probe >= 16 && probe <= (Index{1} << 58), fn,
                  "probe must lie in [16, 2^58], got ", probe);
  double b[4];
  for (int k = 0; k < 4; ++k) {
    b[k] = bias(probe << k);
    detail::require(!std::isnan(b[k]) && b[k] != std::numeric_limits<double>::infinity(), fn, "b(",
                    probe << k, ") = ", b[k]);
  }
  std::ostringstream evidence;
  evidence.precision(10);
  evidence << "b(" << probe << " * {1,2,4,8}) = {" << b[0] << ", " << b[1] << ", " << b[2] << ", "
           << b[3] << "}";
  using Kind = BiasAsymptote::Kind;
  if (!std::isfinite(b[0]) || !std::isfinite(b[3])) {
    return {Kind::unidentified, 0.0, 0.0, evidence.str()};
  }
  const double d[3] = {b[0] - b[1], b[1] - b[2], b[2] - b[3]};
  const double tol = 1e-6 * std::max({1.0, std::fabs(b[0]), std::fabs(b[3])});
  const auto small = [&](double x) { return std::fabs(x) <= tol; };
  if (small(d[0]) && small(d[1]) && small(d[2])) return {Kind::constant, 0.0, 0.0, evidence.str()};
  if (d[0] < -tol && d[1] < -tol && d[2] < -tol) return {Kind::growing, 0.0, 0.0, evidence.str()};
  if (!(d[0] > tol && d[1] > tol && d[2] > tol)) {
    return {Kind::unidentified, 0.0, 0.0, evidence.str()};
  }
  const double p1 = std::log2(d[1] / d[0]);
  const double p2 = std::log2(d[2] / d[1]);
  if (std::fabs(p1 - p2) > 1e-3 * std::max(1.0, std::fabs(p2))) {
    return {Kind::unidentified, 0.0, 0.0, evidence.str()};
  }
  const auto T = static_cast<double>(probe);
  if (std::fabs(p2) < 1e-3) return {Kind::logarithmic, d[2] / std::log(2.0), 0.0, evidence.str()};
  if (p2 < 0.0) return {Kind::constant, 0.0, 0.0, evidence.str()};
  if (std::fabs(p2 - 1.0) < 1e-3) return {Kind::linear, d[2] / (4.0 * T), 1.0, evidence.str()};
  return {Kind::power, d[2] / (std::pow(4.0 * T, p2) * (std::exp2(p2) - 1.0)), p2, evidence.str()};
}

/// A causal bias series b_t, t = 0, 1, 2, …: the input of the TRF engine. Either a closed-form
/// family (exact tails) or any callable with a declared or detected asymptote.
class BiasSeries {
 public:
  using Function = std::function<double(Index)>;
  enum class Family { alibi, kerple_log, kerple_power, constant, function };

  /// ALiBi (Press et al. 2022, arXiv 2108.12409): b_t = −slope·t.
  static BiasSeries alibi(double slope) {
    detail::require(std::isfinite(slope), "posenc::BiasSeries::alibi", "slope must be finite, got ",
                    slope);
    return BiasSeries(Family::alibi, slope, 0.0);
  }
  /// KERPLE-log (Chi et al. 2022, arXiv 2205.09921): b_t = −r1·log(1 + r2·t). Needs r2 > 0.
  static BiasSeries kerple_log(double r1, double r2) {
    detail::require(std::isfinite(r1) && std::isfinite(r2) && r2 > 0.0,
                    "posenc::BiasSeries::kerple_log", "needs finite r1 and r2 > 0, got r1 = ", r1,
                    ", r2 = ", r2);
    return BiasSeries(Family::kerple_log, r1, r2);
  }
  /// KERPLE-power: b_t = −r1·t^r2. Needs r2 > 0 (the paper keeps 0 < r2 ≤ 2).
  static BiasSeries kerple_power(double r1, double r2) {
    detail::require(std::isfinite(r1) && std::isfinite(r2) && r2 > 0.0,
                    "posenc::BiasSeries::kerple_power", "needs finite r1 and r2 > 0, got r1 = ", r1,
                    ", r2 = ", r2);
    return BiasSeries(Family::kerple_power, r1, r2);
  }
  /// b_t = value for every t (NoPE, ALiBi with slope 0, T5 beyond its last bucket): divergent.
  static BiasSeries constant(double value = 0.0) {
    return BiasSeries(Family::constant, value, 0.0);
  }
  /// Any bias b(t), t ≥ 0. Distances below `asymptote_from` are summed directly (once, here,
  /// when the asymptote converges);
  /// beyond, the tail is the asymptote's, anchored at b(K) (exact for an exactly linear tail,
  /// asymptotic otherwise). An undeclared asymptote (the default) is found by
  /// detect_asymptote(bias). b may be −inf (zero weight) but not NaN or +inf: throws otherwise,
  /// and when b(t) = −inf for every t ≤ asymptote_from.
  static BiasSeries from_function(Function bias, BiasAsymptote asymptote = {},
                                  Index asymptote_from = Index{1} << 16) {
    constexpr const char* fn = "posenc::BiasSeries::from_function";
    detail::require(static_cast<bool>(bias), fn, "bias is empty");
    detail::require(asymptote_from >= 1 && asymptote_from <= (Index{1} << 26), fn,
                    "asymptote_from must lie in [1, 2^26], got ", asymptote_from);
    if (asymptote.kind == BiasAsymptote::Kind::detect) asymptote = detect_asymptote(bias);
    BiasSeries series(Family::function, 0.0, 0.0);
    series.head_ = asymptote_from;
    if (!convergence(asymptote).converges) {  // nothing to sum: the TRF is infinite
      series.function_ = std::move(bias);
      series.asymptote_ = std::move(asymptote);
      return series;
    }
    // b(0 … asymptote_from): checked, and their weights summed once for every eps.
    std::vector<long double> values(static_cast<std::size_t>(asymptote_from) + 1);
    long double shift = -std::numeric_limits<long double>::infinity();
    for (Index t = 0; t <= asymptote_from; ++t) {
      const double b = bias(t);
      detail::require(!std::isnan(b) && b != std::numeric_limits<double>::infinity(), fn, "b(", t,
                      ") = ", b);
      values[static_cast<std::size_t>(t)] = b;
      shift = std::max(shift, static_cast<long double>(b));
    }
    detail::require(std::isfinite(shift), fn, "b(t) = -inf for every t <= ", asymptote_from,
                    ": no weight to take a share of");
    std::vector<long double> terms(static_cast<std::size_t>(asymptote_from));
    for (std::size_t t = 0; t < terms.size(); ++t) terms[t] = std::exp(values[t] - shift);
    series.summed_ =
        std::make_shared<const detail::SummedHead>(detail::SummedHead::from_terms(shift, terms));
    series.function_ = std::move(bias);
    series.asymptote_ = std::move(asymptote);
    return series;
  }

  Family family() const { return family_; }
  /// The family's parameters (slope; r1, r2; value); 0 for a function.
  double first_parameter() const { return first_; }
  double second_parameter() const { return second_; }
  /// Distances summed directly before the asymptotic tail (functions only).
  Index asymptote_from() const { return head_; }
  /// The directly summed head (convergent functions only; null otherwise).
  const detail::SummedHead* summed_head() const { return summed_.get(); }

  /// b_t. Unchecked t ≥ 0.
  double operator()(Index t) const {
    const auto x = static_cast<double>(t);
    switch (family_) {
      case Family::alibi:
        return -first_ * x;
      case Family::kerple_log:
        return -first_ * std::log1p(second_ * x);
      case Family::kerple_power:
        return -first_ * std::pow(x, second_);
      case Family::constant:
        return first_;
      case Family::function:
        return function_(t);
    }
    return 0.0;
  }

  /// The large-distance form: the family's, or the declared / detected one of a function.
  BiasAsymptote asymptote() const {
    using Kind = BiasAsymptote::Kind;
    switch (family_) {
      case Family::alibi:
        return {Kind::linear, first_, 1.0, "ALiBi b_t = -m t"};
      case Family::kerple_log:
        return {Kind::logarithmic, first_, 0.0, "KERPLE-log b_t = -r1 log(1 + r2 t)"};
      case Family::kerple_power:
        return {Kind::power, first_, second_, "KERPLE-power b_t = -r1 t^r2"};
      case Family::constant:
        return {Kind::constant, 0.0, 0.0, "constant bias"};
      case Family::function:
        return asymptote_;
    }
    return asymptote_;
  }

 private:
  BiasSeries(Family family, double first, double second)
      : family_(family), first_(first), second_(second) {}

  Family family_;
  double first_ = 0.0;
  double second_ = 0.0;
  Function function_ = {};
  BiasAsymptote asymptote_ = {};
  Index head_ = 0;
  std::shared_ptr<const detail::SummedHead> summed_ = {};
};

/// Whether Σ_t exp(b_t) of this series converges, and why.
inline Convergence convergence(const BiasSeries& series) {
  if (series.family() == BiasSeries::Family::kerple_power && series.first_parameter() <= 0.0) {
    return {false, true,
            "KERPLE-power with r1 = " + detail::format_number(series.first_parameter()) +
                " <= 0: the bias does not decrease, sum exp(b_t) diverges"};
  }
  return convergence(series.asymptote());
}

/// TRF of ALiBi with this slope: the tail share after K tokens is e^(−m·K), so
/// TRF_ε = max(1, ceil(ln(1/ε)/m)) (golden/trf.json: m = 1/16, ε = 0.1 → 37). When ln(1/ε)/m is
/// within 4 double ulps of an integer k the result is k (the definition's ≥ admits equality;
/// e.g. m = 0.5, ε = e^(−5) gives 10, not 11). Slope ≤ 0 → infinite.
/// total_weight = 1/(1 − e^(−m)). Throws unless 0 < ε < 1 and the slope is finite.
inline ReceptiveField trf_alibi(double slope, double eps) {
  constexpr const char* fn = "posenc::trf_alibi";
  detail::require_eps(fn, eps);
  detail::require(std::isfinite(slope), fn, "slope must be finite, got ", slope);
  const Convergence test = convergence(BiasAsymptote{BiasAsymptote::Kind::linear, slope, 1.0});
  if (!test.converges) return detail::divergent("ALiBi: " + test.reason);
  const long double x = -std::log(static_cast<long double>(eps)) / static_cast<long double>(slope);
  const long double nearest = std::nearbyint(x);
  long double k = std::ceil(x);
  if (std::fabs(x - nearest) <= 4.0L * DBL_EPSILON * std::max(1.0L, x)) k = nearest;
  std::optional<Index> tokens;
  if (k <= static_cast<long double>(detail::trf_max_tokens)) {
    tokens = std::max<Index>(1, static_cast<Index>(k));
  }
  return detail::finite_field(
      tokens, "ALiBi: " + test.reason + "; tail share e^(-m K) <= eps at K = ceil(ln(1/eps)/m)",
      eps, 1.0L / -std::expm1(-static_cast<long double>(slope)));
}

/// TRF of KERPLE-log b_t = −r1·log(1 + r2·t): w_t = r2^(−r1)·(t + 1/r2)^(−r1), so
/// S = r2^(−r1)·ζ(r1, 1/r2) and the tail share after K tokens is ζ(r1, 1/r2 + K)/ζ(r1, 1/r2)
/// (Hurwitz zeta, Euler–Maclaurin in long double). Infinite for r1 ≤ 1 (p-series).
/// Throws unless 0 < ε < 1, r1 finite and r2 > 0.
inline ReceptiveField trf_kerple_log(double r1, double r2, double eps) {
  constexpr const char* fn = "posenc::trf_kerple_log";
  detail::require_eps(fn, eps);
  detail::require(std::isfinite(r1) && std::isfinite(r2) && r2 > 0.0, fn,
                  "needs finite r1 and r2 > 0, got r1 = ", r1, ", r2 = ", r2);
  const Convergence test = convergence(BiasAsymptote{BiasAsymptote::Kind::logarithmic, r1, 0.0});
  if (!test.converges) return detail::divergent("KERPLE-log: " + test.reason);
  const long double s = r1;
  const long double a = 1.0L / static_cast<long double>(r2);
  const long double head = detail::hurwitz_zeta_scaled(s, a);  // a^s ζ(s, a)
  const long double threshold = static_cast<long double>(eps) * (1.0L + detail::trf_tie_slack);
  const auto below = [&](Index K) {
    const auto k = static_cast<long double>(K);
    // ζ(s, a+K)/ζ(s, a) = (1 + K/a)^(−s) · [(a+K)^s ζ(s, a+K)] / [a^s ζ(s, a)]
    const long double share =
        std::exp(-s * std::log1p(k / a)) * detail::hurwitz_zeta_scaled(s, a + k) / head;
    return share <= threshold;
  };
  // S = r2^(−r1)·ζ(r1, a) = a^(r1)·ζ(r1, a) since a = 1/r2: S is `head` itself.
  return detail::finite_field(
      detail::first_satisfying(1, below),
      "KERPLE-log: " + test.reason + "; tail share zeta(r1, 1/r2 + K)/zeta(r1, 1/r2) <= eps", eps,
      head);
}

/// TRF of KERPLE-power b_t = −r1·t^r2 (r1 > 0, r2 > 0 converges): no closed form; the tail
/// Σ_{t≥K} exp(−r1 t^r2) is summed directly while terms fall fast and continued by
/// Euler–Maclaurin with the incomplete gamma integral once they fall slowly (see
/// detail::power_tail_ratio), so the remainder is below 1e-17 relative. Infinite for r1 ≤ 0.
/// Throws unless 0 < ε < 1, r1 finite and r2 > 0.
inline ReceptiveField trf_kerple_power(double r1, double r2, double eps) {
  constexpr const char* fn = "posenc::trf_kerple_power";
  detail::require_eps(fn, eps);
  detail::require(std::isfinite(r1) && std::isfinite(r2) && r2 > 0.0, fn,
                  "needs finite r1 and r2 > 0, got r1 = ", r1, ", r2 = ", r2);
  const Convergence test = convergence(BiasSeries::kerple_power(r1, r2));
  if (!test.converges) return detail::divergent("KERPLE-power: " + test.reason);
  const long double c = r1;
  const long double p = r2;
  long double tail_at_head = 0.0L;
  const detail::SummedHead summed = detail::power_series_head(c, p, tail_at_head);
  long double total = 0.0L;
  const auto tokens = detail::trf_search(
      summed, tail_at_head,
      [&](Index K) {
        return std::exp(-c * detail::power_of(static_cast<long double>(K), p)) *
               detail::power_tail_ratio(c, p, K);
      },
      eps, total);
  return detail::finite_field(
      tokens, "KERPLE-power: " + test.reason + "; tail sum_{t>=K} exp(-r1 t^r2) <= eps * total",
      eps, total);
}

/// TRF of a bias that is constant beyond some distance (NoPE, ALiBi with slope 0, T5 beyond its
/// last bucket): always infinite, whatever happens before.
inline ReceptiveField trf_constant_tail() {
  return detail::divergent(convergence(BiasAsymptote::constant()).reason);
}

namespace detail {

/// Σ_{t≥K} w_t / w_K for a tail of this asymptotic form (see BiasSeries::from_function), with
/// b_K = series(K). A logarithmic tail b_t ≈ c − r1·log(t + a) takes its offset a from b(K) and
/// b(2K) (exact for KERPLE-log written as a function; a = 0 if that fails).
inline long double anchored_tail_ratio(const BiasSeries& series, const BiasAsymptote& asymptote,
                                       Index K, double b_K) {
  using Kind = BiasAsymptote::Kind;
  const long double rate = asymptote.rate;
  const auto k = static_cast<long double>(K);
  switch (asymptote.kind) {
    case Kind::linear:
      return 1.0L / -std::expm1(-rate);
    case Kind::logarithmic: {  // Σ_{t≥K} ((t + a)/(K + a))^(−r1) = (K+a)^r1 ζ(r1, K + a)
      long double offset = 0.0L;
      if (K <= (Index{1} << 60)) {
        // b(K) − b(2K) = r1·ln((2K + a)/(K + a)) =: r1·ln R  →  a = K(2 − R)/(R − 1)
        const long double ratio = std::exp((static_cast<long double>(b_K) - series(2 * K)) / rate);
        const long double a = k * (2.0L - ratio) / (ratio - 1.0L);
        if (std::isfinite(a) && a > -0.5L * k) offset = a;
      }
      return hurwitz_zeta_scaled(rate, k + offset);
    }
    case Kind::power:
      return power_tail_ratio(rate, asymptote.exponent, K);
    default:
      return std::numeric_limits<long double>::infinity();
  }
}

inline ReceptiveField trf_of_function(const BiasSeries& series, double eps) {
  const Convergence test = convergence(series);
  if (!test.converges) return divergent(test.reason);
  const BiasAsymptote asymptote = series.asymptote();
  const SummedHead& summed = *series.summed_head();
  const Index head = summed.head();
  const auto tail_from = [&](Index K, double b_K) {
    if (b_K == -std::numeric_limits<double>::infinity()) return 0.0L;
    return std::exp(static_cast<long double>(b_K) - summed.shift) *
           anchored_tail_ratio(series, asymptote, K, b_K);
  };
  long double total = 0.0L;
  const auto tokens = trf_search(
      summed, tail_from(head, series(head)), [&](Index K) { return tail_from(K, series(K)); }, eps,
      total);
  require(std::isfinite(total) && total > 0.0L, "posenc::theoretical_receptive_field",
          "the total weight is ", static_cast<double>(total));
  std::string reason = test.reason + " [asymptote: " + asymptote.note + "]; distances < " +
                       std::to_string(head) +
                       " summed directly, the tail beyond from the asymptote";
  return finite_field(tokens, std::move(reason), eps, total * std::exp(summed.shift));
}

}  // namespace detail

/// TRF_ε of a bias series (definitions at the top of this file): closed forms for the families,
/// the direct sum plus the asymptotic tail for a function. Infinite (finite = false) with the
/// reason when Σ exp(b_t) diverges or its convergence is undetermined.
/// Throws unless 0 < ε < 1.
inline ReceptiveField theoretical_receptive_field(const BiasSeries& series, double eps) {
  detail::require_eps("posenc::theoretical_receptive_field", eps);
  switch (series.family()) {
    case BiasSeries::Family::alibi:
      return trf_alibi(series.first_parameter(), eps);
    case BiasSeries::Family::kerple_log:
      return trf_kerple_log(series.first_parameter(), series.second_parameter(), eps);
    case BiasSeries::Family::kerple_power:
      return trf_kerple_power(series.first_parameter(), series.second_parameter(), eps);
    case BiasSeries::Family::constant:
      return trf_constant_tail();
    case BiasSeries::Family::function:
      return detail::trf_of_function(series, eps);
  }
  return trf_constant_tail();
}

// ---------------------------------------------------------------------------------------------
// Receptive fields of the library's encoders.
//
// An encoder is an additive bias (the AdditiveBias concept) when its only positional effect is a
// term B_h(i, j) added to the logits: ALiBi, KERPLE, T5, FIRE and compositions of them. Its TRF
// is that of the causal series of a query far from the start,
//
//   b_t = lim_{i→∞} B_h(i, i − t),   t = i − j ≥ 0,
//
// which is B_h(i, i − t) itself for a bias of the distance alone. Symmetric forms (δ = |i − j|)
// give the same series: causal attention only sees t ≥ 0, where |i − j| = i − j (a
// bidirectional layer would also attend to the mirror-image keys; the TRF does not count them).
// theoretical_receptive_field_at(encoder, head, ε, i) is the finite variant for one query
// position i: the same rule over the keys 0 … i it sees, without the limit (FIRE needs it; for a
// distance-only bias it approaches the limit as i grows).
//
// Every other encoder (RoPE, XPos, Shaw, stochastic PE, DAPE, compositions including one of
// them) moves the logits by amounts that depend on q and k, so no q/k-free series exists: the
// result has additive = false, finite = false, total_weight NaN and a reason saying so, and
// convergence() reports determined = false. NoPE is additive with b_t = 0: infinite.
// ---------------------------------------------------------------------------------------------

/// An encoder whose only positional effect is an additive logit bias (a ScoreBias modelling no
/// other stage).
template <class E>
concept AdditiveBias = ScoreBias<E> && !QueryKeyTransform<E> && !RelativeKeyValue<E> &&
                       !ScoreMixer<E> && !AbsoluteEncoding<E>;

/// An encoder the attention kernel accepts that is neither an additive bias nor NoPE.
template <class E>
concept NonAdditiveEncoder =
    AttentionEncoder<E> && !AdditiveBias<E> && !std::same_as<E, NoPositionalEncoding>;

namespace detail {

/// Query position at which biases of the distance alone are probed for their series (far enough
/// for detect_asymptote's probes at distances up to 2^33).
inline constexpr Index far_query_position = Index{1} << 40;

inline void require_head(const char* fn, Index head, Index heads) {
  require(head >= 0 && head < heads, fn, "head ", head, " out of range for ", heads, " heads");
}

inline ReceptiveField with_prefix(ReceptiveField field, const std::string& prefix) {
  field.reason = prefix + field.reason;
  return field;
}

inline Convergence with_prefix(Convergence test, const std::string& prefix) {
  test.reason = prefix + test.reason;
  return test;
}

inline std::string head_label(Index head, const char* encoder) {
  return "head " + std::to_string(head) + " of " + encoder + ": ";
}

inline std::string form_note(BiasForm form) {
  return form == BiasForm::symmetric
             ? " (symmetric form: causal attention sees t = i - j >= 0 only, where |i - j| = t)"
             : "";
}

/// Which stages make an encoder non-additive, for the reason of its result.
template <class E>
std::string non_additive_reason() {
  std::string stages;
  const auto add = [&stages](const char* stage) {
    stages += (stages.empty() ? "" : ", ") + std::string(stage);
  };
  if constexpr (QueryKeyTransform<E>) add("transforms q and k by position (RoPE, XPos, SPE)");
  if constexpr (RelativeKeyValue<E>) add("adds the query-dependent term q_i.a(j - i) (Shaw)");
  if constexpr (ScoreMixer<E>) add("mixes logits and biases across heads (DAPE)");
  if constexpr (AbsoluteEncoding<E>) add("adds positions to the embeddings");
  std::string reason = "not an additive bias: the encoder " + stages +
                       ", so its effect on the logits depends on q and k and no bias series "
                       "exists; the TRF is not defined";
  if constexpr (ScoreBias<E>) {
    reason += " (for the bias part alone, call it on that part, e.g. composed.second())";
  }
  return reason;
}

inline ReceptiveField not_additive(std::string reason) {
  return ReceptiveField{false, 0, std::move(reason), std::numeric_limits<double>::quiet_NaN(),
                        false};
}

/// TRF over the finite window t = 0 … last of b(t) (the keys 0 … i of a query at i = last).
template <class Bias>
ReceptiveField trf_of_window(const char* fn, const Bias& b, Index last, double eps,
                             std::string reason) {
  std::vector<long double> values(static_cast<std::size_t>(last) + 1);
  long double shift = -std::numeric_limits<long double>::infinity();
  for (Index t = 0; t <= last; ++t) {
    const auto value = static_cast<double>(b(t));
    require(!std::isnan(value) && value != std::numeric_limits<double>::infinity(), fn, "b(", t,
            ") = ", value);
    values[static_cast<std::size_t>(t)] = value;
    shift = std::max(shift, static_cast<long double>(value));
  }
  require(std::isfinite(shift), fn, "b(t) = -inf for every t <= ", last,
          ": no weight to take a share of");
  for (long double& v : values) v = std::exp(v - shift);
  const SummedHead summed = SummedHead::from_terms(shift, values);
  long double total = 0.0L;
  const auto tokens = trf_search(
      summed, 0.0L, [](Index) { return 0.0L; }, eps, total);
  return finite_field(tokens, std::move(reason), eps, total * std::exp(shift));
}

/// The causal series b_t = lim_{i→∞} B_h(i, i − t) of one part of an additive encoder, as a
/// function. Distance-only biases are read at a far query position; FIRE's normalised distance
/// tends to 0 for every fixed t, so its limit is the constant f_h(0); a part without a bias adds 0.
template <class E>
std::function<double(Index)> limit_bias(const E& encoder, Index head);

template <class T>
std::function<double(Index)> limit_bias(const Fire<T>& fire, Index head) {
  const double value = fire.mlp(head, 0.0);
  return [value](Index) { return value; };
}

template <class A, class B>
std::function<double(Index)> limit_bias(const Composed<A, B>& composed, Index head) {
  return [a = limit_bias(composed.first(), head),
          b = limit_bias(composed.second(), head)](Index t) { return a(t) + b(t); };
}

template <class E>
std::function<double(Index)> limit_bias(const E& encoder, Index head) {
  if constexpr (ScoreBias<E>) {
    return [encoder, head](Index t) {
      return static_cast<double>(encoder.bias(head, far_query_position, far_query_position - t));
    };
  } else {
    return [](Index) { return 0.0; };
  }
}

/// T5: the first causal distance in the last bucket, and that bucket.
template <class T>
std::pair<Index, Index> t5_constant_tail(const T5RelativeBias<T>& t5) {
  const T5BucketOptions& options = t5.options();
  const Index last = options.bidirectional ? options.num_buckets / 2 - 1 : options.num_buckets - 1;
  const std::optional<Index> from =
      first_satisfying(0, [&](Index t) { return t5.bucket(-t) == last; });
  return {from.value_or(trf_max_tokens), last};
}

}  // namespace detail

/// TRF_ε of head `head` of any additive bias of the distance i − j alone: the series
/// b_t = bias(head, q, q − t) at a far query position q (2^40 by default), with its asymptote
/// detected (detect_asymptote). The generic fallback: the library's encoders have exact
/// overloads below (ALiBi → trf_alibi, KERPLE → trf_kerple_*, T5 → its constant tail, FIRE → its
/// limit, compose → the summed series). A bias that also depends on i needs its own overload.
/// Throws for a head out of range or ε outside (0, 1).
template <AdditiveBias Bias>
ReceptiveField theoretical_receptive_field(const Bias& bias, Index head, double eps,
                                           Index query_position = detail::far_query_position) {
  constexpr const char* fn = "posenc::theoretical_receptive_field";
  detail::require_head(fn, head, static_cast<Index>(bias.heads()));
  detail::require(query_position >= (Index{1} << 34), fn,
                  "query_position must be >= 2^34 (room for the asymptote probes), got ",
                  query_position);
  detail::require_eps(fn, eps);
  const auto series = BiasSeries::from_function([&bias, head, query_position](Index t) {
    return static_cast<double>(bias.bias(head, query_position, query_position - t));
  });
  return theoretical_receptive_field(series, eps);
}

/// Whether Σ_t exp(b_t) converges for head `head` of a generic additive bias (the series of the
/// overload above), and why.
template <AdditiveBias Bias>
Convergence convergence(const Bias& bias, Index head) {
  detail::require_head("posenc::convergence", head, static_cast<Index>(bias.heads()));
  return convergence(BiasSeries::from_function([&bias, head](Index t) {
    return static_cast<double>(
        bias.bias(head, detail::far_query_position, detail::far_query_position - t));
  }));
}

/// NoPE has no positional bias (b_t = 0): the series diverges, the TRF is infinite.
inline ReceptiveField theoretical_receptive_field(const NoPositionalEncoding&, Index, double eps) {
  detail::require_eps("posenc::theoretical_receptive_field", eps);
  return detail::divergent("no positional bias (NoPE): b_t = 0, sum exp(b_t) diverges");
}

inline Convergence convergence(const NoPositionalEncoding&, Index) {
  return {false, true, "no positional bias (NoPE): b_t = 0, sum exp(b_t) diverges"};
}

/// ALiBi: trf_alibi of the head's slope m_h (b_t = −m_h·t for both forms, see above).
/// Throws for a head out of range or ε outside (0, 1).
template <class T>
ReceptiveField theoretical_receptive_field(const Alibi<T>& alibi, Index head, double eps) {
  constexpr const char* fn = "posenc::theoretical_receptive_field";
  detail::require_head(fn, head, alibi.heads());
  detail::require_eps(fn, eps);
  ReceptiveField field = detail::with_prefix(trf_alibi(alibi.slopes()[head], eps),
                                             "head " + std::to_string(head) + " of ");
  field.reason += detail::form_note(alibi.form());
  return field;
}

template <class T>
Convergence convergence(const Alibi<T>& alibi, Index head) {
  detail::require_head("posenc::convergence", head, alibi.heads());
  return detail::with_prefix(convergence(BiasSeries::alibi(alibi.slopes()[head])),
                             detail::head_label(head, "ALiBi"));
}

/// KERPLE: trf_kerple_log / trf_kerple_power of the head's parameters after the reference's
/// clamps (r1(), r2()). Throws for a head out of range or ε outside (0, 1).
template <class T>
ReceptiveField theoretical_receptive_field(const Kerple<T>& kerple, Index head, double eps) {
  constexpr const char* fn = "posenc::theoretical_receptive_field";
  detail::require_head(fn, head, kerple.heads());
  detail::require_eps(fn, eps);
  const double r1 = kerple.r1()[head];
  const double r2 = kerple.r2()[head];
  ReceptiveField field = kerple.kernel() == KerpleKernel::log ? trf_kerple_log(r1, r2, eps)
                                                              : trf_kerple_power(r1, r2, eps);
  field = detail::with_prefix(std::move(field), "head " + std::to_string(head) + " of ");
  field.reason += detail::form_note(kerple.form());
  return field;
}

template <class T>
Convergence convergence(const Kerple<T>& kerple, Index head) {
  detail::require_head("posenc::convergence", head, kerple.heads());
  const double r1 = kerple.r1()[head];
  const double r2 = kerple.r2()[head];
  return detail::with_prefix(
      convergence(kerple.kernel() == KerpleKernel::log ? BiasSeries::kerple_log(r1, r2)
                                                       : BiasSeries::kerple_power(r1, r2)),
      detail::head_label(head, "KERPLE"));
}

/// T5: every causal distance from the first one in the last bucket on shares that bucket's
/// learned value, so b_t is constant beyond it and the TRF is infinite whatever the table holds.
template <class T>
Convergence convergence(const T5RelativeBias<T>& t5, Index head) {
  detail::require_head("posenc::convergence", head, t5.heads());
  const auto [from, bucket] = detail::t5_constant_tail(t5);
  return {false, true,
          detail::head_label(head, "T5") + "distances t >= " + std::to_string(from) +
              " share the last bucket " + std::to_string(bucket) + " (bias " +
              detail::format_number(static_cast<double>(t5.table()(bucket, head))) +
              "): the bias is constant beyond, sum exp(b_t) diverges"};
}

template <class T>
ReceptiveField theoretical_receptive_field(const T5RelativeBias<T>& t5, Index head, double eps) {
  constexpr const char* fn = "posenc::theoretical_receptive_field";
  detail::require_head(fn, head, t5.heads());
  detail::require_eps(fn, eps);
  return detail::divergent(convergence(t5, head).reason);
}

/// FIRE: B_h(i, j) = f_h(ψ(i − j)/(ψ(max(i, L)) + eps)) depends on the query position i. For a
/// fixed distance t the normalised distance tends to 0 as i grows, so the limit series is the
/// constant f_h(0): divergent, the TRF is infinite. At a finite query position the field is
/// finite and grows at least linearly with i (theoretical_receptive_field_at): f_h is bounded on
/// [0, 1], so every weight lies within a factor e^(max f − min f) of every other.
template <class T>
Convergence convergence(const Fire<T>& fire, Index head) {
  detail::require_head("posenc::convergence", head, fire.heads());
  return {false, true,
          detail::head_label(head, "FIRE") +
              "the normalised distance psi(t)/(psi(max(i, L)) + eps) of a fixed distance t tends "
              "to 0 as the query position i grows, so b_t tends to the constant f(0) = " +
              detail::format_number(fire.mlp(head, 0.0)) +
              ": sum exp(b_t) diverges (at a finite query position the field is finite and grows "
              "with i: theoretical_receptive_field_at)"};
}

template <class T>
ReceptiveField theoretical_receptive_field(const Fire<T>& fire, Index head, double eps) {
  constexpr const char* fn = "posenc::theoretical_receptive_field";
  detail::require_head(fn, head, fire.heads());
  detail::require_eps(fn, eps);
  return detail::divergent(convergence(fire, head).reason);
}

/// compose(a, b, …) of additive biases: the biases add, so the series is the sum of the parts'
/// limit series (FIRE contributes its constant f_h(0)), handled by the generic engine
/// (BiasSeries::from_function, asymptote detected). E.g. T5 + ALiBi converges like ALiBi.
template <class A, class B>
requires AdditiveBias<Composed<A, B>> Convergence convergence(const Composed<A, B>& composed,
                                                              Index head) {
  detail::require_head("posenc::convergence", head, composed.heads());
  return detail::with_prefix(
      convergence(BiasSeries::from_function(detail::limit_bias(composed, head))),
      detail::head_label(head, "a composition of biases (b_t summed over the parts)"));
}

template <class A, class B>
requires AdditiveBias<Composed<A, B>> ReceptiveField
theoretical_receptive_field(const Composed<A, B>& composed, Index head, double eps) {
  constexpr const char* fn = "posenc::theoretical_receptive_field";
  detail::require_head(fn, head, composed.heads());
  detail::require_eps(fn, eps);
  return detail::with_prefix(
      theoretical_receptive_field(BiasSeries::from_function(detail::limit_bias(composed, head)),
                                  eps),
      detail::head_label(head, "a composition of biases (b_t summed over the parts)"));
}

/// Encoders that are not additive biases: no TRF (additive = false, see above). Checks ε only.
template <NonAdditiveEncoder E>
ReceptiveField theoretical_receptive_field(const E&, Index, double eps) {
  detail::require_eps("posenc::theoretical_receptive_field", eps);
  return detail::not_additive(detail::non_additive_reason<E>());
}

template <NonAdditiveEncoder E>
Convergence convergence(const E&, Index) {
  return {false, false, detail::non_additive_reason<E>()};
}

/// TRF_ε of head `head` for one query at absolute position i = query_position attending causally
/// to the keys 0 … i (the kernel's default key positions):
///
///   w_t = exp(B_h(i, i − t)),   TRF_ε(i) = min { K ≥ 1 : Σ_{t<K} w_t ≥ (1 − ε)·Σ_{t≤i} w_t },
///
/// a finite sum, so always finite (≤ i + 1). This is the meaningful field of FIRE, whose bias
/// depends on i (its limit is infinite; TRF_ε(i) ≥ (1 − ε)(i + 1)·e^(min f − max f) over
/// [0, 1]); for a bias of the distance alone it equals the limit TRF once the window holds it.
/// Summed directly in long double (i + 1 bias evaluations). NoPE: uniform weights. Encoders that
/// are not additive biases get additive = false as above.
/// Throws for a head out of range, ε outside (0, 1) or query_position outside [0, 2^26].
template <AdditiveBias Bias>
ReceptiveField theoretical_receptive_field_at(const Bias& bias, Index head, double eps,
                                              Index query_position) {
  constexpr const char* fn = "posenc::theoretical_receptive_field_at";
  detail::require_head(fn, head, static_cast<Index>(bias.heads()));
  detail::require_eps(fn, eps);
  detail::require(query_position >= 0 && query_position <= (Index{1} << 26), fn,
                  "query_position must lie in [0, 2^26] (the keys are summed directly), got ",
                  query_position);
  const Index i = query_position;
  return detail::trf_of_window(
      fn, [&bias, head, i](Index t) { return bias.bias(head, i, i - t); }, i, eps,
      "head " + std::to_string(head) + ": query at position " + std::to_string(i) +
          ", keys 0 ... " + std::to_string(i) + ": sum of exp(B(i, i - t)) over the " +
          std::to_string(i + 1) + " distances, the nearest K carrying 1 - eps of it");
}

inline ReceptiveField theoretical_receptive_field_at(const NoPositionalEncoding&, Index, double eps,
                                                     Index query_position) {
  constexpr const char* fn = "posenc::theoretical_receptive_field_at";
  detail::require_eps(fn, eps);
  detail::require(query_position >= 0 && query_position <= (Index{1} << 26), fn,
                  "query_position must lie in [0, 2^26] (the keys are summed directly), got ",
                  query_position);
  return detail::trf_of_window(
      fn, [](Index) { return 0.0; }, query_position, eps,
      "no positional bias (NoPE): uniform weights over the " + std::to_string(query_position + 1) +
          " keys 0 ... " + std::to_string(query_position));
}

template <NonAdditiveEncoder E>
ReceptiveField theoretical_receptive_field_at(const E&, Index, double eps, Index) {
  detail::require_eps("posenc::theoretical_receptive_field_at", eps);
  return detail::not_additive(detail::non_additive_reason<E>());
}

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
/// paper uses it; notes §4.4, details unconfirmed): gradients[t] is the gradient (magnitude or
/// signed component) of the loss at the last position with respect to the input at distance t
/// (t = 0 is the last token itself; reverse a per-position array). |g| is normalised to sum 1
/// and accumulated from the nearest position: the smallest K with Σ_{t<K} |g_t| ≥ (1 − ε)·Σ|g|.
/// For gradient vectors pass their norms. Throws when every gradient is 0 or one is not finite.
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

/// ERF_ε of every query row of [H, N, M] attention weights (from attention_weights), with the
/// positions of `options` (query_offset or query_positions, key_positions — pass the options the
/// weights were computed with; the other fields are ignored). Throws for ε outside (0, 1),
/// negative or non-finite weights, or positions of the wrong size.
template <HeadsLike Weights>
EmpiricalReceptiveField empirical_receptive_field(const Weights& weights, double eps,
                                                  const AttentionOptions& options = {}) {
  constexpr const char* fn = "posenc::empirical_receptive_field";
  detail::require_eps(fn, eps);
  const auto view = detail::as_const_view(weights);
  const auto positions = detail::resolve_positions(fn, options, view.rows(), view.dim());
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

}  // namespace posenc
