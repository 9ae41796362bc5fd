// SPDX-License-Identifier: MIT
// Reproducible benchmark inputs: uniform random heads from a fixed seed, made outside the timed
// loop, so every benchmark of one shape sees the same numbers.
#pragma once

#include <cstdint>
#include <random>

#include "posenc/tensor.hpp"

namespace posenc::bench {

/// [heads, rows, dim] with entries uniform in [-1, 1), from std::mt19937_64(seed).
template <class Scalar>
Heads<Scalar> random_heads(Index heads, Index rows, Index dim, std::uint64_t seed) {
  Heads<Scalar> x(heads, rows, dim);
  std::mt19937_64 engine(seed);
  std::uniform_real_distribution<double> uniform(-1.0, 1.0);
  for (auto& value : x.flat()) value = static_cast<Scalar>(uniform(engine));
  return x;
}

/// q, k, v of self-attention ([H, N, D] each, seeds 1, 2, 3) and a preallocated output.
template <class Scalar>
struct AttentionInputs {
  Heads<Scalar> q, k, v, out;

  AttentionInputs(Index heads, Index rows, Index dim)
      : q(random_heads<Scalar>(heads, rows, dim, 1)),
        k(random_heads<Scalar>(heads, rows, dim, 2)),
        v(random_heads<Scalar>(heads, rows, dim, 3)),
        out(heads, rows, dim) {}
};

/// q, k, v [heads, rows, dim] with standard normal entries, drawn in that order from one
/// std::mt19937_64(seed) (the DAPE and bias benchmarks' inputs).
struct NormalQkv {
  Heads<float> q, k, v;
};

inline NormalQkv normal_qkv(Index heads, Index rows, Index dim, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  NormalQkv in{Heads<float>(heads, rows, dim), Heads<float>(heads, rows, dim),
               Heads<float>(heads, rows, dim)};
  for (Heads<float>* h : {&in.q, &in.k, &in.v}) {
    for (Index i = 0; i < h->flat().size(); ++i) h->flat()[i] = normal(rng);
  }
  return in;
}

}  // namespace posenc::bench
