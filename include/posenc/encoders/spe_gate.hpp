// SPDX-License-Identifier: MIT
// The gate of stochastic positional encoding (SPEFilter(gated=True)): mixes the positional code
// with position-free noise shared by queries and keys, so that each feature learns how much
// positional information it carries. Used by SineSpe and ConvSpe.
#pragma once

#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "posenc/detail/check.hpp"
#include "posenc/detail/random.hpp"
#include "posenc/tensor.hpp"

namespace posenc {

/// Which side of the gate σ = sigmoid(gate) weighs: PyTorch's SPEFilter puts sqrt(1 − σ) on the
/// code and sqrt(σ) on the noise; the JAX SPEGate the opposite.
enum class SpeGateConvention { pytorch, jax };

/// Gating of stochastic PE (Liutkus et al. 2021, arXiv 2105.08399; aliutkus/spe
/// `SPEFilter(gated=True)`):
///
///   Q̄'[m,h,d,r] = sqrt(1 − σ_hd)·Q̄[m,h,d,r] + sqrt(σ_hd)·ε[h,d,r],   likewise K̄' with the SAME ε
///
/// with σ = sigmoid(gate) and ε = noise/(D·R)^(1/4). ε is one draw per sequence, shared by queries,
/// keys and every position, so it adds the lag-independent term σ_hd to the expected kernel.
/// Shapes: gate [H, D] (raw parameters), noise [H, D, R] standard normal (golden key
/// `gating_noise_raw_standard_normal`). Matches spe_sine.json / spe_conv.json "gated".
template <class Real>
class SpeGate {
 public:
  using Scalar = Real;

  /// Explicit noise (e.g. recorded from the reference).
  SpeGate(Matrix<Real> gate, Heads<Real> noise,
          SpeGateConvention convention = SpeGateConvention::pytorch)
      : gate_(std::move(gate)), noise_(std::move(noise)), convention_(convention) {
    constexpr const char* fn = "posenc::SpeGate";
    detail::require(gate_.rows() >= 1 && gate_.cols() >= 1, fn,
                    "gate must be [heads >= 1, dim >= 1], got [", gate_.rows(), ", ", gate_.cols(),
                    "]");
    detail::require(noise_.heads() == gate_.rows() && noise_.rows() == gate_.cols(), fn,
                    "noise must be [heads, dim, R] = [", gate_.rows(), ", ", gate_.cols(),
                    ", R], got [", noise_.heads(), ", ", noise_.rows(), ", ", noise_.dim(), "]");
    detail::require(noise_.dim() >= 1, fn, "the number of realizations R must be >= 1, got ",
                    noise_.dim());
    detail::require(gate_.allFinite() && noise_.flat().allFinite(), fn,
                    "gate and noise must be finite");
    const double scale = noise_scale();
    noise_code_.resize(static_cast<std::size_t>(heads()));
    for (Index h = 0; h < heads(); ++h) {
      Matrix<Real>& code = noise_code_[static_cast<std::size_t>(h)];
      code.resize(dim(), realizations());
      for (Index d = 0; d < dim(); ++d) {
        code.row(d) = noise_.head(h).row(d) * static_cast<Real>(noise_weight(h, d) * scale);
      }
    }
  }

  /// Fresh noise ε ~ N(0, 1)^[H, D, R] from `seed` (posenc's generator, not torch's).
  static SpeGate sample(Matrix<Real> gate, Index realizations, std::uint64_t seed,
                        SpeGateConvention convention = SpeGateConvention::pytorch) {
    detail::require(realizations >= 1, "posenc::SpeGate::sample",
                    "the number of realizations R must be >= 1, got ", realizations);
    Heads<Real> noise(gate.rows(), gate.cols(), realizations);
    detail::GaussianSource normal(seed);
    for (Index i = 0; i < noise.flat().size(); ++i) noise.flat()[i] = static_cast<Real>(normal());
    return SpeGate(std::move(gate), std::move(noise), convention);
  }

  Index heads() const { return gate_.rows(); }
  Index dim() const { return gate_.cols(); }
  Index realizations() const { return noise_.dim(); }
  SpeGateConvention convention() const { return convention_; }
  const Matrix<Real>& gate() const { return gate_; }
  const Heads<Real>& noise() const { return noise_; }

  /// σ_hd = sigmoid(gate[h, d]).
  double sigma(Index h, Index d) const {
    return 1.0 / (1.0 + std::exp(-static_cast<double>(gate_(h, d))));
  }
  /// The factor on the positional code: sqrt(1 − σ) (pytorch) or sqrt(σ) (jax).
  double code_weight(Index h, Index d) const {
    return std::sqrt(convention_ == SpeGateConvention::pytorch ? 1.0 - sigma(h, d) : sigma(h, d));
  }
  /// The factor on the noise: sqrt(σ) (pytorch) or sqrt(1 − σ) (jax).
  double noise_weight(Index h, Index d) const {
    return std::sqrt(convention_ == SpeGateConvention::pytorch ? sigma(h, d) : 1.0 - sigma(h, d));
  }
  /// The noise part of head h's code, [D, R]: noise_weight(h, d)·ε[h, d, r].
  const Matrix<Real>& noise_code(Index h) const { return noise_code_[static_cast<std::size_t>(h)]; }
  /// The factor (D·R)^(−1/4) of ε = noise·(D·R)^(−1/4).
  double noise_scale() const {
    return std::pow(static_cast<double>(dim() * realizations()), -0.25);
  }

  /// Backward: ∂L/∂gate[h, d] given ∂L/∂code_weight(h, d) and ∂L/∂noise_weight(h, d). With
  /// σ' = σ(1 − σ): d sqrt(1 − σ)/dgate = −σ·sqrt(1 − σ)/2 and d sqrt(σ)/dgate = (1 − σ)·sqrt(σ)/2
  /// (the roles swap with the JAX convention).
  double gate_gradient(Index h, Index d, double d_code_weight, double d_noise_weight) const {
    const double s = sigma(h, d);
    const double code = code_weight(h, d);
    const double noise = noise_weight(h, d);
    if (convention_ == SpeGateConvention::pytorch) {
      return 0.5 * (-s * code * d_code_weight + (1.0 - s) * noise * d_noise_weight);
    }
    return 0.5 * ((1.0 - s) * code * d_code_weight - s * noise * d_noise_weight);
  }

 private:
  Matrix<Real> gate_;
  Heads<Real> noise_;
  SpeGateConvention convention_;
  std::vector<Matrix<Real>> noise_code_;
};

}  // namespace posenc
