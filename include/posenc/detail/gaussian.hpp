// SPDX-License-Identifier: MIT
// Counter-based standard-normal numbers for long random sequences (stochastic positional encoding
// draws generated on demand): the number at any index without generating the ones before it.
// The sequential sources live in detail/random.hpp.
#pragma once

#include <cmath>
#include <cstdint>
#include <numbers>
#include <random>

#include <Eigen/Core>

#include "posenc/detail/random.hpp"

namespace posenc::detail {

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
    for (std::uint64_t pair = first / 2; pair <= last / 2; pair += pairs_per_draw) {
      block(pair, even, odd);
      for (int i = 0; i < pairs_per_draw; ++i) {
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
  static constexpr int pairs_per_draw = 16;
  using Block = Eigen::Array<double, pairs_per_draw, 1>;

  /// Pairs first_pair … first_pair + 15.
  void block(std::uint64_t first_pair, Block& even, Block& odd) const {
    Block uniform;
    Eigen::Array<float, pairs_per_draw, 1> angle;
    for (int i = 0; i < pairs_per_draw; ++i) {
      const std::uint64_t h1 = mix64(key_ ^ mix64(first_pair + static_cast<std::uint64_t>(i)));
      const std::uint64_t h2 = mix64(h1 ^ 0xA0761D6478BD642FULL);
      uniform[i] = uniform_open_closed(h1);
      angle[i] = static_cast<float>(h2 >> 40) * 0x1.0p-24f * (2.0f * std::numbers::pi_v<float>);
    }
    const Block radius = (-2.0 * uniform.log()).sqrt();
    // Evaluated in float first: a cast inside the expression would fall back to scalar cos/sin.
    const Eigen::Array<float, pairs_per_draw, 1> cosine = angle.cos();
    const Eigen::Array<float, pairs_per_draw, 1> sine = angle.sin();
    even = radius * cosine.cast<double>();
    odd = radius * sine.cast<double>();
  }

  std::uint64_t key_;
};

}  // namespace posenc::detail
