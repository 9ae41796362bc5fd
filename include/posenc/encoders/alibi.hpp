// SPDX-License-Identifier: MIT
// ALiBi: attention with linear biases, a fixed per-head penalty proportional to the distance
// between query and key. Slopes bit-exact with the authors' code for any head count, with the
// float32-rounded variants that trained models (the authors' module, DAPE, BLOOM) actually hold.
#pragma once

#include <cmath>
#include <cstddef>
#include <utility>

#include "posenc/detail/check.hpp"
#include "posenc/encoders/distance_bias.hpp"
#include "posenc/encoding.hpp"
#include "posenc/tensor.hpp"

namespace posenc {

/// Which rounding of the ALiBi slopes to use.
///
///   reference  the authors' `get_slopes` in Python double: start·start^h with
///              start = 2^(−2^−(log2 p − 3)) (ofirpress/attention_with_linear_biases). Differs from
///              the closed form 2^(−8h/p) by up to 1 ulp (n = 10, 11, 12, 16, 24, 32).
///   float32    those values rounded to float32, as the authors' module buffer and the DAPE code
///              (chuanyang-Zheng/DAPE, `torch.Tensor(slopes)`) store them. Exact for powers of two.
///   bloom      HF BLOOM's `build_alibi_tensor`: a float32 base b raised to h in double, rounded
///              to float32 (differs from `float32` in the last bit for some heads).
enum class AlibiSlopes { reference, float32, bloom };

/// The ALiBi slope of every head, [heads]. For n a power of two m_h = 2^(−8h/n), h = 1..n;
/// otherwise, with p = 2^floor(log2 n), the p slopes of p heads followed by the first n − p of
/// every other slope of 2p heads (2^(−8h/(2p)), h = 1, 3, 5, …): not monotonic.
/// Throws std::invalid_argument unless heads >= 1.
inline Vector<double> alibi_slopes(Index heads, AlibiSlopes rounding = AlibiSlopes::reference) {
  detail::require(heads >= 1, "posenc::alibi_slopes", "heads must be >= 1, got ", heads);
  Index p = 1;
  while (2 * p <= heads) p *= 2;
  // The geometric sequence of a power of two q: first term and ratio 2^(−8/q).
  const auto first_term = [](Index q) {
    return std::pow(2.0, -std::pow(2.0, -(std::log2(static_cast<double>(q)) - 3.0)));
  };
  Vector<double> slopes(heads);
  if (rounding == AlibiSlopes::bloom) {
    const double base = static_cast<float>(first_term(p));
    const double extra_base = static_cast<float>(first_term(2 * p));
    for (Index h = 0; h < heads; ++h) {
      const double value = h < p ? std::pow(base, static_cast<double>(h + 1))
                                 : std::pow(extra_base, static_cast<double>(2 * (h - p) + 1));
      slopes[h] = static_cast<float>(value);
    }
    return slopes;
  }
  for (Index h = 0; h < heads; ++h) {
    const Index q = h < p ? p : 2 * p;
    const Index k = h < p ? h : 2 * (h - p);  // every other slope of 2p heads, from the first
    const double start = first_term(q);
    slopes[h] = start * std::pow(start, static_cast<double>(k));
    if (rounding == AlibiSlopes::float32) slopes[h] = static_cast<float>(slopes[h]);
  }
  return slopes;
}

/// ALiBi (Press, Smith & Lewis 2022, "Train Short, Test Long", arXiv 2108.12409): a ScoreBias
///
///   B_h(i, j) = −m_h · δ(i, j),   δ = max(i − j, 0) (BiasForm::causal) or |i − j| (symmetric)
///
/// added to the scaled logits (the kernel's default 1/sqrt(d) scaling, as in every reference).
/// - slopes m: [heads], from `alibi_slopes(heads, rounding)` or given explicitly; formed and
///   applied in double, the bias cast to Scalar last (exact at positions near 10^6).
/// - i, j: absolute query and key positions (any origin; only i − j matters). The causal form is
///   gpt-neox's −m(i − j) with 0 above the diagonal (golden alibi.json `gptneox_bias`; DAPE's
///   `AliBi`); the authors' fairseq rows m·j differ from it by the per-row constant m·i, which
///   softmax ignores. The symmetric form is OpenNMT-py's −m|j − i| (`onmt_bias`).
/// - Example: examples/relative_biases.cpp; `attention(q, k, v, Alibi<float>(8))`.
template <class T>
class Alibi {
 public:
  using Scalar = T;
  /// B_h(i, j) is a function of i − j (DistanceBias).
  static constexpr bool depends_only_on_distance = true;

  /// The reference slopes of `heads` heads. Throws unless heads >= 1.
  explicit Alibi(Index heads, BiasForm form = BiasForm::causal,
                 AlibiSlopes rounding = AlibiSlopes::reference)
      : slopes_(slopes_for(heads, rounding)), form_(form) {}

  /// Explicit slopes, one per head. Throws when empty or not finite.
  explicit Alibi(Vector<double> slopes, BiasForm form = BiasForm::causal)
      : slopes_(std::move(slopes)), form_(form) {
    detail::require(slopes_.size() >= 1, "posenc::Alibi", "slopes must have at least one entry");
    for (Index h = 0; h < slopes_.size(); ++h) {
      detail::require(std::isfinite(slopes_[h]), "posenc::Alibi", "slopes must be finite, got ",
                      slopes_[h], " at slopes[", h, "] (head ", h, ")");
    }
  }

  Index heads() const { return slopes_.size(); }
  const Vector<double>& slopes() const { return slopes_; }
  BiasForm form() const { return form_; }

  /// B_h(i, j) for query position i and key position j. Unchecked head.
  T bias(Index head, Index i, Index j) const { return static_cast<T>(value(slopes_[head], i - j)); }

  /// Adds B_h(query_positions[r], key_positions[c]) to tile(r, c).
  void add_bias(Index head, Positions query_positions, Positions key_positions,
                TileRef<T> tile) const {
    const double minus_slope = -slopes_[head];
    detail::add_distance_bias<T>(query_positions, key_positions, tile,
                                 [&](Index top, Index count, double* out) {
                                   detail::form_distances(form_, top, count, out);
                                   for (Index m = 0; m < count; ++m) out[m] *= minus_slope;
                                 });
  }

 private:
  /// alibi_slopes, with the heads checked under the constructor's name.
  static Vector<double> slopes_for(Index heads, AlibiSlopes rounding) {
    detail::require(heads >= 1, "posenc::Alibi", "heads must be >= 1, got ", heads);
    return alibi_slopes(heads, rounding);
  }

  double value(double slope, Index query_minus_key) const {
    return static_cast<double>(detail::form_distance(form_, query_minus_key)) * -slope;
  }

  Vector<double> slopes_;
  BiasForm form_;
};

static_assert(DistanceBias<Alibi<float>>);
static_assert(ScoreBias<Alibi<float>>);
static_assert(ScoreBias<Alibi<double>>);

}  // namespace posenc
