// SPDX-License-Identifier: MIT
// Internals shared by the rotary encoders (RoPE, XPos): range-reduced cos/sin of p·θ in double,
// a lazily filled row table that const, concurrently used encoders can share safely, and the pair
// rotation loops for both channel pairings.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "posenc/tensor.hpp"

namespace posenc::detail {

/// cos(p·θ) and sin(p·θ) for an integer position p and frequency θ, in double, with p·θ formed
/// exactly (FMA two-product) and reduced modulo 2π with a two-part 2π (Cody–Waite), so position
/// 10^6 is as accurate as position 10: the error is that of θ itself, not of the product.
inline std::pair<double, double> rotary_cos_sin(Index position, double frequency) {
  constexpr double two_pi_hi = 6.283185307179586;       // 2π rounded to double
  constexpr double two_pi_lo = 2.4492935982947064e-16;  // 2π − two_pi_hi
  const double p = static_cast<double>(position);       // exact for |p| < 2^53
  const double hi = p * frequency;
  const double lo = std::fma(p, frequency, -hi);  // p·θ = hi + lo exactly
  const double turns = std::nearbyint(hi / two_pi_hi);
  const double reduced = (std::fma(-turns, two_pi_hi, hi) - turns * two_pi_lo) + lo;
  return {std::cos(reduced), std::sin(reduced)};
}

/// Rows of `width` values indexed by an integer in [first, first + count), filled by `fill(index,
/// row)` in chunks on first use and kept. Safe to read from many threads through a const
/// reference: each chunk is built by whichever thread needs it first and published with one
/// compare-and-swap (a losing thread frees its copy). Indices outside the range are filled into the
/// caller's scratch row instead, so any index works.
template <class Scalar, class Fill>
class LazyRowTable {
 public:
  static constexpr Index chunk_rows = 256;

  LazyRowTable(Index first, Index count, Index width, Fill fill)
      : first_(first),
        count_(count),
        width_(width),
        chunks_(new std::atomic<Scalar*>[static_cast<std::size_t>(chunk_count())]),
        fill_(std::move(fill)) {
    for (Index c = 0; c < chunk_count(); ++c) chunks_[c].store(nullptr, std::memory_order_relaxed);
  }
  LazyRowTable(const LazyRowTable&) = delete;
  LazyRowTable& operator=(const LazyRowTable&) = delete;
  ~LazyRowTable() {
    for (Index c = 0; c < chunk_count(); ++c) delete[] chunks_[c].load(std::memory_order_relaxed);
  }

  Index width() const { return width_; }

  /// Row `index`: a cached row, or `scratch` (width values) filled on the spot.
  /// Whether `index` is inside the cached range (row() then needs no scratch).
  bool contains(Index index) const { return index >= first_ && index < first_ + count_; }

  const Scalar* row(Index index, Scalar* scratch) const {
    if (index < first_ || index >= first_ + count_) {
      fill_(index, scratch);
      return scratch;
    }
    const Index offset = index - first_;
    const Index c = offset / chunk_rows;
    const Scalar* chunk = chunks_[c].load(std::memory_order_acquire);
    if (chunk == nullptr) chunk = build_chunk(c);
    return chunk + (offset % chunk_rows) * width_;
  }

 private:
  Index chunk_count() const { return (count_ + chunk_rows - 1) / chunk_rows; }

  const Scalar* build_chunk(Index c) const {
    std::unique_ptr<Scalar[]> fresh(new Scalar[static_cast<std::size_t>(chunk_rows * width_)]);
    const Index rows = std::min(chunk_rows, count_ - c * chunk_rows);
    for (Index r = 0; r < rows; ++r) fill_(first_ + c * chunk_rows + r, fresh.get() + r * width_);
    Scalar* expected = nullptr;
    if (chunks_[c].compare_exchange_strong(expected, fresh.get(), std::memory_order_acq_rel,
                                           std::memory_order_acquire)) {
      return fresh.release();
    }
    return expected;  // another thread published this chunk first
  }

  Index first_;
  Index count_;
  Index width_;
  std::unique_ptr<std::atomic<Scalar*>[]> chunks_;
  Fill fill_;
};

/// Fills [cos(p·θ_k)·magnitude for k < pairs, then sin(p·θ_k)·magnitude] for position p.
struct RotaryRowFill {
  std::shared_ptr<const std::vector<double>> frequencies;
  double magnitude = 1.0;

  template <class Scalar>
  void operator()(Index position, Scalar* row) const {
    const auto pairs = static_cast<Index>(frequencies->size());
    for (Index k = 0; k < pairs; ++k) {
      const auto [c, s] = rotary_cos_sin(position, (*frequencies)[static_cast<std::size_t>(k)]);
      row[k] = static_cast<Scalar>(c * magnitude);
      row[pairs + k] = static_cast<Scalar>(s * magnitude);
    }
  }
};

/// x·y + z with one rounding where the target has a fast FMA, else with two: the same choice in
/// every loop, so results never depend on which expression the compiler chose to contract.
template <class Scalar>
inline Scalar multiply_add(Scalar x, Scalar y, Scalar z) {
#if defined(FP_FAST_FMA) && defined(FP_FAST_FMAF)
  return std::fma(x, y, z);
#else
  return x * y + z;  // no fast FMA on the target, so nothing to contract either
#endif
}

/// Rotates the first 2·pairs channels of one row pair by pair: (a, b) -> (a·c − b·s, a·s + b·c)
/// with c = cs[k]·g_k, s = cs[pairs + k]·g_k (g_k = gain[k], or 1 when `gain` is null); the
/// remaining `dim − 2·pairs` channels are copied. Pair k is channels (2k, 2k+1) when
/// `interleaved`, else (k, k + pairs). `in` and `out` may be the same row. `Transposed`: the
/// transpose of that map, (a, b) -> (a·c + b·s, −a·s + b·c), the backward of the rotation
/// (din = Jᵀ·dout).
template <class Scalar, bool Transposed = false>
void rotate_row(bool interleaved, Index pairs, Index dim, const Scalar* cs, const Scalar* gain,
                const Scalar* in, Scalar* out) {
  const Scalar* cosines = cs;
  const Scalar* sines = cs + pairs;
  // One loop body for every layout, instantiated with compile-time channel maps so that each
  // variant vectorises; both pairings evaluate the same expressions (interleaved == half after a
  // channel permutation, bit for bit).
  auto rotate = [&](auto first_of_pair, auto partner_offset, auto has_gain) {
    for (Index k = 0; k < pairs; ++k) {
      Scalar c = cosines[k];
      Scalar s = sines[k];
      if constexpr (decltype(has_gain)::value) {
        c *= gain[k];
        s *= gain[k];
      }
      if constexpr (Transposed) s = -s;
      const Index i = first_of_pair(k);
      const Index j = i + partner_offset();
      const Scalar a = in[i];
      const Scalar b = in[j];
      out[i] = multiply_add(a, c, -(b * s));
      out[j] = multiply_add(a, s, b * c);
    }
  };
  const auto interleaved_first = [](Index k) { return 2 * k; };
  const auto half_first = [](Index k) { return k; };
  const auto one = [] { return Index{1}; };
  const auto half_width = [pairs] { return pairs; };
  if (interleaved) {
    if (gain == nullptr) {
      rotate(interleaved_first, one, std::false_type{});
    } else {
      rotate(interleaved_first, one, std::true_type{});
    }
  } else {
    if (gain == nullptr) {
      rotate(half_first, half_width, std::false_type{});
    } else {
      rotate(half_first, half_width, std::true_type{});
    }
  }
  if (out != in) {
    for (Index i = 2 * pairs; i < dim; ++i) out[i] = in[i];
  }
}

}  // namespace posenc::detail
