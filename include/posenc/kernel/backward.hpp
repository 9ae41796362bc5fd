// SPDX-License-Identifier: MIT
// The streaming backward (FlashAttention-2, Dao 2023, Algorithm 2): each key tile's logits are
// recomputed from q, k and the forward's row log-sum-exp, never an N × M matrix. One task per
// key/value head: it owns dk and dv of that head and dq of the query heads of its group, so no
// two tasks write the same output and the result does not depend on the thread count; the
// encoder's parameter gradient has one accumulator per task, summed in head order at the end.
//
// Per tile (rows r of query head h, keys c of its key/value head g), with Q̃ = scale·T_q(q) and
// K̃ = T_k(k) the transformed rows (T the encoder's QueryKeyTransform, identity without one):
//   S = Q̃·K̃ᵀ + B (bias), masked −inf;   P = exp(S − lse_r);   D_r = dO_r·O_r
//   dV_g += Pᵀ·dO;   dP = dO·V_gᵀ;   dS = P ∘ (dP − D)   (0 where P is 0: a forbidden key)
//   dθ_bias += ∂B/∂θ : dS;   dq_h += scale·T_qᵀ(dS·K̃);   dK̃_g += dSᵀ·Q̃,  dk_g = T_kᵀ(dK̃_g)
// A RelativeKeyValue stage (Shaw) adds its terms to S, dP and dQ̃ and its tables' gradients.
// IWYU pragma: private, include "posenc/attention_backward.hpp"
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <span>
#include <vector>

#include "posenc/detail/parallel.hpp"
#include "posenc/detail/scratch.hpp"
#include "posenc/encoding.hpp"
#include "posenc/kernel/problem.hpp"
#include "posenc/kernel/tile_kernels.hpp"
#include "posenc/kernel/tile_mask.hpp"
#include "posenc/tensor.hpp"

namespace posenc::kernel {

/// Compile-time rejection, naming the stage, of an encoder whose backward is not available.
template <class E>
struct RequireDifferentiable {
  static_assert(!RelativeKeyValue<E> || DifferentiableRelativeKeyValue<E>,
                "posenc::attention_backward: the encoder's RelativeKeyValue stage has no backward "
                "form (add_relative_value_scores, add_relative_query_gradient, "
                "accumulate_relative_gradient)");
  static_assert(!ScoreMixer<E> || DifferentiableScoreMixer<E>,
                "posenc::attention_backward: the encoder's ScoreMixer has no backward form "
                "(mix_backward)");
  static_assert(!ScoreMixer<E> || models_only<E, Stage::score_mixer, Stage::absolute>,
                "posenc::attention_backward: a ScoreMixer's backward (kernel/backward_mixer.hpp) "
                "takes no other attention stage (QueryKeyTransform, ScoreBias, RelativeKeyValue)");
  static_assert(!QueryKeyTransform<E> || DifferentiableTransform<E>,
                "posenc::attention_backward: the encoder's QueryKeyTransform has no backward form "
                "(transform_queries_backward / transform_keys_backward)");
  static_assert(!HasLearnableParameters<E> || !ScoreBias<E> || LearnableScoreBias<E>,
                "posenc::attention_backward: the encoder has learnable parameters but its "
                "ScoreBias has no accumulate_bias_gradient");
  static_assert(!HasLearnableParameters<E> || !QueryKeyTransform<E> || LearnableTransform<E>,
                "posenc::attention_backward: the encoder has learnable parameters but its "
                "QueryKeyTransform has no backward overloads taking the gradient");
};

/// din = T_qᵀ(dout) for query rows `in` of head h (and the transform's parameter share, when it
/// has learnable parameters).
template <class Encoder, class In, class DOut, class DIn, class Gradient>
void transform_queries_backward(const Encoder& encoder, Index h, Positions positions, Index centre,
                                const In& in, const DOut& dout, DIn&& din, Gradient& gradient) {
  if constexpr (LearnableTransform<Encoder>) {
    encoder.transform_queries_backward(h, positions, centre, in, dout, din, gradient);
  } else {
    (void)gradient;
    encoder.transform_queries_backward(h, positions, centre, in, dout, din);
  }
}

/// din = T_kᵀ(dout) for key rows `in` of key/value head g (and the parameter share).
template <class Encoder, class In, class DOut, class DIn, class Gradient>
void transform_keys_backward(const Encoder& encoder, Index g, Positions positions, Index centre,
                             const In& in, const DOut& dout, DIn&& din, Gradient& gradient) {
  if constexpr (LearnableTransform<Encoder>) {
    encoder.transform_keys_backward(g, positions, centre, in, dout, din, gradient);
  } else {
    (void)gradient;
    encoder.transform_keys_backward(g, positions, centre, in, dout, din);
  }
}

/// The per-thread buffers of the backward kernel, laid out for the forward's micro-kernels
/// (kernel/tile_kernels.hpp): rows padded to whole packets, zero in the padding, and every buffer
/// aligned as Eigen aligns its own (so each row starts on the same alignment in every thread:
/// Eigen's vectorised reductions in the encoders' hooks split a row where it becomes aligned,
/// and the bits must not depend on which thread's buffer a tile lands in). They only grow (no
/// allocation in the steady state).
template <class Scalar>
struct BackwardWorkspace {
  using Buffer = std::vector<Scalar, Eigen::aligned_allocator<Scalar>>;
  // Q̃ (rows × pad(Dl)), dO (rows × pad(Dv)), dQ̃ (rows × pad(Dl)).
  Buffer queries, dout, dqueries;
  // K̃ (cols × pad(Dl)), K̃ᵀ (Dl × pad(cols)), Vᵀ (Dv × pad(cols)), dK̃, dV (cols × pad(width)).
  Buffer keys, keys_t, values_t, dkeys, dvalues;
  // S then P, dP then dS (rows × pad(cols)).
  Buffer scores, dscores;
  Matrix<Scalar> dq_rows;  // T_qᵀ / T_kᵀ of a tile, max(rows, cols) × D
  std::vector<Index> query_positions, key_positions;

  void reserve(Index query_block, Index key_block, Index query_dim, Index logit_dim,
               Index value_dim) {
    const Index pl = padded_width<Scalar>(logit_dim);
    const Index pv = padded_width<Scalar>(value_dim);
    const Index pc = padded_width<Scalar>(key_block);
    grow(queries, query_block * pl);
    grow(dqueries, query_block * pl);
    grow(dout, query_block * pv);
    grow(keys, key_block * pl);
    grow(dkeys, key_block * pl);
    grow(dvalues, key_block * pv);
    grow(keys_t, logit_dim * pc);
    grow(values_t, value_dim * pc);
    grow(scores, query_block * pc);
    grow(dscores, query_block * pc);
    const Index dq_rows_needed = std::max(query_block, key_block);
    if (dq_rows.rows() < dq_rows_needed || dq_rows.cols() != query_dim) {
      dq_rows.resize(dq_rows_needed, query_dim);
    }
    detail::grow(query_positions, query_block);
    detail::grow(key_positions, key_block);
  }

 private:
  static void grow(Buffer& buffer, Index size) {
    if (static_cast<Index>(buffer.size()) < size) buffer.resize(static_cast<std::size_t>(size));
  }
};

/// A rows × cols row-major view with row stride `ld` of a workspace buffer.
template <class Scalar>
using StridedTile = Eigen::Map<Matrix<Scalar>, 0, Eigen::OuterStride<>>;

template <class Scalar, class Allocator>
StridedTile<Scalar> strided_tile(std::vector<Scalar, Allocator>& buffer, Index rows, Index cols,
                                 Index ld) {
  return StridedTile<Scalar>(buffer.data(), rows, cols, Eigen::OuterStride<>(ld));
}

/// What the backward reads besides the problem: the forward's output and row log-sum-exp, and
/// the gradient of the loss with respect to the output.
template <class Scalar>
struct BackwardInputs {
  HeadsView<const Scalar> out;           // [H, N, Dv]
  HeadsView<const Scalar> dout;          // [H, N, Dv]
  Eigen::Ref<const Matrix<Scalar>> lse;  // [H, N]
};

/// Where the backward writes: dq [H, N, D], dk [H_kv, M, D], dv [H_kv, M, Dv].
template <class Scalar>
struct BackwardOutputs {
  HeadsView<Scalar> dq, dk, dv;
};

/// P = exp(S − lse) row by row, in place, with the forward's exponential (exp_shifted_row: whole
/// packets from the start of the row, then a scalar tail, so the result does not depend on the
/// buffer's address, and a thread count never changes a bit); a row without an allowed key
/// (lse = −inf, every score −inf) gets P = 0.
template <class Scalar, class Tile>
void probabilities_from_lse(Tile& scores, const Scalar* lse) {
  static_assert(Tile::InnerStrideAtCompileTime == 1 && Tile::IsRowMajor,
                "probabilities_from_lse: rows must be contiguous");
  constexpr Scalar minus_infinity = -std::numeric_limits<Scalar>::infinity();
  for (Index r = 0; r < scores.rows(); ++r) {
    if (lse[r] == minus_infinity) {
      scores.row(r).setZero();
    } else {
      exp_shifted_row(&scores.coeffRef(r, 0), scores.cols(), lse[r]);
    }
  }
}

/// dS = P ∘ (dP − D_r), exactly 0 where P is 0 (forbidden keys: their value is never read, so a
/// non-finite v there cannot leak into the gradient).
template <class Tile, class DTile, class Delta>
void softmax_backward(const Tile& probabilities, DTile& dscores, const Delta& delta) {
  using Scalar = typename DTile::Scalar;
  for (Index r = 0; r < dscores.rows(); ++r) {
    const auto p = probabilities.row(r).array();
    dscores.row(r).array() =
        (p == Scalar(0)).select(Scalar(0), p * (dscores.row(r).array() - delta[r]));
  }
}

/// What one backward call keeps from call to call, leased on the calling thread so that the
/// steady state of a training loop allocates nothing: the softmax backward's row terms and one
/// parameter-gradient accumulator per task.
template <class Scalar, class Gradient>
struct BackwardCallScratch {
  Matrix<Scalar> delta;                  // [H, N]
  std::vector<Gradient> task_gradients;  // [tasks], each shaped like the caller's gradient

  /// D_r = dO_r · O_r for every (head, row).
  const Matrix<Scalar>& row_deltas(const BackwardInputs<Scalar>& in, Index heads, Index queries) {
    delta.resize(heads, queries);  // no allocation when the size is unchanged
    for (Index h = 0; h < heads; ++h) {
      delta.row(h) = (in.dout.head(h).array() * in.out.head(h).array()).rowwise().sum().transpose();
    }
    return delta;
  }

  /// `tasks` zeroed accumulators with the shapes of `like` (assignment between equal shapes
  /// reuses the storage).
  std::span<Gradient> zeroed_task_gradients(Index tasks, const Gradient& like) {
    const auto count = static_cast<std::size_t>(tasks);
    while (task_gradients.size() < count) task_gradients.push_back(like);
    const std::span<Gradient> used(task_gradients.data(), count);
    for (Gradient& g : used) {
      g = like;
      g.set_zero();
    }
    return used;
  }
};

/// The streaming backward of an encoder with a ScoreMixer (kernel/backward_mixer.hpp).
template <class Scalar, class Encoder>
void stream_backward_mixed(const AttentionProblem<Scalar>& p, const Encoder& encoder,
                           const BackwardInputs<Scalar>& in, const BackwardOutputs<Scalar>& grads,
                           encoder_gradient_t<Encoder>& gradient);

/// The streaming backward: writes dq, dk and dv, and adds the encoder's parameter gradient to
/// `gradient` (one accumulator per task, summed in key/value-head order).
template <class Scalar, class Encoder>
void stream_backward(const AttentionProblem<Scalar>& p, const Encoder& encoder,
                     const BackwardInputs<Scalar>& in, const BackwardOutputs<Scalar>& grads,
                     encoder_gradient_t<Encoder>& gradient) {
  [[maybe_unused]] RequireDifferentiable<Encoder> differentiable;
  if constexpr (ScoreMixer<Encoder>) {
    stream_backward_mixed(p, encoder, in, grads, gradient);
    return;
  }
  using Gradient = encoder_gradient_t<Encoder>;
  const Index kv_heads = p.k.heads();
  const Index group = p.heads_per_kv_head;
  for (Index h = 0; h < p.heads; ++h) grads.dq.head(h).setZero();
  for (Index g = 0; g < kv_heads; ++g) {
    grads.dk.head(g).setZero();
    grads.dv.head(g).setZero();
  }
  if (p.queries == 0 || p.keys == 0) return;

  detail::ScratchLease<BackwardCallScratch<Scalar, Gradient>> call_lease;
  BackwardCallScratch<Scalar, Gradient>& call = call_lease.get();
  const Matrix<Scalar>& delta = call.row_deltas(in, p.heads, p.queries);
  const std::span<Gradient> task_gradients = call.zeroed_task_gradients(kv_heads, gradient);

  const Index qb = p.query_block;
  const Index kb = p.key_block;
  const Index query_blocks = (p.queries + qb - 1) / qb;
  const Index key_blocks = (p.keys + kb - 1) / kb;
  const Index Dl = p.logit_dim;
  const Index Dv = p.value_dim;
  const Index pl = padded_width<Scalar>(Dl);  // row stride of Q̃, K̃, dQ̃, dK̃
  const Index pv = padded_width<Scalar>(Dv);  // row stride of dO, dV
  detail::parallel_tasks(
      kv_heads, detail::thread_count(p.threads, kv_heads),
      [&] {
        detail::ScratchLease<BackwardWorkspace<Scalar>> lease;
        lease.get().reserve(qb, kb, p.query_dim, Dl, Dv);
        return lease;
      },
      [&](Index g, detail::ScratchLease<BackwardWorkspace<Scalar>>& lease) {
        BackwardWorkspace<Scalar>& ws = lease.get();
        Gradient& task_gradient = task_gradients[static_cast<std::size_t>(g)];
        for (Index kblock = 0; kblock < key_blocks; ++kblock) {
          const Index key_first = kblock * kb;
          const Index cols = std::min(kb, p.keys - key_first);
          const Index pc = padded_width<Scalar>(cols);  // row stride of the score tiles
          const BlockExtent kext = key_extent(p, key_first, cols);
          fill_positions(p, false, key_first, cols, ws.key_positions);
          const Positions kpos(ws.key_positions.data(), static_cast<std::size_t>(cols));
          const Index centre = kpos[0];
          // K̃ = T_k(k) (padded rows), then K̃ᵀ and Vᵀ packed for the Q̃·K̃ᵀ and dO·Vᵀ kernels.
          std::fill(ws.keys.begin(), ws.keys.begin() + cols * pl, Scalar(0));
          auto keys = strided_tile(ws.keys, cols, Dl, pl);
          const auto k_rows = p.k.head(g).middleRows(key_first, cols);
          if constexpr (QueryKeyTransform<Encoder>) {
            encoder.transform_keys(g, kpos, centre, k_rows, keys);
          } else {
            keys = k_rows;
          }
          pack_transposed(ws.keys.data(), pl, cols, Dl, ws.keys_t.data(), pc);
          const auto values = p.v.head(g).middleRows(key_first, cols);
          pack_transposed(values.data(), values.outerStride(), cols, Dv, ws.values_t.data(), pc);
          std::fill(ws.dkeys.begin(), ws.dkeys.begin() + cols * pl, Scalar(0));
          std::fill(ws.dvalues.begin(), ws.dvalues.begin() + cols * pv, Scalar(0));
          bool touched = false;
          for (Index h = g * group; h < (g + 1) * group; ++h) {
            for (Index qblock = 0; qblock < query_blocks; ++qblock) {
              const Index first = qblock * qb;
              const Index rows = std::min(qb, p.queries - first);
              const TileCoverage coverage =
                  tile_coverage(p.mask, p.has_segments(), query_extent(p, first, rows), kext);
              if (coverage == TileCoverage::none) continue;
              touched = true;
              fill_positions(p, true, first, rows, ws.query_positions);
              const Positions qpos(ws.query_positions.data(), static_cast<std::size_t>(rows));
              const auto q_rows = p.q.head(h).middleRows(first, rows);
              std::fill(ws.queries.begin(), ws.queries.begin() + rows * pl, Scalar(0));
              auto queries = strided_tile(ws.queries, rows, Dl, pl);
              if constexpr (QueryKeyTransform<Encoder>) {
                encoder.transform_queries(h, qpos, centre, q_rows, queries);
                queries *= p.scale;
              } else {
                queries.noalias() = p.scale * q_rows;
              }
              // S = Q̃·K̃ᵀ + B, masked; then P = exp(S − lse).
              auto scores = strided_tile(ws.scores, rows, cols, pc);
              tile_logits(ws.queries.data(), pl, rows, Dl, ws.keys_t.data(), pc, cols,
                          ws.scores.data(), pc);
              if constexpr (RelativeKeyValue<Encoder>) {
                encoder.add_relative_logits(h, qpos, kpos, queries, scores);
              }
              if constexpr (ScoreBias<Encoder>) encoder.add_bias(h, qpos, kpos, scores);
              if (coverage == TileCoverage::partial) {
                std::span<const Index> qseg;
                std::span<const Index> kseg;
                if (p.has_segments()) {
                  qseg = p.query_segments.subspan(static_cast<std::size_t>(first), qpos.size());
                  kseg = p.key_segments.subspan(static_cast<std::size_t>(key_first), kpos.size());
                }
                apply_mask<Scalar>(p.mask, qpos, kpos, p.key_positions.empty(), qseg, kseg, scores);
              }
              probabilities_from_lse<Scalar>(scores, in.lse.row(h).data() + first);
              // dO in padded rows: the "values" of dV += Pᵀ·dO and the "queries" of dP = dO·Vᵀ.
              const auto dout_rows = in.dout.head(h).middleRows(first, rows);
              auto dout = strided_tile(ws.dout, rows, pv, pv);
              dout.leftCols(Dv) = dout_rows;
              dout.rightCols(pv - Dv).setZero();
              tile_accumulate<Scalar, true>(ws.scores.data(), pc, cols, rows, ws.dout.data(), pv,
                                            pv, ws.dvalues.data(), pv);
              // dP = dO·Vᵀ (+ Shaw's value term), then dS = P ∘ (dP − D).
              auto dscores = strided_tile(ws.dscores, rows, cols, pc);
              tile_logits(ws.dout.data(), pv, rows, Dv, ws.values_t.data(), pc, cols,
                          ws.dscores.data(), pc);
              if constexpr (RelativeKeyValue<Encoder>) {
                encoder.add_relative_value_scores(h, qpos, kpos, dout_rows, dscores);
              }
              softmax_backward(scores, dscores, delta.row(h).segment(first, rows));
              if constexpr (LearnableScoreBias<Encoder>) {
                encoder.accumulate_bias_gradient(h, qpos, kpos, dscores, task_gradient);
              }
              // dK̃ += dSᵀ·Q̃;  dQ̃ = dS·K̃ (+ Shaw's key term). The transposed products read P
              // and dS column-wise (tile_accumulate<…, true>): no transpose is formed.
              tile_accumulate<Scalar, true>(ws.dscores.data(), pc, cols, rows, ws.queries.data(),
                                            pl, pl, ws.dkeys.data(), pl);
              std::fill(ws.dqueries.begin(), ws.dqueries.begin() + rows * pl, Scalar(0));
              tile_accumulate(ws.dscores.data(), pc, rows, cols, ws.keys.data(), pl, pl,
                              ws.dqueries.data(), pl);
              auto dqueries = strided_tile(ws.dqueries, rows, Dl, pl);
              if constexpr (RelativeKeyValue<Encoder>) {
                encoder.add_relative_query_gradient(h, qpos, kpos, dscores, dqueries);
                encoder.accumulate_relative_gradient(h, qpos, kpos, queries, dscores, scores,
                                                     dout_rows, task_gradient);
              }
              dqueries *= p.scale;
              if constexpr (QueryKeyTransform<Encoder>) {
                auto back = ws.dq_rows.topRows(rows);
                kernel::transform_queries_backward(encoder, h, qpos, centre, q_rows, dqueries, back,
                                                   task_gradient);
                grads.dq.head(h).middleRows(first, rows) += back;
              } else {
                grads.dq.head(h).middleRows(first, rows) += dqueries;
              }
            }
          }
          if (!touched) continue;
          const auto dkeys = strided_tile(ws.dkeys, cols, Dl, pl);
          if constexpr (QueryKeyTransform<Encoder>) {
            auto back = ws.dq_rows.topRows(cols);
            kernel::transform_keys_backward(encoder, g, kpos, centre, k_rows, dkeys, back,
                                            task_gradient);
            grads.dk.head(g).middleRows(key_first, cols) = back;
          } else {
            grads.dk.head(g).middleRows(key_first, cols) = dkeys;
          }
          grads.dv.head(g).middleRows(key_first, cols) = strided_tile(ws.dvalues, cols, Dv, pv);
        }
      });
  for (Gradient& task_gradient : task_gradients) gradient += task_gradient;
}

}  // namespace posenc::kernel

// The ScoreMixer backward builds on the pieces above.
#include "posenc/kernel/backward_mixer.hpp"
