// SPDX-License-Identifier: MIT
// The backward members of detail::DapeNetwork (encoders/dape_network.hpp): mix_backward, which
// maps ∂L/∂scores of a tile to ∂L/∂logits, ∂L/∂B and the weights' gradients, on the same runs,
// bands and chunks as the forward (backward_chunk), or in place on whole rows for DAPE over a
// distance bias (backward_by_rows). Split from dape_network.hpp to keep each header readable.
// IWYU pragma: private, include "posenc/encoders/dape_network.hpp"
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

#include "posenc/encoders/dape_network.hpp"

namespace posenc::detail {

template <class T>
template <class AddBias, class Finish, class BiasGradient, class WeightGradient>
void DapeNetwork<T>::mix_backward(Positions query_positions, Positions key_positions,
                                  Index first_key, Index key_count, ConstTileRef<T> logits,
                                  TileRef<T> scores, ConstTileRef<T> dscores, const Finish& finish,
                                  TileRef<T> dlogits, const AddBias& add_bias,
                                  const BiasGradient* bias_gradient, WeightGradient* gradient,
                                  const char* fn, bool distance_bias) const {
  const auto rows = static_cast<Index>(query_positions.size());
  const auto K = static_cast<Index>(key_positions.size());
  detail::require(first_key >= 0 && key_count >= 0 && first_key + key_count <= K, fn, "keys [",
                  first_key, ", ", first_key + key_count, ") do not lie in the ", K,
                  " key positions");
  detail::require(logits.rows() == heads_ && logits.cols() == rows * K &&
                      dlogits.rows() == heads_ && dlogits.cols() == rows * K,
                  fn, "logits and dlogits must be [heads, rows·keys] = [", heads_, ", ", rows * K,
                  "], got [", logits.rows(), ", ", logits.cols(), "] and [", dlogits.rows(), ", ",
                  dlogits.cols(), "]");
  detail::require(dscores.rows() == heads_ && dscores.cols() == rows * key_count &&
                      scores.rows() == heads_ && scores.cols() == rows * key_count,
                  fn, "scores and dscores must be [heads, rows·key_count] = [", heads_, ", ",
                  rows * key_count, "], got [", scores.rows(), ", ", scores.cols(), "] and [",
                  dscores.rows(), ", ", dscores.cols(), "]");
  if (rows == 0 || key_count == 0) {
    for (Index h = 0; h < heads_; ++h) dlogits.row(h).setZero();
    return;
  }
  ScratchLease<DapeBackwardScratch<T>> lease;
  DapeBackwardScratch<T>& scratch = lease.get();
  const Tile tile{query_positions, key_positions,        logits.data(), logits.outerStride(),
                  scores.data(),   scores.outerStride(), first_key,     key_count};
  const BackwardTile back{dscores.data(), dscores.outerStride(), dlogits.data(),
                          dlogits.outerStride()};
  const bool with_gradient = gradient != nullptr;
  const bool with_dbias = with_bias_ && bias_gradient != nullptr;
  const WeightGradients grads{
      with_gradient ? grow(scratch.dw1, width_ * kernel_ * channels_) : nullptr,
      with_gradient ? grow(scratch.db1, width_) : nullptr,
      with_gradient ? grow(scratch.dw2, heads_ * kernel_ * width_) : nullptr,
      with_gradient ? grow(scratch.db2, heads_) : nullptr};
  if (with_gradient) {
    std::fill(grads.dw1, grads.dw1 + width_ * kernel_ * channels_, T(0));
    std::fill(grads.db1, grads.db1 + width_, T(0));
    std::fill(grads.dw2, grads.dw2 + heads_ * kernel_ * width_, T(0));
    std::fill(grads.db2, grads.db2 + heads_, T(0));
  }
  const bool by_rows =
      kernel_ == 1 && !tril_ && first_key == 0 && key_count == K && K % SimdPacket<T>::width == 0 &&
      (!with_bias_ || (distance_bias && w1_logits_.size() > 0 && is_consecutive(query_positions) &&
                       is_consecutive(key_positions)));
  if (by_rows) {
    backward_by_rows(tile, back, finish, add_bias, with_dbias ? bias_gradient : nullptr, grads,
                     scratch);
  } else {
    for (Index h = 0; h < heads_; ++h) dlogits.row(h).setZero();
    for_each_band(tile, add_bias, scratch.forward.bias, [&](const Band& band, const T* bias) {
      const Index in_count = band.in_last - band.in_first;
      T* dbias = nullptr;
      if (with_dbias) {
        dbias = grow(scratch.dbias, heads_ * band.rows * in_count);
        std::fill(dbias, dbias + heads_ * band.rows * in_count, T(0));
      }
      for (Index r0 = 0; r0 < band.rows; r0 += band.chunk_rows) {
        backward_chunk(tile, back, band, r0, std::min(band.chunk_rows, band.rows - r0), bias,
                       finish, dbias, grads, scratch);
      }
      if (dbias == nullptr) return;
      for (Index h = 0; h < heads_; ++h) {
        const Eigen::Map<const Matrix<T>> db(dbias + h * band.rows * in_count, band.rows, in_count);
        (*bias_gradient)(h,
                         query_positions.subspan(static_cast<std::size_t>(band.r0),
                                                 static_cast<std::size_t>(band.rows)),
                         key_positions.subspan(static_cast<std::size_t>(band.in_first),
                                               static_cast<std::size_t>(in_count)),
                         db);
      }
    });
  }
  if (!with_gradient) return;
  // Tap-major columns t·C + c back to PyTorch's c·k + t.
  for (Index t = 0; t < kernel_; ++t) {
    for (Index c = 0; c < channels_; ++c) {
      for (Index w = 0; w < width_; ++w) {
        gradient->w1(w, c * kernel_ + t) +=
            static_cast<double>(grads.dw1[w * kernel_ * channels_ + t * channels_ + c]);
      }
    }
    for (Index w = 0; w < width_; ++w) {
      for (Index h = 0; h < heads_; ++h) {
        gradient->w2(h, w * kernel_ + t) +=
            static_cast<double>(grads.dw2[h * kernel_ * width_ + t * width_ + w]);
      }
    }
  }
  for (Index w = 0; w < width_; ++w) gradient->b1[w] += static_cast<double>(grads.db1[w]);
  for (Index h = 0; h < heads_; ++h) gradient->b2[h] += static_cast<double>(grads.db2[h]);
}

template <class T>
template <class Finish, class AddBias, class BiasGradient>
void DapeNetwork<T>::backward_by_rows(const Tile& tile, const BackwardTile& back,
                                      const Finish& finish, const AddBias& add_bias,
                                      const BiasGradient* bias_gradient,
                                      const WeightGradients& grads,
                                      DapeBackwardScratch<T>& scratch) const {
  const auto rows = static_cast<Index>(tile.qpos.size());
  const auto K = static_cast<Index>(tile.kpos.size());
  const Index L = rows + K - 1;  // distances of the tile
  const Index Lp = padded_width<T>(L);
  const T slope = static_cast<T>(negative_slope);
  DapeScratch<T>& forward = scratch.forward;
  // B_h(last query, kpos[0] + m) for m < L, and hidden_bias[w][m] = Σ_h W1_B[w, h]·B_h[m] (the
  // loops of mix_by_distance), zero beyond L.
  T* window = nullptr;
  T* hidden_bias = nullptr;
  const Index last_query = tile.qpos[static_cast<std::size_t>(rows - 1)];
  Index* window_keys = nullptr;
  if (with_bias_) {
    window_keys = grow(forward.window_positions, L);
    for (Index m = 0; m < L; ++m) window_keys[m] = tile.kpos[0] + m;
    window = grow(forward.bias, (heads_ + width_) * Lp);
    std::fill(window, window + (heads_ + width_) * Lp, T(0));
    for (Index h = 0; h < heads_; ++h) {
      Eigen::Map<Matrix<T>> row(window + h * Lp, 1, L);
      add_bias(h, Positions(&last_query, 1), Positions(window_keys, static_cast<std::size_t>(L)),
               row);
    }
    hidden_bias = window + heads_ * Lp;
    for (Index w = 0; w < width_; ++w) {
      T* out = hidden_bias + w * Lp;
      for (Index h = 0; h < heads_; ++h) {
        const T weight = w1_bias_(w, h);
        const T* b = window + h * Lp;
        for (Index m = 0; m < L; ++m) out[m] += weight * b[m];
      }
    }
  }
  // Per-distance sums of dz (for dW1_B and ∂L/∂B) and of dS (for ∂L/∂B).
  const bool dz_sums = with_bias_ && (grads.dw1 != nullptr || bias_gradient != nullptr);
  const bool ds_sums = with_bias_ && bias_gradient != nullptr;
  T* dz_sum = dz_sums ? grow(scratch.dz_sums, width_ * Lp) : nullptr;
  T* ds_sum = ds_sums ? grow(scratch.ds_sums, heads_ * Lp) : nullptr;
  if (dz_sums) std::fill(dz_sum, dz_sum + width_ * Lp, T(0));
  if (ds_sums) std::fill(ds_sum, ds_sum + heads_ * Lp, T(0));

  const Index chunk_rows = std::max<Index>(1, dape_chunk_pixels / K);
  const Index chunk = chunk_rows * K;  // pixels of a full chunk: the row stride of a and dz
  T* hidden = grow(forward.hidden, width_ * chunk);
  T* dz = grow(scratch.dz, width_ * chunk);
  const T** in = grow(forward.input_rows, heads_);
  const T** residual_hidden = grow(forward.residual_hidden, width_);
  const T** hidden_in = grow(forward.hidden_rows, width_);
  T** hidden_out = grow(forward.hidden_out, width_);
  const T** residual_a = grow(forward.residual_a, heads_);
  const T** residual_b = grow(forward.residual_b, heads_);
  T** out = grow(forward.output_rows, heads_);
  const T** ds_in = grow(scratch.ds_in, heads_);
  const T** dz_in = grow(scratch.dz_in, width_);
  T** dz_out = grow(scratch.dz_out, width_);
  T** dx_out = grow(scratch.dx_out, heads_);
  const T* w1_logits = with_bias_ ? w1_logits_.data() : w1_.data();  // [W, H]
  for (Index r0 = 0; r0 < rows; r0 += chunk_rows) {
    const Index count_rows = std::min(chunk_rows, rows - r0);
    const Index pixels = count_rows * K;
    // Forward, one row at a time (its rows of W1_B·B and B are slices of the per-distance rows):
    // a = LeakyReLU(b1 + W1_B·B + W1_A·A), S = A + B + b2 + W2·a.
    for (Index r = r0; r < r0 + count_rows; ++r) {
      const Index m0 = rows - 1 - r;  // distance index of (r, 0)
      for (Index w = 0; w < width_; ++w) {
        hidden_in[w] = hidden_out[w] = hidden + w * chunk + (r - r0) * K;
        residual_hidden[w] = with_bias_ ? hidden_bias + w * Lp + m0 : nullptr;
      }
      for (Index h = 0; h < heads_; ++h) {
        in[h] = residual_a[h] = tile.logits + h * tile.logits_stride + r * K;
        residual_b[h] = with_bias_ ? window + h * Lp + m0 : nullptr;
        out[h] = tile.scores + h * tile.scores_stride + r * K;
      }
      dape_layer(DapeLayer<T>{w1_logits, b1_.data(), width_, heads_, in, hidden_out,
                              with_bias_ ? residual_hidden : nullptr, nullptr, true, slope},
                 0, K);
      dape_layer(DapeLayer<T>{w2_.data(), b2_.data(), heads_, width_, hidden_in, out, residual_a,
                              with_bias_ ? residual_b : nullptr, false, slope},
                 0, K);
    }
    finish(r0, count_rows, 0, K);
    // The chunk's rows are contiguous in every buffer: the backward runs over all its pixels.
    for (Index h = 0; h < heads_; ++h) {
      ds_in[h] = back.dscores + h * back.dscores_stride + r0 * K;
      in[h] = tile.logits + h * tile.logits_stride + r0 * K;
      dx_out[h] = back.dlogits + h * back.dlogits_stride + r0 * K;
    }
    for (Index w = 0; w < width_; ++w) {
      hidden_in[w] = hidden + w * chunk;
      dz_in[w] = dz_out[w] = dz + w * chunk;
    }
    if (grads.dw2 != nullptr) {  // db2 += Σ dS,  dW2 += dS·aᵀ
      for (Index h = 0; h < heads_; ++h) grads.db2[h] += dape_row_sum(ds_in[h], pixels);
      dape_accumulate_products(ds_in, heads_, hidden_in, width_, pixels, grads.dw2, width_);
    }
    // dz = (W2ᵀ·dS) ∘ LeakyReLU'(z), the derivative read off a (the gate).
    dape_layer(DapeLayer<T>{w2t_.data(), zeros_.data(), width_, heads_, ds_in, dz_out, nullptr,
                            nullptr, false, slope, hidden_in},
               0, pixels);
    if (grads.dw1 != nullptr) {  // db1 += Σ dz,  dW1_A += dz·Aᵀ (columns 0 … H − 1)
      for (Index w = 0; w < width_; ++w) grads.db1[w] += dape_row_sum(dz_in[w], pixels);
      dape_accumulate_products(dz_in, width_, in, heads_, pixels, grads.dw1, channels_);
    }
    for (Index r = r0; r < r0 + count_rows; ++r) {
      const Index m0 = rows - 1 - r;
      const Index at = (r - r0) * K;
      if (dz_sums) {
        for (Index w = 0; w < width_; ++w) {
          T* to = dz_sum + w * Lp + m0;
          const T* from = dz + w * chunk + at;
          for (Index c = 0; c < K; ++c) to[c] += from[c];
        }
      }
      if (ds_sums) {
        for (Index h = 0; h < heads_; ++h) {
          T* to = ds_sum + h * Lp + m0;
          const T* from = ds_in[h] + at;
          for (Index c = 0; c < K; ++c) to[c] += from[c];
        }
      }
    }
    // dA = dS + W1_Aᵀ·dz, written in place.
    dape_layer(DapeLayer<T>{w1t_.data(), zeros_.data(), heads_, width_, dz_in, dx_out, ds_in,
                            nullptr, false, slope},
               0, pixels);
  }
  if (!dz_sums) return;
  for (Index w = 0; w < width_; ++w) dz_in[w] = dz_sum + w * Lp;
  if (grads.dw1 != nullptr) {  // dW1_B += Σ_m Σdz(m)·B(m)ᵀ (columns H … 2H − 1)
    for (Index h = 0; h < heads_; ++h) in[h] = window + h * Lp;
    dape_accumulate_products(dz_in, width_, in, heads_, Lp, grads.dw1 + heads_, channels_);
  }
  if (!ds_sums) return;
  // ∂L/∂B(m) = ΣdS(m) + W1_Bᵀ·Σdz(m), one row per head over the window's distances.
  T* dbias = grow(scratch.dbias_window, heads_ * Lp);
  for (Index h = 0; h < heads_; ++h) {
    ds_in[h] = ds_sum + h * Lp;
    dx_out[h] = dbias + h * Lp;
  }
  dape_layer(DapeLayer<T>{w1t_.data() + heads_ * width_, zeros_.data(), heads_, width_, dz_in,
                          dx_out, ds_in, nullptr, false, slope},
             0, Lp);
  for (Index h = 0; h < heads_; ++h) {
    const Eigen::Map<const Matrix<T>> db(dbias + h * Lp, 1, L);
    (*bias_gradient)(h, Positions(&last_query, 1),
                     Positions(window_keys, static_cast<std::size_t>(L)), db);
  }
}

template <class T>
template <class Finish>
void DapeNetwork<T>::backward_chunk(const Tile& tile, const BackwardTile& back, const Band& band,
                                    Index r0, Index rows, const T* band_bias, const Finish& finish,
                                    T* dbias, const WeightGradients& grads,
                                    DapeBackwardScratch<T>& scratch) const {
  const auto K = static_cast<Index>(tile.kpos.size());
  const Index half = kernel_ / 2;
  const ChunkLayout c = forward_chunk(tile, band, r0, rows, band_bias, scratch.forward);
  const Index column = band.first - tile.first_key;  // of the chunk's scores
  finish(c.first_row, rows, column, c.count);
  const Index ld = c.ld;
  const Index padded = c.padded;
  const T slope = static_cast<T>(negative_slope);
  const T* input = scratch.forward.input.data();    // [C, ld]
  const T* hidden = scratch.forward.hidden.data();  // [W, ld]

  // dS at the output slots, zero elsewhere: [H, ld], slot q at column half + q.
  T* ds = grow(scratch.ds, heads_ * ld);
  std::fill(ds, ds + heads_ * ld, T(0));
  for (Index h = 0; h < heads_; ++h) {
    for (Index r = 0; r < rows; ++r) {
      const T* from =
          back.dscores + h * back.dscores_stride + (c.first_row + r) * tile.key_count + column;
      std::copy(from, from + c.count, ds + h * ld + half + r * c.S + 2 * half);
    }
  }
  const T** left = grow(scratch.left_rows, std::max(heads_, width_));
  const T** right = grow(scratch.right_rows, std::max(width_, channels_));
  if (grads.dw2 != nullptr) {
    for (Index h = 0; h < heads_; ++h) {
      left[h] = ds + h * ld + half;
      grads.db2[h] += dape_row_sum(left[h], padded);
    }
    for (Index t = 0; t < kernel_; ++t) {  // dW2_t += dS · a(· + t − half)ᵀ
      for (Index w = 0; w < width_; ++w) right[w] = hidden + w * ld + t;
      dape_accumulate_products(left, heads_, right, width_, padded, grads.dw2 + t * width_,
                               kernel_ * width_);
    }
  }

  // dz = (Σ_t W2_tᵀ·dS(· − t + half)) ∘ LeakyReLU'(z), zero at hidden slots outside the
  // sequence: [W, ld], slot q at column half + q, zero margins.
  T* dz = grow(scratch.dz, width_ * ld);
  const T** ds_in = grow(scratch.ds_in, kernel_ * heads_);
  T** dz_out = grow(scratch.dz_out, width_);
  for (Index t = 0; t < kernel_; ++t) {
    for (Index h = 0; h < heads_; ++h) ds_in[t * heads_ + h] = ds + h * ld + 2 * half - t;
  }
  for (Index w = 0; w < width_; ++w) {
    T* row = dz + w * ld;
    std::fill(row, row + half, T(0));
    std::fill(row + half + padded, row + ld, T(0));
    dz_out[w] = row + half;
  }
  dape_layer(DapeLayer<T>{w2t_.data(), zeros_.data(), width_, kernel_ * heads_, ds_in, dz_out,
                          nullptr, nullptr, false, slope, scratch.forward.hidden_out.data()},
             0, padded);
  if (c.slot_key + half < 0 || c.slot_key + c.S - half > K) {
    for (Index r = 0; r < rows; ++r) {
      for (Index u = 0; u < c.S; ++u) {
        const Index e = c.slot_key + u;
        if (e >= 0 && e < K) continue;
        for (Index w = 0; w < width_; ++w) dz[w * ld + half + r * c.S + u] = T(0);
      }
    }
  }
  if (grads.dw1 != nullptr) {
    for (Index w = 0; w < width_; ++w) {
      left[w] = dz + w * ld + half;
      grads.db1[w] += dape_row_sum(left[w], padded);
    }
    for (Index t = 0; t < kernel_; ++t) {  // dW1_t += dz · x(· + t − half)ᵀ
      for (Index ch = 0; ch < channels_; ++ch) right[ch] = input + ch * ld + t;
      dape_accumulate_products(left, width_, right, channels_, padded, grads.dw1 + t * channels_,
                               kernel_ * channels_);
    }
  }

  // dx = Σ_t W1_tᵀ·dz(· − t + half): [C, padded] (the logits' rows only without dB).
  const Index dx_rows = dbias != nullptr ? channels_ : heads_;
  T* dx = grow(scratch.dx, channels_ * padded);
  const T** dz_in = grow(scratch.dz_in, kernel_ * width_);
  T** dx_out = grow(scratch.dx_out, channels_);
  for (Index t = 0; t < kernel_; ++t) {
    for (Index w = 0; w < width_; ++w) dz_in[t * width_ + w] = dz + w * ld + 2 * half - t;
  }
  for (Index ch = 0; ch < dx_rows; ++ch) dx_out[ch] = dx + ch * padded;
  dape_layer(DapeLayer<T>{w1t_.data(), zeros_.data(), dx_rows, kernel_ * width_, dz_in, dx_out,
                          nullptr, nullptr, false, slope},
             0, padded);

  // dA = dS + tril(dx_A), dB = dS + tril(dx_B) at the chunk's input keys.
  const Index in_count = band.in_last - band.in_first;
  const Index u_first = band.in_first - c.slot_key;
  const Index u_last = band.in_last - c.slot_key;
  for (Index r = 0; r < rows; ++r) {
    const Index row = c.first_row + r;
    const Index i = tile.qpos[static_cast<std::size_t>(row)];
    for (Index h = 0; h < heads_; ++h) {
      const T* dsr = ds + h * ld + half + r * c.S;
      const T* dxa = dx + h * padded + r * c.S;
      const T* dxb = dx + (heads_ + h) * padded + r * c.S;
      // to[e − offset] += dS + tril(dx) at the input keys e = slot_key + u.
      const auto add = [&](T* to, Index offset, const T* dxr) {
        const Index shift = c.slot_key - offset;
        if (!tril_) {
          for (Index u = u_first; u < u_last; ++u) to[shift + u] += dsr[u] + dxr[u];
          return;
        }
        for (Index u = u_first; u < u_last; ++u) {
          const bool kept = tile.kpos[static_cast<std::size_t>(c.slot_key + u)] <= i;
          to[shift + u] += dsr[u] + (kept ? dxr[u] : T(0));
        }
      };
      add(back.dlogits + h * back.dlogits_stride + row * K, 0, dxa);
      if (dbias != nullptr) {
        add(dbias + (h * band.rows + r0 + r) * in_count, band.in_first, dxb);
      }
    }
  }
}

}  // namespace posenc::detail
