// SPDX-License-Identifier: MIT
// KERPLE: kernelized relative positional embedding, a learned per-head conditionally positive
// definite kernel of the distance (logarithmic or power), with the authors' parameter clamps.
#pragma once

#include <array>
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
/// - Training: the learnable parameters are the raw values as passed (raw_r1(), raw_r2(); r1()
///   and r2() are the clamped ones the bias uses). Gradient::r1, r2 are ∂L/∂raw: ∂L/∂clamped
///   where the raw value lies inside the clamp range (bounds included), 0 where it is clamped
///   (torch.clamp's backward). An optimiser steps the raw values and rebuilds the encoder.
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
      : kernel_(kernel), raw_r1_(std::move(r1)), raw_r2_(std::move(r2)), form_(form) {
    constexpr const char* fn = "posenc::Kerple";
    detail::require(raw_r1_.size() >= 1 && raw_r1_.size() == raw_r2_.size(), fn,
                    "r1 and r2 must have one entry per head, got ", raw_r1_.size(), " and ",
                    raw_r2_.size());
    const auto require_finite = [&](const char* name, const Vector<double>& values) {
      for (Index h = 0; h < values.size(); ++h) {
        detail::require(std::isfinite(values[h]), fn, "parameters must be finite, got ", name, "[",
                        h, "] = ", values[h], " (head ", h, ")");
      }
    };
    require_finite("r1", raw_r1_);
    require_finite("r2", raw_r2_);
    r1_ = raw_r1_.cwiseMax(minimum_parameter);
    r2_ = raw_r2_.cwiseMax(minimum_parameter);
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
  /// The parameters after clamping (what the bias uses).
  const Vector<double>& r1() const { return r1_; }
  const Vector<double>& r2() const { return r2_; }
  /// The parameters as passed, before clamping: the learnable ones (Gradient is w.r.t. these).
  const Vector<double>& raw_r1() const { return raw_r1_; }
  const Vector<double>& raw_r2() const { return raw_r2_; }

  /// ∂L/∂raw_r1 and ∂L/∂raw_r2, [heads] each (HasLearnableParameters).
  struct Gradient {
    Vector<double> r1;
    Vector<double> r2;
    Gradient& operator+=(const Gradient& other) {
      r1 += other.r1;
      r2 += other.r2;
      return *this;
    }
    void set_zero() {
      r1.setZero();
      r2.setZero();
    }
  };
  Gradient zero_gradient() const {
    return {Vector<double>::Zero(heads()), Vector<double>::Zero(heads())};
  }

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

  /// Adds Σ_{r,c} dbias(r, c)·∂B_h/∂raw_r1,2 to gradient.r1[head], r2[head] (LearnableScoreBias):
  ///   log:   ∂B/∂r1 = −log(1 + r2·δ),   ∂B/∂r2 = −r1·δ / (1 + r2·δ)
  ///   power: ∂B/∂r1 = −δ^r2,            ∂B/∂r2 = −r1·δ^r2·log δ   (0 at δ = 0)
  /// at the clamped r1, r2, times 1 where the raw value is inside its clamp range and 0 where
  /// clamped. dbias is first reduced to one sum per distance; the derivatives are evaluated once
  /// per distance, in double. Unchecked head and shapes.
  void accumulate_bias_gradient(Index head, Positions query_positions, Positions key_positions,
                                ConstTileRef<T> dbias, Gradient& gradient) const {
    const double raw1 = raw_r1_[head];
    const double raw2 = raw_r2_[head];
    const bool pass_r1 = raw1 >= minimum_parameter;
    const bool pass_r2 =
        raw2 >= minimum_parameter && (kernel_ == KerpleKernel::log || raw2 <= maximum_exponent);
    if (!pass_r1 && !pass_r2) return;
    const double r1 = r1_[head];
    const double r2 = r2_[head];
    double d_r1 = 0.0;
    double d_r2 = 0.0;
    using Array = Eigen::Array<double, Eigen::Dynamic, 1>;
    using Map = Eigen::Map<Array>;
    alignas(64) std::array<double, 2 * detail::distance_chunk - 1> distance;
    alignas(64) std::array<double, 2 * detail::distance_chunk - 1> term;
    detail::reduce_distance_gradient<T>(
        query_positions, key_positions, dbias, [&](Index top, Index count, const double* sums) {
          const Eigen::Map<const Array> s(sums, count);
          detail::form_distances(form_, top, count, distance.data());
          Map delta(distance.data(), count);
          Map t(term.data(), count);
          if (kernel_ == KerpleKernel::log) {
            t = r2 * delta;
            detail::log1p_in_place(term.data(), count);  // t = log(1 + r2·δ)
            d_r1 -= (s * t).sum();
            d_r2 -= r1 * (s * delta / (1.0 + r2 * delta)).sum();
          } else {
            t = (delta > 0.0).select((r2 * delta.log()).exp(), 0.0);  // δ^r2 (0^r2 = 0)
            delta = (delta > 0.0).select(delta.log(), 0.0);           // log δ (0 at δ = 0)
            d_r1 -= (s * t).sum();
            d_r2 -= r1 * (s * t * delta).sum();
          }
        });
    if (pass_r1) gradient.r1[head] += d_r1;
    if (pass_r2) gradient.r2[head] += d_r2;
  }

 private:
  double value(Index head, Index query_minus_key) const {
    const double distance = static_cast<double>(detail::form_distance(form_, query_minus_key));
    if (kernel_ == KerpleKernel::log) return -r1_[head] * std::log1p(r2_[head] * distance);
    return -r1_[head] * std::pow(distance, r2_[head]);
  }

  KerpleKernel kernel_;
  Vector<double> raw_r1_;
  Vector<double> raw_r2_;
  Vector<double> r1_;
  Vector<double> r2_;
  BiasForm form_;
};

static_assert(DistanceBias<Kerple<float>>);
static_assert(ScoreBias<Kerple<float>>);
static_assert(ScoreBias<Kerple<double>>);
static_assert(LearnableScoreBias<Kerple<float>>);
static_assert(LearnableScoreBias<Kerple<double>>);

}  // namespace posenc
