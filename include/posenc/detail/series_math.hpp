// SPDX-License-Identifier: MIT
// Special functions for the tails of exp(b_t) series (series_convergence.hpp): the Hurwitz zeta
// function and the upper incomplete gamma function, scaled to stay in range, and the
// Euler–Maclaurin tail ratio of exp(−c·t^p). Long double throughout.
#pragma once

#include <cfloat>
#include <cmath>
#include <limits>

#include "posenc/tensor.hpp"

namespace posenc::detail {

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

}  // namespace posenc::detail
