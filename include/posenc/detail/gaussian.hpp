// SPDX-License-Identifier: MIT
// Reproducible standard-normal numbers for the random parts of posenc (stochastic positional
// encoding draws, Performer projections): a sequential source over std::mt19937_64 and a
// counter-based one that gives the number at any index without generating the ones before it.
#pragma once

#include <cmath>
#include <cstdint>
#include <numbers>
#include <random>

namespace posenc::detail {

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

/// Counter-based standard normals: element `index` of stream `stream` under `seed`, computed
/// directly (hash of the counters, then Box-Muller; indices 2p and 2p+1 share one pair). Lets a
/// long random sequence be read in any window without storing it.
class CounterGaussian {
 public:
  CounterGaussian(std::uint64_t seed, std::uint64_t stream)
      : key_(mix64(mix64(seed) ^ (stream * 0xD1B54A32D192ED03ULL))) {}

  /// The two normals at indices 2·pair and 2·pair + 1.
  void pair(std::uint64_t pair_index, double& even, double& odd) const {
    const std::uint64_t h1 = mix64(key_ ^ mix64(pair_index));
    const std::uint64_t h2 = mix64(h1 ^ 0xA0761D6478BD642FULL);
    const double radius = std::sqrt(-2.0 * std::log(uniform_open_closed(h1)));
    const double angle = 2.0 * std::numbers::pi * uniform_open_closed(h2);
    even = radius * std::cos(angle);
    odd = radius * std::sin(angle);
  }

  double operator()(std::uint64_t index) const {
    double even = 0.0;
    double odd = 0.0;
    pair(index / 2, even, odd);
    return index % 2 == 0 ? even : odd;
  }

  /// Writes elements first … first+count−1 to out[0], out[stride], … (each pair hashed once).
  template <class Scalar>
  void fill(std::uint64_t first, std::int64_t count, Scalar* out, std::int64_t stride) const {
    std::int64_t i = 0;
    if (count > 0 && first % 2 == 1) {
      out[0] = static_cast<Scalar>((*this)(first));
      i = 1;
    }
    for (; i + 1 < count; i += 2) {
      double even = 0.0;
      double odd = 0.0;
      pair((first + static_cast<std::uint64_t>(i)) / 2, even, odd);
      out[i * stride] = static_cast<Scalar>(even);
      out[(i + 1) * stride] = static_cast<Scalar>(odd);
    }
    if (i < count)
      out[i * stride] = static_cast<Scalar>((*this)(first + static_cast<std::uint64_t>(i)));
  }

 private:
  std::uint64_t key_;
};

}  // namespace posenc::detail
