// SPDX-License-Identifier: MIT
// Training: the gradients of softmax attention with respect to q, k, v and the encoder's learnable
// parameters. attention_backward streams (FlashAttention-2: logits recomputed tile by tile from
// q, k and the forward's row log-sum-exp, never N × M); attention_backward_reference
// materialises, for tests. The forward that records the log-sum-exp is the `attention` overload
// taking `lse` (attention.hpp).
#pragma once

#include "posenc/attention.hpp"
#include "posenc/attention_options.hpp"
#include "posenc/detail/check.hpp"
#include "posenc/encoding.hpp"
#include "posenc/kernel/backward.hpp"
#include "posenc/kernel/problem.hpp"
#include "posenc/kernel/reference_backward.hpp"
#include "posenc/tensor.hpp"

namespace posenc {

/// Gradients of a scalar loss L with respect to the inputs of one attention call: dq [H, N, D],
/// dk [H_kv, M, D] and dv [H_kv, M, Dv] (with grouped-query attention summed over the query heads
/// of each key/value head), and `encoder`, the gradient of the encoder's learnable parameters
/// (Encoder::Gradient, the layout of its parameters; NoGradient for an encoder without any).
template <class Scalar, class Encoder>
struct AttentionGradients {
  Heads<Scalar> dq;
  Heads<Scalar> dk;
  Heads<Scalar> dv;
  encoder_gradient_t<Encoder> encoder;
};

/// The forward of a training step: the output [H, N, Dv] and the row log-sum-exp [H, N].
template <class Scalar>
struct AttentionForward {
  Heads<Scalar> out;
  Matrix<Scalar> lse;
};

/// Streaming attention that also returns the row log-sum-exp (see the `attention` overload with
/// `lse`): the forward whose results attention_backward takes.
template <HeadsLike Q, HeadsLike K, HeadsLike V, AttentionEncoder Encoder = NoPositionalEncoding>
AttentionForward<heads_scalar_t<Q>> attention_forward(const Q& q, const K& k, const V& v,
                                                      const Encoder& encoder = {},
                                                      const AttentionOptions& options = {}) {
  const auto qv = detail::as_const_view(q);
  const auto vv = detail::as_const_view(v);
  AttentionForward<heads_scalar_t<Q>> result{
      Heads<heads_scalar_t<Q>>(qv.heads(), qv.rows(), vv.dim()),
      Matrix<heads_scalar_t<Q>>(qv.heads(), qv.rows())};
  attention(q, k, v, encoder, result.out.view(), result.lse, options);
  return result;
}

/// attention_forward without positional encoding (NoPE).
template <HeadsLike Q, HeadsLike K, HeadsLike V>
AttentionForward<heads_scalar_t<Q>> attention_forward(const Q& q, const K& k, const V& v,
                                                      const AttentionOptions& options) {
  return attention_forward(q, k, v, NoPositionalEncoding{}, options);
}

namespace detail {

template <class Scalar, class Encoder>
AttentionGradients<Scalar, Encoder> empty_gradients(const kernel::AttentionProblem<Scalar>& p,
                                                    const Encoder& encoder) {
  AttentionGradients<Scalar, Encoder> grads{Heads<Scalar>(p.heads, p.queries, p.query_dim),
                                            Heads<Scalar>(p.k.heads(), p.keys, p.query_dim),
                                            Heads<Scalar>(p.k.heads(), p.keys, p.value_dim),
                                            {}};
  if constexpr (HasLearnableParameters<Encoder>) {
    grads.encoder = encoder.zero_gradient();
  } else {
    (void)encoder;
  }
  return grads;
}

/// Throws unless `x` is [H, N, Dv] of problem `p`.
template <class Scalar>
void require_output_like(const char* fn, const char* name, const HeadsView<const Scalar>& x,
                         const kernel::AttentionProblem<Scalar>& p) {
  require(x.heads() == p.heads && x.rows() == p.queries && x.dim() == p.value_dim, fn, name,
          " has shape [", x.heads(), ", ", x.rows(), ", ", x.dim(), "] but must be [", p.heads,
          ", ", p.queries, ", ", p.value_dim, "] (the output of the forward)");
}

/// Throws unless grads.dq, dk, dv have the shapes of q, k, v of problem `p` and share no memory
/// with q, k, v, out, dout or each other (the kernel reads the inputs while it writes them).
template <class Scalar, class Encoder>
void require_gradient_buffers(const char* fn, const AttentionGradients<Scalar, Encoder>& grads,
                              const kernel::AttentionProblem<Scalar>& p,
                              const HeadsView<const Scalar>& out,
                              const HeadsView<const Scalar>& dout) {
  const std::pair<const char*, HeadsView<const Scalar>> buffers[] = {
      {"grads.dq", grads.dq.view()}, {"grads.dk", grads.dk.view()}, {"grads.dv", grads.dv.view()}};
  const HeadsView<const Scalar> like[] = {p.q, p.k, p.v};
  const char* like_names[] = {"q", "k", "v"};
  for (int i = 0; i < 3; ++i) {
    const auto& [name, buffer] = buffers[i];
    require(buffer.heads() == like[i].heads() && buffer.rows() == like[i].rows() &&
                buffer.dim() == like[i].dim(),
            fn, name, " has shape [", buffer.heads(), ", ", buffer.rows(), ", ", buffer.dim(),
            "] but must be [", like[i].heads(), ", ", like[i].rows(), ", ", like[i].dim(),
            "] (the shape of ", like_names[i], ")");
  }
  const std::pair<const char*, HeadsView<const Scalar>> inputs[] = {
      {"q", p.q},     {"k", p.k}, {"v", p.v}, {"out", out},
      {"dout", dout}, buffers[0], buffers[1], buffers[2]};
  for (int i = 0; i < 3; ++i) {
    for (const auto& [name, input] : inputs) {
      if (name == buffers[i].first) continue;
      require(!kernel::views_overlap(buffers[i].second, input), fn, buffers[i].first,
              " shares memory with ", name,
              " (a gradient buffer must not alias an input or another gradient)");
    }
  }
}

}  // namespace detail

/// Streaming backward of `attention(q, k, v, encoder, out, lse, options)` into buffers the caller
/// owns, for training loops that allocate nothing in the steady state: given the forward's `out`
/// [H, N, Dv] and `lse` [H, N] and dout = ∂L/∂out [H, N, Dv], writes ∂L/∂q, ∂L/∂k, ∂L/∂v into
/// grads.dq [H, N, D], grads.dk [H_kv, M, D], grads.dv [H_kv, M, Dv] and ADDS the encoder's
/// parameter gradient to grads.encoder (as PyTorch accumulates .grad: an encoder shared by several
/// layers, such as T5's bias, collects every layer's share; call grads.encoder.set_zero() before
/// the next step). grads.encoder must have the shapes of encoder.zero_gradient().
/// Same options as the forward (mask, offsets, positions, segments, grouped-query attention,
/// blocks, threads). Extra memory O(tile) per thread plus one parameter-gradient accumulator per
/// task; deterministic (the same bits for any thread count). Throws std::invalid_argument for
/// shapes that do not match the forward's, and for gradient buffers that share memory with an
/// input or with each other.
template <HeadsLike Q, HeadsLike K, HeadsLike V, HeadsLike O, HeadsLike DO,
          AttentionEncoder Encoder>
void attention_backward(const Q& q, const K& k, const V& v, const Encoder& encoder, const O& out,
                        const Eigen::Ref<const Matrix<heads_scalar_t<Q>>>& lse, const DO& dout,
                        AttentionGradients<heads_scalar_t<Q>, Encoder>& grads,
                        const AttentionOptions& options = {}) {
  using Scalar = heads_scalar_t<Q>;
  detail::check_qkv_scalars<Q, K, V>();
  detail::check_qkv_scalars<Q, O, DO>();
  constexpr const char* fn = "posenc::attention_backward";
  const auto p =
      kernel::make_problem<Scalar>(fn, detail::as_const_view(q), detail::as_const_view(k),
                                   detail::as_const_view(v), encoder, options);
  const auto out_view = detail::as_const_view(out);
  const auto dout_view = detail::as_const_view(dout);
  detail::require_output_like(fn, "out", out_view, p);
  detail::require_output_like(fn, "dout", dout_view, p);
  detail::require(lse.rows() == p.heads && lse.cols() == p.queries, fn, "lse has shape [",
                  lse.rows(), ", ", lse.cols(), "] but must be [", p.heads, ", ", p.queries,
                  "] (the row log-sum-exp of the forward)");
  detail::require_gradient_buffers(fn, grads, p, out_view, dout_view);
  kernel::stream_backward(
      p, encoder, kernel::BackwardInputs<Scalar>{out_view, dout_view, lse},
      kernel::BackwardOutputs<Scalar>{grads.dq.view(), grads.dk.view(), grads.dv.view()},
      grads.encoder);
}

/// Streaming backward of `attention(q, k, v, encoder, out, lse, options)`: given the forward's
/// `out` [H, N, Dv] and `lse` [H, N] and dout = ∂L/∂out [H, N, Dv], returns ∂L/∂q, ∂L/∂k, ∂L/∂v
/// and the encoder's parameter gradient (the overload above writes into buffers the caller keeps).
/// Same options as the forward (mask, offsets, positions, segments, grouped-query attention,
/// blocks, threads). Extra memory O(tile) per thread plus one parameter-gradient accumulator per
/// task; deterministic (the same bits for any thread count). Throws std::invalid_argument for
/// shapes that do not match the forward's.
template <HeadsLike Q, HeadsLike K, HeadsLike V, HeadsLike O, HeadsLike DO,
          AttentionEncoder Encoder>
AttentionGradients<heads_scalar_t<Q>, Encoder> attention_backward(
    const Q& q, const K& k, const V& v, const Encoder& encoder, const O& out,
    const Eigen::Ref<const Matrix<heads_scalar_t<Q>>>& lse, const DO& dout,
    const AttentionOptions& options = {}) {
  using Scalar = heads_scalar_t<Q>;
  const auto qv = detail::as_const_view(q);
  const auto kv = detail::as_const_view(k);
  const auto vv = detail::as_const_view(v);
  AttentionGradients<Scalar, Encoder> grads{Heads<Scalar>(qv.heads(), qv.rows(), qv.dim()),
                                            Heads<Scalar>(kv.heads(), kv.rows(), kv.dim()),
                                            Heads<Scalar>(vv.heads(), vv.rows(), vv.dim()),
                                            {}};
  if constexpr (HasLearnableParameters<Encoder>) grads.encoder = encoder.zero_gradient();
  attention_backward(q, k, v, encoder, out, lse, dout, grads, options);
  return grads;
}

/// The materialising oracle's backward of L = Σ dout ∘ attention(q, k, v, encoder, options):
/// forms every N × M probability matrix and applies the chain rule plainly. For tests.
template <HeadsLike Q, HeadsLike K, HeadsLike V, HeadsLike DO, AttentionEncoder Encoder>
AttentionGradients<heads_scalar_t<Q>, Encoder> attention_backward_reference(
    const Q& q, const K& k, const V& v, const Encoder& encoder, const DO& dout,
    const AttentionOptions& options = {}) {
  using Scalar = heads_scalar_t<Q>;
  detail::check_qkv_scalars<Q, K, V>();
  detail::check_qkv_scalars<Q, DO, DO>();
  constexpr const char* fn = "posenc::attention_backward_reference";
  const auto p =
      kernel::make_problem<Scalar>(fn, detail::as_const_view(q), detail::as_const_view(k),
                                   detail::as_const_view(v), encoder, options);
  const auto dout_view = detail::as_const_view(dout);
  detail::require_output_like(fn, "dout", dout_view, p);
  AttentionGradients<Scalar, Encoder> grads = detail::empty_gradients(p, encoder);
  kernel::reference_backward(
      p, encoder, dout_view,
      kernel::BackwardOutputs<Scalar>{grads.dq.view(), grads.dk.view(), grads.dv.view()},
      grads.encoder);
  return grads;
}

}  // namespace posenc
