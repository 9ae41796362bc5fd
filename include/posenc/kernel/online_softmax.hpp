// SPDX-License-Identifier: MIT
// The online softmax of one block of query rows (running max, running sum, unnormalised output)
// and where a finished block goes: a normalised output or an AttentionPartial.
// IWYU pragma: private, include "posenc/attention.hpp"
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

#include "posenc/kernel/tile_kernels.hpp"
#include "posenc/tensor.hpp"

namespace posenc::kernel {

/// A row-major tile inside a larger buffer (row stride = padded width).
template <class Scalar>
using StridedTile = Eigen::Map<Matrix<Scalar>, Eigen::Unaligned, Eigen::OuterStride<>>;

/// Online-softmax state of one block of query rows (Milakov & Gimelshein 2018; FlashAttention,
/// Dao et al. 2022): running max, running sum, unnormalised output. `output` is rows × Dv inside
/// rows × padded(Dv) storage (`padded_output`), the layout the P·V micro-kernel writes.
template <class Scalar>
struct OnlineSoftmax {
  Eigen::Map<Vector<Scalar>> row_max;
  Eigen::Map<Vector<Scalar>> row_sum;
  Eigen::Map<Vector<Scalar>> rescale;
  StridedTile<Scalar> output;
  StridedTile<Scalar> padded_output;

  void reset() {
    row_max.setConstant(-std::numeric_limits<Scalar>::infinity());
    row_sum.setZero();
    padded_output.setZero();
  }

  /// Turns `scores` (rows × cols) into exp(scores − new max) in place (−inf, i.e. masked, gives
  /// exactly 0) and rescales the running sum and output. Returns false when no entry of the
  /// tile has a score above −inf (nothing to add).
  ///
  /// Non-finite scores follow IEEE arithmetic (README, "Non-finite values"): a NaN score makes
  /// exp(NaN − max) = NaN, so the row's sum and output become NaN; a +inf score makes the max +inf
  /// and exp(inf − inf) = NaN. The one place a NaN could hide is a row whose other entries are all
  /// −inf (the max is then −inf and nothing is exponentiated): such a row is marked NaN here.
  bool absorb(StridedTile<Scalar>& scores) {
    constexpr Scalar minus_infinity = -std::numeric_limits<Scalar>::infinity();
    constexpr Scalar nan = std::numeric_limits<Scalar>::quiet_NaN();
    bool any = false;
    bool rescaled = false;
    for (Index r = 0; r < scores.rows(); ++r) {
      auto row = scores.row(r);
      const Scalar old_max = row_max[r];
      // std::max keeps a NaN old_max (a row already marked NaN stays NaN).
      const Scalar new_max = std::max(old_max, row_maximum(row.data(), scores.cols()));
      if (new_max == minus_infinity) {  // every score so far is −inf (masked) or NaN
        if (row.hasNaN()) {
          row_max[r] = nan;
          row_sum[r] = nan;
        }
        row.setZero();
        rescale[r] = Scalar(1);
        continue;
      }
      any = true;
      const Scalar tile_sum = exp_shifted_row(row.data(), scores.cols(), new_max);
      const Scalar factor = old_max == new_max          ? Scalar(1)
                            : old_max == minus_infinity ? Scalar(0)
                                                        : std::exp(old_max - new_max);
      rescaled = rescaled || factor != Scalar(1);
      rescale[r] = factor;
      row_sum[r] = row_sum[r] * factor + tile_sum;
      row_max[r] = new_max;
    }
    if (any && rescaled) padded_output.array().colwise() *= rescale.array();
    return any;
  }
};

/// Where the streaming kernel writes its result: normalised output, or a partial. A row whose
/// running max is still −inf either has no allowed key (zero, the only zero row) or only keys
/// scoring −inf (NaN: exp(−inf − (−inf)), as softmax gives); `has_allowed_key` tells which.
template <class Scalar>
struct ResultSink {
  HeadsView<Scalar> output;
  Matrix<Scalar>* row_max = nullptr;  // partial mode when non-null
  Matrix<Scalar>* row_sum = nullptr;
  // Normalised mode: when non-null, lse[h·lse_stride + r] = row_max + log(row_sum), the row
  // log-sum-exp of the final logits (−inf for a row with no allowed key), for the backward.
  Scalar* lse = nullptr;
  Index lse_stride = 0;

  template <class HasAllowedKey>
  void write(Index h, Index first, const OnlineSoftmax<Scalar>& state,
             HasAllowedKey has_allowed_key) const {
    constexpr Scalar minus_infinity = -std::numeric_limits<Scalar>::infinity();
    constexpr Scalar nan = std::numeric_limits<Scalar>::quiet_NaN();
    auto out = output.head(h).middleRows(first, state.output.rows());
    if (row_max != nullptr) {
      out = state.output;
      row_max->row(h).segment(first, state.row_max.size()) = state.row_max.transpose();
      row_sum->row(h).segment(first, state.row_sum.size()) = state.row_sum.transpose();
      for (Index r = 0; r < out.rows(); ++r) {
        const Scalar max = state.row_max[r];
        if (std::isnan(max)) {  // a NaN score: the whole row is NaN
          (*row_sum)(h, first + r) = nan;
          out.row(r).setConstant(nan);
        } else if (max == minus_infinity && has_allowed_key(first + r)) {
          // Allowed keys that all score −inf: row_sum NaN (0/0), which a merge with a finite
          // side ignores (weight 0). The output keeps 0 · v of those keys: NaN exactly in the
          // columns where one of them has a non-finite value, which a merge still carries.
          (*row_sum)(h, first + r) = nan;
        }
      }
      return;
    }
    for (Index r = 0; r < out.rows(); ++r) {
      const bool empty = state.row_max[r] == minus_infinity;
      const bool nothing_allowed = empty && !has_allowed_key(first + r);
      if (empty) {
        out.row(r).setConstant(nothing_allowed ? Scalar(0) : nan);
      } else {
        out.row(r) = state.output.row(r) / state.row_sum[r];
      }
      if (lse != nullptr) {
        lse[h * lse_stride + first + r] = nothing_allowed ? minus_infinity
                                          : empty         ? nan
                                                  : state.row_max[r] + std::log(state.row_sum[r]);
      }
    }
  }
};

}  // namespace posenc::kernel
