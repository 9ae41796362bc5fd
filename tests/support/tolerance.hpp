// SPDX-License-Identifier: MIT
// Tolerances against float32 reference values, derived from an error model of the reference's own
// float32 arithmetic (instead of a constant that one case happened to pass), and a float32
// rounding to replay a reference's steps exactly.
#pragma once

#include <cmath>

namespace posenc::test {

/// Unit roundoff of IEEE binary32 with round to nearest: u = 2^-24 (half of FLT_EPSILON). A
/// correctly rounded float32 operation returns x·(1 + δ) with |δ| <= u.
inline constexpr double float32_unit_roundoff = 0x1p-24;

/// γ_n = n·u / (1 − n·u) for u = 2^-24 (Higham, "Accuracy and Stability of Numerical Algorithms",
/// Lemma 3.1): a product of n factors (1 + δ_i)^(±1) with |δ_i| <= u lies in [1 − γ_n, 1 + γ_n].
/// n may be fractional (a condition number times one rounding, below).
inline double float32_gamma(double n) {
  const double nu = n * float32_unit_roundoff;
  return nu / (1.0 - nu);
}

/// The error model of a float32 reference value x̂ of an exact value x: the reference computed x
/// as a chain of float32 steps, so x̂ = x·Π(1 + δ_i)^(±1). `roundings` counts the steps in units
/// of u:
///   - a correctly rounded operation (+, −, ×, /, a reciprocal, a cast from double) counts 1;
///   - an operation whose exact result is representable counts 0 (× or ÷ by a power of two,
///     pow(b, 0) = 1, 1/1, p·1 for an integer p < 2^24);
///   - a library function accurate to 1 ulp (powf, cosf, sinf, their vector versions) counts 2;
///   - an input rounding that a later function amplifies counts its condition number κ: b^e with
///     e rounded (|δe| <= u·|e|) moves by a relative |e·ln b|·u, so it counts |e·ln b|.
/// Then |x̂ − x| <= γ_roundings·|x|, the returned tolerance. The count must come from the
/// reference's code (say which steps in a comment), not from the error a test happened to see.
inline double float32_reference_tolerance(double x, double roundings) {
  return float32_gamma(roundings) * std::abs(x);
}

/// x rounded to the nearest float32 (ties to even), widened back: one float32 step of a replayed
/// reference. Doing each float32 operation of a reference in double and rounding the result with
/// this reproduces it exactly for × (and +, − of operands of similar magnitude) of float32
/// operands: their exact result fits a double, so the only rounding is this one, and FMA
/// contraction cannot change an exact product. ÷ and library functions are rounded twice (to
/// double, then float32), which differs from one rounding only when the double lands on a float32
/// midpoint: a replay must still be checked bit for bit against its golden.
inline double round_to_float32(double x) { return static_cast<double>(static_cast<float>(x)); }

}  // namespace posenc::test
