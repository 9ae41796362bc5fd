// SPDX-License-Identifier: MIT
// The materialising oracle's backward: every N × M probability matrix formed by the forward
// oracle, then the chain rule written out plainly (with a ScoreMixer: all heads' N × M logits and
// one mix_backward over them). Slow on purpose: the streaming backward is tested against it (and
// it against PyTorch autograd and finite differences).
// IWYU pragma: private, include "posenc/attention_backward.hpp"
#pragma once

#include <cstddef>
#include <optional>
#include <vector>

#include "posenc/encoding.hpp"
#include "posenc/kernel/backward.hpp"
#include "posenc/kernel/problem.hpp"
#include "posenc/kernel/reference.hpp"
#include "posenc/tensor.hpp"

namespace posenc::kernel {

/// What both oracle backwards start from: the oracle's probabilities P_h [N, M] and every
/// query and key position.
template <class Scalar>
struct ReferencePass {
  std::vector<Matrix<Scalar>> weights;
  std::vector<Index> qpos, kpos;
};

/// Zeroes dq, dk, dv; the pass, or nothing when there are no queries or no keys.
template <class Scalar, class Encoder>
std::optional<ReferencePass<Scalar>> start_reference_backward(
    const AttentionProblem<Scalar>& p, const Encoder& encoder,
    const BackwardOutputs<Scalar>& grads) {
  for (Index h = 0; h < p.heads; ++h) grads.dq.head(h).setZero();
  for (Index g = 0; g < p.k.heads(); ++g) {
    grads.dk.head(g).setZero();
    grads.dv.head(g).setZero();
  }
  if (p.queries == 0 || p.keys == 0) return std::nullopt;
  ReferencePass<Scalar> pass{reference_weights(p, encoder),
                             std::vector<Index>(static_cast<std::size_t>(p.queries)),
                             std::vector<Index>(static_cast<std::size_t>(p.keys))};
  fill_positions(p, true, 0, p.queries, pass.qpos);
  fill_positions(p, false, 0, p.keys, pass.kpos);
  return pass;
}

/// reference_backward for an encoder with a ScoreMixer: the logits A_h = (scale·q_h)·k_gᵀ of
/// every head over all N × M pairs, dS_h = P_h ∘ (dP_h − D) per head as below, then one
/// mix_backward over the whole matrix (all heads) for dA and the parameter gradient:
///   dq_h = scale·dA_h·k_g,  dk_g += dA_hᵀ·(scale·q_h),  dV_g += P_hᵀ·dO_h.
template <class Scalar, class Encoder>
void reference_backward_mixed(const AttentionProblem<Scalar>& p, const Encoder& encoder,
                              HeadsView<const Scalar> dout, const BackwardOutputs<Scalar>& grads,
                              encoder_gradient_t<Encoder>& gradient) {
  const Index N = p.queries;
  const Index M = p.keys;
  const Index H = p.heads;
  const auto pass = start_reference_backward(p, encoder, grads);
  if (!pass) return;
  const auto& [weights, qpos, kpos] = *pass;
  using Map = Eigen::Map<Matrix<Scalar>>;
  Matrix<Scalar> logits(H, N * M);
  Matrix<Scalar> dscores(H, N * M);
  for (Index h = 0; h < H; ++h) {
    const Index g = p.kv_head(h);
    const Matrix<Scalar> queries = p.scale * p.q.head(h);
    Map(logits.row(h).data(), N, M) = queries * p.k.head(g).transpose();
    const Matrix<Scalar>& P = weights[static_cast<std::size_t>(h)];
    const Matrix<Scalar> dO = dout.head(h);
    grads.dv.head(g) += P.transpose() * dO;
    const Matrix<Scalar> dP = dO * p.v.head(g).transpose();
    Map dS(dscores.row(h).data(), N, M);
    dS.setZero();
    for (Index r = 0; r < N; ++r) {
      Scalar delta = 0;
      for (Index c = 0; c < M; ++c) {
        if (allows(p, r, c)) delta += P(r, c) * dP(r, c);
      }
      for (Index c = 0; c < M; ++c) {
        if (allows(p, r, c) && P(r, c) != 0) dS(r, c) = P(r, c) * (dP(r, c) - delta);
      }
    }
  }
  Matrix<Scalar> dlogits(H, N * M);
  encoder.mix_backward(Positions(qpos), Positions(kpos), 0, M, logits, dscores, dlogits, gradient);
  for (Index h = 0; h < H; ++h) {
    const Index g = p.kv_head(h);
    const Map dA(dlogits.row(h).data(), N, M);
    grads.dq.head(h) = p.scale * (dA * p.k.head(g));
    grads.dk.head(g) += dA.transpose() * (p.scale * p.q.head(h));
  }
}

/// Gradients of L = Σ dout ∘ attention(q, k, v) with respect to q, k, v and the encoder's
/// parameters, for head h (key/value head g) with Q̃ = scale·T_q(q), K̃ = T_k(k) at centre
/// qpos[0] (as reference_scores), P the oracle's probabilities:
///   dV_g += Pᵀ·dO,  dP = dO·V_gᵀ,  D_r = Σ_c P_rc·dP_rc,  dS = P ∘ (dP − D) on allowed keys,
///   dθ += ∂B/∂θ : dS,  dq_h = T_qᵀ(scale·dS·K̃),  dk_g += T_kᵀ(dSᵀ·Q̃),
/// with a RelativeKeyValue stage's terms added to dP and dQ̃ and its tables' gradients.
template <class Scalar, class Encoder>
void reference_backward(const AttentionProblem<Scalar>& p, const Encoder& encoder,
                        HeadsView<const Scalar> dout, const BackwardOutputs<Scalar>& grads,
                        encoder_gradient_t<Encoder>& gradient) {
  [[maybe_unused]] RequireDifferentiable<Encoder> differentiable;
  if constexpr (ScoreMixer<Encoder>) {
    reference_backward_mixed(p, encoder, dout, grads, gradient);
    return;
  }
  const Index N = p.queries;
  const Index M = p.keys;
  const auto pass = start_reference_backward(p, encoder, grads);
  if (!pass) return;
  const auto& [weights, qpos, kpos] = *pass;
  const Index centre = qpos[0];
  for (Index h = 0; h < p.heads; ++h) {
    const Index g = p.kv_head(h);
    const Matrix<Scalar>& P = weights[static_cast<std::size_t>(h)];
    const Matrix<Scalar> dO = dout.head(h);
    const Matrix<Scalar> V = p.v.head(g);
    Matrix<Scalar> queries(N, p.logit_dim);
    Matrix<Scalar> keys(M, p.logit_dim);
    if constexpr (QueryKeyTransform<Encoder>) {
      encoder.transform_queries(h, qpos, centre, p.q.head(h), queries);
      encoder.transform_keys(g, kpos, centre, p.k.head(g), keys);
    } else {
      queries = p.q.head(h);
      keys = p.k.head(g);
    }
    queries *= p.scale;

    // dV: only allowed keys carry weight; a forbidden key's row gets nothing.
    grads.dv.head(g) += P.transpose() * dO;
    // dP = ∂L/∂P: dO·Vᵀ, plus the relative values' term.
    Matrix<Scalar> dP = dO * V.transpose();
    if constexpr (RelativeKeyValue<Encoder>) {
      encoder.add_relative_value_scores(h, qpos, kpos, dO, dP);
    }
    Matrix<Scalar> dS = Matrix<Scalar>::Zero(N, M);
    for (Index r = 0; r < N; ++r) {
      Scalar delta = 0;
      for (Index c = 0; c < M; ++c) {
        if (allows(p, r, c)) delta += P(r, c) * dP(r, c);
      }
      for (Index c = 0; c < M; ++c) {
        if (allows(p, r, c) && P(r, c) != 0) dS(r, c) = P(r, c) * (dP(r, c) - delta);
      }
    }
    if constexpr (LearnableScoreBias<Encoder>) {
      encoder.accumulate_bias_gradient(h, qpos, kpos, dS, gradient);
    }
    Matrix<Scalar> dqueries = dS * keys;
    if constexpr (RelativeKeyValue<Encoder>) {
      encoder.add_relative_query_gradient(h, qpos, kpos, dS, dqueries);
      encoder.accumulate_relative_gradient(h, qpos, kpos, queries, dS, P, dO, gradient);
    }
    dqueries *= p.scale;
    const Matrix<Scalar> dkeys = dS.transpose() * queries;
    if constexpr (QueryKeyTransform<Encoder>) {
      Matrix<Scalar> dq(N, p.query_dim);
      Matrix<Scalar> dk(M, p.query_dim);
      transform_queries_backward(encoder, h, qpos, centre, p.q.head(h), dqueries, dq, gradient);
      transform_keys_backward(encoder, g, kpos, centre, p.k.head(g), dkeys, dk, gradient);
      grads.dq.head(h) = dq;
      grads.dk.head(g) += dk;
    } else {
      grads.dq.head(h) = dqueries;
      grads.dk.head(g) += dkeys;
    }
  }
}

}  // namespace posenc::kernel
