// SPDX-License-Identifier: MIT
// What the relative-position biases share: the causal or symmetric form of the distance i − j,
// and the tile filler for a bias that depends on i − j alone (ALiBi, KERPLE, T5), which evaluates
// the bias once per distinct distance of a tile instead of once per element, and its backward
// (a tile of ∂L/∂B reduced to one sum per distance).
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>

#include "posenc/encoding.hpp"
#include "posenc/tensor.hpp"

namespace posenc {

/// How a distance bias treats the query position i and the key position j.
///
///   causal      δ = max(i − j, 0): the bias of a future key (j > i) equals the bias at j = i. The
///               form of gpt-neox's ALiBi, of the KERPLE code (`tril(i − j)`) and of the DAPE code;
///               a causal mask removes the future keys anyway.
///   symmetric   δ = |i − j|: both directions (OpenNMT-py / x-transformers ALiBi, the abs inside
///               the FIRE listing, the KERPLE paper's kernels), for bidirectional attention.
enum class BiasForm { causal, symmetric };

namespace detail {

/// The distance δ ≥ 0 a bias of the given form sees for i − j = `query_minus_key`.
constexpr Index form_distance(BiasForm form, Index query_minus_key) {
  if (form == BiasForm::causal) return query_minus_key > 0 ? query_minus_key : 0;
  return query_minus_key < 0 ? -query_minus_key : query_minus_key;
}

/// out[m] = δ(top − m) as double, m < count: the distances of a window (see add_distance_bias).
inline void form_distances(BiasForm form, Index top, Index count, double* out) {
  for (Index m = 0; m < count; ++m) out[m] = static_cast<double>(form_distance(form, top - m));
}

/// x[m] = log(1 + x[m]) for m < count (x > −1), vectorised, accurate to a few ulp for every x:
/// log(u)·x/(u − 1) with u = 1 + x cancels the rounding of u (Goldberg 1991, "What every
/// computer scientist should know about floating-point arithmetic", Thm. 4). Eigen vectorises
/// log but not log1p for double.
inline void log1p_in_place(double* x, Index count) {
  constexpr Index block = 64;
  using Array = Eigen::Array<double, 1, Eigen::Dynamic>;
  alignas(64) std::array<double, block> u;
  alignas(64) std::array<double, block> log_u;
  for (Index first = 0; first < count; first += block) {
    const Index n = std::min(block, count - first);
    double* y = x + first;
    for (Index m = 0; m < n; ++m) u[static_cast<std::size_t>(m)] = 1.0 + y[m];
    Eigen::Map<Array>(log_u.data(), n) = Eigen::Map<const Array>(u.data(), n).log();
    for (Index m = 0; m < n; ++m) {
      const double um = u[static_cast<std::size_t>(m)];
      y[m] = um == 1.0 ? y[m] : log_u[static_cast<std::size_t>(m)] * (y[m] / (um - 1.0));
    }
  }
}

/// Whether `positions` are p[0], p[0] + 1, …, p[0] + n − 1 (the kernel's default positions).
/// O(n), cheap next to the O(rows · cols) tile it decides about.
inline bool is_consecutive(Positions positions) {
  for (std::size_t r = 1; r < positions.size(); ++r) {
    if (positions[r] != positions[0] + static_cast<Index>(r)) return false;
  }
  return true;
}

/// Rows and columns of a tile handled per distance window (the window holds 2·chunk − 1 values).
inline constexpr Index distance_chunk = 256;

/// row[c] += values[c] for c < count (a plain loop: the compiler vectorises it without the
/// per-call overhead of an Eigen segment expression).
template <class Scalar>
void add_row(const Scalar* values, Index count, Scalar* row) {
  for (Index c = 0; c < count; ++c) row[c] += values[c];
}

/// Adds B(qpos[r] − kpos[c]) to tile(r, c) for a bias B of the distance i − j alone, given as
/// `fill(top, count, out)`, which writes out[m] = B(top − m) in double for m < count.
///
/// Consecutive key positions: row r of a block of columns reads distances top_r − c, one window.
/// Consecutive query positions too: the block holds only rows + cols − 1 distinct distances,
/// filled once (top = distance of its last row and first column), and row r is the contiguous
/// slice [rows − 1 − r, rows − 1 − r + cols) of that window. The window is cast to Scalar once
/// and added row by row (vectorised). Other positions are evaluated element by element. The
/// windows live on the stack: no allocation, nothing O(N).
template <class Scalar, class Fill>
void add_distance_bias(Positions qpos, Positions kpos, TileRef<Scalar> tile, const Fill& fill) {
  const Index rows = tile.rows();
  const Index cols = tile.cols();
  if (rows == 0 || cols == 0) return;
  if (!is_consecutive(kpos)) {
    for (Index r = 0; r < rows; ++r) {
      for (Index c = 0; c < cols; ++c) {
        double value = 0.0;
        fill(qpos[static_cast<std::size_t>(r)] - kpos[static_cast<std::size_t>(c)], 1, &value);
        tile(r, c) += static_cast<Scalar>(value);
      }
    }
    return;
  }
  const bool queries_consecutive = is_consecutive(qpos);
  alignas(64) std::array<double, 2 * distance_chunk - 1> values;
  alignas(64) std::array<Scalar, 2 * distance_chunk - 1> window;
  const auto fill_window = [&](Index top, Index count) {
    fill(top, count, values.data());
    for (Index m = 0; m < count; ++m) {
      window[static_cast<std::size_t>(m)] =
          static_cast<Scalar>(values[static_cast<std::size_t>(m)]);
    }
  };
  for (Index c0 = 0; c0 < cols; c0 += distance_chunk) {
    const Index chunk_cols = std::min(distance_chunk, cols - c0);
    const Index first_key = kpos[static_cast<std::size_t>(c0)];
    if (!queries_consecutive) {
      for (Index r = 0; r < rows; ++r) {
        fill_window(qpos[static_cast<std::size_t>(r)] - first_key, chunk_cols);
        add_row(window.data(), chunk_cols, &tile(r, c0));
      }
      continue;
    }
    for (Index r0 = 0; r0 < rows; r0 += distance_chunk) {
      const Index chunk_rows = std::min(distance_chunk, rows - r0);
      fill_window(qpos[static_cast<std::size_t>(r0 + chunk_rows - 1)] - first_key,
                  chunk_rows + chunk_cols - 1);
      for (Index r = 0; r < chunk_rows; ++r) {
        add_row(window.data() + (chunk_rows - 1 - r), chunk_cols, &tile(r0 + r, c0));
      }
    }
  }
}

/// The backward of add_distance_bias: reduces dbias to a sum per distance i − j and hands each
/// window to `apply(top, count, sums)`, sums[m] = Σ dbias(r, c) over qpos[r] − kpos[c] = top − m
/// (m < count, in double). A bias b(i − j) with parameter θ then adds Σ_m sums[m]·∂b(top − m)/∂θ.
/// Same windows as the forward: one per block (rows + cols − 1 anti-diagonal sums) when queries
/// and keys are consecutive, one per row when only the keys are, one per element otherwise.
template <class Scalar, class Apply>
void reduce_distance_gradient(Positions qpos, Positions kpos, ConstTileRef<Scalar> dbias,
                              const Apply& apply) {
  const Index rows = dbias.rows();
  const Index cols = dbias.cols();
  if (rows == 0 || cols == 0) return;
  if (!is_consecutive(kpos)) {
    for (Index r = 0; r < rows; ++r) {
      for (Index c = 0; c < cols; ++c) {
        const double value = static_cast<double>(dbias(r, c));
        apply(qpos[static_cast<std::size_t>(r)] - kpos[static_cast<std::size_t>(c)], 1, &value);
      }
    }
    return;
  }
  const bool queries_consecutive = is_consecutive(qpos);
  alignas(64) std::array<double, 2 * distance_chunk - 1> sums;
  for (Index c0 = 0; c0 < cols; c0 += distance_chunk) {
    const Index chunk_cols = std::min(distance_chunk, cols - c0);
    const Index first_key = kpos[static_cast<std::size_t>(c0)];
    if (!queries_consecutive) {
      for (Index r = 0; r < rows; ++r) {
        const Scalar* row = &dbias.coeffRef(r, c0);
        for (Index c = 0; c < chunk_cols; ++c) {
          sums[static_cast<std::size_t>(c)] = static_cast<double>(row[c]);
        }
        apply(qpos[static_cast<std::size_t>(r)] - first_key, chunk_cols, sums.data());
      }
      continue;
    }
    for (Index r0 = 0; r0 < rows; r0 += distance_chunk) {
      const Index chunk_rows = std::min(distance_chunk, rows - r0);
      const Index count = chunk_rows + chunk_cols - 1;
      std::fill(sums.begin(), sums.begin() + count, 0.0);
      for (Index r = 0; r < chunk_rows; ++r) {  // row r holds distances top − (rows − 1 − r + c)
        const Scalar* row = &dbias.coeffRef(r0 + r, c0);
        double* out = sums.data() + (chunk_rows - 1 - r);
        for (Index c = 0; c < chunk_cols; ++c) out[c] += static_cast<double>(row[c]);
      }
      apply(qpos[static_cast<std::size_t>(r0 + chunk_rows - 1)] - first_key, count, sums.data());
    }
  }
}

}  // namespace detail

}  // namespace posenc
