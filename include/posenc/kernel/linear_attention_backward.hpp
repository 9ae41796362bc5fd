// SPDX-License-Identifier: MIT
// The backward of linear attention (linear_attention_backward in posenc/linear_attention.hpp):
// the gradients with respect to q, k, v and a QueryKeyTransform's parameters, O(N) extra memory,
// never an N × M matrix; and the plain materialising backward the tests hold it to.
//
// Per query head, with a_i = φ(T_q(q_i)), b_j = φ(T_k(k_j)), w_ij = a_i·b_j over the keys row i
// sees, num_i = Σⱼ w_ij v_j, den_i = Σⱼ w_ij and out_i = num_i / den_i, the loss reaches the
// weights through g_i = dO_i / den_i and γ_i = −dO_i·out_i / den_i (both 0 where den_i = 0: the
// row is the constant 0 there):
//   dw_ij = g_i·v_j + γ_i,   dv_j = Σᵢ w_ij g_i,   da_i = Σⱼ dw_ij b_j,   db_j = Σᵢ dw_ij a_i,
// so that, with the prefix state (S_i, z_i) = Σ_{j<=i} (b_j v_jᵀ, b_j) of the forward and the
// suffix state (R_j, r_j) = Σ_{i>=j} (a_i g_iᵀ, γ_i a_i):
//   da_i = S_i g_i + γ_i z_i,   db_j = R_j v_j + r_j,   dv_j = R_jᵀ b_j.
// Causal: pass 1 scans forward in chunks (as the forward does: a small masked quadratic form per
// chunk, then the chunk joins the prefix state), recomputes den_i and out_i on the way, writes
// dq and records den_i and γ_i (2N numbers); pass 2 scans backward in chunks with the suffix
// state and adds dk and dv. Non-causal: the key state, then every query (dq, and the global
// query sums R, r), then every key. Favor (a StabilizedFeatureMap) also carries its stabilisers:
// w_ij = ratio·(exp(m_j − c_i)·a_i·E_j + ε·Σa_i) with E_j its key exponentials, m_j their row
// maximum and c_i the largest m_j row i sees (one number when non-causal); the suffix state is
// kept relative to the smallest c_i it holds, and ∂L/∂c_i goes to the key whose m_j it is.
// IWYU pragma: private, include "posenc/linear_attention.hpp"
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "posenc/encoding.hpp"
#include "posenc/kernel/backward.hpp"
#include "posenc/kernel/linear_attention.hpp"
#include "posenc/tensor.hpp"

namespace posenc::kernel {

/// The scratch of one key/value-head task of the backward.
template <class Scalar>
struct LinearBackwardWorkspace {
  LinearWorkspace<Scalar> chunk;            // the forward's chunk scratch (rows, features, weights)
  LinearAttentionHeadState<Scalar> state;   // the prefix state (causal) or key state (non-causal)
  Matrix<Scalar> upstream;                  // g, rows × Dv
  Matrix<Scalar> dweights, lambda, scaled;  // rows × rows; scaled: also rows × F
  Matrix<Scalar> dfeatures, dtransformed, dvalues, back;
  Vector<Scalar> gamma, drow_max;
  // Pass 1's records for pass 2 (length N): den_i, γ_i, Favor's c_i, and ∂L/∂m_j from the
  // stabilisers c_i that key j sets.
  Vector<Scalar> row_denominator, row_gamma, row_stabilizer, key_max_gradient;
  // The query sums: suffix sums (causal pass 2) or sums over all queries (non-causal).
  Matrix<Scalar> query_values;     // R = Σ a_i g_iᵀ  [F, Dv]
  Vector<Scalar> query_gamma;      // r = Σ γ_i a_i   [F]
  Vector<Scalar> value_gradients;  // Σ (Σ_f a_i) g_i [Dv] (Favor's ε term)
  Scalar query_offset = 0;         // Favor: R and r hold exp(query_offset − c_i)·a_i
  bool query_empty = true;
};

/// out += L·X for L lower triangular (zero above the diagonal): row i reads the rows j <= i of X
/// only, so a non-finite row j of X never reaches a row i < j (0 · NaN would).
template <class Lower, class X, class Out>
void add_lower_product(const Lower& lower, const X& x, Out& out) {
  if (x.allFinite()) {
    out.noalias() += lower * x;
  } else {
    for (Index i = 0; i < lower.rows(); ++i) {
      out.row(i).noalias() += lower.row(i).head(i + 1) * x.topRows(i + 1);
    }
  }
}

/// out += Lᵀ·X for L lower triangular: row j reads the rows i >= j of X only.
template <class Lower, class X, class Out>
void add_lower_transpose_product(const Lower& lower, const X& x, Out& out) {
  if (x.allFinite()) {
    out.noalias() += lower.transpose() * x;
  } else {
    const Index n = lower.rows();
    for (Index j = 0; j < n; ++j) {
      out.row(j).noalias() += lower.col(j).tail(n - j).transpose() * x.bottomRows(n - j);
    }
  }
}

/// g = dO / den and γ = −(g·num) / den row by row; both zero where den is 0.
template <class Scalar, class DOut>
void upstream_gradients(const Matrix<Scalar>& numerator, const Vector<Scalar>& denominator,
                        const DOut& dout, Matrix<Scalar>& g, Vector<Scalar>& gamma) {
  g.resize(dout.rows(), dout.cols());
  gamma.resize(dout.rows());
  for (Index i = 0; i < dout.rows(); ++i) {
    const Scalar den = denominator[i];
    if (den != Scalar(0)) {
      g.row(i) = dout.row(i) / den;
      gamma[i] = -g.row(i).dot(numerator.row(i)) / den;
    } else {
      g.row(i).setZero();
      gamma[i] = Scalar(0);
    }
  }
}

/// g = dO / den from recorded denominators (zero where den is 0).
template <class Scalar, class DOut, class Den>
void upstream_from_records(const DOut& dout, const Den& denominator, Matrix<Scalar>& g) {
  g.resize(dout.rows(), dout.cols());
  for (Index i = 0; i < dout.rows(); ++i) {
    if (denominator[i] != Scalar(0)) {
      g.row(i) = dout.row(i) / denominator[i];
    } else {
      g.row(i).setZero();
    }
  }
}

/// dx from ∂L/∂(query features) of rows x (the map's query backward hook).
template <class Scalar, class Map>
void query_features_backward(const Map& map, const Matrix<Scalar>& x,
                             const Matrix<Scalar>& dfeatures, Matrix<Scalar>& dx) {
  dx.resize(x.rows(), x.cols());
  if constexpr (StabilizedFeatureMap<Map, Scalar>) {
    map.query_features_backward(x, dfeatures, dx);
  } else {
    map.features_backward(x, dfeatures, dx);
  }
}

/// dx from ∂L/∂(key features) of rows x (Favor: ∂L/∂ of its key exponentials and row maxima).
template <class Scalar, class Map>
void key_features_backward(const Map& map, const Matrix<Scalar>& x, const Matrix<Scalar>& dfeatures,
                           const Vector<Scalar>& drow_max, Matrix<Scalar>& dx) {
  dx.resize(x.rows(), x.cols());
  if constexpr (StabilizedFeatureMap<Map, Scalar>) {
    map.key_exponentials_backward(x, dfeatures, drow_max, dx);
  } else {
    (void)drow_max;
    map.features_backward(x, dfeatures, dx);
  }
}

/// Adds T_qᵀ(dtransformed) (queries) or T_kᵀ(dtransformed) (keys) of rows `in` to `out`, and the
/// transform's parameter share to `gradient`; without a transform, adds dtransformed.
template <class Scalar, class Encoder, class In, class Out, class Gradient>
void add_transform_backward(const Encoder& encoder, bool queries, Index head, Positions positions,
                            Index centre, const In& in, const Matrix<Scalar>& dtransformed,
                            Matrix<Scalar>& back, Out&& out, Gradient& gradient) {
  if constexpr (QueryKeyTransform<Encoder>) {
    back.resize(in.rows(), in.cols());
    if (queries) {
      transform_queries_backward(encoder, head, positions, centre, in, dtransformed, back,
                                 gradient);
    } else {
      transform_keys_backward(encoder, head, positions, centre, in, dtransformed, back, gradient);
    }
    out += back;
  } else {
    (void)encoder, (void)queries, (void)head, (void)positions, (void)centre, (void)in;
    (void)back, (void)gradient;
    out += dtransformed;
  }
}

/// ws.lambda(i, j) = exp(m_j − c_i) for j <= i, 0 above the diagonal (never evaluated there: a
/// later key may have a larger maximum than c_i).
template <class Scalar, class Stabilizers>
void fill_lambda(const Vector<Scalar>& key_max, const Stabilizers& c, Matrix<Scalar>& lambda) {
  const Index rows = key_max.size();
  lambda.setZero(rows, rows);
  for (Index i = 0; i < rows; ++i) {
    lambda.row(i).head(i + 1) = (key_max.head(i + 1).array() - c[i]).exp().transpose();
  }
}

/// The shared end of both passes over a chunk of keys: ∂L/∂(key features) in ws.dfeatures (and
/// Favor's ws.drow_max) to dk rows [first, first + rows) of key/value head g.
template <class Scalar, class Map, class Encoder, class Gradient>
void finish_keys(const Map& map, const Encoder& encoder, Index g, Index first, Index rows,
                 Index centre, const HeadsView<const Scalar>& k,
                 LinearBackwardWorkspace<Scalar>& ws, const BackwardOutputs<Scalar>& grads,
                 Gradient& gradient) {
  key_features_backward(map, ws.chunk.keys, ws.dfeatures, ws.drow_max, ws.dtransformed);
  add_transform_backward(encoder, false, g, ws.chunk.positions, centre,
                         k.head(g).middleRows(first, rows), ws.dtransformed, ws.back,
                         grads.dk.head(g).middleRows(first, rows), gradient);
  grads.dv.head(g).middleRows(first, rows) += ws.dvalues;
}

/// Loads the transformed rows and features of one chunk: queries of head h (when `queries`) and
/// keys of key/value head g (when `keys`), rows [first, first + rows).
template <class Scalar, class Map, class Encoder>
void load_chunk(const Map& map, const Encoder& encoder, const LinearShape& shape, Index h, Index g,
                const HeadsView<const Scalar>& q, const HeadsView<const Scalar>& k, Index first,
                Index rows, Index first_position, bool queries, bool keys,
                LinearWorkspace<Scalar>& c) {
  fill_linear_positions(first_position, first, rows, c.positions);
  if (queries) {
    load_linear_rows(encoder, true, h, c.positions, first_position,
                     q.head(h).middleRows(first, rows), shape.width, c.queries);
    query_features(map, c.queries, c.query_features);
  }
  if (keys) {
    load_linear_rows(encoder, false, g, c.positions, first_position,
                     k.head(g).middleRows(first, rows), shape.width, c.keys);
    key_features(map, c.keys, c.key_features, c.key_max);
  }
}

/// Pass 1 of the causal backward of query head h over chunk [first, first + rows): the forward's
/// sums, g and γ (recorded), ∂L/∂a, dq; then the chunk's keys join the prefix state. `argmax`
/// and `running` follow the largest key maximum so far (Favor's c and the key that sets it).
template <class Scalar, class Map, class Encoder, class Gradient>
void causal_forward_chunk(const Map& map, const Encoder& encoder, const LinearShape& shape, Index h,
                          Index g, const HeadsView<const Scalar>& q,
                          const HeadsView<const Scalar>& k, const HeadsView<const Scalar>& v,
                          const HeadsView<const Scalar>& dout, Index first, Index rows,
                          Index first_position, LinearBackwardWorkspace<Scalar>& ws,
                          const BackwardOutputs<Scalar>& grads, Gradient& gradient, Index& argmax,
                          Scalar& running) {
  auto& c = ws.chunk;
  auto& s = ws.state;
  load_chunk(map, encoder, shape, h, g, q, k, first, rows, first_position, true, true, c);
  const auto values = v.head(g).middleRows(first, rows);
  causal_chunk_sums(map, values, c, s);
  upstream_gradients(c.numerator, c.denominator, dout.head(h).middleRows(first, rows), ws.upstream,
                     ws.gamma);
  ws.row_denominator.segment(first, rows) = c.denominator;
  ws.row_gamma.segment(first, rows) = ws.gamma;
  ws.dweights.noalias() = ws.upstream * values.transpose();
  ws.dweights.colwise() += ws.gamma;
  ws.dweights.template triangularView<Eigen::StrictlyUpper>().setZero();
  auto& da = ws.dfeatures;
  // The state's share: Σ_{j<first} dw_ij (exp-part of) b_j = S g_i + γ_i z.
  da.noalias() = ws.upstream * s.key_values.transpose();
  da.noalias() += ws.gamma * s.key_sum.transpose();
  if constexpr (StabilizedFeatureMap<Map, Scalar>) {
    const Scalar ratio = map.ratio();
    const auto eps = static_cast<Scalar>(map.stabilizer());
    ws.row_stabilizer.segment(first, rows) = c.prefix_max;
    for (Index i = 0; i < rows; ++i) {
      da.row(i) *= s.count == 0 ? Scalar(0) : std::exp(s.offset - c.prefix_max[i]);
    }
    fill_lambda(c.key_max, c.prefix_max, ws.lambda);
    ws.scaled = ws.dweights.cwiseProduct(ws.lambda);
    add_lower_product(ws.scaled, c.key_features, da);  // P_i = Σⱼ dw_ij exp(m_j − c_i) E_j
    for (Index i = 0; i < rows; ++i) {
      const Scalar sum_dw = ws.upstream.row(i).dot(s.value_sum) +
                            ws.gamma[i] * static_cast<Scalar>(s.count) + ws.dweights.row(i).sum();
      const Scalar dc = -ratio * c.query_features.row(i).dot(da.row(i));
      da.row(i) = ratio * (da.row(i).array() + eps * sum_dw);
      // c_i is the largest key maximum among keys <= i (as causal_chunk_sums takes it).
      if (c.key_max[i] > running) {
        running = c.key_max[i];
        argmax = first + i;
      }
      if (argmax >= 0) ws.key_max_gradient[argmax] += dc;
    }
  } else {
    (void)argmax, (void)running;
    add_lower_product(ws.dweights, c.key_features, da);
  }
  query_features_backward(map, c.queries, da, ws.dtransformed);
  auto dq = grads.dq.head(h).middleRows(first, rows);
  dq.setZero();
  add_transform_backward(encoder, true, h, c.positions, first_position,
                         q.head(h).middleRows(first, rows), ws.dtransformed, ws.back, dq, gradient);
  absorb_keys(map, values, c, s);
}

/// Pass 2 of the causal backward of query head h over chunk [first, first + rows): dv and ∂L/∂b
/// of the chunk's keys from the chunk's own rows and the suffix state, added to dk and dv; then
/// the chunk's queries join the suffix state.
template <class Scalar, class Map, class Encoder, class Gradient>
void causal_backward_chunk(const Map& map, const Encoder& encoder, const LinearShape& shape,
                           Index h, Index g, const HeadsView<const Scalar>& q,
                           const HeadsView<const Scalar>& k, const HeadsView<const Scalar>& v,
                           const HeadsView<const Scalar>& dout, Index first, Index rows,
                           Index first_position, LinearBackwardWorkspace<Scalar>& ws,
                           const BackwardOutputs<Scalar>& grads, Gradient& gradient) {
  auto& c = ws.chunk;
  load_chunk(map, encoder, shape, h, g, q, k, first, rows, first_position, true, true, c);
  const auto values = v.head(g).middleRows(first, rows);
  upstream_from_records(dout.head(h).middleRows(first, rows),
                        ws.row_denominator.segment(first, rows), ws.upstream);
  const auto gamma = ws.row_gamma.segment(first, rows);
  ws.dweights.noalias() = ws.upstream * values.transpose();
  ws.dweights.colwise() += gamma;
  ws.dweights.template triangularView<Eigen::StrictlyUpper>().setZero();
  const auto& a = c.query_features;
  auto& weights = c.weights;
  weights.noalias() = a * c.key_features.transpose();
  auto& db = ws.dfeatures;
  auto& dv = ws.dvalues;
  dv.setZero(rows, shape.value_dim);
  db.setZero(rows, a.cols());
  if constexpr (StabilizedFeatureMap<Map, Scalar>) {
    const Scalar ratio = map.ratio();
    const auto eps = static_cast<Scalar>(map.stabilizer());
    const auto stabilizers = ws.row_stabilizer.segment(first, rows);
    fill_lambda(c.key_max, stabilizers, ws.lambda);
    c.feature_sum = a.rowwise().sum();
    weights = ratio * (ws.lambda.cwiseProduct(weights) + eps * c.feature_sum.replicate(1, rows));
    weights.template triangularView<Eigen::StrictlyUpper>().setZero();
    add_lower_transpose_product(weights, ws.upstream, dv);
    ws.scaled = ratio * ws.dweights.cwiseProduct(ws.lambda);
    add_lower_transpose_product(ws.scaled, a, db);  // ratio·Σᵢ dw_ij exp(m_j − c_i) a_i
    if (!ws.query_empty) {
      // The suffix state holds exp(o − c_i)·a_i for the rows i after the chunk, o <= c_i; key j
      // needs exp(m_j − c_i)·a_i = exp(m_j − o)·(that), and m_j <= c_j <= o.
      ws.scaled.noalias() = c.key_features * ws.query_values;    // Rᵀ E_j
      ws.back.noalias() = values * ws.query_values.transpose();  // R v_j + r
      ws.back.rowwise() += ws.query_gamma.transpose();
      for (Index j = 0; j < rows; ++j) {
        const Scalar beta = ratio * std::exp(c.key_max[j] - ws.query_offset);
        dv.row(j) += beta * ws.scaled.row(j) + (ratio * eps) * ws.value_gradients.transpose();
        db.row(j) += beta * ws.back.row(j);
      }
    }
    ws.drow_max = db.cwiseProduct(c.key_features).rowwise().sum();
    ws.drow_max += ws.key_max_gradient.segment(first, rows);
    // The chunk's queries join the suffix state, now relative to the smallest c_i it holds.
    const Scalar offset = stabilizers.minCoeff();
    if (!ws.query_empty) {
      const Scalar shrink = std::exp(offset - ws.query_offset);
      ws.query_values *= shrink;
      ws.query_gamma *= shrink;
    }
    ws.scaled = a;
    for (Index i = 0; i < rows; ++i) ws.scaled.row(i) *= std::exp(offset - stabilizers[i]);
    ws.query_values.noalias() += ws.scaled.transpose() * ws.upstream;
    ws.query_gamma.noalias() += ws.scaled.transpose() * gamma;
    ws.value_gradients.noalias() += ws.upstream.transpose() * c.feature_sum;
    ws.query_offset = offset;
  } else {
    weights.template triangularView<Eigen::StrictlyUpper>().setZero();
    add_lower_transpose_product(weights, ws.upstream, dv);
    dv.noalias() += c.key_features * ws.query_values;
    add_lower_transpose_product(ws.dweights, a, db);
    db.noalias() += values * ws.query_values.transpose();
    db.rowwise() += ws.query_gamma.transpose();
    ws.query_values.noalias() += a.transpose() * ws.upstream;
    ws.query_gamma.noalias() += a.transpose() * gamma;
  }
  ws.query_empty = false;
  finish_keys(map, encoder, g, first, rows, first_position, k, ws, grads, gradient);
}

/// The causal backward of query head h: pass 1 forward in time (dq, records), pass 2 backward in
/// time (adds dk, dv of its key/value head).
template <class Scalar, class Map, class Encoder, class Gradient>
void causal_head_backward(const Map& map, const Encoder& encoder, const LinearShape& shape, Index h,
                          const HeadsView<const Scalar>& q, const HeadsView<const Scalar>& k,
                          const HeadsView<const Scalar>& v, const HeadsView<const Scalar>& dout,
                          Index first_position, Index chunk, LinearBackwardWorkspace<Scalar>& ws,
                          const BackwardOutputs<Scalar>& grads, Gradient& gradient) {
  const Index g = h / (shape.heads / shape.kv_heads);
  const Index N = shape.rows;
  reset_state(map, shape.width, shape.value_dim, ws.state);
  ws.row_denominator.resize(N);
  ws.row_gamma.resize(N);
  if constexpr (StabilizedFeatureMap<Map, Scalar>) {
    ws.row_stabilizer.resize(N);
    ws.key_max_gradient.setZero(N);
  }
  Index argmax = -1;
  Scalar running = -std::numeric_limits<Scalar>::infinity();
  for (Index first = 0; first < N; first += chunk) {
    causal_forward_chunk(map, encoder, shape, h, g, q, k, v, dout, first,
                         std::min(chunk, N - first), first_position, ws, grads, gradient, argmax,
                         running);
  }
  ws.query_values.setZero(shape.features, shape.value_dim);
  ws.query_gamma.setZero(shape.features);
  ws.value_gradients.setZero(shape.value_dim);
  ws.query_offset = Scalar(0);
  ws.query_empty = true;
  if (N == 0) return;
  for (Index first = ((N - 1) / chunk) * chunk; first >= 0; first -= chunk) {
    causal_backward_chunk(map, encoder, shape, h, g, q, k, v, dout, first,
                          std::min(chunk, N - first), first_position, ws, grads, gradient);
  }
}

/// The non-causal backward of key/value head g and the query heads of its group: the key state;
/// every query (dq, and the sums R, r over all queries of the group); every key (dk, dv).
template <class Scalar, class Map, class Encoder, class Gradient>
void noncausal_group_backward(const Map& map, const Encoder& encoder, const LinearShape& shape,
                              Index g, const HeadsView<const Scalar>& q,
                              const HeadsView<const Scalar>& k, const HeadsView<const Scalar>& v,
                              const HeadsView<const Scalar>& dout, Index first_position,
                              Index chunk, LinearBackwardWorkspace<Scalar>& ws,
                              const BackwardOutputs<Scalar>& grads, Gradient& gradient) {
  constexpr bool stabilized = StabilizedFeatureMap<Map, Scalar>;
  auto& c = ws.chunk;
  auto& s = ws.state;
  const Index group = shape.heads / shape.kv_heads;
  reset_state(map, shape.width, shape.value_dim, s);
  Index argmax = -1;  // Favor: the key whose maximum is the shared stabiliser c
  Scalar running = -std::numeric_limits<Scalar>::infinity();
  for (Index first = 0; first < shape.keys; first += chunk) {
    const Index rows = std::min(chunk, shape.keys - first);
    load_chunk(map, encoder, shape, 0, g, q, k, first, rows, first_position, false, true, c);
    if constexpr (stabilized) {
      for (Index j = 0; j < rows; ++j) {
        if (c.key_max[j] > running) {
          running = c.key_max[j];
          argmax = first + j;
        }
      }
    }
    absorb_keys(map, v.head(g).middleRows(first, rows), c, s);
  }
  ws.query_values.setZero(shape.features, shape.value_dim);
  ws.query_gamma.setZero(shape.features);
  ws.value_gradients.setZero(shape.value_dim);
  Scalar dc = 0;  // Favor: ∂L/∂c
  for (Index h = g * group; h < (g + 1) * group; ++h) {
    for (Index first = 0; first < shape.rows; first += chunk) {
      const Index rows = std::min(chunk, shape.rows - first);
      load_chunk(map, encoder, shape, h, g, q, k, first, rows, first_position, true, false, c);
      read_state(map, s, c);
      upstream_gradients(c.numerator, c.denominator, dout.head(h).middleRows(first, rows),
                         ws.upstream, ws.gamma);
      const auto& a = c.query_features;
      auto& da = ws.dfeatures;
      da.noalias() = ws.upstream * s.key_values.transpose();
      da.noalias() += ws.gamma * s.key_sum.transpose();
      if constexpr (stabilized) {
        const Scalar ratio = map.ratio();
        const auto eps = static_cast<Scalar>(map.stabilizer());
        for (Index i = 0; i < rows; ++i) {
          const Scalar sum_dw =
              ws.upstream.row(i).dot(s.value_sum) + ws.gamma[i] * static_cast<Scalar>(s.count);
          dc -= ratio * a.row(i).dot(da.row(i));
          da.row(i) = ratio * (da.row(i).array() + eps * sum_dw);
        }
        ws.value_gradients.noalias() += ws.upstream.transpose() * c.feature_sum;
      }
      ws.query_values.noalias() += a.transpose() * ws.upstream;
      ws.query_gamma.noalias() += a.transpose() * ws.gamma;
      query_features_backward(map, c.queries, da, ws.dtransformed);
      auto dq = grads.dq.head(h).middleRows(first, rows);
      dq.setZero();
      add_transform_backward(encoder, true, h, c.positions, first_position,
                             q.head(h).middleRows(first, rows), ws.dtransformed, ws.back, dq,
                             gradient);
    }
  }
  for (Index first = 0; first < shape.keys; first += chunk) {
    const Index rows = std::min(chunk, shape.keys - first);
    load_chunk(map, encoder, shape, 0, g, q, k, first, rows, first_position, false, true, c);
    const auto values = v.head(g).middleRows(first, rows);
    auto& db = ws.dfeatures;
    auto& dv = ws.dvalues;
    dv.noalias() = c.key_features * ws.query_values;
    db.noalias() = values * ws.query_values.transpose();
    db.rowwise() += ws.query_gamma.transpose();
    if constexpr (stabilized) {
      const Scalar ratio = map.ratio();
      const auto eps = static_cast<Scalar>(map.stabilizer());
      for (Index j = 0; j < rows; ++j) {
        const Scalar beta = ratio * std::exp(c.key_max[j] - s.offset);
        dv.row(j) = beta * dv.row(j) + (ratio * eps) * ws.value_gradients.transpose();
        db.row(j) *= beta;
      }
      ws.drow_max = db.cwiseProduct(c.key_features).rowwise().sum();
      if (argmax >= first && argmax < first + rows) ws.drow_max[argmax - first] += dc;
    }
    finish_keys(map, encoder, g, first, rows, first_position, k, ws, grads, gradient);
  }
}

/// The streaming backward: one task per key/value head (it owns dk, dv of that head and dq of
/// the query heads of its group), so the result does not depend on the thread count; the
/// encoder's parameter gradient has one accumulator per task, summed in head order.
template <class Scalar, class Map, class Encoder>
void linear_backward(const Map& map, const Encoder& encoder, const LinearShape& shape,
                     const HeadsView<const Scalar>& q, const HeadsView<const Scalar>& k,
                     const HeadsView<const Scalar>& v, const HeadsView<const Scalar>& dout,
                     const LinearAttentionOptions& options, const BackwardOutputs<Scalar>& grads,
                     encoder_gradient_t<Encoder>& gradient) {
  using Gradient = encoder_gradient_t<Encoder>;
  for (Index h = 0; h < shape.heads; ++h) grads.dq.head(h).setZero();
  for (Index g = 0; g < shape.kv_heads; ++g) {
    grads.dk.head(g).setZero();
    grads.dv.head(g).setZero();
  }
  std::vector<Gradient> task_gradients;
  task_gradients.reserve(static_cast<std::size_t>(shape.kv_heads));
  for (Index g = 0; g < shape.kv_heads; ++g) {
    if constexpr (HasLearnableParameters<Encoder>) {
      task_gradients.push_back(encoder.zero_gradient());
    } else {
      task_gradients.push_back(Gradient{});
    }
  }
  const Index group = shape.heads / shape.kv_heads;
  detail::parallel_tasks(
      shape.kv_heads, detail::thread_count(options.threads, shape.kv_heads),
      [] { return LinearBackwardWorkspace<Scalar>{}; },
      [&](Index g, LinearBackwardWorkspace<Scalar>& ws) {
        Gradient& task_gradient = task_gradients[static_cast<std::size_t>(g)];
        if (options.causal) {
          for (Index h = g * group; h < (g + 1) * group; ++h) {
            causal_head_backward(map, encoder, shape, h, q, k, v, dout, options.first_position,
                                 options.chunk, ws, grads, task_gradient);
          }
        } else {
          noncausal_group_backward(map, encoder, shape, g, q, k, v, dout, options.first_position,
                                   options.chunk, ws, grads, task_gradient);
        }
      });
  for (Gradient& task_gradient : task_gradients) gradient += task_gradient;
}

/// The materialising backward, written plainly for tests: every weight w_ij of every allowed
/// pair, the chain rule term by term (a masked pair is never read).
template <class Scalar, class Map, class Encoder>
void linear_reference_backward(const Map& map, const Encoder& encoder, const LinearShape& shape,
                               const HeadsView<const Scalar>& q, const HeadsView<const Scalar>& k,
                               const HeadsView<const Scalar>& v,
                               const HeadsView<const Scalar>& dout, bool causal,
                               Index first_position, const BackwardOutputs<Scalar>& grads,
                               encoder_gradient_t<Encoder>& gradient) {
  constexpr bool stabilized = StabilizedFeatureMap<Map, Scalar>;
  for (Index h = 0; h < shape.heads; ++h) grads.dq.head(h).setZero();
  for (Index g = 0; g < shape.kv_heads; ++g) {
    grads.dk.head(g).setZero();
    grads.dv.head(g).setZero();
  }
  const Index N = shape.rows;
  const Index M = shape.keys;
  std::vector<Index> qpos;
  std::vector<Index> kpos;
  fill_linear_positions(first_position, 0, N, qpos);
  fill_linear_positions(first_position, 0, M, kpos);
  Scalar ratio = 1;
  Scalar eps = 0;
  if constexpr (stabilized) {
    ratio = map.ratio();
    eps = static_cast<Scalar>(map.stabilizer());
  }
  Matrix<Scalar> qt, kt, a, e, da, de, dqt, dkt, back;
  Vector<Scalar> m, dm, c;
  for (Index h = 0; h < shape.heads; ++h) {
    const Index g = h / (shape.heads / shape.kv_heads);
    load_linear_rows(encoder, true, h, qpos, first_position, q.head(h), shape.width, qt);
    load_linear_rows(encoder, false, g, kpos, first_position, k.head(g), shape.width, kt);
    query_features(map, qt, a);
    key_features(map, kt, e, m);
    // Favor: c_i, the largest key maximum among the keys row i sees, and the key it comes from.
    c.setZero(N);
    std::vector<Index> source(static_cast<std::size_t>(N), -1);
    if constexpr (stabilized) {
      Scalar running = -std::numeric_limits<Scalar>::infinity();
      Index arg = -1;
      Index next = 0;
      for (Index i = 0; i < N; ++i) {
        for (const Index last = causal ? i : M - 1; next <= last; ++next) {
          if (m[next] > running) {
            running = m[next];
            arg = next;
          }
        }
        c[i] = running;
        source[static_cast<std::size_t>(i)] = arg;
      }
    }
    const auto weight = [&](Index i, Index j) -> Scalar {
      if constexpr (stabilized) {
        return ratio * (std::exp(m[j] - c[i]) * a.row(i).dot(e.row(j)) + eps * a.row(i).sum());
      } else {
        return a.row(i).dot(e.row(j));
      }
    };
    da.setZero(N, a.cols());
    de.setZero(M, e.cols());
    dm.setZero(M);
    const auto values = v.head(g);
    for (Index i = 0; i < N; ++i) {
      const Index last = causal ? i : M - 1;
      Scalar den = 0;
      Vector<Scalar> num = Vector<Scalar>::Zero(shape.value_dim);
      for (Index j = 0; j <= last; ++j) {
        den += weight(i, j);
        num += weight(i, j) * values.row(j).transpose();
      }
      if (den == Scalar(0)) continue;  // the row is the constant 0
      const Vector<Scalar> g_i = dout.head(h).row(i).transpose() / den;
      const Scalar gamma = -g_i.dot(num) / den;
      for (Index j = 0; j <= last; ++j) {
        grads.dv.head(g).row(j) += weight(i, j) * g_i.transpose();
        const Scalar dw = g_i.dot(values.row(j).transpose()) + gamma;
        if constexpr (stabilized) {
          const Scalar lambda = std::exp(m[j] - c[i]);
          da.row(i) += ratio * dw * (lambda * e.row(j).array() + eps).matrix();
          de.row(j) += ratio * dw * lambda * a.row(i);
          const Scalar dlambda = ratio * dw * lambda * a.row(i).dot(e.row(j));
          dm[j] += dlambda;  // λ = exp(m_j − c_i)
          const Index from = source[static_cast<std::size_t>(i)];
          if (from >= 0) dm[from] -= dlambda;
        } else {
          da.row(i) += dw * e.row(j);
          de.row(j) += dw * a.row(i);
        }
      }
    }
    query_features_backward(map, qt, da, dqt);
    key_features_backward(map, kt, de, dm, dkt);
    add_transform_backward(encoder, true, h, qpos, first_position, q.head(h), dqt, back,
                           grads.dq.head(h), gradient);
    add_transform_backward(encoder, false, g, kpos, first_position, k.head(g), dkt, back,
                           grads.dk.head(g), gradient);
  }
}

}  // namespace posenc::kernel
