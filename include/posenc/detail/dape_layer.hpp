// SPDX-License-Identifier: MIT
// One layer of DAPE's network over a chunk of pixels, in SIMD registers: a small GEMM
// (rows × depth weights times depth input rows) with bias, optional residual rows and leaky ReLU,
// written once over Eigen's packets (detail/simd.hpp).
#pragma once

#include <Eigen/Core>
#include <utility>

#include "posenc/detail/simd.hpp"
#include "posenc/tensor.hpp"

namespace posenc::detail {

/// One layer of the network over `width` pixels (a multiple of the packet width):
///
///   out[r][q] = act(bias[r] + residual_a[r][q] + residual_b[r][q] + Σ_d weights[r, d] · in[d][q])
///
/// for r < rows, with act the leaky ReLU (`activate`) or the identity, and the residual rows
/// optional (null arrays). weights: [rows × depth], row-major; in[d]: the input rows (a 1×k
/// convolution lists each input row k times, shifted by its tap); out[r]: the output rows.
template <class T>
struct DapeLayer {
  const T* weights;
  const T* bias;
  Index rows, depth;
  const T* const* in;
  T* const* out;
  const T* const* residual_a = nullptr;
  const T* const* residual_b = nullptr;
  bool activate = false;
  T slope = T(0);
  /// Optional rows a[r] of a leaky ReLU's output: out[r][q] is then multiplied by its derivative,
  /// 1 where a[r][q] > 0 and `slope` elsewhere (the backward of the activation, fused).
  const T* const* gate = nullptr;
};

/// Rows [r0, r0 + MR) × pixels [col, col + NP·packet) of a DapeLayer, in registers. The
/// residual count, the activation and the gate are template arguments: with runtime branches
/// around the accumulators GCC keeps them on the stack and spills them around the depth loop.
template <class T, int MR, int NP, int Residuals, bool Activate, bool Gate = false>
void dape_layer_block(const DapeLayer<T>& layer, Index r0, Index col) {
  using Packet = typename SimdPacket<T>::Packet;
  using namespace Eigen::internal;
  constexpr Index W = SimdPacket<T>::width;
  Packet acc[MR][NP];
  for (int i = 0; i < MR; ++i) {
    const Packet b = pset1<Packet>(layer.bias[r0 + i]);
    for (int j = 0; j < NP; ++j) acc[i][j] = b;
    if constexpr (Residuals >= 1) {
      for (int j = 0; j < NP; ++j) {
        acc[i][j] = padd(acc[i][j], ploadu<Packet>(layer.residual_a[r0 + i] + col + j * W));
      }
    }
    if constexpr (Residuals >= 2) {
      for (int j = 0; j < NP; ++j) {
        acc[i][j] = padd(acc[i][j], ploadu<Packet>(layer.residual_b[r0 + i] + col + j * W));
      }
    }
  }
  const T* w = layer.weights + r0 * layer.depth;
  for (Index d = 0; d < layer.depth; ++d) {
    const T* x = layer.in[d] + col;
    Packet xp[NP];
    for (int j = 0; j < NP; ++j) xp[j] = ploadu<Packet>(x + j * W);
    for (int i = 0; i < MR; ++i) {
      const Packet wi = pset1<Packet>(w[i * layer.depth + d]);
      for (int j = 0; j < NP; ++j) acc[i][j] = pmadd(wi, xp[j], acc[i][j]);
    }
  }
  [[maybe_unused]] const Packet slope = pset1<Packet>(layer.slope);
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NP; ++j) {
      if constexpr (Activate) acc[i][j] = pmax(acc[i][j], pmul(acc[i][j], slope));
      if constexpr (Gate) {
        const Packet a = ploadu<Packet>(layer.gate[r0 + i] + col + j * W);
        const Packet zero = pset1<Packet>(T(0));
        acc[i][j] = pselect(pcmp_lt(zero, a), acc[i][j], pmul(acc[i][j], slope));
      }
      pstoreu(layer.out[r0 + i] + col + j * W, acc[i][j]);
    }
  }
}

/// Every row of a DapeLayer for the pixels [col, col + NP·packet): blocks of 4 rows, then 2, 1.
template <class T, int NP, int Residuals, bool Activate, bool Gate>
void dape_layer_columns(const DapeLayer<T>& layer, Index col) {
  Index r = 0;
  for (; r + 4 <= layer.rows; r += 4) {
    dape_layer_block<T, 4, NP, Residuals, Activate, Gate>(layer, r, col);
  }
  if (r + 2 <= layer.rows) {
    dape_layer_block<T, 2, NP, Residuals, Activate, Gate>(layer, r, col);
    r += 2;
  }
  if (r < layer.rows) dape_layer_block<T, 1, NP, Residuals, Activate, Gate>(layer, r, col);
}

/// dape_layer with the residual count and activation fixed.
template <class T, int Residuals, bool Activate, bool Gate = false>
void dape_layer_strips(const DapeLayer<T>& layer, Index first_col, Index last_col) {
  constexpr Index W = SimdPacket<T>::width;
  constexpr int NP = 3;
  Index col = first_col;
  if constexpr (SimdPacket<T>::many_registers) {
    // Rows of whole 4-packet strips (DAPE's 128-key rows): no single-packet tail.
    if ((last_col - first_col) % (4 * W) == 0) {
      for (; col < last_col; col += 4 * W) {
        dape_layer_columns<T, 4, Residuals, Activate, Gate>(layer, col);
      }
      return;
    }
  }
  for (; col + NP * W <= last_col; col += NP * W) {
    dape_layer_columns<T, NP, Residuals, Activate, Gate>(layer, col);
  }
  for (; col < last_col; col += W) dape_layer_columns<T, 1, Residuals, Activate, Gate>(layer, col);
}

/// A DapeLayer over pixels [first_col, last_col) (a multiple of the packet width from first_col):
/// strips of three packets, the input strip reused by every block of rows, then single packets.
/// With 16 vector registers, 4 × 3 accumulators (of 16) hide the FMA latency that 4 × 2 did not:
/// 5 % less time for DAPE's backward on Zen 2 (bench_backward).
template <class T>
void dape_layer(DapeLayer<T> layer, Index first_col, Index last_col) {
  if (layer.residual_a == nullptr) std::swap(layer.residual_a, layer.residual_b);
  const int residuals = layer.residual_a == nullptr ? 0 : layer.residual_b == nullptr ? 1 : 2;
  if (layer.gate != nullptr && residuals == 0 && !layer.activate) {
    return dape_layer_strips<T, 0, false, true>(layer, first_col, last_col);
  }
  if (layer.activate) {
    if (residuals == 0) return dape_layer_strips<T, 0, true>(layer, first_col, last_col);
    if (residuals == 1) return dape_layer_strips<T, 1, true>(layer, first_col, last_col);
    return dape_layer_strips<T, 2, true>(layer, first_col, last_col);
  }
  if (residuals == 0) return dape_layer_strips<T, 0, false>(layer, first_col, last_col);
  if (residuals == 1) return dape_layer_strips<T, 1, false>(layer, first_col, last_col);
  return dape_layer_strips<T, 2, false>(layer, first_col, last_col);
}

}  // namespace posenc::detail
