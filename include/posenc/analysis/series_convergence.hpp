// SPDX-License-Identifier: MIT
// The series engine behind theoretical receptive fields: for a causal bias series b_t, whether
// Σ_t exp(b_t) converges and after how many recent tokens K its tail falls below an ε share (TRF,
// Qin, Zhong & Deng). Closed forms for ALiBi and KERPLE, Euler–Maclaurin and asymptote detection
// for any other series (BiasSeries). The encoders' overloads are in receptive_field.hpp.
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstddef>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "posenc/detail/check.hpp"
#include "posenc/detail/series_math.hpp"
#include "posenc/encoding.hpp"
#include "posenc/tensor.hpp"

namespace posenc {

// ---------------------------------------------------------------------------------------------
// Definitions (docs/reference/xpos_bca_resolution_trf.md §4; the TRF paper, Qin, Zhong & Deng,
// "Exploring Transformer Extrapolation", arXiv 2307.10156, AAAI 2024, could only be read in its
// abstract, so the definition below is the reconstruction of the golden tests/data/trf.json):
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
/// TRF_ε = max(1, ceil(ln(1/ε)/m)) (tests/data/trf.json: m = 1/16, ε = 0.1 → 37). When ln(1/ε)/m is
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

}  // namespace posenc
