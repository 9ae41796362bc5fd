// SPDX-License-Identifier: MIT
// Register-blocked micro-kernels for the two products of an attention tile (logits = Q·Kᵀ and
// output += P·V) and the softmax exponential, written once over Eigen's packet abstraction so
// the same code runs with AVX-512, AVX2, SSE or NEON packets (or scalars), chosen at compile time.
// IWYU pragma: private, include "posenc/attention.hpp"
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include "posenc/detail/simd.hpp"
#include "posenc/tensor.hpp"

namespace posenc::kernel {

using detail::padded_width;
using detail::store_lanes;
using detail::sum_lanes;

/// The packet of Scalar (detail::SimdPacket) and the register blocking of the micro-kernels
/// (32 vector registers with AVX-512, 16 with AVX).
template <class Scalar>
struct TileKernelTraits : detail::SimdPacket<Scalar> {
  using detail::SimdPacket<Scalar>::many_registers;
  /// Q·Kᵀ: logits_rows query rows × logits_packets packets of keys per step.
  static constexpr int logits_rows = many_registers ? 8 : 6;
  static constexpr int logits_packets = 2;
  /// P·V: output_rows rows × up to output_packets packets of the value width per step.
  static constexpr int output_rows = many_registers ? 6 : 4;
  static constexpr int output_packets = many_registers ? 4 : 3;
};

/// Per-row column ranges of a tile that may hold non-zero work: row r needs columns
/// [begin[r], end[r]) only (a mask's allowed keys); null pointers: every column. The micro-kernels
/// skip whole register blocks outside the union of their rows' ranges.
struct ColumnLimits {
  const Index* begin = nullptr;
  const Index* end = nullptr;

  /// The union [first, last) of rows [r0, r0 + rows) (clamped to [0, cols)); empty as first >=
  /// last.
  std::pair<Index, Index> span(Index r0, Index rows, Index cols) const {
    if (begin == nullptr) return {0, cols};
    Index first = cols;
    Index last = 0;
    for (Index r = r0; r < r0 + rows; ++r) {
      if (begin[r] >= end[r]) continue;  // no allowed column
      first = std::min(first, begin[r]);
      last = std::max(last, end[r]);
    }
    return {std::max<Index>(first, 0), std::min(last, cols)};
  }
};

/// keys_t (depth × padded cols, row stride `ld`) = keysᵀ, zero in the padding columns.
/// keys: cols × depth, row stride `keys_stride`. Whole W × W blocks are transposed in registers
/// (Eigen's ptranspose on a PacketBlock); the edges element by element.
template <class Scalar>
void pack_transposed(const Scalar* keys, Index keys_stride, Index cols, Index depth, Scalar* keys_t,
                     Index ld) {
  using Packet = typename TileKernelTraits<Scalar>::Packet;
  constexpr Index W = TileKernelTraits<Scalar>::width;
  const Index full_cols = cols / W * W;
  const Index full_depth = depth / W * W;
  if constexpr (W > 1) {
// GCC warns that the vector type's alignment attribute is dropped in the template argument;
// Eigen's own PacketBlock uses carry the same (harmless) warning, silenced in its system header.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif
    Eigen::internal::PacketBlock<Packet, W> block;
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
    for (Index c0 = 0; c0 < full_cols; c0 += W) {
      for (Index d0 = 0; d0 < full_depth; d0 += W) {
        for (Index i = 0; i < W; ++i) {
          block.packet[i] = Eigen::internal::ploadu<Packet>(keys + (c0 + i) * keys_stride + d0);
        }
        Eigen::internal::ptranspose(block);
        for (Index i = 0; i < W; ++i) {
          Eigen::internal::pstoreu(keys_t + (d0 + i) * ld + c0, block.packet[i]);
        }
      }
    }
  }
  for (Index d = 0; d < depth; ++d) {
    Scalar* row = keys_t + d * ld;
    const Index first_col = d < full_depth ? full_cols : 0;  // blocks covered the rest
    for (Index c = first_col; c < cols; ++c) row[c] = keys[c * keys_stride + d];
    std::fill(row + cols, row + ld, Scalar(0));
  }
}

/// values_p (cols × padded dim, row stride `ld`) = values, zero in the padding columns.
template <class Scalar>
void pack_rows(const Scalar* values, Index values_stride, Index cols, Index dim, Scalar* values_p,
               Index ld) {
  for (Index c = 0; c < cols; ++c) {
    std::memcpy(values_p + c * ld, values + c * values_stride,
                static_cast<std::size_t>(dim) * sizeof(Scalar));
    std::fill(values_p + c * ld + dim, values_p + (c + 1) * ld, Scalar(0));
  }
}

/// Rows [r0, r0 + MR) ∩ [0, rows) × the register blocks of columns [first_col, last_col) of
/// tile_logits (first_col a multiple of the block width). Not inlined: inside a larger function
/// GCC 12 keeps the accumulators in memory and stores them on every step of the depth loop.
template <class Scalar>
EIGEN_DONT_INLINE void logits_row_block(const Scalar* queries, Index ldq, Index rows, Index r0,
                                        Index depth, const Scalar* keys_t, Index ldk, Index cols,
                                        Index first_col, Index last_col, Scalar* logits,
                                        Index ldl) {
  using Traits = TileKernelTraits<Scalar>;
  using Packet = typename Traits::Packet;
  using namespace Eigen::internal;
  constexpr int MR = Traits::logits_rows;
  constexpr int NP = Traits::logits_packets;
  constexpr Index W = Traits::width;
  const bool full_stores = ldl >= padded_width<Scalar>(cols);
  // Rows past the end repeat the last row (valid memory) and are not stored.
  const Scalar* q[MR];
  for (int i = 0; i < MR; ++i) q[i] = queries + std::min<Index>(r0 + i, rows - 1) * ldq;
  const Index active_rows = std::min<Index>(MR, rows - r0);
  for (Index c0 = first_col; c0 < last_col; c0 += NP * W) {
    Packet acc[MR][NP];
    for (int i = 0; i < MR; ++i) {
      for (int j = 0; j < NP; ++j) acc[i][j] = pset1<Packet>(Scalar(0));
    }
    // Columns past the padded width of keys_t are never read: c0 + NP·W may exceed it only
    // when the last step is narrower, handled by clamping the packet count.
    const Index packets = std::min<Index>(NP, (padded_width<Scalar>(cols) - c0) / W);
    if (packets == NP) {
      for (Index d = 0; d < depth; ++d) {
        const Scalar* k = keys_t + d * ldk + c0;
        Packet kp[NP];
        for (int j = 0; j < NP; ++j) kp[j] = ploadu<Packet>(k + j * W);
        for (int i = 0; i < MR; ++i) {
          const Packet qi = pset1<Packet>(q[i][d]);
          for (int j = 0; j < NP; ++j) acc[i][j] = pmadd(qi, kp[j], acc[i][j]);
        }
      }
    } else {
      for (Index d = 0; d < depth; ++d) {
        const Scalar* k = keys_t + d * ldk + c0;
        for (int j = 0; j < NP; ++j) {
          if (j >= packets) break;
          const Packet kp = ploadu<Packet>(k + j * W);
          for (int i = 0; i < MR; ++i) acc[i][j] = pmadd(pset1<Packet>(q[i][d]), kp, acc[i][j]);
        }
      }
    }
    // Constant trip counts with early exits (not runtime bounds): the loops unroll, every
    // acc[i][j] index is a constant and the accumulators stay in registers. A runtime index
    // would make GCC keep acc in memory and store all of it on every step of the depth loop.
    for (int i = 0; i < MR; ++i) {
      if (i >= active_rows) break;
      Scalar* out = logits + (r0 + i) * ldl + c0;
      for (int j = 0; j < NP; ++j) {
        if (j >= packets) break;
        const Index lanes = full_stores ? W : std::min<Index>(W, cols - c0 - j * W);
        if (lanes > 0) store_lanes(out + j * W, acc[i][j], lanes);
      }
    }
  }
}

/// logits(r, c) = Σ_d queries(r, d) · keys_t(d, c) for r < rows, c < cols.
/// queries: rows × depth (row stride ldq); keys_t: depth × padded(cols) (row stride ldk, zero
/// padding); logits: rows × cols (row stride ldl; columns up to padded(cols) may be written when
/// ldl >= padded(cols)). With `limits`, register blocks outside every one of their rows' ranges
/// are neither computed nor written: the caller masks those entries.
template <class Scalar>
void tile_logits(const Scalar* queries, Index ldq, Index rows, Index depth, const Scalar* keys_t,
                 Index ldk, Index cols, Scalar* logits, Index ldl, ColumnLimits limits = {}) {
  using Traits = TileKernelTraits<Scalar>;
  constexpr Index block = Traits::logits_packets * Traits::width;
  for (Index r0 = 0; r0 < rows; r0 += Traits::logits_rows) {
    const auto [first, last] =
        limits.span(r0, std::min<Index>(Traits::logits_rows, rows - r0), cols);
    logits_row_block(queries, ldq, rows, r0, depth, keys_t, ldk, cols, first / block * block, last,
                     logits, ldl);
  }
}

/// One step of tile_accumulate: NP packets of the output width starting at column `col`.
/// Transposed: the weights are read as weights(c, r) (the kernel computes Wᵀ·values).
template <class Scalar, int NP, bool Transposed = false>
void accumulate_columns(const Scalar* weights, Index ldw, Index rows, Index cols,
                        const Scalar* values_p, Index ldv, Scalar* output, Index ldo, Index col,
                        ColumnLimits limits) {
  using Traits = TileKernelTraits<Scalar>;
  using Packet = typename Traits::Packet;
  using namespace Eigen::internal;
  constexpr int MR = Traits::output_rows;
  constexpr Index W = Traits::width;
  // Weight (row r, column c) sits at p[i][c · step] for r = r0 + i.
  const Index row_stride = Transposed ? 1 : ldw;
  const Index step = Transposed ? ldw : 1;
  for (Index r0 = 0; r0 < rows; r0 += MR) {
    const Scalar* p[MR];
    for (int i = 0; i < MR; ++i) p[i] = weights + std::min<Index>(r0 + i, rows - 1) * row_stride;
    const Index active_rows = std::min<Index>(MR, rows - r0);
    const auto [first_c, last_c] = limits.span(r0, active_rows, cols);
    Packet acc[MR][NP];
    for (int i = 0; i < MR; ++i) {
      const Scalar* o = output + std::min<Index>(r0 + i, rows - 1) * ldo + col;
      for (int j = 0; j < NP; ++j) acc[i][j] = ploadu<Packet>(o + j * W);
    }
    for (Index c = first_c; c < last_c; ++c) {
      const Scalar* v = values_p + c * ldv + col;
      Packet vp[NP];
      for (int j = 0; j < NP; ++j) vp[j] = ploadu<Packet>(v + j * W);
      for (int i = 0; i < MR; ++i) {
        const Packet pi = pset1<Packet>(p[i][c * step]);
        for (int j = 0; j < NP; ++j) acc[i][j] = pmadd(pi, vp[j], acc[i][j]);
      }
    }
    for (int i = 0; i < MR; ++i) {  // constant trip count: acc stays in registers (see above)
      if (i >= active_rows) break;
      Scalar* o = output + (r0 + i) * ldo + col;
      for (int j = 0; j < NP; ++j) pstoreu(o + j * W, acc[i][j]);
    }
  }
}

/// output(r, :) += Σ_c weights(r, c) · values_p(c, :) for r < rows, c < cols.
/// weights: rows × cols (row stride ldw); values_p: cols × width (row stride ldv); output: rows ×
/// width (row stride ldo); width is a multiple of the packet width (padded). With `limits`, the
/// weights outside a row's range must be 0 (they are not read). Transposed: weights is cols ×
/// rows (row stride ldw) and output(r, :) += Σ_c weights(c, r) · values_p(c, :), i.e. the
/// backward's Pᵀ·dO and dSᵀ·Q̃ without forming the transpose.
template <class Scalar, bool Transposed = false>
void tile_accumulate(const Scalar* weights, Index ldw, Index rows, Index cols,
                     const Scalar* values_p, Index ldv, Index width, Scalar* output, Index ldo,
                     ColumnLimits limits = {}) {
  using Traits = TileKernelTraits<Scalar>;
  constexpr Index W = Traits::width;
  constexpr int NP = Traits::output_packets;
  Index col = 0;
  for (; col + NP * W <= width; col += NP * W) {
    accumulate_columns<Scalar, NP, Transposed>(weights, ldw, rows, cols, values_p, ldv, output, ldo,
                                               col, limits);
  }
  switch ((width - col) / W) {
    case 3:
      accumulate_columns<Scalar, 3, Transposed>(weights, ldw, rows, cols, values_p, ldv, output,
                                                ldo, col, limits);
      break;
    case 2:
      accumulate_columns<Scalar, 2, Transposed>(weights, ldw, rows, cols, values_p, ldv, output,
                                                ldo, col, limits);
      break;
    case 1:
      accumulate_columns<Scalar, 1, Transposed>(weights, ldw, rows, cols, values_p, ldv, output,
                                                ldo, col, limits);
      break;
    default:
      break;
  }
}

/// exp(x) for the softmax, whose arguments are x = s − max ≤ 0: Eigen's vectorised exponential
/// (the packet of the compile flags: AVX-512, AVX2, SSE, NEON, or scalar std::exp without SIMD),
/// with every x below the smallest normal result (−inf included) mapped to exactly 0 — Eigen
/// clamps its argument, so exp(−inf) would otherwise be the smallest normal number.
/// ln of the smallest normal Scalar: below it softmax_exp gives exactly 0. Computed once (a call
/// to std::log per packet cost 3 % of the backward).
template <class Scalar>
inline const Scalar log_smallest_normal = std::log(std::numeric_limits<Scalar>::min());

template <class Packet>
Packet softmax_exp(const Packet& x) {
  using namespace Eigen::internal;
  using Scalar = typename unpacket_traits<Packet>::type;
  const Packet lowest = pset1<Packet>(log_smallest_normal<Scalar>);
  // NaN passes through (x == x is false only for NaN): a NaN score must reach the row's sum.
  return pselect(pcmp_eq(x, x), pselect(pcmp_lt(x, lowest), pset1<Packet>(Scalar(0)), pexp(x)), x);
}

#ifdef EIGEN_VECTORIZE_AVX512
/// The same for 16 floats with AVX-512, in about half the instructions of Eigen's pexp: the
/// Cody–Waite reduction x = n·ln 2 + r (|r| ≤ ln 2 / 2, ln 2 split in two so n·ln 2 is exact),
/// Cephes' degree-7 polynomial for exp(r) (the one Eigen uses), and 2ⁿ applied by vscalefps,
/// whose zeroing mask gives exactly 0 below the normal range. Within 1 ulp on [log(FLT_MIN), 0].
inline Eigen::internal::Packet16f softmax_exp(const Eigen::internal::Packet16f& x) {
  const __m512 lowest = _mm512_set1_ps(std::log(std::numeric_limits<float>::min()));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln 2, high bits (exact)
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);      // ln 2, the rest
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  // Not-less-than, unordered: NaN counts as in range, so it propagates instead of becoming 0.
  const __mmask16 in_range = _mm512_cmp_ps_mask(x, lowest, _CMP_NLT_UQ);
  return _mm512_maskz_scalef_ps(in_range, p, n);
}
#endif

/// max_c row[c] for c < count (−inf when count is 0).
template <class Scalar>
Scalar row_maximum(const Scalar* row, Index count) {
  using Packet = typename TileKernelTraits<Scalar>::Packet;
  using namespace Eigen::internal;
  constexpr Index W = TileKernelTraits<Scalar>::width;
  Scalar best = -std::numeric_limits<Scalar>::infinity();
  Index c = 0;
  if (count >= W) {
    Packet m = ploadu<Packet>(row);
    for (c = W; c + W <= count; c += W) m = pmax(m, ploadu<Packet>(row + c));
    best = predux_max(m);
  }
  for (; c < count; ++c) best = std::max(best, row[c]);
  return best;
}

/// row[c] = softmax_exp(row[c] − max) for c < count, returning Σ_c row[c].
template <class Scalar>
Scalar exp_shifted_row(Scalar* row, Index count, Scalar max) {
  using Packet = typename TileKernelTraits<Scalar>::Packet;
  using namespace Eigen::internal;
  constexpr Index W = TileKernelTraits<Scalar>::width;
  const Packet shift = pset1<Packet>(max);
  Packet sum = pset1<Packet>(Scalar(0));
  Index c = 0;
  for (; c + W <= count; c += W) {
    const Packet e = softmax_exp(psub(ploadu<Packet>(row + c), shift));
    pstoreu(row + c, e);
    sum = padd(sum, e);
  }
  Scalar total = sum_lanes(sum);
  for (; c < count; ++c) {
    const Scalar x = row[c] - max;
    row[c] = x < log_smallest_normal<Scalar> ? Scalar(0) : std::exp(x);
    total += row[c];
  }
  return total;
}

}  // namespace posenc::kernel
