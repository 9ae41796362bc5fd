// SPDX-License-Identifier: MIT
// Reproducible standard-normal numbers for the random parts of posenc (stochastic positional
// encoding draws, Performer projections): a sequential source over std::mt19937_64 and a
// counter-based one that gives the number at any index without generating the ones before it.
#pragma once

#include <cmath>
#include <cstdint>
#include <numbers>
#include <random>

#include <Eigen/Core>

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
/// directly (hash of the counters, then Box-Muller; indices 2p and 2p+1 share pair p). Lets a
/// long random sequence be read in any window without storing it. The Box-Muller step runs on
/// fixed blocks of 16 pairs with Eigen's vectorised log/cos/sin (radius in double, angle in
/// float), so every element takes the same arithmetic path and a window never depends on where
/// it starts; values are reproducible for a given build (vectorised math may differ by an ulp
/// across instruction sets).
class CounterGaussian {
 public:
  CounterGaussian(std::uint64_t seed, std::uint64_t stream)
      : key_(mix64(mix64(seed) ^ (stream * 0xD1B54A32D192ED03ULL))) {}

  /// Writes elements first … first+count−1 to out[0], out[stride], ….
  template <class Scalar>
  void fill(std::uint64_t first, std::int64_t count, Scalar* out, std::int64_t stride) const {
    if (count <= 0) return;
    const std::uint64_t last = first + static_cast<std::uint64_t>(count) - 1;
    Block even;
    Block odd;
    for (std::uint64_t pair = first / 2; pair <= last / 2; pair += kPairs) {
      block(pair, even, odd);
      for (int i = 0; i < kPairs; ++i) {
        const std::uint64_t index = 2 * (pair + static_cast<std::uint64_t>(i));
        if (index >= first && index <= last) {
          out[static_cast<std::int64_t>(index - first) * stride] = static_cast<Scalar>(even[i]);
        }
        if (index + 1 >= first && index + 1 <= last) {
          out[static_cast<std::int64_t>(index + 1 - first) * stride] = static_cast<Scalar>(odd[i]);
        }
      }
    }
  }

  /// Element `index` alone.
  double operator()(std::uint64_t index) const {
    double value = 0.0;
    fill(index, 1, &value, 1);
    return value;
  }

 private:
  static constexpr int kPairs = 16;
  using Block = Eigen::Array<double, kPairs, 1>;

  /// Pairs first_pair … first_pair + 15.
  void block(std::uint64_t first_pair, Block& even, Block& odd) const {
    Block uniform;
    Eigen::Array<float, kPairs, 1> angle;
    for (int i = 0; i < kPairs; ++i) {
      const std::uint64_t h1 = mix64(key_ ^ mix64(first_pair + static_cast<std::uint64_t>(i)));
      const std::uint64_t h2 = mix64(h1 ^ 0xA0761D6478BD642FULL);
      uniform[i] = uniform_open_closed(h1);
      angle[i] = static_cast<float>(h2 >> 40) * 0x1.0p-24f * (2.0f * std::numbers::pi_v<float>);
    }
    const Block radius = (-2.0 * uniform.log()).sqrt();
    // Evaluated in float first: a cast inside the expression would fall back to scalar cos/sin.
    const Eigen::Array<float, kPairs, 1> cosine = angle.cos();
    const Eigen::Array<float, kPairs, 1> sine = angle.sin();
    even = radius * cosine.cast<double>();
    odd = radius * sine.cast<double>();
  }

  std::uint64_t key_;
};

}  // namespace posenc::detail
