// SPDX-License-Identifier: MIT
// The streaming drivers: query blocks × key tiles, the encoder's stages applied to each tile
// (only those it models, asked at compile time), online softmax, P·V. One task per (head, group
// of query blocks), or per query block when a ScoreMixer needs every head of a tile.
// IWYU pragma: private, include "posenc/attention.hpp"
#pragma once

#include <algorithm>
#include <array>
#include <vector>

#include "posenc/detail/parallel.hpp"
#include "posenc/encoding.hpp"
#include "posenc/kernel/online_softmax.hpp"
#include "posenc/kernel/problem.hpp"
#include "posenc/kernel/tile_kernels.hpp"
#include "posenc/kernel/tile_mask.hpp"
#include "posenc/kernel/workspace.hpp"
#include "posenc/tensor.hpp"

namespace posenc::kernel {

/// Packs a key tile transposed into ws.keys_t (the layout of the Q·Kᵀ micro-kernel); returns its
/// row stride.
template <class Scalar, class Keys>
Index pack_keys(const Keys& keys, TileWorkspace<Scalar>& ws) {
  const Index ldk = padded_width<Scalar>(keys.rows());
  pack_transposed(keys.data(), keys.outerStride(), keys.rows(), keys.cols(), ws.keys_t.data(), ldk);
  return ldk;
}

/// logits (rows × keys.rows(), row stride ld) = queries · keysᵀ by the register-blocked
/// micro-kernel, after packing the key tile transposed into the workspace.
template <class Scalar, class Queries, class Keys>
void compute_logits(const Queries& queries, const Keys& keys, TileWorkspace<Scalar>& ws,
                    Scalar* logits, Index ld) {
  const Index ldk = pack_keys(keys, ws);
  tile_logits(queries.data(), queries.outerStride(), queries.rows(), keys.cols(), ws.keys_t.data(),
              ldk, keys.rows(), logits, ld);
}

/// Writes the scaled, transformed query tile of head h (rows × logit_dim) into `out`.
template <class Scalar, class Encoder>
void load_queries(const AttentionProblem<Scalar>& p, const Encoder& encoder, Index h, Index first,
                  Positions qpos, Eigen::Map<Matrix<Scalar>> out) {
  const auto source = p.q.head(h).middleRows(first, out.rows());
  if constexpr (QueryKeyTransform<Encoder>) {
    encoder.transform_queries(h, qpos, qpos[0], source, out);
    out *= p.scale;
  } else {
    out.noalias() = p.scale * source;
  }
}

/// Writes the transformed key tile of kv head kvh (count × logit_dim) into `buffer` and returns
/// it, or (no transform) returns a view of k itself.
template <class Scalar, class Encoder>
auto load_keys(const AttentionProblem<Scalar>& p, const Encoder& encoder, Index kvh, Index first,
               Index count, Positions kpos, Index centre, Vector<Scalar>& buffer) {
  using Map = Eigen::Map<const Matrix<Scalar>, Eigen::Unaligned, Eigen::OuterStride<>>;
  if constexpr (QueryKeyTransform<Encoder>) {
    auto out = as_matrix(buffer, 0, count, p.logit_dim);
    encoder.transform_keys(kvh, kpos, centre, p.k.head(kvh).middleRows(first, count), out);
    return Map(out.data(), count, p.logit_dim, Eigen::OuterStride<>(p.logit_dim));
  } else {
    (void)encoder;
    (void)kpos;
    (void)centre;
    (void)buffer;
    return Map(p.k.head(kvh).data() + first * p.k.row_stride(), count, p.query_dim,
               Eigen::OuterStride<>(p.k.row_stride()));
  }
}

/// P·V of a tile by the micro-kernel: state.padded_output += scores · v rows (within limits).
template <class Scalar>
void accumulate_values(const AttentionProblem<Scalar>& p, Index kv_head, Index key_first,
                       const StridedTile<Scalar>& scores, OnlineSoftmax<Scalar>& state,
                       TileWorkspace<Scalar>& ws, ColumnLimits limits) {
  const HeadsView<const Scalar>& v = p.v;
  const Scalar* values = v.head(kv_head).data() + key_first * v.row_stride();
  const Index width = padded_width<Scalar>(p.value_dim);
  Index ldv = v.row_stride();
  if (width != p.value_dim) {  // pad the value rows to whole packets; else read v in place
    pack_rows(values, v.row_stride(), scores.cols(), p.value_dim, ws.values_p.data(), width);
    values = ws.values_p.data();
    ldv = width;
  }
  tile_accumulate(scores.data(), scores.outerStride(), scores.rows(), scores.cols(), values, ldv,
                  width, state.padded_output.data(), state.padded_output.outerStride(), limits);
}

/// P·V reading only the allowed keys of a partial tile (scalar): where a masked column inside a
/// row's span would multiply its weight 0 by a non-finite value and leak it into the row.
template <class Scalar>
void accumulate_allowed_values(const AttentionProblem<Scalar>& p, Index kv_head, Index query_first,
                               Index key_first, const StridedTile<Scalar>& scores,
                               OnlineSoftmax<Scalar>& state) {
  const auto values = p.v.head(kv_head).middleRows(key_first, scores.cols());
  for (Index r = 0; r < scores.rows(); ++r) {
    for (Index c = 0; c < scores.cols(); ++c) {
      if (allows(p, query_first + r, key_first + c)) {
        state.output.row(r) += scores(r, c) * values.row(c);
      }
    }
  }
}

/// Bias, mask and online-softmax update for one head's finished score tile, then P·V.
template <class Scalar, class Encoder>
void finish_tile(const AttentionProblem<Scalar>& p, const Encoder& encoder, Index h,
                 Index query_first, Index key_first, Positions qpos, Positions kpos,
                 TileCoverage coverage, StridedTile<Scalar>& scores, OnlineSoftmax<Scalar>& state,
                 TileWorkspace<Scalar>& ws, ColumnLimits limits = {}) {
  if constexpr (ScoreBias<Encoder>) encoder.add_bias(h, qpos, kpos, scores);
  if (coverage == TileCoverage::partial) {
    std::span<const Index> qseg;
    std::span<const Index> kseg;
    if (p.has_segments()) {
      qseg = p.query_segments.subspan(static_cast<std::size_t>(query_first), qpos.size());
      kseg = p.key_segments.subspan(static_cast<std::size_t>(key_first), kpos.size());
    }
    apply_mask<Scalar>(p.mask, qpos, kpos, p.key_positions.empty(), qseg, kseg, scores);
  }
  const Index kv_head = p.kv_head(h);
  if (!state.absorb(scores)) {
    // Every score of the tile is −inf: the allowed keys get weight 0, which still turns a
    // non-finite value into NaN (0 · Inf), as the oracle gives; finite values add nothing.
    if (!p.v.head(kv_head).middleRows(key_first, scores.cols()).allFinite()) {
      accumulate_allowed_values(p, kv_head, query_first, key_first, scores, state);
    }
    return;
  }
  // Masked columns carry weight 0, and 0 · NaN is NaN: the P·V micro-kernel reads, for a block of
  // rows, the union of their allowed columns (and, with segments or explicit key positions, every
  // column), so on a partial tile with a non-finite value read only each row's allowed keys
  // (README, "Non-finite values").
  if (coverage == TileCoverage::partial &&
      !p.v.head(kv_head).middleRows(key_first, scores.cols()).allFinite()) {
    accumulate_allowed_values(p, kv_head, query_first, key_first, scores, state);
  } else {
    accumulate_values(p, kv_head, key_first, scores, state, ws, limits);
  }
  if constexpr (RelativeKeyValue<Encoder>) {
    encoder.add_relative_values(h, qpos, kpos, scores, state.output);
  }
}

inline Index ceil_div(Index a, Index b) { return (a + b - 1) / b; }

/// Query blocks that one per-head task takes together: up to four, fewer when that would leave
/// less than two tasks per thread. They share each key tile's transform and packing (so with
/// four, a key tile is transformed and packed a quarter as often), while each block keeps its
/// own score tile, coverage and softmax state.
inline constexpr Index max_blocks_per_task = 4;

inline Index blocks_per_task(Index heads, Index query_blocks, int requested_threads) {
  const auto threads =
      static_cast<Index>(detail::thread_count(requested_threads, heads * query_blocks));
  Index group = max_blocks_per_task;
  while (group > 1 && heads * ceil_div(query_blocks, group) < 2 * threads) group /= 2;
  return group;
}

/// Streaming kernel without a ScoreMixer: one task per (head, group of blocks_per_task query
/// blocks).
template <class Scalar, class Encoder>
void stream_per_head(const AttentionProblem<Scalar>& p, const Encoder& encoder,
                     const ResultSink<Scalar>& sink) {
  const Index query_blocks = ceil_div(p.queries, p.query_block);
  const Index key_blocks = ceil_div(p.keys, p.key_block);
  const Index group_size = blocks_per_task(p.heads, query_blocks, p.threads);
  const Index groups = ceil_div(query_blocks, group_size);
  const Index tasks = p.heads * groups;
  const Index qb = p.query_block;
  detail::parallel_tasks(
      tasks, detail::thread_count(p.threads, tasks),
      [&] {
        WorkspaceLease<Scalar> lease;
        lease.get().reserve(group_size, qb, p.key_block, 0, p.query_dim, p.logit_dim, p.value_dim,
                            false);
        return lease;
      },
      [&](Index task, WorkspaceLease<Scalar>& lease) {
        TileWorkspace<Scalar>& ws = lease.get();
        // Last query blocks first: under a causal mask they see the most keys.
        const Index group = groups - 1 - task / p.heads;
        const Index h = task % p.heads;
        const Index first = group * group_size * qb;
        const Index rows = std::min(group_size * qb, p.queries - first);
        const Index blocks = ceil_div(rows, qb);
        fill_positions(p, true, first, rows, ws.query_positions);
        const Positions qpos(ws.query_positions.data(), static_cast<std::size_t>(rows));
        load_queries(p, encoder, h, first, qpos, as_matrix(ws.queries, 0, rows, p.logit_dim));
        const BlockExtent group_extent = query_extent(p, first, rows);
        std::array<BlockExtent, max_blocks_per_task> block_extents{};
        std::vector<OnlineSoftmax<Scalar>>& states = ws.states;
        states.clear();  // capacity reserved: no allocation
        for (Index b = 0; b < blocks; ++b) {
          const Index block_rows = std::min(qb, rows - b * qb);
          block_extents[static_cast<std::size_t>(b)] = query_extent(p, first + b * qb, block_rows);
          states.push_back(softmax_state(ws, b, qb, block_rows, p.value_dim));
          states.back().reset();
        }
        const Index lds = padded_width<Scalar>(p.key_block);
        for (Index kb = 0; kb < key_blocks; ++kb) {
          const Index key_first = kb * p.key_block;
          const Index cols = std::min(p.key_block, p.keys - key_first);
          const BlockExtent kext = key_extent(p, key_first, cols);
          if (tile_coverage(p.mask, p.has_segments(), group_extent, kext) == TileCoverage::none) {
            continue;
          }
          fill_positions(p, false, key_first, cols, ws.key_positions);
          const Positions kpos(ws.key_positions.data(), static_cast<std::size_t>(cols));
          const auto keys =
              load_keys(p, encoder, p.kv_head(h), key_first, cols, kpos, qpos[0], ws.keys);
          const Index ldk = pack_keys(keys, ws);
          for (Index b = 0; b < blocks; ++b) {
            const TileCoverage coverage = tile_coverage(
                p.mask, p.has_segments(), block_extents[static_cast<std::size_t>(b)], kext);
            if (coverage == TileCoverage::none) continue;
            OnlineSoftmax<Scalar>& state = states[static_cast<std::size_t>(b)];
            const Index block_rows = state.row_max.size();
            const auto queries =
                as_matrix(ws.queries, b * qb * p.logit_dim, block_rows, p.logit_dim);
            const Positions block_qpos = qpos.subspan(static_cast<std::size_t>(b * qb),
                                                      static_cast<std::size_t>(block_rows));
            auto scores = as_strided(ws.scores.data(), block_rows, cols, lds);
            const ColumnLimits limits = column_limits(p, coverage, block_qpos, key_first, cols, ws);
            tile_logits(queries.data(), p.logit_dim, block_rows, p.logit_dim, ws.keys_t.data(), ldk,
                        cols, scores.data(), lds, limits);
            if constexpr (RelativeKeyValue<Encoder>) {
              encoder.add_relative_logits(h, block_qpos, kpos, queries, scores);
            }
            finish_tile(p, encoder, h, first + b * qb, key_first, block_qpos, kpos, coverage,
                        scores, state, ws, limits);
          }
        }
        for (Index b = 0; b < blocks; ++b) {
          sink.write(h, first + b * qb, states[static_cast<std::size_t>(b)],
                     [&](Index r) { return has_allowed_key(p, r); });
        }
      });
}

/// Streaming kernel with a ScoreMixer (which needs every head of a tile): one task per query
/// block; the logits of each tile are computed for all heads, with `key_halo()` extra key
/// columns on each side, mixed, then each head continues as in stream_per_head.
template <class Scalar, class Encoder>
void stream_mixed(const AttentionProblem<Scalar>& p, const Encoder& encoder,
                  const ResultSink<Scalar>& sink) {
  const Index halo = static_cast<Index>(encoder.key_halo());
  const Index query_blocks = ceil_div(p.queries, p.query_block);
  const Index key_blocks = ceil_div(p.keys, p.key_block);
  const Index H = p.heads;
  const Index qb = p.query_block;
  detail::parallel_tasks(
      query_blocks, detail::thread_count(p.threads, query_blocks),
      [&] {
        WorkspaceLease<Scalar> lease;
        lease.get().reserve(H, qb, p.key_block, halo, p.query_dim, p.logit_dim, p.value_dim, true);
        return lease;
      },
      [&](Index task, WorkspaceLease<Scalar>& lease) {
        TileWorkspace<Scalar>& ws = lease.get();
        const Index block = query_blocks - 1 - task;
        const Index first = block * qb;
        const Index rows = std::min(qb, p.queries - first);
        fill_positions(p, true, first, rows, ws.query_positions);
        const Positions qpos(ws.query_positions.data(), static_cast<std::size_t>(rows));
        const BlockExtent qext = query_extent(p, first, rows);
        std::vector<OnlineSoftmax<Scalar>>& states = ws.states;
        states.clear();  // capacity reserved: no allocation
        for (Index h = 0; h < H; ++h) {
          load_queries(p, encoder, h, first, qpos,
                       as_matrix(ws.queries, h * qb * p.logit_dim, rows, p.logit_dim));
          states.push_back(softmax_state(ws, h, qb, rows, p.value_dim));
          states.back().reset();
        }
        for (Index kb = 0; kb < key_blocks; ++kb) {
          const Index key_first = kb * p.key_block;
          const Index cols = std::min(p.key_block, p.keys - key_first);
          const TileCoverage coverage =
              tile_coverage(p.mask, p.has_segments(), qext, key_extent(p, key_first, cols));
          if (coverage == TileCoverage::none) continue;
          const Index ext_first = std::max<Index>(0, key_first - halo);
          const Index ext_count = std::min(p.keys, key_first + cols + halo) - ext_first;
          fill_positions(p, false, ext_first, ext_count, ws.key_positions);
          const Positions kpos_ext(ws.key_positions.data(), static_cast<std::size_t>(ext_count));
          const Positions kpos = kpos_ext.subspan(static_cast<std::size_t>(key_first - ext_first),
                                                  static_cast<std::size_t>(cols));
          auto logits = as_matrix(ws.logits, 0, H, rows * ext_count);
          for (Index h = 0; h < H; ++h) {
            const auto queries = as_matrix(ws.queries, h * qb * p.logit_dim, rows, p.logit_dim);
            const auto keys = load_keys(p, encoder, p.kv_head(h), ext_first, ext_count, kpos_ext,
                                        qpos[0], ws.keys);
            auto head_logits = as_strided(logits.row(h).data(), rows, ext_count, ext_count);
            compute_logits(queries, keys, ws, head_logits.data(), ext_count);
            if constexpr (RelativeKeyValue<Encoder>) {
              encoder.add_relative_logits(h, qpos, kpos_ext, queries, head_logits);
            }
          }
          auto scores = as_matrix(ws.scores, 0, H, rows * cols);
          encoder.mix(qpos, kpos_ext, key_first - ext_first, cols, logits, scores);
          // The mixer reads every logit (a convolution reads masked neighbours), so the limits
          // bound P·V only.
          const ColumnLimits limits = column_limits(p, coverage, qpos, key_first, cols, ws);
          for (Index h = 0; h < H; ++h) {
            auto head_scores = as_strided(scores.row(h).data(), rows, cols, cols);
            finish_tile(p, encoder, h, first, key_first, qpos, kpos, coverage, head_scores,
                        states[static_cast<std::size_t>(h)], ws, limits);
          }
        }
        for (Index h = 0; h < H; ++h) {
          sink.write(h, first, states[static_cast<std::size_t>(h)],
                     [&](Index r) { return has_allowed_key(p, r); });
        }
      });
}

template <class Scalar, class Encoder>
void stream(const AttentionProblem<Scalar>& p, const Encoder& encoder,
            const ResultSink<Scalar>& sink) {
  if (p.queries == 0) return;
  if constexpr (ScoreMixer<Encoder>) {
    stream_mixed(p, encoder, sink);
  } else {
    stream_per_head(p, encoder, sink);
  }
}

}  // namespace posenc::kernel
