// SPDX-License-Identifier: MIT
// The streaming backward of an encoder with a ScoreMixer (DAPE, DAPE V2): the mixer reads the
// logits of every head at a pair, and with a halo (V2's 1×k convolutions) those of neighbouring
// keys, so a tile is recomputed for all heads at once, as the forward (stream_mixed) does. Two
// passes, each task writing rows no other task writes, so the result is the same, bit for bit,
// for any thread count:
//   pass 1, one task per query block: dq of its rows (every head) and the encoder's parameter
//           gradient (one accumulator per task, summed in task order);
//   pass 2, one task per key block: dk and dv of its keys (every key/value head).
//
// Per tile (query block rows r, all heads h, key/value head g = kv_head(h)), with Q̃_h = scale·q_h:
//   A_h = Q̃_h·K_gᵀ at the tile's keys and key_halo() neighbours on each side (zero padding
//   beyond the sequence: neighbours outside it are absent);   S = mix(A) at the tile's keys,
//   masked −inf;   P_h = exp(S_h − lse);   D_r = dO_r·O_r;   dV_g += P_hᵀ·dO_h;
//   dP = dO_h·V_gᵀ;   dS = P ∘ (dP − D);   dA = mix_backward(dS) (all heads, at every key read);
//   dq_h += scale·dA_h·K_g;   dk_g += dA_hᵀ·Q̃_h.
// A key's logit reaches the scores of up to key_halo() keys on each side, so its dA sums shares
// from neighbouring tiles. Pass 1 adds the share of every key a tile's scores read (halo
// included) to dq: each share is counted once. Pass 2 mixes the scores of its keys and key_halo()
// neighbours on each side (whose logits need a second halo) and keeps dA at its own keys only,
// which then holds every share. Extra memory O(tile) per thread plus one parameter-gradient
// accumulator per query block; the mixer runs twice (once per pass), as a deterministic
// FlashAttention backward without atomics recomputes its tiles. A mixer with mix_and_backward
// (DAPE) runs S = mix(A), the softmax backward and dA = mix_backward(dS) chunk by chunk in one
// sweep, so that its hidden layer is computed once per pass and never leaves the chunk. The five
// products run on the forward's micro-kernels (kernel/tile_kernels.hpp), as the non-mixer backward
// does: Kᵀ and Vᵀ packed once per tile (pass 1) or key block (pass 2) by pack_transposed, Q̃·Kᵀ
// and dO·Vᵀ by tile_logits, dA·K by tile_accumulate, Pᵀ·dO and dAᵀ·Q̃ by the transposed
// tile_accumulate, all in padded, Eigen-aligned per-thread buffers.
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
#include "posenc/kernel/backward.hpp"
#include "posenc/kernel/problem.hpp"
#include "posenc/kernel/tile_mask.hpp"
#include "posenc/tensor.hpp"

namespace posenc::kernel {

/// The per-thread buffers of the mixer backward, sized once per call for the largest tile (no
/// allocation inside the tile loops), laid out for the forward's micro-kernels
/// (kernel/tile_kernels.hpp) as BackwardWorkspace is: Q̃, dO, K and the accumulators in rows
/// padded to whole packets (zero in the padding), Kᵀ and Vᵀ packed with padded rows. Every buffer
/// is Eigen-aligned and every head's block starts at the same offset in every thread, so no
/// result depends on which thread's buffer a tile lands in.
template <class Scalar>
struct MixerBackwardWorkspace {
  Vector<Scalar> queries;      // [H][rows × pl]: Q̃_h = scale·q_h
  Vector<Scalar> dout;         // [H][rows × pv]: dO_h
  Vector<Scalar> keys;         // pass 1: [H_kv][read × pl]: K_g at the keys read
  Vector<Scalar> keys_t;       // [H_kv][Dl × pad(read)]: K_gᵀ
  Vector<Scalar> values_t;     // [H_kv][Dv × pad(scored)]: V_gᵀ
  Vector<Scalar> logits;       // [H, rows·E]: A at the keys read
  Vector<Scalar> scores;       // [H, rows·O]: S, then P
  Vector<Scalar> dscores;      // [H, rows·O]: dP, then dS
  Vector<Scalar> dlogits;      // [H, rows·E]: dA
  Vector<Scalar> accumulator;  // pass 1: [H][rows × pl] dQ̃; pass 2: [H_kv][cols × pl] dk
  Vector<Scalar> dvalues;      // pass 2: [H_kv][cols × pv]
  std::vector<Index> query_positions, key_positions;

  void reserve(Index heads, Index kv_heads, Index rows, Index keys_read, Index logit_dim,
               Index value_dim) {
    const Index pl = padded_width<Scalar>(logit_dim);
    const Index pv = padded_width<Scalar>(value_dim);
    const Index pc = padded_width<Scalar>(keys_read);
    detail::grow(queries, heads * rows * pl);
    detail::grow(dout, heads * rows * pv);
    detail::grow(keys, kv_heads * keys_read * pl);
    detail::grow(keys_t, kv_heads * logit_dim * pc);
    detail::grow(values_t, kv_heads * value_dim * pc);
    detail::grow(logits, heads * rows * keys_read);
    detail::grow(scores, heads * rows * keys_read);
    detail::grow(dscores, heads * rows * keys_read);
    detail::grow(dlogits, heads * rows * keys_read);
    detail::grow(accumulator, std::max(heads * rows, kv_heads * keys_read) * pl);
    detail::grow(dvalues, kv_heads * keys_read * pv);
    detail::grow(query_positions, rows);
    detail::grow(key_positions, keys_read);
  }
};

/// rows × cols row-major view of `buffer` from `offset`.
template <class Scalar>
Eigen::Map<Matrix<Scalar>> view_of(Vector<Scalar>& buffer, Index offset, Index rows, Index cols) {
  return Eigen::Map<Matrix<Scalar>>(buffer.data() + offset, rows, cols);
}

/// Keys [first, first + count) of the sequence.
struct KeySpan {
  Index first, count;
};

/// Packs, for every key/value head g, K_gᵀ at the keys `read` (ws.keys_t, rows of pad(read)), V_gᵀ
/// at the keys `scored` (ws.values_t, rows of pad(scored)) and, with `rows_too`, K_g's rows at the
/// keys read (ws.keys, rows of pad(Dl)): the operands of the tile's products.
template <class Scalar>
void pack_keys(const AttentionProblem<Scalar>& p, KeySpan read, KeySpan scored, bool rows_too,
               MixerBackwardWorkspace<Scalar>& ws) {
  const Index Dl = p.logit_dim;
  const Index Dv = p.value_dim;
  const Index pl = padded_width<Scalar>(Dl);
  const Index pr = padded_width<Scalar>(read.count);
  const Index ps = padded_width<Scalar>(scored.count);
  for (Index g = 0; g < p.k.heads(); ++g) {
    const auto keys = p.k.head(g).middleRows(read.first, read.count);
    const auto values = p.v.head(g).middleRows(scored.first, scored.count);
    pack_transposed(keys.data(), keys.outerStride(), read.count, Dl, ws.keys_t.data() + g * Dl * pr,
                    pr);
    pack_transposed(values.data(), values.outerStride(), scored.count, Dv,
                    ws.values_t.data() + g * Dv * ps, ps);
    if (rows_too) {
      pack_rows(keys.data(), keys.outerStride(), read.count, Dl,
                ws.keys.data() + g * read.count * pl, pl);
    }
  }
}

/// The softmax and its backward on `count` contiguous scores of one row, in one sweep: P =
/// exp(S − lse) in place of S (the exponential of probabilities_from_lse: whole packets from the
/// start of the row, then a scalar tail, so no bit depends on the buffer's address) and dS = P ∘
/// (dP − D) in place of dP, exactly 0 where P is 0 (softmax_backward); a row without an allowed key
/// (lse = −inf) gets P = dS = 0.
template <class Scalar>
void softmax_row_backward(Scalar* scores, Scalar* dscores, Index count, Scalar lse, Scalar delta) {
  using Packet = typename TileKernelTraits<Scalar>::Packet;
  using namespace Eigen::internal;
  constexpr Index W = TileKernelTraits<Scalar>::width;
  if (lse == -std::numeric_limits<Scalar>::infinity()) {
    std::fill(scores, scores + count, Scalar(0));
    std::fill(dscores, dscores + count, Scalar(0));
    return;
  }
  const Packet shift = pset1<Packet>(lse);
  const Packet d = pset1<Packet>(delta);
  const Packet zero = pset1<Packet>(Scalar(0));
  Index c = 0;
  for (; c + W <= count; c += W) {
    const Packet e = softmax_exp(psub(ploadu<Packet>(scores + c), shift));
    pstoreu(scores + c, e);
    const Packet ds = pmul(e, psub(ploadu<Packet>(dscores + c), d));
    pstoreu(dscores + c, pselect(pcmp_eq(e, zero), zero, ds));
  }
  for (; c < count; ++c) {
    const Scalar x = scores[c] - lse;
    const Scalar e = x < log_smallest_normal<Scalar> ? Scalar(0) : std::exp(x);
    scores[c] = e;
    dscores[c] = e == Scalar(0) ? Scalar(0) : e * (dscores[c] - delta);
  }
}

/// One tile of either pass: the logits of every head of the query block (rows from `first`, Q̃ and
/// dO in ws.queries and ws.dout) against the keys `read` (positions kpos_read), dP = dO·Vᵀ at keys
/// `scored` ⊆ `read` (K and V packed by pack_keys), then the mixer and its backward: S = mix(A),
/// masked (a partial tile), P = exp(S − lse) (left in ws.scores), dS = P ∘ (dP − D) and dA =
/// mix_backward(dS) (in ws.dlogits), adding the mixer's parameter gradient to `*gradient` when it
/// is non-null. A mixer with mix_and_backward (DAPE) does all of it in one sweep over its chunks,
/// the softmax backward per chunk (`finish`).
template <class Scalar, class Encoder>
void mixed_tile_backward(const AttentionProblem<Scalar>& p, const Encoder& encoder,
                         const BackwardInputs<Scalar>& in, const Matrix<Scalar>& delta, Index first,
                         Positions qpos, KeySpan read, Positions kpos_read, KeySpan scored,
                         TileCoverage coverage, MixerBackwardWorkspace<Scalar>& ws,
                         encoder_gradient_t<Encoder>* gradient) {
  const auto rows = static_cast<Index>(qpos.size());
  const Index H = p.heads;
  const Index Dl = p.logit_dim;
  const Index Dv = p.value_dim;
  const Index pl = padded_width<Scalar>(Dl);
  const Index pv = padded_width<Scalar>(Dv);
  const Index pr = padded_width<Scalar>(read.count);
  const Index ps = padded_width<Scalar>(scored.count);
  auto logits = view_of(ws.logits, 0, H, rows * read.count);
  for (Index h = 0; h < H; ++h) {
    const Index g = p.kv_head(h);
    tile_logits(ws.queries.data() + h * rows * pl, pl, rows, Dl, ws.keys_t.data() + g * Dl * pr, pr,
                read.count, ws.logits.data() + h * rows * read.count, read.count);
    tile_logits(ws.dout.data() + h * rows * pv, pv, rows, Dv, ws.values_t.data() + g * Dv * ps, ps,
                scored.count, ws.dscores.data() + h * rows * scored.count, scored.count);
  }
  auto scores = view_of(ws.scores, 0, H, rows * scored.count);
  auto dscores = view_of(ws.dscores, 0, H, rows * scored.count);
  auto dlogits = view_of(ws.dlogits, 0, H, rows * read.count);
  const Positions kpos_scored = kpos_read.subspan(
      static_cast<std::size_t>(scored.first - read.first), static_cast<std::size_t>(scored.count));
  std::span<const Index> qseg;
  std::span<const Index> kseg;
  if (p.has_segments()) {
    qseg = p.query_segments.subspan(static_cast<std::size_t>(first), qpos.size());
    kseg = p.key_segments.subspan(static_cast<std::size_t>(scored.first), kpos_scored.size());
  }
  // Rows [r0, r0 + count_rows) × score columns [c0, c0 + cols) of every head: S → P, dP → dS.
  const auto finish = [&](Index r0, Index count_rows, Index c0, Index cols) {
    const auto row_span = [&](auto span) {
      return span.empty()
                 ? span
                 : span.subspan(static_cast<std::size_t>(r0), static_cast<std::size_t>(count_rows));
    };
    const auto column_span = [&](auto span) {
      return span.empty()
                 ? span
                 : span.subspan(static_cast<std::size_t>(c0), static_cast<std::size_t>(cols));
    };
    for (Index h = 0; h < H; ++h) {
      auto probabilities = view_of(ws.scores, h * rows * scored.count, rows, scored.count)
                               .block(r0, c0, count_rows, cols);
      if (coverage == TileCoverage::partial) {
        apply_mask<Scalar>(p.mask, row_span(qpos), column_span(kpos_scored),
                           p.key_positions.empty(), row_span(qseg), column_span(kseg),
                           probabilities);
      }
      auto block = view_of(ws.dscores, h * rows * scored.count, rows, scored.count)
                       .block(r0, c0, count_rows, cols);
      for (Index r = 0; r < count_rows; ++r) {
        softmax_row_backward(&probabilities.coeffRef(r, 0), &block.coeffRef(r, 0), cols,
                             in.lse(h, first + r0 + r), delta(h, first + r0 + r));
      }
    }
  };
  const Index first_key = scored.first - read.first;
  if constexpr (requires {
                  encoder.mix_and_backward(qpos, kpos_read, first_key, scored.count, logits, scores,
                                           dscores, finish, dlogits, gradient);
                }) {
    encoder.mix_and_backward(qpos, kpos_read, first_key, scored.count, logits, scores, dscores,
                             finish, dlogits, gradient);
  } else {
    encoder.mix(qpos, kpos_read, first_key, scored.count, logits, scores);
    finish(0, rows, 0, scored.count);
    if (gradient != nullptr) {
      encoder.mix_backward(qpos, kpos_read, first_key, scored.count, logits, dscores, dlogits,
                           *gradient);
    } else {
      encoder.mix_backward(qpos, kpos_read, first_key, scored.count, logits, dscores, dlogits);
    }
  }
}

/// Keys [first − halo, last + halo) ∩ [0, M).
template <class Scalar>
KeySpan widen(const AttentionProblem<Scalar>& p, KeySpan keys, Index halo) {
  const Index first = std::max<Index>(0, keys.first - halo);
  return {first, std::min(p.keys, keys.first + keys.count + halo) - first};
}

/// The mixer backward (see the top of this file). dq [H, N, D], dk and dv [H_kv, M, ·] are
/// overwritten; `gradient` receives the encoder's parameter gradient.
template <class Scalar, class Encoder>
void stream_backward_mixed(const AttentionProblem<Scalar>& p, const Encoder& encoder,
                           const BackwardInputs<Scalar>& in, const BackwardOutputs<Scalar>& grads,
                           encoder_gradient_t<Encoder>& gradient) {
  static_assert(DifferentiableScoreMixer<Encoder> &&
                models_only<Encoder, Stage::score_mixer, Stage::absolute>);
  using Gradient = typename Encoder::Gradient;
  const Index H = p.heads;
  const Index kv_heads = p.k.heads();
  const Index Dl = p.logit_dim;
  if (p.queries == 0 || p.keys == 0) {
    for (Index h = 0; h < H; ++h) grads.dq.head(h).setZero();
    for (Index g = 0; g < kv_heads; ++g) {
      grads.dk.head(g).setZero();
      grads.dv.head(g).setZero();
    }
    return;
  }
  const auto halo = static_cast<Index>(encoder.key_halo());
  const Index qb = p.query_block;
  const Index kb = p.key_block;
  const Index query_blocks = (p.queries + qb - 1) / qb;
  const Index key_blocks = (p.keys + kb - 1) / kb;
  const Index max_read = std::min(p.keys, kb + 4 * halo);

  // D_r = dO_r · O_r for every (head, row), the softmax backward's row term, and one parameter
  // gradient per query block, in the calling thread's scratch (no allocation in the steady state).
  detail::ScratchLease<BackwardCallScratch<Scalar, Gradient>> call_lease;
  BackwardCallScratch<Scalar, Gradient>& call = call_lease.get();
  const Matrix<Scalar>& delta = call.row_deltas(in, H, p.queries);
  const std::span<Gradient> task_gradients = call.zeroed_task_gradients(query_blocks, gradient);
  const Index pl = padded_width<Scalar>(Dl);           // row stride of Q̃, K, dQ̃, dk
  const Index pv = padded_width<Scalar>(p.value_dim);  // row stride of dO, dv
  const auto make_workspace = [&] {
    detail::ScratchLease<MixerBackwardWorkspace<Scalar>> lease;
    lease.get().reserve(H, kv_heads, qb, std::max(kb, max_read), Dl, p.value_dim);
    return lease;
  };
  // Loads Q̃_h = scale·q_h and dO_h of every head for query rows [first, first + rows) (padded
  // rows, zero padding) and their positions.
  const auto load_queries = [&](MixerBackwardWorkspace<Scalar>& ws, Index first, Index rows) {
    fill_positions(p, true, first, rows, ws.query_positions);
    for (Index h = 0; h < H; ++h) {
      auto queries = view_of(ws.queries, h * rows * pl, rows, pl);
      queries.leftCols(Dl).noalias() = p.scale * p.q.head(h).middleRows(first, rows);
      queries.rightCols(pl - Dl).setZero();
      auto dout = view_of(ws.dout, h * rows * pv, rows, pv);
      dout.leftCols(p.value_dim) = in.dout.head(h).middleRows(first, rows);
      dout.rightCols(pv - p.value_dim).setZero();
    }
    return Positions(ws.query_positions.data(), static_cast<std::size_t>(rows));
  };

  // Pass 1: dq and the parameter gradient, one task per query block, the last (under a causal
  // mask the longest) first, so that the dynamic schedule ends on short tasks.
  detail::parallel_tasks(
      query_blocks, detail::thread_count(p.threads, query_blocks), make_workspace,
      [&](Index task, detail::ScratchLease<MixerBackwardWorkspace<Scalar>>& lease) {
        MixerBackwardWorkspace<Scalar>& ws = lease.get();
        const Index block = query_blocks - 1 - task;
        Gradient& task_gradient = task_gradients[static_cast<std::size_t>(block)];
        const Index first = block * qb;
        const Index rows = std::min(qb, p.queries - first);
        const Positions qpos = load_queries(ws, first, rows);
        const BlockExtent qext = query_extent(p, first, rows);
        view_of(ws.accumulator, 0, H * rows, pl).setZero();
        for (Index kblock = 0; kblock < key_blocks; ++kblock) {
          const KeySpan scored{kblock * kb, std::min(kb, p.keys - kblock * kb)};
          const TileCoverage coverage = tile_coverage(p.mask, p.has_segments(), qext,
                                                      key_extent(p, scored.first, scored.count));
          if (coverage == TileCoverage::none) continue;  // dS = 0: no share
          const KeySpan read = widen(p, scored, halo);
          fill_positions(p, false, read.first, read.count, ws.key_positions);
          const Positions kpos(ws.key_positions.data(), static_cast<std::size_t>(read.count));
          pack_keys(p, read, scored, true, ws);
          mixed_tile_backward(p, encoder, in, delta, first, qpos, read, kpos, scored, coverage, ws,
                              &task_gradient);
          for (Index h = 0; h < H; ++h) {  // dQ̃_h += dA_h·K_g
            tile_accumulate(ws.dlogits.data() + h * rows * read.count, read.count, rows, read.count,
                            ws.keys.data() + p.kv_head(h) * read.count * pl, pl, pl,
                            ws.accumulator.data() + h * rows * pl, pl);
          }
        }
        for (Index h = 0; h < H; ++h) {
          grads.dq.head(h).middleRows(first, rows) =
              p.scale * view_of(ws.accumulator, h * rows * pl, rows, pl).leftCols(Dl);
        }
      });
  for (const Gradient& task_gradient : task_gradients) gradient += task_gradient;

  // Pass 2: dk and dv, one task per key block.
  detail::parallel_tasks(
      key_blocks, detail::thread_count(p.threads, key_blocks), make_workspace,
      [&](Index kblock, detail::ScratchLease<MixerBackwardWorkspace<Scalar>>& lease) {
        MixerBackwardWorkspace<Scalar>& ws = lease.get();
        const KeySpan own{kblock * kb, std::min(kb, p.keys - kblock * kb)};
        const KeySpan scored = widen(p, own, halo);  // every score an own key's logit reaches
        const KeySpan read = widen(p, scored, halo);
        const BlockExtent kext = key_extent(p, scored.first, scored.count);
        view_of(ws.accumulator, 0, kv_heads * own.count, pl).setZero();
        view_of(ws.dvalues, 0, kv_heads * own.count, pv).setZero();
        pack_keys(p, read, scored, false, ws);
        for (Index qblock = 0; qblock < query_blocks; ++qblock) {
          const Index first = qblock * qb;
          const Index rows = std::min(qb, p.queries - first);
          const TileCoverage coverage =
              tile_coverage(p.mask, p.has_segments(), query_extent(p, first, rows), kext);
          if (coverage == TileCoverage::none) continue;
          const Positions qpos = load_queries(ws, first, rows);
          fill_positions(p, false, read.first, read.count, ws.key_positions);
          const Positions kpos(ws.key_positions.data(), static_cast<std::size_t>(read.count));
          mixed_tile_backward(p, encoder, in, delta, first, qpos, read, kpos, scored, coverage, ws,
                              static_cast<encoder_gradient_t<Encoder>*>(nullptr));
          // dV_g += P_hᵀ·dO_h, dk_g += dA_hᵀ·Q̃_h at the own keys: the transposed products read
          // P and dA column-wise (tile_accumulate<…, true>), no transpose is formed.
          for (Index h = 0; h < H; ++h) {
            const Index g = p.kv_head(h);
            tile_accumulate<Scalar, true>(
                ws.scores.data() + h * rows * scored.count + (own.first - scored.first),
                scored.count, own.count, rows, ws.dout.data() + h * rows * pv, pv, pv,
                ws.dvalues.data() + g * own.count * pv, pv);
            tile_accumulate<Scalar, true>(
                ws.dlogits.data() + h * rows * read.count + (own.first - read.first), read.count,
                own.count, rows, ws.queries.data() + h * rows * pl, pl, pl,
                ws.accumulator.data() + g * own.count * pl, pl);
          }
        }
        for (Index g = 0; g < kv_heads; ++g) {
          grads.dk.head(g).middleRows(own.first, own.count) =
              view_of(ws.accumulator, g * own.count * pl, own.count, pl).leftCols(Dl);
          grads.dv.head(g).middleRows(own.first, own.count) =
              view_of(ws.dvalues, g * own.count * pv, own.count, pv).leftCols(p.value_dim);
        }
      });
}

}  // namespace posenc::kernel
