// SPDX-License-Identifier: MIT
// Convolutive stochastic positional encoding (convSPE): the codes are white noise filtered along
// the sequence by learned per-feature filters, so that E[q̂_m·k̂_n] is the cross-correlation of
// the query and key filters at lag m − n. A QueryKeyTransform from width D to R, trainable (its
// backward gives dq, dk and the gradients of both filters and the gate).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <random>
#include <utility>
#include <vector>

#include "posenc/detail/check.hpp"
#include "posenc/detail/gaussian.hpp"
#include "posenc/detail/scratch.hpp"
#include "posenc/encoders/spe_common.hpp"
#include "posenc/encoders/spe_gate.hpp"
#include "posenc/encoding.hpp"
#include "posenc/tensor.hpp"

namespace posenc {

/// The learnable filters of convSPE, each [H, D, ks] (one depthwise filter per head and feature),
/// named by the code they produce: `query_filter` makes Q̄, `key_filter` makes K̄.
/// PyTorch's ConvSPE computes Q̄ with conv_k and K̄ with conv_q (its names are swapped), so
/// from_torch(conv_q.weight, conv_k.weight) is {query_filter = conv_k.weight, key_filter =
/// conv_q.weight}; a torch weight [H·D, 1, ks] is read as [H, D, ks] (same memory order).
template <class Real>
struct ConvSpeParameters {
  Heads<Real> query_filter;
  Heads<Real> key_filter;

  /// From the PyTorch module's weights, swapping the roles as its forward() does.
  static ConvSpeParameters from_torch(Heads<Real> conv_q_weight, Heads<Real> conv_k_weight) {
    return {std::move(conv_k_weight), std::move(conv_q_weight)};
  }

  /// The reference's initialisation U[0, 1)/sqrt(ks/2) for both filters, from `seed`.
  static ConvSpeParameters initial(Index heads, Index dim, Index kernel_size, std::uint64_t seed) {
    detail::require(
        heads >= 1 && dim >= 1 && kernel_size >= 1, "posenc::ConvSpeParameters::initial",
        "heads, dim and kernel_size must be >= 1, got ", heads, ", ", dim, ", ", kernel_size);
    std::mt19937_64 engine(seed);
    const double scale = 1.0 / std::sqrt(static_cast<double>(kernel_size) / 2.0);
    ConvSpeParameters p{Heads<Real>(heads, dim, kernel_size), Heads<Real>(heads, dim, kernel_size)};
    for (Heads<Real>* filter : {&p.query_filter, &p.key_filter}) {
      for (Index i = 0; i < filter->flat().size(); ++i) {
        filter->flat()[i] =
            static_cast<Real>(static_cast<double>(engine() >> 11) * 0x1.0p-53 * scale);
      }
    }
    return p;
  }
};

/// The white noise of one convSPE draw, z[r, c, t] for realization r, channel c = h·D + d and
/// time t. Either explicit, [R, H·D, T] as the reference draws it (T = L + 4·ks for L positions;
/// golden key `z_raw_standard_normal`), or generated on demand from a seed (counter-based, so
/// any window is produced without storing the sequence; posenc's generator, not torch's), which
/// covers every position >= 0.
template <class Real>
class ConvSpeDraw {
 public:
  /// Explicit noise [R, channels, T].
  explicit ConvSpeDraw(Heads<Real> noise)
      : noise_(std::move(noise)),
        realizations_(noise_.heads()),
        channels_(noise_.rows()),
        samples_(noise_.dim()) {
    detail::require(realizations_ >= 1, "posenc::ConvSpeDraw",
                    "the number of realizations R must be >= 1, got ", realizations_);
    detail::require(noise_.flat().allFinite(), "posenc::ConvSpeDraw", "the noise must be finite");
  }

  /// Noise generated on demand from `seed`.
  static ConvSpeDraw from_seed(Index realizations, Index channels, std::uint64_t seed) {
    detail::require(realizations >= 1, "posenc::ConvSpeDraw::from_seed",
                    "the number of realizations R must be >= 1, got ", realizations);
    detail::require(channels >= 1, "posenc::ConvSpeDraw::from_seed",
                    "channels (H·D) must be >= 1, got ", channels);
    ConvSpeDraw draw;
    draw.realizations_ = realizations;
    draw.channels_ = channels;
    draw.samples_ = std::numeric_limits<Index>::max();
    draw.seed_ = seed;
    return draw;
  }

  Index realizations() const { return realizations_; }
  Index channels() const { return channels_; }
  /// Samples per channel and realization: T, or the largest Index for seeded noise.
  Index samples() const { return samples_; }
  bool seeded() const { return seed_.has_value(); }

  /// out(t, r) = z[r, channel, first + t] for t < count (out is resized to [count, R]).
  void window(Index channel, Index first, Index count, Matrix<Real>& out) const {
    check_window(channel, first, count);
    out.resize(count, realizations_);
    fill_window(channel, first, count, out.data());
  }

  /// The same window written to `out`, count × R row-major (the caller's buffer, no allocation).
  void fill_window(Index channel, Index first, Index count, Real* out) const {
    check_window(channel, first, count);
    for (Index r = 0; r < realizations_; ++r) {
      if (seed_) {
        const detail::CounterGaussian normal(
            *seed_, static_cast<std::uint64_t>(channel * realizations_ + r));
        normal.fill(static_cast<std::uint64_t>(first), count, out + r, realizations_);
      } else {
        const Real* source = noise_.data() + (r * channels_ + channel) * samples_ + first;
        for (Index t = 0; t < count; ++t) out[t * realizations_ + r] = source[t];
      }
    }
  }

 private:
  ConvSpeDraw() = default;

  void check_window(Index channel, Index first, Index count) const {
    detail::require(channel >= 0 && channel < channels_ && first >= 0 && count >= 0 &&
                        count <= samples_ - first,
                    "posenc::ConvSpeDraw::window", "channel ", channel, ", samples [", first, ", ",
                    first + count, ") out of range for ", channels_, " channels of ", samples_,
                    " samples");
  }

  Heads<Real> noise_;
  Index realizations_ = 0;
  Index channels_ = 0;
  Index samples_ = 0;
  std::optional<std::uint64_t> seed_;
};

/// The gradient of convSPE's learnable parameters (ConvSpe::Gradient), laid out like
/// ConvSpeParameters: query_filter and key_filter [H, D, ks] (the same memory order as torch's
/// [H·D, 1, ks]; query_filter is torch's conv_k.weight, key_filter its conv_q.weight, see
/// ConvSpeParameters::from_torch), and gate [H, D] like SpeGate::gate() (empty when ungated).
template <class Real>
struct ConvSpeGradient {
  Heads<Real> query_filter;
  Heads<Real> key_filter;
  Matrix<Real> gate;

  ConvSpeGradient& operator+=(const ConvSpeGradient& other) {
    detail::add_gradient(query_filter, other.query_filter);
    detail::add_gradient(key_filter, other.key_filter);
    detail::add_gradient(gate, other.gate);
    return *this;
  }
  void set_zero() {
    query_filter.flat().setZero();
    key_filter.flat().setZero();
    gate.setZero();
  }
};

/// Convolutive stochastic positional encoding (Liutkus et al. 2021, arXiv 2105.08399; aliutkus/spe
/// `ConvSPE` (1-D) + `SPEFilter`):
///
///   Q̄[m,h,d,r] = Σ_{j<ks} w^Q_hd[j]·z[r, hD+d, m + ks + j] / (R·D)^(1/4),   K̄ likewise with w^K
///
/// (a valid cross-correlation of the noise, read from offset ks as the reference does), then
/// q̂[m,h,r] = Σ_d q[m,h,d]·Q̄[m,h,d,r]. The same noise makes both codes, so
/// E[q̂_m·k̂_n] = sqrt(R/D) Σ_d q_md k_nd P̃_d(m − n) with P̃_d(δ) = Σ_j w^Q_d[j] w^K_d[j + δ]
/// (zero for |δ| >= ks, not symmetric; `lag_kernel`, `expected_logits`).
///
/// Shapes: filters [H, D, ks] (any ks >= 1: the reference has no odd/even rule, its noise is
/// long enough for valid filtering); noise [R, H·D, T]; transform_queries/keys map a tile
/// in [rows, D] at absolute positions 0 … max_length()−1 to out [rows, R]. Codes for a tile are
/// generated on the fly from its noise window (positions p_min + ks … p_max + 2ks − 1), never as
/// [L, H, D, R]. Roles follow the PyTorch code (see ConvSpeParameters::from_torch). Softmax
/// attention: keep the default scale 1/sqrt(R). Matches spe_conv.json (codes, q̂/k̂ gated and
/// not, logits, both attention outputs). Example: examples/spe_linear_attention.cpp.
/// Training (LearnableTransform): transform_queries_backward / transform_keys_backward give
/// din = Jᵀ·dout and add the gradients of the filters and the gate to a Gradient
/// (zero_gradient()), O(rows·D·ks·R) per tile with per-thread scratch buffers.
/// The stage members (transform_queries/keys, filter_queries/keys, query_code/key_code,
/// validate) come from detail::SpeStages over the private tile filter.
template <class Real>
class ConvSpe : public detail::SpeStages<ConvSpe<Real>, Real, ConvSpeGradient<Real>> {
 public:
  static constexpr const char* name = "posenc::ConvSpe";

  using Scalar = Real;
  using Gradient = ConvSpeGradient<Real>;

  ConvSpe(ConvSpeParameters<Real> parameters, ConvSpeDraw<Real> draw,
          std::optional<SpeGate<Real>> gate = std::nullopt)
      : parameters_(std::move(parameters)), draw_(std::move(draw)), gate_(std::move(gate)) {
    constexpr const char* fn = "posenc::ConvSpe";
    const Heads<Real>& wq = parameters_.query_filter;
    const Heads<Real>& wk = parameters_.key_filter;
    heads_ = wq.heads();
    dim_ = wq.rows();
    kernel_size_ = wq.dim();
    detail::require(heads_ >= 1 && dim_ >= 1, fn, "the filters must be [H >= 1, D >= 1, ks], got [",
                    heads_, ", ", dim_, ", ", kernel_size_, "]");
    detail::require(kernel_size_ >= 1, fn, "kernel_size must be >= 1, got ", kernel_size_);
    detail::require(wk.heads() == heads_ && wk.rows() == dim_ && wk.dim() == kernel_size_, fn,
                    "query_filter is [", heads_, ", ", dim_, ", ", kernel_size_,
                    "] but key_filter is [", wk.heads(), ", ", wk.rows(), ", ", wk.dim(), "]");
    detail::require(wq.flat().allFinite() && wk.flat().allFinite(), fn,
                    "the filters must be finite");
    detail::require(draw_.channels() == heads_ * dim_, fn, "the noise has ", draw_.channels(),
                    " channels but the filters need H·D = ", heads_ * dim_);
    realizations_ = draw_.realizations();
    if (draw_.seeded()) {
      max_length_ = std::numeric_limits<Index>::max() / 4;
    } else {
      max_length_ = draw_.samples() - 4 * kernel_size_;
      detail::require(max_length_ >= 1, fn, "noise of ", draw_.samples(),
                      " samples is too short for kernel_size ", kernel_size_,
                      ": the reference draws L + 4·ks samples for L positions");
    }
    if (gate_) {
      detail::require(gate_->heads() == heads_ && gate_->dim() == dim_ &&
                          gate_->realizations() == realizations_,
                      fn, "the gate is for [H, D, R] = [", gate_->heads(), ", ", gate_->dim(), ", ",
                      gate_->realizations(), "] but the codes are [", heads_, ", ", dim_, ", ",
                      realizations_, "]");
    }
    const double scale = code_scale();
    query_taps_ = Heads<Real>(heads_, dim_, kernel_size_);
    key_taps_ = Heads<Real>(heads_, dim_, kernel_size_);
    for (Index h = 0; h < heads_; ++h) {
      for (Index d = 0; d < dim_; ++d) {
        const auto factor = static_cast<Real>((gate_ ? gate_->code_weight(h, d) : 1.0) * scale);
        query_taps_.head(h).row(d) = wq.head(h).row(d) * factor;
        key_taps_.head(h).row(d) = wk.head(h).row(d) * factor;
      }
    }
  }

  /// Convenience: noise generated from `seed` (and, with `gate`, fresh gate noise).
  ConvSpe(ConvSpeParameters<Real> parameters, Index realizations, std::uint64_t seed,
          std::optional<Matrix<Real>> gate = std::nullopt)
      : ConvSpe(parameters, seeded_draw(parameters, realizations, seed, gate),
                seeded_gate(parameters, realizations, seed, gate)) {}

  Index heads() const { return heads_; }
  Index dim() const { return dim_; }
  Index kernel_size() const { return kernel_size_; }
  Index realizations() const { return realizations_; }
  /// Positions 0 … max_length()−1 have codes (T − 4·ks for explicit noise of T samples).
  Index max_length() const { return max_length_; }
  const ConvSpeParameters<Real>& parameters() const { return parameters_; }
  const ConvSpeDraw<Real>& draw() const { return draw_; }
  const SpeGate<Real>* gate() const { return gate_ ? &*gate_ : nullptr; }

  /// A gradient of zeros: query_filter, key_filter [H, D, ks]; gate [H, D] when gated.
  Gradient zero_gradient() const {
    return {Heads<Real>(heads_, dim_, kernel_size_), Heads<Real>(heads_, dim_, kernel_size_),
            gate_ ? Matrix<Real>(Matrix<Real>::Zero(heads_, dim_)) : Matrix<Real>()};
  }

  /// P̃_d(lag) = Σ_j w^Q_d[j]·w^K_d[j + lag] for d = 0 … D−1 (ungated; zero for |lag| >= ks).
  Vector<double> lag_kernel(Index head, Index lag) const {
    detail::require(head >= 0 && head < heads_, "posenc::ConvSpe::lag_kernel", "head ", head,
                    " out of range for ", heads_, " heads");
    Vector<double> kernel = Vector<double>::Zero(dim_);
    for (Index j = std::max<Index>(0, -lag); j < kernel_size_ && j + lag < kernel_size_; ++j) {
      kernel += (parameters_.query_filter.head(head).col(j).template cast<double>().array() *
                 parameters_.key_filter.head(head).col(j + lag).template cast<double>().array())
                    .matrix();
    }
    return kernel;
  }

 private:
  friend class detail::SpeStages<ConvSpe<Real>, Real, Gradient>;

  /// (R·D)^(−1/4), the code scale.
  double code_scale() const { return std::pow(static_cast<double>(realizations_ * dim_), -0.25); }

  /// The seeded constructor's arguments, checked under its name before anything is sampled.
  static void check_seeded(const ConvSpeParameters<Real>& parameters, Index realizations,
                           const std::optional<Matrix<Real>>& gate) {
    const Heads<Real>& wq = parameters.query_filter;
    detail::require(wq.heads() >= 1 && wq.rows() >= 1, name,
                    "the filters must be [H >= 1, D >= 1, ks], got [", wq.heads(), ", ", wq.rows(),
                    ", ", wq.dim(), "]");
    detail::check_seeded_spe(name, wq.heads(), wq.rows(), realizations, gate);
  }
  static ConvSpeDraw<Real> seeded_draw(const ConvSpeParameters<Real>& parameters,
                                       Index realizations, std::uint64_t seed,
                                       const std::optional<Matrix<Real>>& gate) {
    check_seeded(parameters, realizations, gate);
    const Heads<Real>& wq = parameters.query_filter;
    return ConvSpeDraw<Real>::from_seed(realizations, wq.heads() * wq.rows(), seed);
  }
  static std::optional<SpeGate<Real>> seeded_gate(const ConvSpeParameters<Real>& parameters,
                                                  Index realizations, std::uint64_t seed,
                                                  const std::optional<Matrix<Real>>& gate) {
    check_seeded(parameters, realizations, gate);
    if (!gate) return std::nullopt;
    return SpeGate<Real>::sample(*gate, realizations, detail::mix64(seed ^ 0x5EED));
  }

  /// The lowest and highest of `positions` (not empty), which must lie inside the draw.
  std::pair<Index, Index> position_range(const char* fn, Positions positions) const {
    const auto [low, high] = std::minmax_element(positions.begin(), positions.end());
    detail::require(*low >= 0 && *high < max_length_, fn, "positions ", *low, " … ", *high,
                    " are outside the draw, which covers positions 0 … ", max_length_ - 1,
                    " (noise of ", draw_.samples(), " samples, kernel_size ", kernel_size_, ")");
    return {*low, *high};
  }

  /// Whether the positions of a tile are about consecutive (span <= 2·rows): the forward then
  /// filters one noise window per feature for every position of the span.
  static bool consecutive(Index span, Index rows) { return span <= 2 * rows; }
  /// Whether one noise window per feature for the whole span is cheaper than a window of ks
  /// samples per row and feature (and its length stays within 16 tiles).
  bool shared_window(Index span, Index rows) const {
    return consecutive(span, rows) ||
           (span + kernel_size_ - 1 <= rows * kernel_size_ && span <= 16 * rows);
  }

  void filter(Index head, Positions positions, ConstTileRef<Real> in, TileRef<Real> out,
              bool query) const {
    const char* fn =
        query ? "posenc::ConvSpe::transform_queries" : "posenc::ConvSpe::transform_keys";
    detail::check_spe_tile(fn, head, positions, in, out, heads_, dim_, realizations_);
    detail::ScratchLease<detail::SpeScratch<Real>> lease;
    detail::SpeScratch<Real>& ws = lease.get();
    const Index rows = in.rows();
    auto result = detail::scratch_matrix(ws.result, rows, realizations_);
    result.setZero();
    if (rows > 0) {
      const auto [low, high] = position_range(fn, positions);
      const Heads<Real>& taps = query ? query_taps_ : key_taps_;
      const Index span = high - low + 1;
      if (consecutive(span, rows)) {
        // One noise window for the whole tile, filtered once per feature.
        auto noise = detail::scratch_matrix(ws.noise, span + kernel_size_ - 1, realizations_);
        auto codes = detail::scratch_matrix(ws.codes, span, realizations_);
        for (Index d = 0; d < dim_; ++d) {
          draw_.fill_window(head * dim_ + d, low + kernel_size_, span + kernel_size_ - 1,
                            noise.data());
          codes.setZero();
          // Blocks of 16 positions keep the partial codes in L1 across the ks taps.
          for (Index first = 0; first < span; first += 16) {
            const Index count = std::min<Index>(16, span - first);
            auto block = codes.middleRows(first, count);
            for (Index j = 0; j < kernel_size_; ++j) {
              block.noalias() += taps(head, d, j) * noise.middleRows(first + j, count);
            }
          }
          for (Index r = 0; r < rows; ++r) {
            result.row(r) += in(r, d) * codes.row(positions[static_cast<std::size_t>(r)] - low);
          }
        }
      } else {
        // Scattered positions: per row and feature, ks samples of one window per feature (when
        // the rows' windows overlap enough) or of a window per row.
        const bool shared = shared_window(span, rows);
        const Index ks = kernel_size_;
        auto noise = detail::scratch_matrix(ws.noise, shared ? span + ks - 1 : ks, realizations_);
        for (Index d = 0; d < dim_; ++d) {
          if (shared) draw_.fill_window(head * dim_ + d, low + ks, span + ks - 1, noise.data());
          for (Index r = 0; r < rows; ++r) {
            const Index position = positions[static_cast<std::size_t>(r)];
            if (!shared) draw_.fill_window(head * dim_ + d, position + ks, ks, noise.data());
            const Index first = shared ? position - low : 0;
            for (Index j = 0; j < ks; ++j) {
              result.row(r) += (in(r, d) * taps(head, d, j)) * noise.row(first + j);
            }
          }
        }
      }
      if (gate_) detail::product_in_blocks(result, in, gate_->noise_code(head), true);
    }
    out = result;
  }

  /// din = Jᵀ·dout and, with a gradient, the parameters' share. With v_rdj = z(p_r + ks + j)·dout_r
  /// (row r's noise window of feature d against its upstream gradient, j < ks), e_rd = ε_d·dout_r
  /// and c = (R·D)^(−1/4):
  ///   din_rd = Σ_j taps_dj·v_rdj + nw_d·e_rd,
  ///   ∂L/∂filter_dj += cw_d·c·Σ_r q_rd·v_rdj,
  ///   ∂L/∂cw_d += c·Σ_rj filter_dj·q_rd·v_rdj,   ∂L/∂nw_d += Σ_r q_rd·e_rd
  /// (cw, nw the gate's weights; the gate's gradient through SpeGate::gate_gradient).
  void filter_backward(Index head, Positions positions, ConstTileRef<Real> in,
                       ConstTileRef<Real> dout, TileRef<Real> din, Gradient* gradient,
                       bool query) const {
    const char* fn = query ? "posenc::ConvSpe::transform_queries_backward"
                           : "posenc::ConvSpe::transform_keys_backward";
    detail::check_spe_backward_tile(fn, head, positions, in, dout, din, heads_, dim_,
                                    realizations_);
    if (gradient) check_gradient(*gradient);
    detail::ScratchLease<detail::SpeScratch<Real>> lease;
    detail::SpeScratch<Real>& ws = lease.get();
    const Index rows = in.rows();
    const Index ks = kernel_size_;
    auto back = detail::scratch_matrix(ws.result, rows, dim_);
    if (rows == 0) return;
    const auto [low, high] = position_range(fn, positions);
    const Heads<Real>& taps = query ? query_taps_ : key_taps_;
    const Heads<Real>& filter = query ? parameters_.query_filter : parameters_.key_filter;
    const Index span = high - low + 1;
    const bool shared = shared_window(span, rows);
    // sums: Σ_r q·v per tap (ks), then ∂L/∂cw and ∂L/∂nw per feature (D each).
    double* sums = detail::grow(ws.sums, ks + 2 * dim_);
    std::fill(sums, sums + ks + 2 * dim_, 0.0);
    double* d_code_weight = sums + ks;
    double* d_noise_weight = sums + ks + dim_;
    auto noise = detail::scratch_matrix(ws.noise, shared ? span + ks - 1 : ks, realizations_);
    Eigen::Map<Vector<Real>> v(detail::grow(ws.codes, ks), ks);
    const double scale = code_scale();
    for (Index d = 0; d < dim_; ++d) {
      if (shared) draw_.fill_window(head * dim_ + d, low + ks, span + ks - 1, noise.data());
      std::fill(sums, sums + ks, 0.0);
      for (Index r = 0; r < rows; ++r) {
        const Index position = positions[static_cast<std::size_t>(r)];
        if (shared) {
          v.noalias() = noise.middleRows(position - low, ks) * dout.row(r).transpose();
        } else {
          draw_.fill_window(head * dim_ + d, position + ks, ks, noise.data());
          v.noalias() = noise * dout.row(r).transpose();
        }
        back(r, d) = taps.head(head).row(d).dot(v.transpose());
        if (gradient) {
          const auto value = static_cast<double>(in(r, d));
          for (Index j = 0; j < ks; ++j) sums[j] += value * static_cast<double>(v[j]);
        }
      }
      if (gradient) {
        Heads<Real>& filter_gradient = query ? gradient->query_filter : gradient->key_filter;
        const double code_weight = gate_ ? gate_->code_weight(head, d) : 1.0;
        for (Index j = 0; j < ks; ++j) {
          filter_gradient(head, d, j) += static_cast<Real>(code_weight * scale * sums[j]);
          d_code_weight[d] += scale * static_cast<double>(filter(head, d, j)) * sums[j];
        }
      }
    }
    if (gate_) {
      auto e = detail::scratch_matrix(ws.projections, rows, dim_);
      detail::product_in_blocks(e, dout, gate_->noise().head(head).transpose(), false);
      const double noise_scale = gate_->noise_scale();
      for (Index d = 0; d < dim_; ++d) {
        const double noise_weight = gate_->noise_weight(head, d);
        for (Index r = 0; r < rows; ++r) {
          const double scaled = noise_scale * static_cast<double>(e(r, d));
          back(r, d) += static_cast<Real>(noise_weight * scaled);
          d_noise_weight[d] += static_cast<double>(in(r, d)) * scaled;
        }
        if (gradient) {
          gradient->gate(head, d) +=
              static_cast<Real>(gate_->gate_gradient(head, d, d_code_weight[d], d_noise_weight[d]));
        }
      }
    }
    din = back;
  }

  /// Rejects a gradient not shaped like zero_gradient() (e.g. default-constructed).
  void check_gradient(const Gradient& g) const {
    const auto shaped = [&](const Heads<Real>& x) {
      return x.heads() == heads_ && x.rows() == dim_ && x.dim() == kernel_size_;
    };
    detail::require(
        shaped(g.query_filter) && shaped(g.key_filter) && g.gate.rows() == (gate_ ? heads_ : 0) &&
            g.gate.cols() == (gate_ ? dim_ : 0),
        "posenc::ConvSpe::transform_backward", "the gradient must be shaped like zero_gradient()");
  }

  ConvSpeParameters<Real> parameters_;
  ConvSpeDraw<Real> draw_;
  std::optional<SpeGate<Real>> gate_;
  Index heads_ = 0, dim_ = 0, kernel_size_ = 0, realizations_ = 0, max_length_ = 0;
  Heads<Real> query_taps_, key_taps_;  // filters × gate code weight × (R·D)^(−1/4)
};

static_assert(QueryKeyTransform<ConvSpe<float>>);
static_assert(QueryKeyTransform<ConvSpe<double>>);
static_assert(LearnableTransform<ConvSpe<float>>);
static_assert(LearnableTransform<ConvSpe<double>>);

/// Closed-form E[q̂_m·k̂_n] over the noise for these filters (and gate):
/// sqrt(R/D)·Σ_d q_md k_nd·P̃_d(m − n), gated (1 − σ_d)·P̃_d + σ_d (PyTorch convention).
/// q [H, N, D] at positions query_offset + i, k [H, M, D] at positions j → [H, N, M].
template <class Real, HeadsLike Q, HeadsLike K>
Heads<Real> expected_logits(const ConvSpe<Real>& spe, const Q& q, const K& k,
                            Index query_offset = 0) {
  return detail::spe_expected_logits("posenc::expected_logits", spe, q, k, query_offset);
}

}  // namespace posenc
