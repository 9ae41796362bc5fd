// SPDX-License-Identifier: MIT
// The layers of the lab's language model, forward and backward side by side with the shape of
// every argument, as llm.c writes them. B sequences × T tokens are BT rows of row-major
// matrices; C is the width, V the vocabulary, H heads of D = C / H channels. The attention is
// posenc's (attention with lse, attention_backward); everything else is plain Eigen.
#pragma once

#include <algorithm>
#include <cmath>
#include <exception>
#include <numbers>
#include <utility>
#include <vector>

#include <Eigen/Core>
#include <posenc/attention.hpp>
#include <posenc/attention_backward.hpp>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace lab {

using posenc::Index;
template <class Scalar>
using Matrix = posenc::Matrix<Scalar>;
/// A (rows, cols) row-major window on a flat buffer (parameters, activations).
template <class Scalar>
using MatrixMap = Eigen::Map<Matrix<Scalar>>;
template <class Scalar>
using ConstMatrixMap = Eigen::Map<const Matrix<Scalar>>;
template <class Scalar>
using VectorMap = Eigen::Map<posenc::Vector<Scalar>>;
template <class Scalar>
using ConstVectorMap = Eigen::Map<const posenc::Vector<Scalar>>;

/// An activation buffer, aligned as Eigen's own storage: Eigen's vectorised reductions (a row's
/// sum, squaredNorm) start their packets at the first aligned address, so the rounding of a
/// result depends on the buffer's address modulo the packet size. Aligned buffers make every run
/// of a given thread count bit-identical.
template <class Scalar>
using Buffer = std::vector<Scalar, Eigen::aligned_allocator<Scalar>>;

/// Runs body(i) for i in [0, count) on `threads` OpenMP threads (static schedule; each i is
/// independent, so the result does not depend on the thread count). Each thread limits its own
/// OpenMP ICV to one thread, so Eigen products inside never fork a nested team. The first
/// exception thrown is rethrown after the loop.
template <class Body>
void parallel_for(Index count, int threads, Body&& body) {
#ifdef _OPENMP
  if (threads > 1 && count > 1) {
    std::exception_ptr error;
#pragma omp parallel num_threads(threads)
    {
      omp_set_num_threads(1);
#pragma omp for schedule(static)
      for (Index i = 0; i < count; ++i) {
        try {
          body(i);
        } catch (...) {
#pragma omp critical(lab_parallel_error)
          if (!error) error = std::current_exception();
        }
      }
    }
    if (error) std::rethrow_exception(error);
    return;
  }
#endif
  (void)threads;
  for (Index i = 0; i < count; ++i) body(i);
}

// ---------------------------------------------------------------------------------------------
// Token embedding (the output head reuses wte: tied weights)

/// out (BT, C) = wte (V, C) rows of tokens (BT).
template <class S>
void embedding_forward(MatrixMap<S> out, const int* tokens, ConstMatrixMap<S> wte) {
  for (Index i = 0; i < out.rows(); ++i) out.row(i) = wte.row(tokens[i]);
}

/// dwte (V, C) += dout (BT, C) scattered to the rows of tokens (BT); in row order, so
/// deterministic.
template <class S>
void embedding_backward(MatrixMap<S> dwte, const int* tokens, ConstMatrixMap<S> dout) {
  for (Index i = 0; i < dout.rows(); ++i) dwte.row(tokens[i]) += dout.row(i);
}

// ---------------------------------------------------------------------------------------------
// RMSNorm (Zhang & Sennrich 2019): out = inp · rstd ∘ weight, rstd = 1 / sqrt(mean(inp²) + eps)

inline constexpr double rmsnorm_eps = 1e-5;

/// out (BT, C), rstd (BT) = RMSNorm of inp (BT, C) with weight (C).
template <class S>
void rmsnorm_forward(MatrixMap<S> out, S* rstd, ConstMatrixMap<S> inp, ConstVectorMap<S> weight) {
  const Index C = inp.cols();
  for (Index i = 0; i < inp.rows(); ++i) {
    const S r = S(1) / std::sqrt(inp.row(i).squaredNorm() / S(C) + S(rmsnorm_eps));
    rstd[i] = r;
    out.row(i) = (inp.row(i).array() * r) * weight.transpose().array();
  }
}

/// dinp (BT, C) += ∂L/∂inp and dweight (C) += ∂L/∂weight, given dout (BT, C), inp (BT, C),
/// weight (C) and the forward's rstd (BT):
///   g = dout ∘ weight;  dinp = rstd·g − inp·rstd³·(g·inp)/C;  dweight = Σ_rows dout ∘ inp·rstd.
template <class S>
void rmsnorm_backward(MatrixMap<S> dinp, VectorMap<S> dweight, ConstMatrixMap<S> dout,
                      ConstMatrixMap<S> inp, ConstVectorMap<S> weight, const S* rstd) {
  const Index C = inp.cols();
  for (Index i = 0; i < inp.rows(); ++i) {
    const S r = rstd[i];
    const auto g = dout.row(i).array() * weight.transpose().array();  // an expression, no copy
    const S dot = (g * inp.row(i).array()).sum();
    dinp.row(i).array() += r * g - inp.row(i).array() * (r * r * r * dot / S(C));
    dweight.transpose().array() += dout.row(i).array() * inp.row(i).array() * r;
  }
}

// ---------------------------------------------------------------------------------------------
// Matrix products split over threads by the lab itself: Eigen's own parallel GEMM spin-waits
// between its threads, which on a loaded 2-core machine made training 3× slower than one thread.
// Each thread computes a block of whole rows (or columns) of the result with one single-threaded
// Eigen GEMM; the blocks are the same for a given thread count, so the result is deterministic.

/// The i-th of `parts` blocks of [0, n), in multiples of 8 (the last takes the rest).
inline std::pair<Index, Index> block_range(Index n, Index parts, Index i) {
  const Index step = ((n + parts - 1) / parts + 7) / 8 * 8;
  const Index first = std::min(n, i * step);
  return {first, std::min(n, first + step) - first};
}

/// out (M, N) = lhs (M, K) · rhs (K, N), or += when `accumulate`; rows of out split over threads.
template <class Out, class Lhs, class Rhs>
void product_by_rows(Out&& out, const Lhs& lhs, const Rhs& rhs, bool accumulate, int threads) {
  const Index parts = std::max<Index>(1, std::min<Index>(threads, out.rows() / 64));
  parallel_for(parts, threads, [&](Index i) {
    const auto [first, count] = block_range(out.rows(), parts, i);
    if (count == 0) return;
    if (accumulate) {
      out.middleRows(first, count).noalias() += lhs.middleRows(first, count) * rhs;
    } else {
      out.middleRows(first, count).noalias() = lhs.middleRows(first, count) * rhs;
    }
  });
}

/// out (M, N) += lhs (M, K) · rhs (K, N); columns of out split over threads (for weight
/// gradients, whose K = B·T is the long side).
template <class Out, class Lhs, class Rhs>
void accumulate_by_columns(Out&& out, const Lhs& lhs, const Rhs& rhs, int threads) {
  const Index parts = std::max<Index>(1, std::min<Index>(threads, out.cols() / 32));
  parallel_for(parts, threads, [&](Index i) {
    const auto [first, count] = block_range(out.cols(), parts, i);
    if (count == 0) return;
    out.middleCols(first, count).noalias() += lhs * rhs.middleCols(first, count);
  });
}

// ---------------------------------------------------------------------------------------------
// Linear layer without bias: out = inp · weight, weight stored (in, out) as GPT-2's Conv1D

/// out (BT, OC) = inp (BT, C) · weight (C, OC).
template <class S>
void matmul_forward(MatrixMap<S> out, ConstMatrixMap<S> inp, ConstMatrixMap<S> weight,
                    int threads) {
  product_by_rows(out, inp, weight, false, threads);
}

/// dinp (BT, C) = dout (BT, OC) · weightᵀ (overwritten); dweight (C, OC) += inpᵀ · dout.
template <class S>
void matmul_backward(MatrixMap<S> dinp, MatrixMap<S> dweight, ConstMatrixMap<S> dout,
                     ConstMatrixMap<S> inp, ConstMatrixMap<S> weight, int threads) {
  product_by_rows(dinp, dout, weight.transpose(), false, threads);
  accumulate_by_columns(dweight, inp.transpose(), dout, threads);
}

// ---------------------------------------------------------------------------------------------
// GELU, tanh approximation (GPT-2): out = ½x(1 + tanh(√(2/π)(x + 0.044715x³)))

inline constexpr double gelu_scale = 0.7978845608028654;  // √(2/π)

/// out (BT, 4C) = GELU(inp (BT, 4C)).
template <class S>
void gelu_forward(MatrixMap<S> out, ConstMatrixMap<S> inp) {
  const auto x = inp.array();
  out.array() = S(0.5) * x * (S(1) + (S(gelu_scale) * (x + S(0.044715) * x.cube())).tanh());
}

/// dinp (BT, 4C) = GELU'(inp) ∘ dout (BT, 4C) (overwritten).
template <class S>
void gelu_backward(MatrixMap<S> dinp, ConstMatrixMap<S> inp, ConstMatrixMap<S> dout) {
  const auto x = inp.array();
  auto th = dinp.array();  // dinp holds tanh(·) first: no temporary
  th = (S(gelu_scale) * (x + S(0.044715) * x.cube())).tanh();
  dinp.array() =
      dout.array() * (S(0.5) * (S(1) + th) + S(0.5) * x * (S(1) - th.square()) * S(gelu_scale) *
                                                 (S(1) + S(3 * 0.044715) * x.square()));
}

// ---------------------------------------------------------------------------------------------
// Causal multi-head attention on a fused qkv, with posenc's kernel and its backward

/// The heads of one sequence b inside a fused (B, T, 3C) qkv buffer: part 0 = q, 1 = k, 2 = v,
/// each [H, T, D] (token-major: row stride 3C, head stride D). No copy.
template <class S>
posenc::HeadsView<S> qkv_heads(S* qkv, Index b, Index part, Index T, Index C, Index H) {
  return posenc::HeadsView<S>(qkv + b * T * 3 * C + part * C, H, T, C / H, C / H, 3 * C);
}

/// The heads of sequence b of a (B, T, C) buffer, [H, T, D] (row stride C, head stride D).
template <class S>
posenc::HeadsView<S> sequence_heads(S* x, Index b, Index T, Index C, Index H) {
  return posenc::HeadsView<S>(x + b * T * C, H, T, C / H, C / H, C);
}

/// Options of every attention call of the lab: causal, the same 1/√D scale for every encoding
/// (T5's natural scale of 1 folds 1/√D into T5's initialisation; a lab comparing encodings keeps
/// the model identical), `threads` threads inside one call.
inline posenc::AttentionOptions lab_attention_options(Index head_dim, int threads) {
  return {.mask = posenc::Mask::causal(),
          .scale = 1.0 / std::sqrt(static_cast<double>(head_dim)),
          .threads = threads};
}

/// out (B, T, C) = causal attention of qkv (B, T, 3C) under `encoder`, head by head; lse (B·H, T)
/// receives each row's log-sum-exp (what the backward needs). Sequences run in parallel when
/// there are at least `threads` of them, else one after another with `threads` threads inside
/// posenc's kernel.
template <class S, class Encoder>
void attention_forward(S* out, Matrix<S>& lse, S* qkv, Index B, Index T, Index C, Index H,
                       const Encoder& encoder, int threads) {
  const bool across = B >= threads;
  const auto options = lab_attention_options(C / H, across ? 1 : threads);
  parallel_for(B, across ? threads : 1, [&](Index b) {
    posenc::HeadsView<const S> q = qkv_heads(qkv, b, 0, T, C, H);
    posenc::HeadsView<const S> k = qkv_heads(qkv, b, 1, T, C, H);
    posenc::HeadsView<const S> v = qkv_heads(qkv, b, 2, T, C, H);
    posenc::attention(q, k, v, encoder, sequence_heads(out, b, T, C, H), lse.middleRows(b * H, H),
                      options);
  });
}

/// Workspace of attention_backward: one set of dq, dk, dv [H, T, D] and one encoder-gradient
/// accumulator per sequence, so that sequences run in parallel and their encoder gradients are
/// summed in sequence order (deterministic for any thread count).
template <class S, class Encoder>
using AttentionWorkspace = std::vector<posenc::AttentionGradients<S, Encoder>>;

/// dqkv (B, T, 3C) = ∂L/∂qkv (overwritten) and encoder_gradient += ∂L/∂(encoder parameters),
/// given dout (B, T, C) = ∂L/∂out and the forward's qkv (B, T, 3C), out (B, T, C), lse (B·H, T).
template <class S, class Encoder>
void attention_backward(S* dqkv, posenc::encoder_gradient_t<Encoder>& encoder_gradient,
                        AttentionWorkspace<S, Encoder>& workspace, S* dout, S* qkv, S* out,
                        const Matrix<S>& lse, Index B, Index T, Index C, Index H,
                        const Encoder& encoder, int threads) {
  const Index D = C / H;
  if (static_cast<Index>(workspace.size()) != B || (B > 0 && workspace[0].dq.rows() != T)) {
    workspace.clear();
    for (Index b = 0; b < B; ++b) {
      posenc::AttentionGradients<S, Encoder> g{
          posenc::Heads<S>(H, T, D), posenc::Heads<S>(H, T, D), posenc::Heads<S>(H, T, D), {}};
      if constexpr (posenc::HasLearnableParameters<Encoder>) g.encoder = encoder.zero_gradient();
      workspace.push_back(std::move(g));
    }
  }
  const bool across = B >= threads;
  const auto options = lab_attention_options(D, across ? 1 : threads);
  parallel_for(B, across ? threads : 1, [&](Index b) {
    auto& g = workspace[static_cast<std::size_t>(b)];
    g.encoder.set_zero();
    posenc::HeadsView<const S> q = qkv_heads(qkv, b, 0, T, C, H);
    posenc::HeadsView<const S> k = qkv_heads(qkv, b, 1, T, C, H);
    posenc::HeadsView<const S> v = qkv_heads(qkv, b, 2, T, C, H);
    posenc::HeadsView<const S> o = sequence_heads(out, b, T, C, H);
    posenc::HeadsView<const S> d = sequence_heads(dout, b, T, C, H);
    posenc::attention_backward(q, k, v, encoder, o, lse.middleRows(b * H, H), d, g, options);
    const posenc::Heads<S>* parts[3] = {&g.dq, &g.dk, &g.dv};
    for (Index part = 0; part < 3; ++part) {
      const posenc::HeadsView<S> target = qkv_heads(dqkv, b, part, T, C, H);
      for (Index h = 0; h < H; ++h) target.head(h) = parts[part]->head(h);
    }
  });
  for (Index b = 0; b < B; ++b) encoder_gradient += workspace[static_cast<std::size_t>(b)].encoder;
}

// ---------------------------------------------------------------------------------------------
// Softmax cross-entropy over the vocabulary

/// losses (BT) = −log softmax(logits (BT, V))[targets]; probs (BT, V) = softmax(logits), kept for
/// the backward. Rows in parallel (independent). Returns Σ losses, summed in row order in double.
template <class S>
double crossentropy_forward(S* losses, MatrixMap<S> probs, ConstMatrixMap<S> logits,
                            const int* targets, int threads) {
  parallel_for(logits.rows(), threads, [&](Index i) {
    const S max = logits.row(i).maxCoeff();
    probs.row(i).array() = (logits.row(i).array() - max).exp();
    const S sum = probs.row(i).sum();
    probs.row(i) /= sum;
    losses[i] = std::log(sum) + max - logits(i, targets[i]);
  });
  double total = 0.0;
  for (Index i = 0; i < logits.rows(); ++i) total += static_cast<double>(losses[i]);
  return total;
}

/// dlogits (BT, V) = scale · (probs − onehot(targets)), the gradient of scale · Σ losses.
template <class S>
void crossentropy_backward(MatrixMap<S> dlogits, ConstMatrixMap<S> probs, const int* targets,
                           S scale) {
  dlogits.noalias() = scale * probs;
  for (Index i = 0; i < probs.rows(); ++i) dlogits(i, targets[i]) -= scale;
}

}  // namespace lab
