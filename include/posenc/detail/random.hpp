// SPDX-License-Identifier: MIT
// Distributions for the seeded initialisers and random draws, written out so that a seed gives the
// same numbers with every standard library (std::mt19937_64 is fully specified; the algorithms of
// std::uniform_real_distribution and std::normal_distribution are implementation-defined).
#pragma once

#include <cmath>
#include <cstdint>
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

/// 53-bit uniform in (0, 1] (never 0, so that log() is finite).
inline double uniform_open_closed(std::uint64_t bits) {
  return static_cast<double>((bits >> 11) + 1) * 0x1.0p-53;
}

/// Standard normal numbers from std::mt19937_64 by the Box-Muller transform (both outputs of each
/// pair used). The sequence is the same on every platform, unlike std::normal_distribution whose
/// algorithm is implementation-defined. It is not PyTorch's generator: to reproduce a torch run,
/// pass its recorded draws explicitly.
class GaussianSource {
 public:
  explicit GaussianSource(std::uint64_t seed) : engine_(seed) {}

  double operator()() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    const double radius = std::sqrt(-2.0 * std::log(uniform_open_closed(engine_())));
    const double angle = 2.0 * std::numbers::pi * uniform_open_closed(engine_());
    spare_ = radius * std::sin(angle);
    has_spare_ = true;
    return radius * std::cos(angle);
  }

 private:
  std::mt19937_64 engine_;
  double spare_ = 0.0;
  bool has_spare_ = false;
};

/// SplitMix64's finaliser: a bijective 64-bit mix (Steele, Lea & Flood 2014).
inline std::uint64_t mix64(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

}  // namespace posenc::detail
