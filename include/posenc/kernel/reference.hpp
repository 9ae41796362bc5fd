// SPDX-License-Identifier: MIT
// The materialising oracle: every N × M score matrix formed, masked and soft-maxed the obvious
// way. Slow and plain on purpose: the streaming kernel is tested against it.
// IWYU pragma: private, include "posenc/attention.hpp"
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <vector>

#include "posenc/encoding.hpp"
#include "posenc/kernel/problem.hpp"
#include "posenc/tensor.hpp"

namespace posenc::kernel {

/// The oracle's first half: every N × M score matrix (all stages applied, forbidden keys −inf).
template <class Scalar, class Encoder>
std::vector<Matrix<Scalar>> reference_scores(const AttentionProblem<Scalar>& p,
                                             const Encoder& encoder) {
  const Index N = p.queries;
  const Index M = p.keys;
  std::vector<Matrix<Scalar>> result(static_cast<std::size_t>(p.heads), Matrix<Scalar>(N, M));
  if (N == 0 || M == 0) return result;
  std::vector<Index> qpos(static_cast<std::size_t>(N));
  std::vector<Index> kpos(static_cast<std::size_t>(M));
  fill_positions(p, true, 0, N, qpos);
  fill_positions(p, false, 0, M, kpos);
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
    result[static_cast<std::size_t>(h)] = s;
  }
  return result;
}

/// The oracle: materialise every N × M score matrix, mask, softmax. Returns the probabilities
/// per head (N × M each): over the allowed keys of each row, in IEEE arithmetic (README,
/// "Non-finite values"); zero for forbidden keys and for rows with no allowed key.
template <class Scalar, class Encoder>
std::vector<Matrix<Scalar>> reference_weights(const AttentionProblem<Scalar>& p,
                                              const Encoder& encoder) {
  std::vector<Matrix<Scalar>> weights = reference_scores(p, encoder);
  constexpr Scalar minus_infinity = -std::numeric_limits<Scalar>::infinity();
  constexpr Scalar nan = std::numeric_limits<Scalar>::quiet_NaN();
  for (Matrix<Scalar>& w : weights) {
    for (Index r = 0; r < w.rows(); ++r) {
      if (!has_allowed_key(p, r)) {
        w.row(r).setZero();
        continue;
      }
      // The max over the allowed keys; NaN when any of them scores NaN.
      Scalar max = minus_infinity;
      for (Index c = 0; c < w.cols(); ++c) {
        if (!allows(p, r, c)) continue;
        if (std::isnan(w(r, c))) max = nan;
        if (!std::isnan(max)) max = std::max(max, w(r, c));
      }
      Scalar sum = 0;
      for (Index c = 0; c < w.cols(); ++c) {
        // exp(−inf − max) is exactly 0 for finite max; exp(−inf − (−inf)) and exp(inf − inf) are
        // NaN, as IEEE gives.
        w(r, c) = allows(p, r, c) ? std::exp(w(r, c) - max) : Scalar(0);
        sum += w(r, c);
      }
      w.row(r) /= sum;
    }
  }
  return weights;
}

/// Σ_j w_ij v_j over the allowed keys of each row: a forbidden key's value is never read (its
/// weight 0 would turn a non-finite value into NaN).
template <class Scalar, class Values>
Matrix<Scalar> reference_values(const AttentionProblem<Scalar>& p, const Matrix<Scalar>& weights,
                                const Values& v) {
  if (v.allFinite()) return weights * v;
  Matrix<Scalar> out = Matrix<Scalar>::Zero(weights.rows(), v.cols());
  for (Index r = 0; r < weights.rows(); ++r) {
    for (Index c = 0; c < weights.cols(); ++c) {
      if (allows(p, r, c)) out.row(r) += weights(r, c) * v.row(c);
    }
  }
  return out;
}

template <class Scalar, class Encoder>
void reference_output(const AttentionProblem<Scalar>& p, const Encoder& encoder,
                      HeadsView<Scalar> out) {
  const std::vector<Matrix<Scalar>> weights = reference_weights(p, encoder);
  if (p.queries == 0) return;
  std::vector<Index> qpos(static_cast<std::size_t>(p.queries));
  std::vector<Index> kpos(static_cast<std::size_t>(p.keys));
  fill_positions(p, true, 0, p.queries, qpos);
  fill_positions(p, false, 0, p.keys, kpos);
  for (Index h = 0; h < p.heads; ++h) {
    const Matrix<Scalar>& w = weights[static_cast<std::size_t>(h)];
    Matrix<Scalar> o = reference_values(p, w, p.v.head(p.kv_head(h)));
    if constexpr (RelativeKeyValue<Encoder>) {
      if (p.keys > 0) encoder.add_relative_values(h, qpos, kpos, w, o);
    }
    out.head(h) = o;
  }
}

}  // namespace posenc::kernel
