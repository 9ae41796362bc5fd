// SPDX-License-Identifier: MIT
// XPos (extrapolatable position embedding): RoPE's rotation times a per-pair decay that shrinks
// q·k with distance, as a QueryKeyTransform whose scale factors stay in floating-point range at any
// length; plus the decoding window of the LEX paper's blockwise causal attention.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

#include "posenc/detail/check.hpp"
#include "posenc/detail/rotary.hpp"
#include "posenc/detail/scratch.hpp"
#include "posenc/encoders/rope.hpp"
#include "posenc/encoding.hpp"
#include "posenc/tensor.hpp"

namespace posenc {

/// Where XPos measures its scale exponent p = n − c from. Any c shared by the queries and keys of
/// one logit cancels in q·k; it only decides the magnitudes of the transformed rows.
///
///   tile()          c = the `centre` the attention kernel passes: the first query position of the
///                   query tile. Keeps every factor in range at any length (the default).
///   fixed(c)        c for every row, whatever the kernel passes: keys transformed once stay valid,
///                   so a KvCache may store them. Rows must lie within
///                   XPosEncoding::fixed_centre_range() positions of c (35 694 in float, 289 519 in
///                   double with the defaults γ = 0.4, scale_base = 512): farther out a factor
///                   leaves the Scalar's normal range, and transform_queries / transform_keys
///                   (so attention and KvCache) throw std::invalid_argument.
///   torchscale(T)   fixed(ceil(T/2)): microsoft/torchscale's centring for a call covering T
///                   positions (reproduces tests/data/xpos_rotate.json and xpos_attention.json).
struct XPosCentring {
  std::optional<Index> centre;  // empty: tile

  static XPosCentring tile() { return {}; }
  static XPosCentring fixed(Index centre) { return {centre}; }
  static XPosCentring torchscale(Index total_length) { return {(total_length + 1) / 2}; }
};

/// Construction options of XPosEncoding. An aggregate: `{.scale_base = 512, .pairing = ...}`.
struct XPosOptions {
  double scale_base = 512.0;  // torchscale xpos_scale_base
  double gamma = 0.4;         // torchscale's hard-coded decay offset
  double base = 10000.0;      // rotation base, as RoPE
  /// Default interleaved, pairs (2k, 2k+1), as torchscale (the paper's code); half = pairs (k, k +
  /// d/2), flash-attention's XPos. Unlike RotaryOptions, whose default is half (HF rotate_half).
  RotaryPairing pairing = RotaryPairing::interleaved;
  XPosCentring centring = XPosCentring::tile();
  /// cos/sin rows of positions [0, cached_positions) and decay rows of offsets |n − c| below it
  /// are cached on first use (shared by copies); others are computed on the fly.
  Index cached_positions = Index{1} << 20;
};

/// XPos: pair k of a query at position m becomes ζ_k^((m−c)/scale_base)·R(m·θ_k)·(a, b), of a key
/// at position n ζ_k^(−(n−c)/scale_base)·R(n·θ_k)·(a, b), with R RoPE's rotation, θ_k =
/// base^(−2k/d) and ζ_k = (2k + γ·d)/((1 + γ)·d), so q'·k' = Σ_k ζ_k^((m−n)/scale_base)·(RoPE's
/// pair term) depends only on m − n and decays for keys in the past. Sun, Dong, Patra, Ma, Huang,
/// Benhaim, Chaudhary, Song, Wei 2022, "A Length-Extrapolatable Transformer", arXiv 2212.10554;
/// constants and signs of microsoft/torchscale (ζ^(p/scale_base), not the paper's ζ^p; keys
/// rotated like queries, Eq. 10's minus sign is a typo).
///
/// - Rows: [rows, head_dim] tiles, row r at absolute position positions[r]; every channel is
///   rotated (head_dim even); transformed_dim(d) = d. `out` may be the same matrix as `in`.
/// - Range: the exponent is measured from a centre c (XPosCentring). With the default tile
///   centring the query factors are ζ^((m−c)/sb) <= 1 for the rows of a query tile with
///   consecutive positions (c = its first position) and past keys get factors <= 1 that underflow
///   smoothly to 0 (their true contribution), so float attention is finite at N = 131072 and
///   beyond. Keys in the future (no causal mask) are amplified, as in the reference. With a
///   fixed centre every row must lie within fixed_centre_range() of it (std::invalid_argument
///   otherwise, rather than factors that overflow or flush to 0 and give NaN or wrong logits).
/// - Angles and decays are formed in double and cast last.
/// - Matches tests/data/xpos_rotate.json and xpos_attention.json (with XPosCentring::torchscale)
/// and,
///   with Mask::blockwise_causal, bca.json. Example: examples/kv_cache_decoding.cpp.
template <class ScalarType>
class XPosEncoding {
 public:
  using Scalar = ScalarType;

  explicit XPosEncoding(Index head_dim, XPosOptions options = {})
      : head_dim_(head_dim), options_(options) {
    constexpr const char* fn = "posenc::XPosEncoding";
    detail::require(head_dim >= 2 && head_dim % 2 == 0, fn, "head_dim must be even and >= 2, got ",
                    head_dim);
    detail::require(std::isfinite(options.scale_base) && options.scale_base > 0.0, fn,
                    "scale_base must be finite and positive, got ", options.scale_base);
    detail::require(std::isfinite(options.gamma) && options.gamma > 0.0, fn,
                    "gamma must be finite and positive, got ", options.gamma);
    detail::require(std::isfinite(options.base) && options.base > 1.0, fn,
                    "base must be finite and > 1, got ", options.base);
    detail::require(options.cached_positions >= 0, fn, "cached_positions must be >= 0, got ",
                    options.cached_positions);
    const Index pairs = head_dim / 2;
    const double d = static_cast<double>(head_dim);
    auto theta = std::make_shared<std::vector<double>>(static_cast<std::size_t>(pairs));
    auto log_decay = std::make_shared<std::vector<double>>(static_cast<std::size_t>(pairs));
    for (Index k = 0; k < pairs; ++k) {
      const auto i = static_cast<std::size_t>(k);
      (*theta)[i] = 1.0 / std::pow(options.base, static_cast<double>(2 * k) / d);
      const double zeta =
          (2.0 * static_cast<double>(k) + options.gamma * d) / ((1.0 + options.gamma) * d);
      (*log_decay)[i] = std::log(zeta) / options.scale_base;
    }
    frequencies_ = theta;
    log_decay_ = log_decay;
    fixed_centre_range_ = compute_fixed_centre_range(*log_decay);
    rotation_ = std::make_shared<const RotationTable>(0, options.cached_positions, head_dim,
                                                      detail::RotaryRowFill{theta, 1.0});
    decay_ = std::make_shared<const DecayTable>(
        -options.cached_positions, 2 * options.cached_positions, pairs, DecayRowFill{log_decay});
  }

  Index head_dim() const { return head_dim_; }
  const XPosOptions& options() const { return options_; }
  /// θ_k, k < head_dim/2.
  std::span<const double> frequencies() const { return *frequencies_; }
  /// ζ_k, k < head_dim/2.
  double zeta(Index k) const {
    return std::exp((*log_decay_)[static_cast<std::size_t>(k)] * options_.scale_base);
  }

  /// With a fixed centre c (XPosCentring::fixed, torchscale), the largest |n − c| accepted for a
  /// row at position n: the largest offset p for which every scale factor ζ_k^(±p/scale_base),
  /// rounded to Scalar, is finite and normal (>= numeric_limits<Scalar>::min(), so its reciprocal
  /// is finite too). The extreme pair is k = 0, ζ_0 = γ/(1 + γ): the limit is
  /// floor(ln(1/min)·scale_base / |ln ζ_0|) up to rounding, 35 694 in float and 289 519 in double
  /// for γ = 0.4, scale_base = 512. Tile centring has no such limit (its factors for past keys
  /// underflow to their true contribution, 0).
  Index fixed_centre_range() const { return fixed_centre_range_; }

  /// The same encoder with another centring (e.g. fixed, to cache transformed keys).
  XPosEncoding with_centring(XPosCentring centring) const {
    XPosEncoding copy = *this;
    copy.options_.centring = centring;
    return copy;
  }

  Index transformed_dim(Index dim) const { return dim; }

  void validate(const AttentionShape& shape) const {
    detail::require(shape.query_dim == head_dim_, "posenc::XPosEncoding", "built for head_dim ",
                    head_dim_, " but q and k have dim ", shape.query_dim);
  }

  /// Queries ([rows, head_dim]) at `positions`: rotation times ζ^(+(m − c)/scale_base).
  /// With a fixed centre, throws for a position farther than fixed_centre_range() from it.
  void transform_queries(Index /*head*/, Positions positions, Index centre, ConstTileRef<Scalar> in,
                         TileRef<Scalar> out) const {
    apply("posenc::XPosEncoding::transform_queries", positions,
          options_.centring.centre.value_or(centre), Scalar(1), in, out);
  }
  /// Keys ([rows, head_dim]) at `positions`: rotation times ζ^(−(n − c)/scale_base).
  /// With a fixed centre, throws for a position farther than fixed_centre_range() from it.
  void transform_keys(Index /*head*/, Positions positions, Index centre, ConstTileRef<Scalar> in,
                      TileRef<Scalar> out) const {
    apply("posenc::XPosEncoding::transform_keys", positions,
          options_.centring.centre.value_or(centre), Scalar(-1), in, out);
  }

  /// Backward (DifferentiableTransform): out = G·R·in with G the diagonal gains ζ^(±(p − c)/
  /// scale_base), so din = Rᵀ·G·dout, the transposed rotation with the same gains. `in` is not
  /// needed.
  void transform_queries_backward(Index /*head*/, Positions positions, Index centre,
                                  ConstTileRef<Scalar> /*in*/, ConstTileRef<Scalar> dout,
                                  TileRef<Scalar> din) const {
    apply<true>("posenc::XPosEncoding::transform_queries_backward", positions,
                options_.centring.centre.value_or(centre), Scalar(1), dout, din);
  }
  void transform_keys_backward(Index /*head*/, Positions positions, Index centre,
                               ConstTileRef<Scalar> /*in*/, ConstTileRef<Scalar> dout,
                               TileRef<Scalar> din) const {
    apply<true>("posenc::XPosEncoding::transform_keys_backward", positions,
                options_.centring.centre.value_or(centre), Scalar(-1), dout, din);
  }

  /// With a fixed centre, keys do not depend on the kernel's centre: a KvCache may store them
  /// transformed.
  bool keys_ignore_centre() const { return options_.centring.centre.has_value(); }

 private:
  /// Fills ζ_k^(offset/scale_base) for k < pairs.
  struct DecayRowFill {
    std::shared_ptr<const std::vector<double>> log_decay;  // ln(ζ_k)/scale_base
    template <class S>
    void operator()(Index offset, S* row) const {
      for (std::size_t k = 0; k < log_decay->size(); ++k) {
        row[k] = static_cast<S>(std::exp(static_cast<double>(offset) * (*log_decay)[k]));
      }
    }
  };
  using RotationTable = detail::LazyRowTable<Scalar, detail::RotaryRowFill>;
  using DecayTable = detail::LazyRowTable<Scalar, DecayRowFill>;

  static constexpr const char* scalar_name() {
    if constexpr (std::is_same_v<Scalar, float>) return "float";
    if constexpr (std::is_same_v<Scalar, double>) return "double";
    return "the scalar type";
  }

  /// See fixed_centre_range(): the largest p with every ζ_k^(±p/scale_base), formed as
  /// DecayRowFill forms it, a finite normal Scalar. The bound ln(1/min)/max_k |ln ζ_k/scale_base|
  /// is refined against the factors actually computed, so rounding cannot let one slip out.
  static Index compute_fixed_centre_range(const std::vector<double>& log_decay) {
    double steepest = 0.0;  // max_k |ln ζ_k| / scale_base
    for (const double l : log_decay) steepest = std::max(steepest, std::abs(l));
    constexpr Index unlimited = std::numeric_limits<Index>::max();
    if (steepest == 0.0) return unlimited;
    const double bound =
        -std::log(static_cast<double>(std::numeric_limits<Scalar>::min())) / steepest;
    if (!(bound < 0x1p62)) return unlimited;
    const auto in_range = [&](Index p) {
      for (const double l : log_decay) {
        for (const double sign : {1.0, -1.0}) {
          const auto factor = static_cast<Scalar>(std::exp(sign * static_cast<double>(p) * l));
          if (!(std::isfinite(factor) && factor >= std::numeric_limits<Scalar>::min())) {
            return false;
          }
        }
      }
      return true;
    };
    auto limit = static_cast<Index>(bound);
    while (limit > 0 && !in_range(limit)) --limit;
    while (in_range(limit + 1)) ++limit;
    return limit;
  }

  /// Rejects, with a fixed centre, a row farther than fixed_centre_range() from it.
  void check_fixed_centre_range(const char* fn, Positions positions, Index centre) const {
    if (!options_.centring.centre) return;
    for (std::size_t r = 0; r < positions.size(); ++r) {
      const Index n = positions[r];
      // |n − centre| without signed overflow.
      const std::uint64_t distance =
          n >= centre ? static_cast<std::uint64_t>(n) - static_cast<std::uint64_t>(centre)
                      : static_cast<std::uint64_t>(centre) - static_cast<std::uint64_t>(n);
      detail::require(distance <= static_cast<std::uint64_t>(fixed_centre_range_), fn, "positions[",
                      r, "] = ", n, " is ", distance, " positions from the fixed centre ", centre,
                      " (XPosCentring::fixed / torchscale), but at most ", fixed_centre_range_,
                      " are supported in ", scalar_name(),
                      ": beyond that the scale factors ζ^(±(n − c)/scale_base) (scale_base ",
                      options_.scale_base, ", gamma ", options_.gamma, ") leave the ",
                      scalar_name(),
                      " range. Use XPosCentring::tile() or a centre nearer the positions");
    }
  }

  template <bool Transposed = false>
  void apply(const char* fn, Positions positions, Index centre, Scalar sign,
             ConstTileRef<Scalar> in, TileRef<Scalar> out) const {
    detail::require(in.cols() == head_dim_ && out.cols() == head_dim_ && out.rows() == in.rows(),
                    fn, "in is [", in.rows(), ", ", in.cols(), "] and out is [", out.rows(), ", ",
                    out.cols(), "] but both must be [rows, head_dim = ", head_dim_, "]");
    detail::require(static_cast<Index>(positions.size()) == in.rows(), fn, "positions has ",
                    positions.size(), " entries but in has ", in.rows(), " rows");
    check_fixed_centre_range(fn, positions, centre);
    const Index pairs = head_dim_ / 2;
    // Rows outside the cached ranges go to a per-thread buffer, fetched only when one is needed
    // (no allocation per tile).
    std::optional<detail::ScratchLease<detail::RowScratch<Scalar>>> lease;
    Scalar* scratch = nullptr;
    const bool interleaved = options_.pairing == RotaryPairing::interleaved;
    for (Index r = 0; r < in.rows(); ++r) {
      const Index n = positions[static_cast<std::size_t>(r)];
      const Index offset = sign > 0 ? n - centre : centre - n;
      if (scratch == nullptr && !(rotation_->contains(n) && decay_->contains(offset))) {
        scratch = detail::grow(lease.emplace().get().values, head_dim_ + pairs);
      }
      const Scalar* cs = rotation_->row(n, scratch);
      const Scalar* gain = decay_->row(offset, scratch == nullptr ? nullptr : scratch + head_dim_);
      detail::rotate_row<Scalar, Transposed>(interleaved, pairs, head_dim_, cs, gain,
                                             in.data() + r * in.outerStride(),
                                             out.data() + r * out.outerStride());
    }
  }

  Index head_dim_;
  XPosOptions options_;
  std::shared_ptr<const std::vector<double>> frequencies_;
  std::shared_ptr<const std::vector<double>> log_decay_;
  Index fixed_centre_range_ = 0;
  std::shared_ptr<const RotationTable> rotation_;
  std::shared_ptr<const DecayTable> decay_;
};

static_assert(QueryKeyTransform<XPosEncoding<float>>);
static_assert(QueryKeyTransform<XPosEncoding<double>>);

}  // namespace posenc
