// SPDX-License-Identifier: MIT
// Shared test helpers: tolerance per scalar, a reproducible seed, random inputs and comparisons
// that never let NaN pass.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "posenc/tensor.hpp"

namespace posenc::test {

/// The scalar types every typed test runs over.
using Scalars = ::testing::Types<float, double>;

/// Relative tolerance of the streaming kernel against the reference (the project's contract):
/// 1e-5 in float (~84 eps) and 1e-12 in double (~4500 eps), room for the different summation
/// order of tiled GEMMs and the online softmax over a few thousand keys.
template <class Scalar>
struct Tolerance;
template <>
struct Tolerance<float> {
  static constexpr double kernel = 1e-5;
};
template <>
struct Tolerance<double> {
  static constexpr double kernel = 1e-12;
};

/// Positions first, first + 1, …, first + count − 1.
inline std::vector<Index> iota(Index count, Index first = 0) {
  std::vector<Index> positions(static_cast<std::size_t>(count));
  for (Index r = 0; r < count; ++r) positions[static_cast<std::size_t>(r)] = first + r;
  return positions;
}

/// Seed of a randomised test: POSENC_TEST_SEED if set, else a fixed default. Printed once so a
/// failure can be replayed.
inline std::uint64_t test_seed() {
  static const std::uint64_t seed = [] {
    std::uint64_t s = 20261123;
    if (const char* env = std::getenv("POSENC_TEST_SEED")) s = std::strtoull(env, nullptr, 10);
    std::cout << "[posenc] POSENC_TEST_SEED=" << s << "\n";
    return s;
  }();
  return seed;
}

/// A generator for one test: the global seed mixed with a per-test salt.
inline std::mt19937_64 make_rng(std::uint64_t salt) {
  return std::mt19937_64(test_seed() * 0x9E3779B97F4A7C15ULL + salt);
}

/// [heads, rows, dim] with entries from N(0, 1).
template <class Scalar>
Heads<Scalar> random_heads(Index heads, Index rows, Index dim, std::mt19937_64& rng) {
  Heads<Scalar> x(heads, rows, dim);
  std::normal_distribution<double> normal;
  for (Index i = 0; i < x.flat().size(); ++i) x.flat()[i] = static_cast<Scalar>(normal(rng));
  return x;
}

/// max |a - b| / max(1, max |b|), or +inf when either side has a non-finite entry.
template <class A, class B>
double relative_error(const A& a, const B& b) {
  if (!a.allFinite() || !b.allFinite()) return std::numeric_limits<double>::infinity();
  if (a.size() != b.size()) return std::numeric_limits<double>::infinity();
  if (a.size() == 0) return 0.0;
  const double diff = (a.template cast<double>() - b.template cast<double>()).cwiseAbs().maxCoeff();
  const double scale = std::max(1.0, b.template cast<double>().cwiseAbs().maxCoeff());
  return diff / scale;
}

/// For results that may hold NaN or Inf on purpose: +inf when a and b differ in which entries are
/// finite, else max |a - b| / max(1, max |b|) over the finite entries.
template <class A, class B>
double finite_part_error(const A& a, const B& b) {
  if (a.size() != b.size()) return std::numeric_limits<double>::infinity();
  double diff = 0.0;
  double scale = 1.0;
  for (Index i = 0; i < a.size(); ++i) {
    const double x = static_cast<double>(a(i));
    const double y = static_cast<double>(b(i));
    if (std::isfinite(x) != std::isfinite(y)) return std::numeric_limits<double>::infinity();
    if (!std::isfinite(x)) continue;
    diff = std::max(diff, std::fabs(x - y));
    scale = std::max(scale, std::fabs(y));
  }
  return diff / scale;
}

/// Normalised mean squared error sum (a-b)^2 / sum b^2 (ggml's backend comparison).
template <class A, class B>
double nmse(const A& a, const B& b) {
  if (!a.allFinite() || !b.allFinite()) return std::numeric_limits<double>::infinity();
  const double den = b.template cast<double>().squaredNorm();
  const double num = (a.template cast<double>() - b.template cast<double>()).squaredNorm();
  return den == 0.0 ? num : num / den;
}

/// Expects `statement` to throw std::invalid_argument whose message contains every fragment.
#define POSENC_EXPECT_INVALID(statement, ...)                                                \
  do {                                                                                       \
    bool posenc_thrown_ = false;                                                             \
    try {                                                                                    \
      statement;                                                                             \
    } catch (const std::invalid_argument& posenc_error_) {                                   \
      posenc_thrown_ = true;                                                                 \
      const std::string posenc_message_ = posenc_error_.what();                              \
      for (const char* posenc_fragment_ : {__VA_ARGS__}) {                                   \
        EXPECT_NE(posenc_message_.find(posenc_fragment_), std::string::npos)                 \
            << "message \"" << posenc_message_ << "\" lacks \"" << posenc_fragment_ << "\""; \
      }                                                                                      \
    }                                                                                        \
    EXPECT_TRUE(posenc_thrown_) << #statement " did not throw std::invalid_argument";        \
  } while (false)

}  // namespace posenc::test
