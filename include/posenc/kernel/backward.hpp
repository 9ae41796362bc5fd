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
#include <vector>

#include "posenc/detail/parallel.hpp"
#include "posenc/detail/scratch.hpp"
#include "posenc/encoding.hpp"
#include "posenc/kernel/problem.hpp"
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
  static_assert(!ScoreMixer<E>,
                "posenc::attention_backward: the encoder models ScoreMixer (DAPE), whose backward "
                "is not implemented yet");
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

/// The per-thread buffers of the backward kernel; they only grow (no allocation in the steady
/// state).
template <class Scalar>
struct BackwardWorkspace {
  Matrix<Scalar> queries, keys, scores, dscores, dkeys, dvalues, dqueries, dq_rows;
  std::vector<Index> query_positions, key_positions;

  void reserve(Index query_block, Index key_block, Index query_dim, Index logit_dim,
               Index value_dim) {
    grow(queries, query_block, logit_dim);
    grow(keys, key_block, logit_dim);
    grow(scores, query_block, key_block);
    grow(dscores, query_block, key_block);
    grow(dkeys, key_block, logit_dim);
    grow(dvalues, key_block, value_dim);
    grow(dqueries, query_block, logit_dim);
    grow(dq_rows, std::max(query_block, key_block), query_dim);
    if (static_cast<Index>(query_positions.size()) < query_block) {
      query_positions.resize(static_cast<std::size_t>(query_block));
    }
    if (static_cast<Index>(key_positions.size()) < key_block) {
      key_positions.resize(static_cast<std::size_t>(key_block));
    }
  }

 private:
  static void grow(Matrix<Scalar>& m, Index rows, Index cols) {
    if (m.size() < rows * cols) m.resize(rows * cols, 1);
  }
};

/// A rows × cols row-major view of a workspace buffer.
template <class Scalar>
Eigen::Map<Matrix<Scalar>> tile_of(Matrix<Scalar>& buffer, Index rows, Index cols) {
  return Eigen::Map<Matrix<Scalar>>(buffer.data(), rows, cols);
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

/// P = exp(S − lse) row by row, in place; a row without an allowed key (lse = −inf, every
/// score −inf) gets P = 0.
template <class Scalar, class Tile>
void probabilities_from_lse(Tile& scores, const Scalar* lse) {
  constexpr Scalar minus_infinity = -std::numeric_limits<Scalar>::infinity();
  for (Index r = 0; r < scores.rows(); ++r) {
    if (lse[r] == minus_infinity) {
      scores.row(r).setZero();
    } else {
      scores.row(r) = (scores.row(r).array() - lse[r]).exp();
    }
  }
}

/// dS = P ∘ (dP − D_r), exactly 0 where P is 0 (forbidden keys: their value is never read, so a
/// non-finite v there cannot leak into the gradient).
template <class Tile, class DTile, class Delta>
void softmax_backward(const Tile& probabilities, DTile& dscores, const Delta& delta) {
  for (Index r = 0; r < dscores.rows(); ++r) {
    for (Index c = 0; c < dscores.cols(); ++c) {
      const auto p = probabilities(r, c);
      dscores(r, c) = p == 0 ? 0 : p * (dscores(r, c) - delta[r]);
    }
  }
}

/// The streaming backward. `gradient` receives the encoder's parameter gradient (summed over
/// the tasks in key/value-head order).
template <class Scalar, class Encoder>
void stream_backward(const AttentionProblem<Scalar>& p, const Encoder& encoder,
                     const BackwardInputs<Scalar>& in, const BackwardOutputs<Scalar>& grads,
                     encoder_gradient_t<Encoder>& gradient) {
  [[maybe_unused]] RequireDifferentiable<Encoder> differentiable;
  using Gradient = encoder_gradient_t<Encoder>;
  const Index kv_heads = p.k.heads();
  const Index group = p.heads_per_kv_head;
  for (Index h = 0; h < p.heads; ++h) grads.dq.head(h).setZero();
  for (Index g = 0; g < kv_heads; ++g) {
    grads.dk.head(g).setZero();
    grads.dv.head(g).setZero();
  }
  if (p.queries == 0 || p.keys == 0) return;

  // D_r = dO_r · O_r for every (head, row): the softmax backward's row term.
  Matrix<Scalar> delta(p.heads, p.queries);
  for (Index h = 0; h < p.heads; ++h) {
    delta.row(h) = (in.dout.head(h).array() * in.out.head(h).array()).rowwise().sum().transpose();
  }

  std::vector<Gradient> task_gradients;
  task_gradients.reserve(static_cast<std::size_t>(kv_heads));
  for (Index g = 0; g < kv_heads; ++g) {
    if constexpr (HasLearnableParameters<Encoder>) {
      task_gradients.push_back(encoder.zero_gradient());
    } else {
      task_gradients.push_back(Gradient{});
    }
  }

  const Index qb = p.query_block;
  const Index kb = p.key_block;
  const Index query_blocks = (p.queries + qb - 1) / qb;
  const Index key_blocks = (p.keys + kb - 1) / kb;
  const Index Dl = p.logit_dim;
  detail::parallel_tasks(
      kv_heads, detail::thread_count(p.threads, kv_heads),
      [&] {
        detail::ScratchLease<BackwardWorkspace<Scalar>> lease;
        lease.get().reserve(qb, kb, p.query_dim, Dl, p.value_dim);
        return lease;
      },
      [&](Index g, detail::ScratchLease<BackwardWorkspace<Scalar>>& lease) {
        BackwardWorkspace<Scalar>& ws = lease.get();
        Gradient& task_gradient = task_gradients[static_cast<std::size_t>(g)];
        for (Index kblock = 0; kblock < key_blocks; ++kblock) {
          const Index key_first = kblock * kb;
          const Index cols = std::min(kb, p.keys - key_first);
          const BlockExtent kext = key_extent(p, key_first, cols);
          fill_positions(p, false, key_first, cols, ws.key_positions);
          const Positions kpos(ws.key_positions.data(), static_cast<std::size_t>(cols));
          const Index centre = kpos[0];
          auto keys = tile_of(ws.keys, cols, Dl);
          const auto k_rows = p.k.head(g).middleRows(key_first, cols);
          if constexpr (QueryKeyTransform<Encoder>) {
            encoder.transform_keys(g, kpos, centre, k_rows, keys);
          } else {
            keys = k_rows;
          }
          const auto values = p.v.head(g).middleRows(key_first, cols);
          auto dkeys = tile_of(ws.dkeys, cols, Dl);
          auto dvalues = tile_of(ws.dvalues, cols, p.value_dim);
          dkeys.setZero();
          dvalues.setZero();
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
              auto queries = tile_of(ws.queries, rows, Dl);
              if constexpr (QueryKeyTransform<Encoder>) {
                encoder.transform_queries(h, qpos, centre, q_rows, queries);
                queries *= p.scale;
              } else {
                queries.noalias() = p.scale * q_rows;
              }
              auto scores = tile_of(ws.scores, rows, cols);
              scores.noalias() = queries * keys.transpose();
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
              const auto dout = in.dout.head(h).middleRows(first, rows);
              dvalues.noalias() += scores.transpose() * dout;
              auto dscores = tile_of(ws.dscores, rows, cols);
              dscores.noalias() = dout * values.transpose();
              if constexpr (RelativeKeyValue<Encoder>) {
                encoder.add_relative_value_scores(h, qpos, kpos, dout, dscores);
              }
              softmax_backward(scores, dscores, delta.row(h).segment(first, rows));
              if constexpr (LearnableScoreBias<Encoder>) {
                encoder.accumulate_bias_gradient(h, qpos, kpos, dscores, task_gradient);
              }
              dkeys.noalias() += dscores.transpose() * queries;
              auto dqueries = tile_of(ws.dqueries, rows, Dl);
              dqueries.noalias() = dscores * keys;
              if constexpr (RelativeKeyValue<Encoder>) {
                encoder.add_relative_query_gradient(h, qpos, kpos, dscores, dqueries);
                encoder.accumulate_relative_gradient(h, qpos, kpos, queries, dscores, scores, dout,
                                                     task_gradient);
              }
              dqueries *= p.scale;
              if constexpr (QueryKeyTransform<Encoder>) {
                auto back = tile_of(ws.dq_rows, rows, p.query_dim);
                kernel::transform_queries_backward(encoder, h, qpos, centre, q_rows, dqueries, back,
                                                   task_gradient);
                grads.dq.head(h).middleRows(first, rows) += back;
              } else {
                grads.dq.head(h).middleRows(first, rows) += dqueries;
              }
            }
          }
          if (!touched) continue;
          if constexpr (QueryKeyTransform<Encoder>) {
            auto back = tile_of(ws.dq_rows, cols, p.query_dim);
            kernel::transform_keys_backward(encoder, g, kpos, centre, k_rows, dkeys, back,
                                            task_gradient);
            grads.dk.head(g).middleRows(key_first, cols) = back;
          } else {
            grads.dk.head(g).middleRows(key_first, cols) = dkeys;
          }
          grads.dv.head(g).middleRows(key_first, cols) = dvalues;
        }
      });
  for (Gradient& task_gradient : task_gradients) gradient += task_gradient;
}

}  // namespace posenc::kernel
