// SPDX-License-Identifier: MIT
// The pre-softmax scores of an attention call, [H, N, M], for the analysis tools that need logits
// rather than probabilities (the empirical score curve and attention resolution). Materialises
// N × M per head, like attention_weights: pass only the query rows you analyse.
#pragma once

#include <limits>
#include <vector>

#include "posenc/attention.hpp"

namespace posenc {

/// Pre-softmax scores [H, N, M]: scale·q'_i·k'_j after every stage of `encoder` (query/key
/// transform, relative logits, score mixer, bias), with keys the mask or the segments forbid set
/// to −inf; exactly the scores whose softmax is attention_weights(q, k, v, encoder, options).
/// q: [H, N, D], k: [H_kv, M, D] (H_kv divides H). Same options and checks as `attention`.
/// (Computed by the same steps as the reference kernel; posenc_tests checks that the softmax of
/// these scores equals attention_weights.)
template <HeadsLike Q, HeadsLike K, AttentionEncoder Encoder = NoPositionalEncoding>
Heads<heads_scalar_t<Q>> attention_scores(const Q& q, const K& k, const Encoder& encoder = {},
                                          const AttentionOptions& options = {}) {
  using Scalar = heads_scalar_t<Q>;
  detail::check_scalars<Q, K, K>();
  const auto kv = detail::as_const_view(k);
  // k stands in for v (make_problem checks values too); only its row count matters.
  const auto p = detail::make_problem<Scalar>("posenc::attention_scores", detail::as_const_view(q),
                                              kv, kv, encoder, options);
  const Index N = p.queries;
  const Index M = p.keys;
  Heads<Scalar> out(p.heads, N, M);
  if (N == 0 || M == 0) return out;
  std::vector<Index> qpos(static_cast<std::size_t>(N));
  std::vector<Index> kpos(static_cast<std::size_t>(M));
  detail::fill_positions(p, true, 0, N, qpos);
  detail::fill_positions(p, false, 0, M, kpos);
  const Index centre = qpos[0];
  Matrix<Scalar> logits(p.heads, N * M);
  for (Index h = 0; h < p.heads; ++h) {
    Matrix<Scalar> queries(N, p.logit_dim);
    Matrix<Scalar> keys(M, p.logit_dim);
    if constexpr (QueryKeyTransform<Encoder>) {
      encoder.transform_queries(h, qpos, centre, p.q.head(h), queries);
      encoder.transform_keys(p.kv_head(h), kpos, centre, p.k.head(p.kv_head(h)), keys);
    } else {
      queries = p.q.head(h);
      keys = p.k.head(p.kv_head(h));
    }
    queries *= p.scale;
    Eigen::Map<Matrix<Scalar>> head_logits(logits.row(h).data(), N, M);
    head_logits = queries * keys.transpose();
    if constexpr (RelativeKeyValue<Encoder>) {
      encoder.add_relative_logits(h, qpos, kpos, queries, head_logits);
    }
  }
  Matrix<Scalar> scores;
  if constexpr (ScoreMixer<Encoder>) {
    scores.resize(p.heads, N * M);
    encoder.mix(qpos, kpos, 0, M, logits, scores);
  } else {
    scores.swap(logits);
  }
  constexpr Scalar minus_infinity = -std::numeric_limits<Scalar>::infinity();
  for (Index h = 0; h < p.heads; ++h) {
    Eigen::Map<Matrix<Scalar>> s(scores.row(h).data(), N, M);
    if constexpr (ScoreBias<Encoder>) encoder.add_bias(h, qpos, kpos, s);
    for (Index r = 0; r < N; ++r) {
      const auto row = static_cast<std::size_t>(r);
      for (Index c = 0; c < M; ++c) {
        const auto col = static_cast<std::size_t>(c);
        const bool same_document =
            !p.has_segments() || p.query_segments[row] == p.key_segments[col];
        if (!same_document || !p.mask.allows(qpos[row], kpos[col])) s(r, c) = minus_infinity;
      }
    }
    out.head(h) = s;
  }
  return out;
}

}  // namespace posenc
