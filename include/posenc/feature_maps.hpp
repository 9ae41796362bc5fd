// SPDX-License-Identifier: MIT
// The positive feature maps of linear attention: elu + 1, ReLU + ε, and Performer's FAVOR+
// random features. Each models the FeatureMap contract of encoding.hpp (FAVOR+ also its
// StabilizedFeatureMap hook); a user's own map plugs in the same way.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>

#include <Eigen/QR>

#include "posenc/detail/check.hpp"
#include "posenc/detail/gaussian.hpp"
#include "posenc/encoding.hpp"
#include "posenc/tensor.hpp"

namespace posenc {

namespace detail {

/// out = x where x is NaN (elementwise): a feature map's NaN input stays NaN in its output
/// (the input policy), whichever vector width Eigen's select/min/max took.
template <class In, class Out>
void keep_nan(const In& x, Out& out) {
  out = x.isNaN().select(x, out.array()).matrix();
}

}  // namespace detail

/// φ(x) = elu(x) + 1 elementwise (x + 1 for x > 0, eˣ otherwise); F = D.
/// Katharopoulos et al. 2020, "Transformers are RNNs" (arXiv 2006.16236); fast-transformers'
/// "linear" and "causal-linear" attention. Matches the `causal_linear_elu1_out` goldens.
struct EluPlusOne {
  Index feature_dim(Index dim) const { return dim; }

  /// out = φ(x) (rows × D each): x + 1 where x > 0, else exp(x), vectorised. Exact at the
  /// edges whatever the vector width: φ(−inf) = 0 (a vectorised exp clamps its argument and
  /// would give ~1e−38), φ(NaN) = NaN (a vectorised max/min may drop a NaN).
  template <class In, class Out>
  void features(const In& x, Out&& out) const {
    using Scalar = typename std::remove_cvref_t<Out>::Scalar;
    const auto a = x.array();
    out = (a > Scalar(0))
              .select(a + Scalar(1), (a == -std::numeric_limits<Scalar>::infinity())
                                         .select(Scalar(0), a.min(Scalar(0)).exp()))
              .matrix();
    detail::keep_nan(a, out);
  }

  /// The DifferentiableFeatureMap hook: dx = dfeatures ∘ φ'(x), φ'(x) = 1 for x > 0, eˣ
  /// otherwise (both sides give 1 at 0; 0 at −inf, NaN at NaN, as features()).
  template <class In, class DF, class Out>
  void features_backward(const In& x, const DF& dfeatures, Out&& dx) const {
    using Scalar = typename std::remove_cvref_t<Out>::Scalar;
    const auto a = x.array();
    dx = (dfeatures.array() *
          (a == -std::numeric_limits<Scalar>::infinity()).select(Scalar(0), a.min(Scalar(0)).exp()))
             .matrix();
    detail::keep_nan(a, dx);
  }
};

/// φ(x) = max(x, 0) + epsilon elementwise; F = D. The Long Range Arena "linear_transformer_relu"
/// map (epsilon 1e-3; no temperature, no data normalisation).
struct ReluPlusEpsilon {
  double epsilon = 1e-3;

  Index feature_dim(Index dim) const { return dim; }

  template <class In, class Out>
  void features(const In& x, Out&& out) const {
    using Scalar = typename std::remove_cvref_t<Out>::Scalar;
    const auto a = x.array();
    out = ((a > Scalar(0)).select(a, Scalar(0)) + static_cast<Scalar>(epsilon)).matrix();
    detail::keep_nan(a, out);
  }

  /// The DifferentiableFeatureMap hook: dx = dfeatures where x > 0, else 0 (the kink at 0 takes
  /// the left derivative, as torch's relu does).
  template <class In, class DF, class Out>
  void features_backward(const In& x, const DF& dfeatures, Out&& dx) const {
    using Scalar = typename std::remove_cvref_t<Out>::Scalar;
    const auto a = x.array();
    dx = (a > Scalar(0)).select(dfeatures.array(), Scalar(0)).matrix();
    detail::keep_nan(a, dx);
  }

  /// The ValidatedFeatureMap hook: epsilon must be finite and >= 0.
  void validate(const char* fn, Index /*width*/, bool /*after_transform*/) const {
    detail::require(std::isfinite(epsilon) && epsilon >= 0.0, fn,
                    "ReluPlusEpsilon::epsilon must be finite and >= 0, got ", epsilon);
  }
};

/// Options of the Performer feature map.
struct FavorOptions {
  /// Draw the projection in blocks of D mutually orthogonal rows (Performer's default), each row
  /// rescaled to the norm of an independent Gaussian vector; false: i.i.d. Gaussian rows.
  bool orthogonal = true;
  /// ε added to every feature after the exponential (Performer's `numerical_stabilizer`).
  double stabilizer = 1e-6;
  /// Softmax temperature τ: φ(q)·φ(k) estimates exp(τ·q·k). Default 1/sqrt(D), the usual
  /// 1/sqrt(width) of softmax attention (Performer's D^(−1/4) on each side; fast-transformers'
  /// `softmax_temp`). After stochastic PE, D is the width R of the filtered queries.
  std::optional<double> temperature = std::nullopt;
};

/// Performer's FAVOR+ positive random features for the softmax kernel (Choromanski et al. 2021,
/// "Rethinking Attention with Performers", arXiv 2009.14794; google-research/performer
/// `softmax_kernel_transformation`):
///
///   φ(x) = F^(−1/2) · (exp(ωᵢ·x' − |x'|²/2 − c) + ε)ᵢ,   x' = sqrt(τ)·x,   ω: [F, D] projection
///
/// so that E[φ(q)·φ(k)] ∝ exp(τ·q·k). The stabiliser c is, for a query, the largest ωᵢ·x' of that
/// query; for keys it is one number shared by all keys of a sum: Performer takes the largest ωᵢ·k'
/// over the whole sequence; posenc takes the largest over the keys summed so far (for
/// non-causal attention that is the same number). The running maximum rescales the state when it
/// grows, so causal outputs are exact for any chunking, never depend on later keys, and
/// decoding token by token equals one pass.
template <class Scalar>
class Favor {
 public:
  using value_type = Scalar;

  /// F random features for inputs of width `dim`, drawn from `seed` (posenc's own generator,
  /// detail::GaussianSource: reproducible everywhere, not torch's or JAX's stream).
  Favor(Index dim, Index features, std::uint64_t seed, FavorOptions options = {})
      : Favor(draw_projection(dim, features, seed, options.orthogonal), options) {}

  /// An explicit projection matrix [F, D] (rows ωᵢ), e.g. one exported from a trained model.
  explicit Favor(Matrix<Scalar> projection, FavorOptions options = {})
      : projection_(std::move(projection)), options_(options) {
    constexpr const char* fn = "posenc::Favor";
    detail::require(projection_.rows() >= 1 && projection_.cols() >= 1, fn,
                    "the projection must be [features >= 1, dim >= 1], got [", projection_.rows(),
                    ", ", projection_.cols(), "]");
    detail::require(projection_.allFinite(), fn, "the projection has non-finite entries");
    detail::require(std::isfinite(options.stabilizer) && options.stabilizer >= 0.0, fn,
                    "stabilizer must be finite and >= 0, got ", options.stabilizer);
    const double tau =
        options.temperature.value_or(1.0 / std::sqrt(static_cast<double>(projection_.cols())));
    detail::require(std::isfinite(tau) && tau > 0.0, fn,
                    "temperature must be finite and positive, got ", tau);
    temperature_ = tau;
    scaled_projection_t_ = (projection_ * static_cast<Scalar>(std::sqrt(tau))).transpose();
  }

  Index dim() const { return projection_.cols(); }
  Index features() const { return projection_.rows(); }
  Index feature_dim(Index /*dim*/) const { return features(); }
  const Matrix<Scalar>& projection() const { return projection_; }
  double temperature() const { return temperature_; }
  double stabilizer() const { return options_.stabilizer; }
  /// F^(−1/2), the factor in front of every feature.
  Scalar ratio() const {
    return static_cast<Scalar>(1.0 / std::sqrt(static_cast<double>(features())));
  }

  /// The ValidatedFeatureMap hook: the queries and keys must have the projection's width.
  void validate(const char* fn, Index width, bool after_transform) const {
    detail::require(dim() == width, fn, "the Favor projection has width ", dim(),
                    " but the queries and keys it sees have width ", width,
                    after_transform ? " (after the encoder's transform)" : "");
  }

  /// φ of each row on its own (the FeatureMap contract; each row stabilised by its own maximum).
  /// Linear attention uses the StabilizedFeatureMap hooks below instead.
  template <class In, class Out>
  void features(const In& x, Out&& out) const {
    query_features(x, out);
  }

  /// Query features φ(x) for rows x (rows × D → rows × F), each row stabilised by its own max.
  template <class In, class Out>
  void query_features(const In& x, Out&& out) const {
    out.noalias() = x * scaled_projection_t_;
    const auto eps = static_cast<Scalar>(options_.stabilizer);
    const Scalar half_tau = static_cast<Scalar>(temperature_ / 2.0);
    for (Index r = 0; r < out.rows(); ++r) {
      const Scalar shift =
          out.row(r).template maxCoeff<Eigen::PropagateNaN>() + half_tau * x.row(r).squaredNorm();
      out.row(r) = ratio() * ((out.row(r).array() - shift).exp() + eps);
    }
  }

  /// Key features without the shared stabiliser: out(r, i) = exp(ωᵢ·x'_r − |x'_r|²/2 − m_r) with
  /// m_r = maxᵢ ωᵢ·x'_r written to row_max[r]. The feature is then F^(−1/2)·(out·exp(m_r − c) + ε).
  template <class In, class Out, class Max>
  void key_exponentials(const In& x, Out&& out, Max&& row_max) const {
    out.noalias() = x * scaled_projection_t_;
    const Scalar half_tau = static_cast<Scalar>(temperature_ / 2.0);
    for (Index r = 0; r < out.rows(); ++r) {
      row_max[r] = out.row(r).template maxCoeff<Eigen::PropagateNaN>();
      out.row(r) = (out.row(r).array() - (row_max[r] + half_tau * x.row(r).squaredNorm())).exp();
    }
  }

  // The backward hooks (DifferentiableFeatureMap, DifferentiableStabilizedFeatureMap). With
  // u = ω·x' (x' = sqrt(τ)·x), s = |x'|²/2 and m = maxᵢ uᵢ (first index on ties), each
  // differentiates exactly what its forward computes, the maximum included: it cancels in
  // attention only when the stabilizer ε is 0.

  /// The backward of `features` (= query_features).
  template <class In, class DF, class Out>
  void features_backward(const In& x, const DF& dfeatures, Out&& dx) const {
    query_features_backward(x, dfeatures, dx);
  }

  /// The backward of query_features, φ(x)ᵢ = ratio·(exp(uᵢ − s − m) + ε): with
  /// tᵢ = dfeaturesᵢ·ratio·exp(uᵢ − s − m), du = t − (Σt)·e_argmax and dx = sqrt(τ)·ωᵀdu − (Σt)·τx.
  template <class In, class DF, class Out>
  void query_features_backward(const In& x, const DF& dfeatures, Out&& dx) const {
    exponentials_backward(
        x, dfeatures, ratio(), [](Index) { return Scalar(0); }, dx);
  }

  /// The backward of key_exponentials (out Eᵢ = exp(uᵢ − s − m), row_max m), given dexponentials
  /// = ∂L/∂E and drow_max = ∂L/∂m: with tᵢ = dexponentialsᵢ·Eᵢ,
  /// du = t + (drow_max − Σt)·e_argmax and dx = sqrt(τ)·ωᵀdu − (Σt)·τx.
  template <class In, class DE, class DM, class Out>
  void key_exponentials_backward(const In& x, const DE& dexponentials, const DM& drow_max,
                                 Out&& dx) const {
    exponentials_backward(
        x, dexponentials, Scalar(1), [&](Index r) { return drow_max[r]; }, dx);
  }

 private:
  static Matrix<Scalar> draw_projection(Index dim, Index features, std::uint64_t seed,
                                        bool orthogonal) {
    detail::require(dim >= 1 && features >= 1, "posenc::Favor",
                    "dim and features must be >= 1, got dim ", dim, " and features ", features);
    detail::GaussianSource normal(seed);
    Matrix<double> omega(features, dim);
    if (!orthogonal) {
      for (Index i = 0; i < omega.size(); ++i) omega.data()[i] = normal();
      return omega.cast<Scalar>();
    }
    // Blocks of `dim` orthonormal rows (Q of a Gaussian matrix), the last block truncated, then
    // each row scaled to the norm of a fresh Gaussian vector (Performer's scaling = 0). Q's
    // columns are multiplied by the signs of R's diagonal so that Q is Haar-distributed
    // (Mezzadri 2007): a raw Householder Q has a fixed-sign coordinate in its columns, which
    // biases the estimate of exp(q·k) (Performer's create_projection_matrix uses the raw Q).
    for (Index first = 0; first < features; first += dim) {
      Matrix<double> gaussian(dim, dim);
      for (Index i = 0; i < gaussian.size(); ++i) gaussian.data()[i] = normal();
      const Eigen::HouseholderQR<Matrix<double>> qr(gaussian);
      Matrix<double> q = qr.householderQ();
      for (Index j = 0; j < dim; ++j) {
        if (qr.matrixQR()(j, j) < 0.0) q.col(j) = -q.col(j);
      }
      const Index rows = std::min(dim, features - first);
      omega.middleRows(first, rows) = q.transpose().topRows(rows);
    }
    for (Index i = 0; i < features; ++i) {
      double norm_squared = 0.0;
      for (Index j = 0; j < dim; ++j) {
        const double g = normal();
        norm_squared += g * g;
      }
      omega.row(i) *= std::sqrt(norm_squared);
    }
    return omega.cast<Scalar>();
  }

  /// The shared backward of both exponential forms: t = dexp·factor·exp(u − s − m) row by row,
  /// du = t + (dmax(r) − Σt)·e_argmax, dx = du·(sqrt(τ)·ω) − (Σt)·τ·x.
  template <class In, class DE, class DMax, class Out>
  void exponentials_backward(const In& x, const DE& dexp, Scalar factor, DMax&& dmax,
                             Out&& dx) const {
    const Scalar tau = static_cast<Scalar>(temperature_);
    const Scalar half_tau = tau / Scalar(2);
    Matrix<Scalar> du = x * scaled_projection_t_;  // u, then t, then du
    Vector<Scalar> total(x.rows());
    for (Index r = 0; r < du.rows(); ++r) {
      Index arg = 0;
      const Scalar m = du.row(r).maxCoeff(&arg);
      du.row(r) = factor * dexp.row(r).array() *
                  (du.row(r).array() - (m + half_tau * x.row(r).squaredNorm())).exp();
      total[r] = du.row(r).sum();
      du(r, arg) += dmax(r) - total[r];
    }
    dx.noalias() = du * scaled_projection_t_.transpose();
    for (Index r = 0; r < dx.rows(); ++r) dx.row(r) -= (tau * total[r]) * x.row(r);
  }

  Matrix<Scalar> projection_;
  Matrix<Scalar> scaled_projection_t_;  // sqrt(τ)·ωᵀ, [D, F]
  FavorOptions options_;
  double temperature_ = 1.0;
};

static_assert(FeatureMap<EluPlusOne, float> && FeatureMap<ReluPlusEpsilon, double>);
static_assert(StabilizedFeatureMap<Favor<float>, float> && ValidatedFeatureMap<Favor<float>>);
static_assert(DifferentiableFeatureMap<EluPlusOne, double> &&
              DifferentiableFeatureMap<ReluPlusEpsilon, float> &&
              DifferentiableStabilizedFeatureMap<Favor<double>, double>);

}  // namespace posenc
