// SPDX-License-Identifier: MIT
// Distributions for the seeded parameter initialisers, written out so that a seed gives the same
// parameters with every standard library (std::mt19937_64 is fully specified; the algorithms of
// std::uniform_real_distribution and std::normal_distribution are implementation-defined).
#pragma once

#include <cmath>
#include <numbers>
#include <random>

namespace posenc::detail {

/// U[0, 1) with 53 random bits.
inline double uniform01(std::mt19937_64& rng) {
  return static_cast<double>(rng() >> 11) * 0x1.0p-53;
}

/// U[low, high).
inline double uniform(std::mt19937_64& rng, double low, double high) {
  return low + (high - low) * uniform01(rng);
}

/// N(0, 1) by the Box–Muller transform (one draw per call; the partner is discarded).
inline double standard_normal(std::mt19937_64& rng) {
  const double u1 = 1.0 - uniform01(rng);  // (0, 1]: log(u1) is finite
  const double u2 = uniform01(rng);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
}

}  // namespace posenc::detail
