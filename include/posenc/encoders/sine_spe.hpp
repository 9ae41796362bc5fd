// SPDX-License-Identifier: MIT
// Sinusoidal stochastic positional encoding (sineSPE): queries and keys are filtered from width D
// to R random realizations of a stationary process, so that E[q̂_m·k̂_n] depends on m − n only.
// A QueryKeyTransform for the softmax kernel and for linear attention.
#pragma once

#include <cmath>
#include <cstdint>
#include <numbers>
#include <optional>
#include <utility>
#include <vector>

#include "posenc/detail/check.hpp"
#include "posenc/detail/random.hpp"
#include "posenc/encoders/spe_common.hpp"
#include "posenc/encoders/spe_gate.hpp"
#include "posenc/encoding.hpp"
#include "posenc/tensor.hpp"

namespace posenc {

/// The learnable parameters of sineSPE, each [H, D, K] (K sines per head and feature), raw as
/// the reference stores them: frequency f = sigmoid(frequencies)/2 in cycles per position,
/// gain λ = softplus(gains), phase offset θ = offsets (query side only).
template <class Real>
struct SineSpeParameters {
  Heads<Real> frequencies;
  Heads<Real> offsets;
  Heads<Real> gains;

  /// The reference's initialisation (frequencies N(0,1) − 4, offsets N(0,1), gains N(0,1)
  /// rescaled to 2g/sqrt(|g| over K)) from `seed`; posenc's generator, not torch's.
  static SineSpeParameters initial(Index heads, Index dim, Index sines, std::uint64_t seed) {
    detail::require(heads >= 1 && dim >= 1 && sines >= 1, "posenc::SineSpeParameters::initial",
                    "heads, dim and sines must be >= 1, got ", heads, ", ", dim, ", ", sines);
    detail::GaussianSource normal(seed);
    SineSpeParameters p{Heads<Real>(heads, dim, sines), Heads<Real>(heads, dim, sines),
                        Heads<Real>(heads, dim, sines)};
    for (Index i = 0; i < p.frequencies.flat().size(); ++i) {
      p.frequencies.flat()[i] = static_cast<Real>(normal() - 4.0);
    }
    for (Index i = 0; i < p.offsets.flat().size(); ++i) {
      p.offsets.flat()[i] = static_cast<Real>(normal());
    }
    for (Index i = 0; i < p.gains.flat().size(); ++i)
      p.gains.flat()[i] = static_cast<Real>(normal());
    for (Index h = 0; h < heads; ++h) {
      for (Index d = 0; d < dim; ++d) {
        auto g = p.gains.head(h).row(d);
        g *= static_cast<Real>(2.0 / std::sqrt(static_cast<double>(g.norm())));
      }
    }
    return p;
  }
};

/// The random numbers of one sineSPE draw: `noise` [H, D·2K, R] standard normal, row d·2K + 2k
/// the cosine column and d·2K + 2k + 1 the sine column of sine k (the reference's z [H][D][2K][R]
/// before its 1/sqrt(2K); golden key `z_raw_standard_normal`).
template <class Real>
struct SineSpeDraw {
  Heads<Real> noise;

  /// A fresh draw from `seed` (posenc's generator, not torch's).
  static SineSpeDraw sample(Index heads, Index dim, Index sines, Index realizations,
                            std::uint64_t seed) {
    detail::require(heads >= 1 && dim >= 1 && sines >= 1, "posenc::SineSpeDraw::sample",
                    "heads, dim and sines must be >= 1, got ", heads, ", ", dim, ", ", sines);
    detail::require(realizations >= 1, "posenc::SineSpeDraw::sample",
                    "the number of realizations R must be >= 1, got ", realizations);
    SineSpeDraw draw{Heads<Real>(heads, dim * 2 * sines, realizations)};
    detail::GaussianSource normal(seed);
    for (Index i = 0; i < draw.noise.flat().size(); ++i) {
      draw.noise.flat()[i] = static_cast<Real>(normal());
    }
    return draw;
  }
};

/// Sinusoidal stochastic positional encoding (Liutkus, Cífka, Wu, Şimşekli, Yang & Richard 2021,
/// "Relative Positional Encoding for Transformers with Linear Complexity", ICML, arXiv
/// 2105.08399; aliutkus/spe `SineSPE` + `SPEFilter`):
///
///   q̂[m,h,r] = Σ_d q[m,h,d]·Q̄[m,h,d,r],   Q̄[m,h,d,:] = Σ_c Ω_q[h,d,m,c]·λ_hdc·Z[h,d,c,:] /
///   (sqrt(2K)·(R·D)^(1/4))
///
/// with Ω_q[m] = (cos φ_k, sin φ_k)_k interleaved, φ_k = 2π f_hdk m + θ_hdk for queries and
/// 2π f_hdk n for keys (the phase offset is on the query side only), and the SAME Z for both.
/// Then E[q̂_m·k̂_n] = sqrt(R/D) Σ_d q_md k_nd P̃_d(m − n) with
/// P̃_d(δ) = (1/2K) Σ_k λ²_dk cos(2π f_dk δ + θ_dk) (`lag_kernel`, `expected_logits`).
///
/// Shapes: parameters [H, D, K]; draw [H, D·2K, R]; transform_queries/keys map a tile
/// in [rows, D] at absolute positions (any int64; position 0 is the reference's first index) to
/// out [rows, R]. Codes are never materialised as [L, H, D, R]: per tile,
/// q̂ = [q ⊙ Ω(m)]·W_h with W_h = λZ/(sqrt(2K)(RD)^(1/4)) a [D·2K, R] matrix (plus the gate's
/// [D, R] noise rows when gated). The draw is held by value: one draw serves a whole sequence,
/// every decoding step included.
///
/// With softmax attention keep the kernel's default scale 1/sqrt(R) (the temperature the
/// reference's Performer uses): the scaled logit then has expectation
/// (1/sqrt(D))·Σ_d q_md k_nd P̃_d(m − n). Matches spe_sine.json (codes, q̂/k̂ gated and not, logits,
/// both attention outputs). Example: examples/spe_linear_attention.cpp.
/// The stage members (transform_queries/keys, filter_queries/keys, query_code/key_code,
/// validate) come from detail::SpeStages over the private tile filter.
template <class Real>
class SineSpe : public detail::SpeStages<SineSpe<Real>, Real> {
 public:
  static constexpr const char* name = "posenc::SineSpe";

  using Scalar = Real;

  SineSpe(SineSpeParameters<Real> parameters, const SineSpeDraw<Real>& draw,
          std::optional<SpeGate<Real>> gate = std::nullopt)
      : parameters_(std::move(parameters)), gate_(std::move(gate)) {
    constexpr const char* fn = "posenc::SineSpe";
    const Heads<Real>& f = parameters_.frequencies;
    heads_ = f.heads();
    dim_ = f.rows();
    sines_ = f.dim();
    detail::require(heads_ >= 1 && dim_ >= 1 && sines_ >= 1, fn,
                    "frequencies must be [H >= 1, D >= 1, K >= 1], got [", heads_, ", ", dim_, ", ",
                    sines_, "]");
    for (const Heads<Real>* p : {&parameters_.offsets, &parameters_.gains}) {
      detail::require(p->heads() == heads_ && p->rows() == dim_ && p->dim() == sines_, fn,
                      "offsets and gains must have the shape of frequencies [", heads_, ", ", dim_,
                      ", ", sines_, "], got [", p->heads(), ", ", p->rows(), ", ", p->dim(), "]");
    }
    detail::require(parameters_.frequencies.flat().allFinite() &&
                        parameters_.offsets.flat().allFinite() &&
                        parameters_.gains.flat().allFinite(),
                    fn, "the parameters must be finite");
    const Heads<Real>& z = draw.noise;
    detail::require(z.heads() == heads_ && z.rows() == dim_ * 2 * sines_, fn,
                    "the draw must be [H, D·2K, R] = [", heads_, ", ", dim_ * 2 * sines_,
                    ", R], got [", z.heads(), ", ", z.rows(), ", ", z.dim(), "]");
    realizations_ = z.dim();
    detail::require(realizations_ >= 1, fn, "the number of realizations R must be >= 1, got ",
                    realizations_);
    if (gate_) {
      detail::require(gate_->heads() == heads_ && gate_->dim() == dim_ &&
                          gate_->realizations() == realizations_,
                      fn, "the gate is for [H, D, R] = [", gate_->heads(), ", ", gate_->dim(), ", ",
                      gate_->realizations(), "] but the codes are [", heads_, ", ", dim_, ", ",
                      realizations_, "]");
    }
    // Per head: cycles per position, phase offsets, and the code matrix W_h.
    const Index columns = 2 * sines_;
    const double scale = 1.0 / (std::sqrt(static_cast<double>(columns)) *
                                std::pow(static_cast<double>(realizations_ * dim_), 0.25));
    frequency_.resize(heads_, dim_ * sines_);
    step_cos_.resize(heads_, dim_ * sines_);
    step_sin_.resize(heads_, dim_ * sines_);
    offset_.resize(heads_, dim_ * sines_);
    weights_.resize(static_cast<std::size_t>(heads_));
    for (Index h = 0; h < heads_; ++h) {
      Matrix<Real>& w = weights_[static_cast<std::size_t>(h)];
      w.resize(dim_ * columns + (gate_ ? dim_ : 0), realizations_);
      for (Index d = 0; d < dim_; ++d) {
        const double code_weight = gate_ ? gate_->code_weight(h, d) : 1.0;
        for (Index k = 0; k < sines_; ++k) {
          frequency_(h, d * sines_ + k) =
              detail::sigmoid(static_cast<double>(parameters_.frequencies(h, d, k))) / 2.0;
          offset_(h, d * sines_ + k) = static_cast<double>(parameters_.offsets(h, d, k));
          step_cos_(h, d * sines_ + k) =
              std::cos(2.0 * std::numbers::pi * frequency_(h, d * sines_ + k));
          step_sin_(h, d * sines_ + k) =
              std::sin(2.0 * std::numbers::pi * frequency_(h, d * sines_ + k));
          const double gain = detail::softplus(static_cast<double>(parameters_.gains(h, d, k)));
          for (Index c = 2 * k; c < 2 * k + 2; ++c) {
            const Index row = d * columns + c;
            w.row(row) = z.head(h).row(row) * static_cast<Real>(code_weight * gain * scale);
          }
        }
      }
      if (gate_) w.bottomRows(dim_) = gate_->noise_code(h);
    }
  }

  /// Convenience: a fresh draw (and, when `gate` is given, fresh gate noise) from `seed`.
  SineSpe(SineSpeParameters<Real> parameters, Index realizations, std::uint64_t seed,
          std::optional<Matrix<Real>> gate = std::nullopt)
      : SineSpe(parameters, seeded_draw(parameters, realizations, seed, gate),
                seeded_gate(parameters, realizations, seed, gate)) {}

  Index heads() const { return heads_; }
  Index dim() const { return dim_; }
  Index sines() const { return sines_; }
  Index realizations() const { return realizations_; }
  const SineSpeParameters<Real>& parameters() const { return parameters_; }
  /// The gate, or nullptr when ungated.
  const SpeGate<Real>* gate() const { return gate_ ? &*gate_ : nullptr; }

  /// P̃_d(lag) = (1/2K) Σ_k λ²_dk cos(2π f_dk·lag + θ_dk) for d = 0 … D−1 (ungated), so that
  /// E[Q̄_m·K̄_n] per feature is sqrt(R/D)·P̃_d(m − n). The reference's get_posattn_matrix is
  /// 2K·P̃ (no 1/(2K), no sqrt(R/D)).
  Vector<double> lag_kernel(Index head, Index lag) const {
    detail::require(head >= 0 && head < heads_, "posenc::SineSpe::lag_kernel", "head ", head,
                    " out of range for ", heads_, " heads");
    Vector<double> kernel = Vector<double>::Zero(dim_);
    for (Index d = 0; d < dim_; ++d) {
      for (Index k = 0; k < sines_; ++k) {
        const double gain = detail::softplus(static_cast<double>(parameters_.gains(head, d, k)));
        kernel[d] += gain * gain * std::cos(phase(head, d * sines_ + k, lag, true));
      }
    }
    return kernel / static_cast<double>(2 * sines_);
  }

 private:
  friend class detail::SpeStages<SineSpe<Real>, Real>;

  /// The seeded constructor's arguments, checked under its name before anything is sampled.
  static void check_seeded(const SineSpeParameters<Real>& parameters, Index realizations,
                           const std::optional<Matrix<Real>>& gate) {
    const Heads<Real>& f = parameters.frequencies;
    detail::require(f.heads() >= 1 && f.rows() >= 1 && f.dim() >= 1, name,
                    "frequencies must be [H >= 1, D >= 1, K >= 1], got [", f.heads(), ", ",
                    f.rows(), ", ", f.dim(), "]");
    detail::check_seeded_spe(name, f.heads(), f.rows(), realizations, gate);
  }
  static SineSpeDraw<Real> seeded_draw(const SineSpeParameters<Real>& parameters,
                                       Index realizations, std::uint64_t seed,
                                       const std::optional<Matrix<Real>>& gate) {
    check_seeded(parameters, realizations, gate);
    const Heads<Real>& f = parameters.frequencies;
    return SineSpeDraw<Real>::sample(f.heads(), f.rows(), f.dim(), realizations, seed);
  }
  static std::optional<SpeGate<Real>> seeded_gate(const SineSpeParameters<Real>& parameters,
                                                  Index realizations, std::uint64_t seed,
                                                  const std::optional<Matrix<Real>>& gate) {
    check_seeded(parameters, realizations, gate);
    if (!gate) return std::nullopt;
    return SpeGate<Real>::sample(*gate, realizations, detail::mix64(seed ^ 0x5EED));
  }

  /// 2π·f·position (+ θ for queries), in double.
  double phase(Index head, Index dk, Index position, bool query) const {
    const double angle =
        2.0 * std::numbers::pi * frequency_(head, dk) * static_cast<double>(position);
    return query ? angle + offset_(head, dk) : angle;
  }

  /// Row r of x: [q ⊙ (cos, sin) per (d, k)] and, gated, q itself. For runs of consecutive
  /// positions the phases advance by rotation (one complex multiply per row and sine), anchored
  /// by exact cos/sin every anchor rows so that the rounding never accumulates over more than
  /// anchor steps (~1e-14 relative); scattered positions use cos/sin per row.
  template <class In>
  void features(Index head, Positions positions, const In& in, bool query, Matrix<Real>& x) const {
    constexpr Index anchor = 32;
    const Index columns = 2 * sines_;
    const Index dk = dim_ * sines_;
    x.resize(in.rows(), weights_[static_cast<std::size_t>(head)].rows());
    Eigen::ArrayXd cosine(dk), sine(dk), rotated(dk);
    const auto step_cos = step_cos_.row(head).array().transpose();
    const auto step_sin = step_sin_.row(head).array().transpose();
    for (Index r = 0; r < in.rows(); ++r) {
      const Index position = positions[static_cast<std::size_t>(r)];
      const bool advance =
          r % anchor != 0 && position == positions[static_cast<std::size_t>(r - 1)] + 1;
      if (advance) {
        rotated = cosine * step_cos - sine * step_sin;
        sine = sine * step_cos + cosine * step_sin;
        cosine = rotated;
      } else {
        for (Index j = 0; j < dk; ++j) {
          const double angle = phase(head, j, position, query);
          cosine[j] = std::cos(angle);
          sine[j] = std::sin(angle);
        }
      }
      for (Index d = 0; d < dim_; ++d) {
        const double value = static_cast<double>(in(r, d));
        for (Index k = 0; k < sines_; ++k) {
          x(r, d * columns + 2 * k) = static_cast<Real>(value * cosine[d * sines_ + k]);
          x(r, d * columns + 2 * k + 1) = static_cast<Real>(value * sine[d * sines_ + k]);
        }
      }
      if (gate_) x.row(r).tail(dim_) = in.row(r);
    }
  }

  void filter(Index head, Positions positions, ConstTileRef<Real> in, TileRef<Real> out,
              bool query) const {
    detail::check_spe_tile(
        query ? "posenc::SineSpe::transform_queries" : "posenc::SineSpe::transform_keys", head,
        positions, in, out, heads_, dim_, realizations_);
    Matrix<Real> x;
    features(head, positions, in, query, x);
    out.noalias() = x * weights_[static_cast<std::size_t>(head)];
  }

  SineSpeParameters<Real> parameters_;
  std::optional<SpeGate<Real>> gate_;
  Index heads_ = 0, dim_ = 0, sines_ = 0, realizations_ = 0;
  Matrix<double> frequency_;            // [H, D·K] cycles per position
  Matrix<double> offset_;               // [H, D·K] θ
  Matrix<double> step_cos_, step_sin_;  // [H, D·K] cos, sin of 2π·f (one position's rotation)
  std::vector<Matrix<Real>> weights_;   // per head [D·2K (+D gated), R]
};

static_assert(QueryKeyTransform<SineSpe<float>>);
static_assert(QueryKeyTransform<SineSpe<double>>);

/// Closed-form E[q̂_m·k̂_n] over the draws for these parameters (and gate):
/// sqrt(R/D)·Σ_d q_md k_nd·P̃_d(m − n), gated (1 − σ_d)·P̃_d + σ_d (PyTorch convention).
/// q [H, N, D] at positions query_offset + i, k [H, M, D] at positions j → [H, N, M].
/// Matches the goldens' `expected_logits_ungated` / `expected_logits_gated`.
template <class Real, HeadsLike Q, HeadsLike K>
Heads<Real> expected_logits(const SineSpe<Real>& spe, const Q& q, const K& k,
                            Index query_offset = 0) {
  return detail::spe_expected_logits("posenc::expected_logits", spe, q, k, query_offset);
}

}  // namespace posenc
