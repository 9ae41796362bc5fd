// SPDX-License-Identifier: MIT
// The compute ceiling an attention kernel is judged against: per head, the GEMM pair
// S = Q·Kᵀ (N×D · D×M) then O = S·V (N×M · M×Dv), single-threaded Eigen on preallocated buffers.
// Its rate (FLOP/s, by wall and by thread CPU time) is measured once per shape and scalar in the
// running process and cached, so every kernel row can report ratio_to_ceiling against the same
// machine, state and build.
#pragma once

#include <Eigen/Core>
#include <compare>
#include <map>

#include "posenc/tensor.hpp"
#include "support/inputs.hpp"
#include "support/timing.hpp"

namespace posenc::bench {

/// Sets Eigen's thread count for a scope (Eigen parallelises large products with OpenMP).
class EigenThreads {
 public:
  explicit EigenThreads(int threads) : saved_(Eigen::nbThreads()) { Eigen::setNbThreads(threads); }
  ~EigenThreads() { Eigen::setNbThreads(saved_); }
  EigenThreads(const EigenThreads&) = delete;
  EigenThreads& operator=(const EigenThreads&) = delete;

 private:
  int saved_;
};

struct GemmPairShape {
  Index heads, queries, keys, dim, value_dim;

  /// FLOPs of one run: heads · (2·N·M·D + 2·N·M·Dv), every pair counted.
  double flops() const {
    return static_cast<double>(heads) * static_cast<double>(queries) * static_cast<double>(keys) *
           2.0 * static_cast<double>(dim + value_dim);
  }
  friend auto operator<=>(const GemmPairShape&, const GemmPairShape&) = default;
};

/// The two products of attention without softmax, on buffers allocated once.
template <class Scalar>
class GemmPair {
 public:
  explicit GemmPair(const GemmPairShape& shape)
      : q_(random_heads<Scalar>(shape.heads, shape.queries, shape.dim, 11)),
        k_(random_heads<Scalar>(shape.heads, shape.keys, shape.dim, 12)),
        v_(random_heads<Scalar>(shape.heads, shape.keys, shape.value_dim, 13)),
        out_(shape.heads, shape.queries, shape.value_dim),
        scores_(shape.queries, shape.keys) {}

  /// One run over every head, single-threaded whatever Eigen's global setting.
  void run() {
    const EigenThreads one(1);
    for (Index h = 0; h < q_.heads(); ++h) {
      scores_.noalias() = q_.head(h) * k_.head(h).transpose();
      out_.head(h).noalias() = scores_ * v_.head(h);
    }
  }

  const Heads<Scalar>& output() const { return out_; }

 private:
  Heads<Scalar> q_, k_, v_, out_;
  Matrix<Scalar> scores_;
};

/// FLOP/s of the single-threaded GEMM pair: by wall time and by the CPU time of the thread.
struct FlopRate {
  double wall;
  double cpu;
};

/// FLOP/s of the GEMM pair of `shape` (best of a few timed runs), measured the first time a
/// shape and scalar are asked for, then cached for the rest of the process.
template <class Scalar>
FlopRate gemm_pair_rate(const GemmPairShape& shape) {
  static std::map<GemmPairShape, FlopRate> cache;
  const auto found = cache.find(shape);
  if (found != cache.end()) return found->second;
  GemmPair<Scalar> pair(shape);
  const Seconds best = best_seconds([&] { pair.run(); });
  const FlopRate rate{shape.flops() / best.wall, shape.flops() / best.cpu};
  cache.emplace(shape, rate);
  return rate;
}

}  // namespace posenc::bench
