// SPDX-License-Identifier: MIT
// Rotary position embedding (RoPE) as a QueryKeyTransform, with partial rotation, both channel
// pairings and the context-extension scalings in use (linear interpolation, NTK-aware, dynamic
// NTK, YaRN, Llama 3, LongRoPE). The README maps these names to HF `rope_scaling` and llama.cpp
// options; posenc/io/rope_config.hpp reads them from a model's config.json or GGUF file.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <numbers>
#include <optional>
#include <span>
#include <utility>
#include <vector>

#include "posenc/detail/check.hpp"
#include "posenc/detail/rotary.hpp"
#include "posenc/detail/scratch.hpp"
#include "posenc/encoding.hpp"
#include "posenc/tensor.hpp"

namespace posenc {

/// Which channels of a head form a rotation pair, for a rotary width r.
///
///   half         pair k = channels (k, k + r/2): HF transformers `rotate_half` (Llama, Mistral,
///                Qwen, Gemma, Phi, ... checkpoints from the Hub), GPT-NeoX, ggml/llama.cpp NEOX
///                (mode 2), ONNX `interleaved=0`, flash-attention's default. RotaryOptions'
///                default.
///   interleaved  pair k = channels (2k, 2k+1): Meta's original LLaMA code (`view_as_complex`),
///                RoFormer (Su et al.), HF GPT-J `rotate_every_two`, ggml/llama.cpp NORMAL (mode
///                0), ONNX `interleaved=1`, torchscale XPos (XPosOptions' default).
///
/// The two are the same rotation on permuted channels (rotary_half_permutation); the pairing is a
/// property of the trained weights, so it must match the checkpoint: a wrong pairing raises no
/// error, it silently gives wrong logits. HF Hub Llama-family weights were permuted for
/// `rotate_half` when converted from Meta's, so they need `half`; Meta's own consolidated
/// checkpoints (and llama.cpp's NORMAL GGUFs) need `interleaved`.
enum class RotaryPairing : std::uint8_t { interleaved, half };

/// The channel permutation that turns interleaved pairing into half pairing: channel j of the
/// half-paired head is channel perm[j] of the interleaved one (evens first, then odds, over the
/// first `rotary_dim` channels; the rest stay). Permuting the q and k projection rows of each head
/// by it converts a checkpoint: half(W[perm]·x) = interleaved(W·x)[perm], so logits agree.
inline std::vector<Index> rotary_half_permutation(Index head_dim, Index rotary_dim) {
  detail::require(rotary_dim >= 2 && rotary_dim % 2 == 0 && rotary_dim <= head_dim,
                  "posenc::rotary_half_permutation",
                  "rotary_dim must be even and in [2, head_dim], got rotary_dim ", rotary_dim,
                  " and head_dim ", head_dim);
  std::vector<Index> perm(static_cast<std::size_t>(head_dim));
  const Index pairs = rotary_dim / 2;
  for (Index k = 0; k < pairs; ++k) {
    perm[static_cast<std::size_t>(k)] = 2 * k;
    perm[static_cast<std::size_t>(pairs + k)] = 2 * k + 1;
  }
  for (Index j = rotary_dim; j < head_dim; ++j) perm[static_cast<std::size_t>(j)] = j;
  return perm;
}

/// YaRN's optional parameters (Peng et al. 2023, arXiv 2309.00071; HF `rope_scaling` keys).
struct YarnOptions {
  double beta_fast = 32.0;  // HF beta_fast, llama.cpp yarn_beta_fast (the paper's β)
  double beta_slow = 1.0;   // HF beta_slow, llama.cpp yarn_beta_slow (the paper's α)
  bool truncate = true;     // HF truncate: floor/ceil the correction range
  /// Magnitude on cos and sin (logits grow by its square). Default: 0.1·ln(s) + 1, or, when
  /// mscale and mscale_all_dim are both non-zero (DeepSeek), g(s, mscale)/g(s, mscale_all_dim)
  /// with g(s, m) = 0.1·m·ln(s) + 1 (1 for s <= 1).
  std::optional<double> attention_factor = std::nullopt;
  double mscale = 0.0;
  double mscale_all_dim = 0.0;
};

/// LongRoPE's parameters (Phi-3 style; Ding et al. 2024, arXiv 2402.13753; HF `longrope`, llama.cpp
/// `rope_factors_short` / `rope_factors_long`): one rescale factor per rotation pair.
struct LongRopeOptions {
  std::vector<double> short_factor;  // r/2 divisors of θ_k while the sequence fits L0
  std::vector<double> long_factor;   // r/2 divisors of θ_k once it exceeds L0
  /// Magnitude on cos and sin. Default (HF): sqrt(1 + ln(s)/ln(L0)) for s > 1, else 1.
  std::optional<double> attention_factor = std::nullopt;
};

/// How RoPE's frequencies θ_k = base^(−2k/r) are changed to reach past the training context.
/// s = factor, L0 = original_context (the training length), r = rotary width.
///
///   none()                       θ_k
///   linear(s)                    θ_k / s                          (position interpolation)
///   ntk(s)                       base' = base·s^(r/(r−2))         (static NTK-aware)
///   dynamic_ntk(s, L0, L)        base' = base·(s·L/L0 − (s−1))^(r/(r−2)) for L > L0, else θ_k
///                                (L >= 0)
///   yarn(s, L0, options)         θ_k blended with θ_k/s by a ramp over the pair index, times a
///                                magnitude on cos and sin (s >= 1, beta_fast >= beta_slow > 0)
///   llama3(s, L0, low, high)     θ_k kept for wavelengths < L0/high, θ_k/s above L0/low,
///                                smoothly mixed in between
///   longrope(s, L0, L, options)  θ_k / f_k with f = short_factor while L <= L0, long_factor once
///                                L > L0; cos and sin times sqrt(1 + ln s / ln L0) (s > 1)
struct RopeScaling {
  enum class Kind : std::uint8_t { none, linear, ntk, dynamic_ntk, yarn, llama3, longrope };

  Kind kind = Kind::none;
  double factor = 1.0;
  Index original_context = 0;
  Index sequence_length = 0;  // dynamic_ntk, longrope: the length the frequencies are for
  YarnOptions yarn_options = {};
  double low_freq_factor = 1.0;   // llama3
  double high_freq_factor = 4.0;  // llama3
  LongRopeOptions longrope_options = {};

  static RopeScaling none() { return {}; }
  static RopeScaling linear(double factor) { return {.kind = Kind::linear, .factor = factor}; }
  static RopeScaling ntk(double factor) { return {.kind = Kind::ntk, .factor = factor}; }
  /// HF `dynamic`: original_context is HF's max_position_embeddings; sequence_length is
  /// max(position_ids) + 1 of the call. RotaryEncoding::for_sequence_length changes it.
  static RopeScaling dynamic_ntk(double factor, Index original_context, Index sequence_length) {
    return {.kind = Kind::dynamic_ntk,
            .factor = factor,
            .original_context = original_context,
            .sequence_length = sequence_length};
  }
  static RopeScaling yarn(double factor, Index original_context, YarnOptions options = {}) {
    return {.kind = Kind::yarn,
            .factor = factor,
            .original_context = original_context,
            .yarn_options = options};
  }
  static RopeScaling llama3(double factor, Index original_context, double low_freq_factor = 1.0,
                            double high_freq_factor = 4.0) {
    return {.kind = Kind::llama3,
            .factor = factor,
            .original_context = original_context,
            .low_freq_factor = low_freq_factor,
            .high_freq_factor = high_freq_factor};
  }
  /// LongRoPE. `factor` is HF's s = max_position_embeddings / original_max_position_embeddings
  /// (it only sets the default attention factor); `original_context` is L0; `sequence_length` is
  /// the length the encoder serves, max(position) + 1 over everything it will rotate: the long
  /// factors apply when sequence_length > L0 (HF: seq_len > original_max_position_embeddings).
  /// See RotaryEncoding::for_sequence_length and the KV-cache note there.
  static RopeScaling longrope(double factor, Index original_context, Index sequence_length,
                              LongRopeOptions options) {
    return {.kind = Kind::longrope,
            .factor = factor,
            .original_context = original_context,
            .sequence_length = sequence_length,
            .longrope_options = std::move(options)};
  }

  /// LongRoPE: whether the long factors are in use (sequence_length > original_context).
  bool uses_long_factors() const {
    return kind == Kind::longrope && sequence_length > original_context;
  }
};

/// Construction options of RotaryEncoding. An aggregate: `{.base = 5e5, .pairing = ...}`.
struct RotaryOptions {
  double base = 10000.0;  // HF rope_theta, llama.cpp rope_freq_base
  /// Channels rotated (even, <= head_dim); the others pass through. 0 = all. HF
  /// partial_rotary_factor·head_dim, GPT-J rotary_dim, ggml n_dims.
  Index rotary_dim = 0;
  /// Default `half` (HF transformers `rotate_half`, what most checkpoints use); set
  /// `RotaryPairing::interleaved` for Meta's original LLaMA, GPT-J, RoFormer or ggml NORMAL.
  RotaryPairing pairing = RotaryPairing::half;
  RopeScaling scaling = {};
  /// cos/sin rows of positions [0, cached_positions) are computed on first use (in chunks) and
  /// kept, shared by copies of the encoder; other positions are computed on the fly.
  Index cached_positions = Index{1} << 22;
};

namespace detail {

/// g(s, m) of YaRN: the attention magnitude for scale s and mscale m.
inline double yarn_magnitude(double factor, double mscale) {
  return factor <= 1.0 ? 1.0 : 0.1 * mscale * std::log(factor) + 1.0;
}

/// LongRoPE's default attention factor (HF _compute_longrope_parameters): sqrt(1 + ln s / ln L0)
/// for s > 1, else 1.
inline double longrope_attention_factor(double factor, Index original_context) {
  if (factor <= 1.0) return 1.0;
  return std::sqrt(1.0 + std::log(factor) / std::log(static_cast<double>(original_context)));
}

/// Frequencies θ_k and the cos/sin magnitude of RoPE with a scaling, all in double.
inline std::pair<std::vector<double>, double> rope_frequencies(double base, Index rotary_dim,
                                                               const RopeScaling& scaling) {
  constexpr const char* fn = "posenc::RotaryEncoding";
  using Kind = RopeScaling::Kind;
  const Index pairs = rotary_dim / 2;
  const double r = static_cast<double>(rotary_dim);
  auto default_frequencies = [&](double b) {
    std::vector<double> theta(static_cast<std::size_t>(pairs));
    for (Index k = 0; k < pairs; ++k) {
      theta[static_cast<std::size_t>(k)] = 1.0 / std::pow(b, static_cast<double>(2 * k) / r);
    }
    return theta;
  };
  const double s = scaling.factor;
  if (scaling.kind != Kind::none) {
    require(std::isfinite(s) && s > 0.0, fn, "scaling factor must be finite and positive, got ", s);
  }
  if (scaling.kind == Kind::dynamic_ntk || scaling.kind == Kind::yarn ||
      scaling.kind == Kind::llama3 || scaling.kind == Kind::longrope) {
    require(scaling.original_context >= 1, fn, "scaling original_context must be >= 1, got ",
            scaling.original_context);
  }
  if (scaling.kind == Kind::ntk || scaling.kind == Kind::dynamic_ntk) {
    require(rotary_dim > 2, fn, "NTK scaling needs rotary_dim > 2 (exponent r/(r-2)), got ",
            rotary_dim);
  }
  switch (scaling.kind) {
    case Kind::none:
      return {default_frequencies(base), 1.0};
    case Kind::linear: {
      auto theta = default_frequencies(base);
      for (double& t : theta) t /= s;
      return {theta, 1.0};
    }
    case Kind::ntk:
      return {default_frequencies(base * std::pow(s, r / (r - 2.0))), 1.0};
    case Kind::dynamic_ntk: {
      require(scaling.sequence_length >= 0, fn,
              "dynamic NTK sequence_length must be >= 0 (max(position_ids) + 1), got ",
              scaling.sequence_length);
      const double length =
          static_cast<double>(std::max(scaling.sequence_length, scaling.original_context));
      const double l0 = static_cast<double>(scaling.original_context);
      const double rebased = base * std::pow(s * length / l0 - (s - 1.0), r / (r - 2.0));
      return {default_frequencies(rebased), 1.0};
    }
    case Kind::yarn: {
      const YarnOptions& y = scaling.yarn_options;
      require(y.beta_fast > 0.0 && y.beta_slow > 0.0, fn,
              "YaRN beta_fast and beta_slow must be positive, got ", y.beta_fast, " and ",
              y.beta_slow);
      // HF's _validate_yarn_parameters warns about both; the ramp and magnitude assume them.
      require(y.beta_fast >= y.beta_slow, fn, "YaRN beta_fast must be >= beta_slow, got beta_fast ",
              y.beta_fast, " < beta_slow ", y.beta_slow);
      require(s >= 1.0, fn, "YaRN factor must be >= 1 (it extends the context), got ", s);
      const double l0 = static_cast<double>(scaling.original_context);
      // Pair index at which a wavelength completes `rotations` turns over L0 (HF
      // find_correction_dim; ggml ggml_rope_yarn_corr_dim).
      auto correction_dim = [&](double rotations) {
        return r * std::log(l0 / (rotations * 2.0 * std::numbers::pi)) / (2.0 * std::log(base));
      };
      double low = correction_dim(y.beta_fast);
      double high = correction_dim(y.beta_slow);
      if (y.truncate) {
        low = std::floor(low);
        high = std::ceil(high);
      }
      low = std::max(low, 0.0);
      high = std::min(high, r - 1.0);
      if (low == high) high += 0.001;  // HF; avoids a zero-width ramp
      std::vector<double> theta = default_frequencies(base);
      for (Index k = 0; k < pairs; ++k) {
        const double ramp = std::clamp((static_cast<double>(k) - low) / (high - low), 0.0, 1.0);
        const double keep = 1.0 - ramp;  // HF's inv_freq_extrapolation_factor
        double& t = theta[static_cast<std::size_t>(k)];
        t = (t / s) * (1.0 - keep) + t * keep;
      }
      double magnitude = yarn_magnitude(s, 1.0);
      if (y.attention_factor) {
        magnitude = *y.attention_factor;
      } else if (y.mscale != 0.0 && y.mscale_all_dim != 0.0) {
        magnitude = yarn_magnitude(s, y.mscale) / yarn_magnitude(s, y.mscale_all_dim);
      }
      require(std::isfinite(magnitude) && magnitude > 0.0, fn,
              "YaRN attention_factor must be finite and positive, got ", magnitude);
      return {theta, magnitude};
    }
    case Kind::llama3: {
      require(scaling.low_freq_factor > 0.0 && scaling.high_freq_factor > scaling.low_freq_factor,
              fn, "llama3 scaling needs 0 < low_freq_factor < high_freq_factor, got ",
              scaling.low_freq_factor, " and ", scaling.high_freq_factor);
      const double l0 = static_cast<double>(scaling.original_context);
      const double low_wavelength = l0 / scaling.low_freq_factor;
      const double high_wavelength = l0 / scaling.high_freq_factor;
      std::vector<double> theta = default_frequencies(base);
      for (double& t : theta) {
        const double wavelength = 2.0 * std::numbers::pi / t;
        if (wavelength > low_wavelength) {
          t /= s;
        } else if (wavelength >= high_wavelength) {
          const double smooth = (l0 / wavelength - scaling.low_freq_factor) /
                                (scaling.high_freq_factor - scaling.low_freq_factor);
          t = (1.0 - smooth) * t / s + smooth * t;
        }
      }
      return {theta, 1.0};
    }
    case Kind::longrope: {
      require(scaling.sequence_length >= 0, fn,
              "LongRoPE sequence_length must be >= 0 (max(position) + 1), got ",
              scaling.sequence_length);
      // ln L0 is the denominator of the default attention factor.
      require(scaling.original_context >= 2, fn, "LongRoPE original_context must be >= 2, got ",
              scaling.original_context);
      const LongRopeOptions& o = scaling.longrope_options;
      const bool use_long = scaling.uses_long_factors();
      const std::vector<double>& rescale = use_long ? o.long_factor : o.short_factor;
      for (const auto* factors : {&o.short_factor, &o.long_factor}) {
        require(static_cast<Index>(factors->size()) == pairs, fn, "LongRoPE ",
                factors == &o.short_factor ? "short_factor" : "long_factor", " has ",
                factors->size(), " entries but rotary_dim / 2 = ", pairs);
        for (const double f : *factors) {
          require(std::isfinite(f) && f > 0.0, fn, "LongRoPE ",
                  factors == &o.short_factor ? "short_factor" : "long_factor",
                  " entries must be finite and positive, got ", f);
        }
      }
      std::vector<double> theta = default_frequencies(base);
      for (Index k = 0; k < pairs; ++k) {
        theta[static_cast<std::size_t>(k)] /= rescale[static_cast<std::size_t>(k)];
      }
      const double magnitude = o.attention_factor
                                   ? *o.attention_factor
                                   : longrope_attention_factor(s, scaling.original_context);
      require(std::isfinite(magnitude) && magnitude > 0.0, fn,
              "LongRoPE attention_factor must be finite and positive, got ", magnitude);
      return {theta, magnitude};
    }
  }
  return {default_frequencies(base), 1.0};
}

}  // namespace detail

/// Rotary position embedding (RoPE): pair k of a query or key row at position p is rotated by
/// φ = p·θ_k, (a, b) -> (a cos φ − b sin φ, a sin φ + b cos φ), θ_k = base^(−2k/r), so that
/// q'_i·k'_j depends only on i − j. Su, Lu, Pan, Murtadha, Wen, Liu 2021, "RoFormer", arXiv
/// 2104.09864.
///
/// - Rows: [rows, head_dim] tiles, row r at absolute position positions[r] (any int64, negative
///   included); the first rotary_dim channels rotate (pairing: RotaryPairing, default half =
///   HF `rotate_half`; interleaved = Meta LLaMA / GPT-J / RoFormer), the rest pass through;
///   transformed_dim(d) = d. Queries and keys get the same rotation; the `centre` argument is
///   ignored. `out` may be the same matrix as `in` (not a partial overlap).
/// - Angles are formed in double (p·θ exact, reduced modulo 2π) and cast last; cos/sin rows are
///   cached per position on first use (thread-safe; copies share the cache).
/// - Scalings (RopeScaling) change θ_k and, for YaRN and LongRoPE, multiply cos and sin by a
///   magnitude. Dynamic NTK and LongRoPE depend on the sequence length, fixed at construction
///   (RopeScaling::sequence_length) and changed only by for_sequence_length: an encoder never
///   switches by itself, so every key a KV cache holds and every later query share one set of
///   frequencies.
/// - Matches tests/data/rope.json: HF Llama/GPT-NeoX (half), HF GPT-J, Meta LLaMA and ggml
///   (interleaved), partial rotary, HF inv_freq of every scaling, ggml linear and YaRN; LongRoPE
///   matches tests/data/longrope.json (HF's formula). Example: examples/convert_rope_pairing.cpp.
template <class ScalarType>
class RotaryEncoding {
 public:
  using Scalar = ScalarType;

  explicit RotaryEncoding(Index head_dim, RotaryOptions options = {})
      : head_dim_(head_dim),
        rotary_dim_(options.rotary_dim == 0 ? head_dim : options.rotary_dim),
        pairing_(options.pairing),
        base_(options.base),
        scaling_(options.scaling),
        cached_positions_(options.cached_positions) {
    constexpr const char* fn = "posenc::RotaryEncoding";
    detail::require(head_dim >= 2, fn, "head_dim must be >= 2, got ", head_dim);
    detail::require(rotary_dim_ >= 2 && rotary_dim_ <= head_dim && rotary_dim_ % 2 == 0, fn,
                    "rotary_dim must be even and in [2, head_dim = ", head_dim, "], got ",
                    rotary_dim_,
                    rotary_dim_ % 2 != 0 ? " (odd rotary widths are not defined)" : "");
    detail::require(std::isfinite(base_) && base_ > 1.0, fn, "base must be finite and > 1, got ",
                    base_);
    detail::require(cached_positions_ >= 0, fn, "cached_positions must be >= 0, got ",
                    cached_positions_);
    auto [theta, magnitude] = detail::rope_frequencies(base_, rotary_dim_, scaling_);
    build(std::move(theta), magnitude);
  }

  /// RoPE with explicit frequencies θ_k (k < theta.size(), rotary width 2·theta.size()) and a
  /// magnitude on cos and sin: any scaling not listed in RopeScaling (per-pair factors, a
  /// checkpoint's stored inv_freq, float32-rounded frequencies to replay a float32 reference).
  static RotaryEncoding with_frequencies(Index head_dim, std::span<const double> theta,
                                         RotaryPairing pairing, double magnitude = 1.0,
                                         Index cached_positions = Index{1} << 22) {
    constexpr const char* fn = "posenc::RotaryEncoding::with_frequencies";
    const auto pairs = static_cast<Index>(theta.size());
    detail::require(pairs >= 1 && 2 * pairs <= head_dim, fn,
                    "needs 1 to head_dim/2 = ", head_dim / 2, " frequencies, got ", pairs);
    for (const double t : theta) {
      detail::require(std::isfinite(t), fn, "frequencies must be finite, got ", t);
    }
    detail::require(std::isfinite(magnitude) && magnitude > 0.0, fn,
                    "magnitude must be finite and positive, got ", magnitude);
    RotaryEncoding rope(
        head_dim,
        {.rotary_dim = 2 * pairs, .pairing = pairing, .cached_positions = cached_positions});
    rope.build(std::vector<double>(theta.begin(), theta.end()), magnitude);
    return rope;
  }

  Index head_dim() const { return head_dim_; }
  Index rotary_dim() const { return rotary_dim_; }
  RotaryPairing pairing() const { return pairing_; }
  const RopeScaling& scaling() const { return scaling_; }
  /// θ_k after scaling (HF's inv_freq), k < rotary_dim/2.
  std::span<const double> frequencies() const { return *frequencies_; }
  /// The magnitude on cos and sin (YaRN's attention factor; 1 otherwise).
  double magnitude() const { return magnitude_; }

  /// Dynamic NTK and LongRoPE: the encoder for a call whose positions are below
  /// `sequence_length`. HF recomputes the frequencies per forward call from max(position_ids) + 1
  /// (LongRoPE: long factors once it exceeds original_max_position_embeddings); llama.cpp picks
  /// LongRoPE's factors once per context from n_ctx (long if n_ctx > the original context).
  /// With a KV cache, HF's per-call switch leaves the cached keys rotated with the short factors
  /// and new queries with the long ones; build the encoder once for the longest length the cache
  /// will reach (llama.cpp's choice) to keep them consistent, or re-rotate the cache when the
  /// factors change (scaling().uses_long_factors()). Any other scaling returns a copy of *this.
  RotaryEncoding for_sequence_length(Index sequence_length) const {
    if (scaling_.kind != RopeScaling::Kind::dynamic_ntk &&
        scaling_.kind != RopeScaling::Kind::longrope) {
      return *this;
    }
    detail::require(sequence_length >= 0, "posenc::RotaryEncoding::for_sequence_length",
                    "sequence_length must be >= 0 (max(position_ids) + 1), got ", sequence_length);
    RopeScaling scaling = scaling_;
    scaling.sequence_length = sequence_length;
    return RotaryEncoding(head_dim_, {.base = base_,
                                      .rotary_dim = rotary_dim_,
                                      .pairing = pairing_,
                                      .scaling = scaling,
                                      .cached_positions = cached_positions_});
  }

  Index transformed_dim(Index dim) const { return dim; }

  /// Rejects attention calls whose head width is not head_dim.
  void validate(const AttentionShape& shape) const {
    detail::require(shape.query_dim == head_dim_, "posenc::RotaryEncoding", "built for head_dim ",
                    head_dim_, " but q and k have dim ", shape.query_dim);
  }

  /// Rotates rows of `in` ([rows, head_dim]) at `positions` into `out` (same shape).
  void transform_queries(Index /*head*/, Positions positions, Index /*centre*/,
                         ConstTileRef<Scalar> in, TileRef<Scalar> out) const {
    rotate(positions, in, out);
  }
  void transform_keys(Index /*head*/, Positions positions, Index /*centre*/,
                      ConstTileRef<Scalar> in, TileRef<Scalar> out) const {
    rotate(positions, in, out);
  }

  /// Backward (DifferentiableTransform): the rotation is orthogonal, so din = R(θ)ᵀ·dout, the
  /// rotation by −θ, at the same positions. `in` is not needed.
  void transform_queries_backward(Index /*head*/, Positions positions, Index /*centre*/,
                                  ConstTileRef<Scalar> /*in*/, ConstTileRef<Scalar> dout,
                                  TileRef<Scalar> din) const {
    rotate<true>(positions, dout, din);
  }
  void transform_keys_backward(Index /*head*/, Positions positions, Index /*centre*/,
                               ConstTileRef<Scalar> /*in*/, ConstTileRef<Scalar> dout,
                               TileRef<Scalar> din) const {
    rotate<true>(positions, dout, din);
  }

  /// Keys do not depend on the tile centre: a KV cache may store them transformed.
  bool keys_ignore_centre() const { return true; }

 private:
  using Table = detail::LazyRowTable<Scalar, detail::RotaryRowFill>;

  void build(std::vector<double> theta, double magnitude) {
    rotary_dim_ = 2 * static_cast<Index>(theta.size());
    magnitude_ = magnitude;
    frequencies_ = std::make_shared<const std::vector<double>>(std::move(theta));
    table_ = std::make_shared<const Table>(0, cached_positions_, rotary_dim_,
                                           detail::RotaryRowFill{frequencies_, magnitude_});
  }

  template <bool Transposed = false>
  void rotate(Positions positions, ConstTileRef<Scalar> in, TileRef<Scalar> out) const {
    constexpr const char* fn = "posenc::RotaryEncoding::transform";
    detail::require(in.cols() == head_dim_ && out.cols() == head_dim_ && out.rows() == in.rows(),
                    fn, "in is [", in.rows(), ", ", in.cols(), "] and out is [", out.rows(), ", ",
                    out.cols(), "] but both must be [rows, head_dim = ", head_dim_, "]");
    detail::require(static_cast<Index>(positions.size()) == in.rows(), fn, "positions has ",
                    positions.size(), " entries but in has ", in.rows(), " rows");
    const Index pairs = rotary_dim_ / 2;
    // Rows of uncached positions are computed into a per-thread buffer, fetched only when one
    // is needed (no allocation per tile).
    std::optional<detail::ScratchLease<detail::RowScratch<Scalar>>> lease;
    Scalar* scratch = nullptr;
    const bool interleaved = pairing_ == RotaryPairing::interleaved;
    for (Index r = 0; r < in.rows(); ++r) {
      const Index position = positions[static_cast<std::size_t>(r)];
      if (scratch == nullptr && !table_->contains(position)) {
        scratch = detail::grow(lease.emplace().get().values, rotary_dim_);
      }
      const Scalar* cs = table_->row(position, scratch);
      detail::rotate_row<Scalar, Transposed>(interleaved, pairs, head_dim_, cs, nullptr,
                                             in.data() + r * in.outerStride(),
                                             out.data() + r * out.outerStride());
    }
  }

  Index head_dim_;
  Index rotary_dim_;
  RotaryPairing pairing_;
  double base_;
  RopeScaling scaling_;
  Index cached_positions_;
  double magnitude_ = 1.0;
  std::shared_ptr<const std::vector<double>> frequencies_;
  std::shared_ptr<const Table> table_;
};

static_assert(QueryKeyTransform<RotaryEncoding<float>>);
static_assert(QueryKeyTransform<RotaryEncoding<double>>);

}  // namespace posenc
