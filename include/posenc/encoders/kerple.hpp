// SPDX-License-Identifier: MIT
// KERPLE: kernelized relative positional embedding, a learned per-head conditionally positive
// definite kernel of the distance (logarithmic or power), with the authors' parameter clamps.
#pragma once

#include <cmath>
#include <random>
#include <utility>

#include "posenc/detail/check.hpp"
#include "posenc/detail/random.hpp"
#include "posenc/encoders/distance_bias.hpp"
#include "posenc/encoding.hpp"
#include "posenc/tensor.hpp"

namespace posenc {

/// The two KERPLE kernels of the paper's experiments.
enum class KerpleKernel {
  log,   // B = −r1 · log(1 + r2 · δ)       (`kerple_log`; the only one in the DAPE code)
  power  // B = −r1 · δ^r2, 0 < r2 <= 2     (`kerple_power_ap_`)
};

/// KERPLE (Chi, Fan, Ramadge & Rudnicky 2022, arXiv 2205.09921): a ScoreBias
///
///   log:   B_h(i, j) = −r1_h · log(1 + r2_h · δ)      power:  B_h(i, j) = −r1_h · δ^r2_h
///
/// with δ = max(i − j, 0) (BiasForm::causal, the `tril(i − j)` of chijames/KERPLE and of the DAPE
/// code: future keys get the δ = 0 bias, 0, and are masked) or |i − j| (symmetric, the paper's
/// kernels), added to the scaled logits.
/// - r1, r2: [heads] each, learned. Clamped here as the reference clamps them in place before
///   every use: r1, r2 >= 0.01, and the power exponent r2 <= 2 (so a value set below 0.01
///   behaves as 0.01). The reference names swap roles: ParallelKerpleLog's `bias_p` is r1 and
///   `bias_a` is r2; ParallelKerplePower's `bias_a` is r1 and `bias_p` is r2.
/// - Evaluated in double (log1p, pow) and cast to Scalar last; one evaluation per distinct
///   distance of a tile, the log kernel's vectorised (detail::log1p_in_place). Matches golden
///   kerple.json (log, power, decode row) and DAPE's `ParallelKerpleLog`.
/// - Example: examples/relative_biases.cpp.
template <class T>
class Kerple {
 public:
  using Scalar = T;
  /// B_h(i, j) is a function of i − j (DistanceBias).
  static constexpr bool depends_only_on_distance = true;

  /// The reference's clamp: every parameter is at least this.
  static constexpr double minimum_parameter = 0.01;
  /// The reference's upper clamp of the power exponent r2.
  static constexpr double maximum_exponent = 2.0;

  /// Throws when r1 and r2 differ in size, are empty, or hold a non-finite value (the message
  /// names the parameter, head and value).
  Kerple(KerpleKernel kernel, Vector<double> r1, Vector<double> r2,
         BiasForm form = BiasForm::causal)
      : kernel_(kernel), r1_(std::move(r1)), r2_(std::move(r2)), form_(form) {
    constexpr const char* fn = "posenc::Kerple";
    detail::require(r1_.size() >= 1 && r1_.size() == r2_.size(), fn,
                    "r1 and r2 must have one entry per head, got ", r1_.size(), " and ",
                    r2_.size());
    const auto require_finite = [&](const char* name, const Vector<double>& values) {
      for (Index h = 0; h < values.size(); ++h) {
        detail::require(std::isfinite(values[h]), fn, "parameters must be finite, got ", name, "[",
                        h, "] = ", values[h], " (head ", h, ")");
      }
    };
    require_finite("r1", r1_);
    require_finite("r2", r2_);
    r1_ = r1_.cwiseMax(minimum_parameter);
    r2_ = r2_.cwiseMax(minimum_parameter);
    if (kernel_ == KerpleKernel::power) r2_ = r2_.cwiseMin(maximum_exponent);
  }

  /// The reference initialisation (chijames/KERPLE and DAPE, from `rng`, documented draws of
  /// detail::uniform01): the `*_p` parameter ~ 2·U[0, 1), the `*_a` parameter ~ U[0, 1). So log:
  /// r1 ~ U[0, 2), r2 ~ U[0, 1); power: r1 ~ U[0, 1), r2 ~ U[0, 2). Per head, r1 then r2.
  static Kerple random(KerpleKernel kernel, Index heads, std::mt19937_64& rng,
                       BiasForm form = BiasForm::causal) {
    detail::require(heads >= 1, "posenc::Kerple::random", "heads must be >= 1, got ", heads);
    const double r1_scale = kernel == KerpleKernel::log ? 2.0 : 1.0;
    const double r2_scale = kernel == KerpleKernel::log ? 1.0 : 2.0;
    Vector<double> r1(heads);
    Vector<double> r2(heads);
    for (Index h = 0; h < heads; ++h) {
      r1[h] = r1_scale * detail::uniform01(rng);
      r2[h] = r2_scale * detail::uniform01(rng);
    }
    return Kerple(kernel, std::move(r1), std::move(r2), form);
  }

  Index heads() const { return r1_.size(); }
  KerpleKernel kernel() const { return kernel_; }
  BiasForm form() const { return form_; }
  /// The parameters after clamping.
  const Vector<double>& r1() const { return r1_; }
  const Vector<double>& r2() const { return r2_; }

  /// B_h(i, j) for query position i and key position j. Unchecked head.
  T bias(Index head, Index i, Index j) const { return static_cast<T>(value(head, i - j)); }

  /// Adds B_h(query_positions[r], key_positions[c]) to tile(r, c).
  void add_bias(Index head, Positions query_positions, Positions key_positions,
                TileRef<T> tile) const {
    const double r1 = r1_[head];
    const double r2 = r2_[head];
    detail::add_distance_bias<T>(query_positions, key_positions, tile,
                                 [&](Index top, Index count, double* out) {
                                   detail::form_distances(form_, top, count, out);
                                   if (kernel_ == KerpleKernel::log) {
                                     for (Index m = 0; m < count; ++m) out[m] *= r2;
                                     detail::log1p_in_place(out, count);
                                     for (Index m = 0; m < count; ++m) out[m] *= -r1;
                                   } else {
                                     for (Index m = 0; m < count; ++m)
                                       out[m] = -r1 * std::pow(out[m], r2);
                                   }
                                 });
  }

 private:
  double value(Index head, Index query_minus_key) const {
    const double distance = static_cast<double>(detail::form_distance(form_, query_minus_key));
    if (kernel_ == KerpleKernel::log) return -r1_[head] * std::log1p(r2_[head] * distance);
    return -r1_[head] * std::pow(distance, r2_[head]);
  }

  KerpleKernel kernel_;
  Vector<double> r1_;
  Vector<double> r2_;
  BiasForm form_;
};

static_assert(DistanceBias<Kerple<float>>);
static_assert(ScoreBias<Kerple<float>>);
static_assert(ScoreBias<Kerple<double>>);

}  // namespace posenc
