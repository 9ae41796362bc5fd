// SPDX-License-Identifier: MIT
// Linear (kernelised) attention: exp(q·k) replaced by φ(q)·φ(k) for a positive feature map φ
// (posenc/feature_maps.hpp, or the user's own FeatureMap), so that attention costs O(N·F·Dv)
// instead of O(N·M·D). Non-causal or causal (a running prefix state streamed over the sequence in
// chunks), a state object that continues decoding one token at a time, and the materialising
// oracle the streaming form is tested against; and the backward of both (training). The engines
// are posenc/kernel/linear_attention.hpp and posenc/kernel/linear_attention_backward.hpp.
#pragma once

#include <cmath>
#include <type_traits>
#include <utility>
#include <vector>

#include "posenc/attention_options.hpp"
#include "posenc/detail/check.hpp"
#include "posenc/detail/parallel.hpp"
#include "posenc/encoding.hpp"
#include "posenc/feature_maps.hpp"
#include "posenc/kernel/linear_attention.hpp"
#include "posenc/kernel/linear_attention_backward.hpp"
#include "posenc/tensor.hpp"

namespace posenc {

/// Causal linear attention that continues across calls: prefill with `append`, then `step` one
/// token at a time. Holds, per head, the O(F·Dv) running sums (LinearAttentionHeadState) and the
/// position of the next token. The encoder (e.g. stochastic PE) and its random draw are held by
/// value, so one draw serves the whole sequence.
///
///   LinearAttentionState<float, Favor<float>, SineSpe<float>> state(favor, spe);
///   auto prompt_out = state.append(q, k, v);         // [H, N, Dv], positions 0 … N−1
///   auto next = state.step(q_t, k_t, v_t);           // [H, 1, Dv] at position N
///
/// Head counts and widths are fixed by the first call.
template <class Scalar, class Map = EluPlusOne, class Encoder = NoPositionalEncoding>
class LinearAttentionState {
  static_assert(
      FeatureMap<Map, Scalar>,
      "posenc::LinearAttentionState: Map must model FeatureMap<Map, Scalar> (encoding.hpp): "
      "EluPlusOne, ReluPlusEpsilon, Favor<Scalar> or the user's own map");
  // Linear attention applies a QueryKeyTransform only: any other stage fails here, by name.
  static constexpr RequireOnlyStages<Encoder, Stage::query_key_transform> only_transforms{};

 public:
  /// `first_position`: absolute position of the first token (also the `centre` handed to the
  /// encoder's transforms, fixed for the whole sequence).
  explicit LinearAttentionState(Map map = {}, Encoder encoder = {}, Index first_position = 0,
                                Index chunk = 64)
      : map_(std::move(map)),
        encoder_(std::move(encoder)),
        first_position_(first_position),
        next_position_(first_position),
        chunk_(chunk) {
    detail::require(chunk >= 1, "posenc::LinearAttentionState", "chunk must be >= 1, got ", chunk);
    detail::require_position("posenc::LinearAttentionState", "first_position", first_position);
  }

  /// Absorbs N new tokens (q: [H, N, D], k: [H_kv, N, D], v: [H_kv, N, Dv]) causally and returns
  /// their outputs [H, N, Dv]. `threads`: over heads; 0 = OpenMP's default.
  template <HeadsLike Q, HeadsLike K, HeadsLike V>
  Heads<Scalar> append(const Q& q, const K& k, const V& v, int threads = 0) {
    detail::check_qkv_scalars<Q, K, V>();
    static_assert(std::is_same_v<heads_scalar_t<Q>, Scalar>,
                  "posenc::LinearAttentionState::append: q, k, v must have the state's scalar");
    constexpr const char* fn = "posenc::LinearAttentionState::append";
    const auto qv = detail::as_const_view(q);
    const auto kv = detail::as_const_view(k);
    const auto vv = detail::as_const_view(v);
    const auto shape = kernel::check_linear<Scalar>(fn, qv, kv, vv, map_, encoder_, true, threads,
                                                    chunk_, next_position_);
    if (heads_.empty()) {
      shape_ = shape;
      heads_.resize(static_cast<std::size_t>(shape.heads));
      for (auto& s : heads_) kernel::reset_state(map_, shape.width, shape.value_dim, s);
    } else {
      detail::require(shape.heads == shape_.heads && shape.kv_heads == shape_.kv_heads &&
                          shape.dim == shape_.dim && shape.value_dim == shape_.value_dim,
                      fn, "this state holds ", shape_.heads, " query heads, ", shape_.kv_heads,
                      " key/value heads, dim ", shape_.dim, " and value dim ", shape_.value_dim,
                      "; got ", shape.heads, ", ", shape.kv_heads, ", ", shape.dim, " and ",
                      shape.value_dim);
    }
    Heads<Scalar> out(shape.heads, shape.rows, shape.value_dim);
    const Index first = next_position_;
    detail::parallel_tasks(
        shape.heads, detail::thread_count(threads, shape.heads),
        [] { return kernel::LinearWorkspace<Scalar>{}; },
        [&](Index h, kernel::LinearWorkspace<Scalar>& ws) {
          kernel::causal_head(map_, encoder_, shape, h, qv, kv, vv, first, first_position_, chunk_,
                              ws, heads_[static_cast<std::size_t>(h)], out.view());
        });
    next_position_ += shape.rows;
    return out;
  }

  /// One token: q_t [H, 1, D], k_t [H_kv, 1, D], v_t [H_kv, 1, Dv] → [H, 1, Dv].
  template <HeadsLike Q, HeadsLike K, HeadsLike V>
  Heads<Scalar> step(const Q& q_t, const K& k_t, const V& v_t) {
    detail::require(detail::as_const_view(q_t).rows() == 1, "posenc::LinearAttentionState::step",
                    "q_t must have one row, got ", detail::as_const_view(q_t).rows(),
                    " (use append for several tokens)");
    return append(q_t, k_t, v_t, 1);
  }

  /// Absolute position of the next token.
  Index position() const { return next_position_; }
  /// Tokens absorbed so far.
  Index tokens() const { return next_position_ - first_position_; }
  /// Query heads (0 before the first call).
  Index heads() const { return static_cast<Index>(heads_.size()); }
  /// The running sums of query head h (see LinearAttentionHeadState).
  const LinearAttentionHeadState<Scalar>& head_state(Index h) const {
    detail::require(h >= 0 && h < heads(), "posenc::LinearAttentionState::head_state", "head ", h,
                    " out of range for ", heads(), " heads");
    return heads_[static_cast<std::size_t>(h)];
  }
  const Map& feature_map() const { return map_; }
  const Encoder& encoder() const { return encoder_; }

 private:
  Map map_;
  Encoder encoder_;
  Index first_position_;
  Index next_position_;
  Index chunk_;
  kernel::LinearShape shape_{};
  std::vector<LinearAttentionHeadState<Scalar>> heads_;
};

// ---------------------------------------------------------------------------------------------
// Entry points. q: [H, N, D], k: [H_kv, M, D], v: [H_kv, M, Dv] (H_kv divides H), out
// [H, N, Dv]. The encoder, if any, is a QueryKeyTransform applied before φ (its transformed
// width is what φ sees). Row i of q and k sits at options.first_position + i.
// ---------------------------------------------------------------------------------------------

/// Linear attention into `out` ([H, N, Dv]):
/// out_i = Σⱼ φ(q_i)·φ(k_j) v_j / Σⱼ φ(q_i)·φ(k_j) over j <= i (causal) or all j.
/// Time O((N + M)·F·Dv) (+ O(N·chunk·(F + Dv)) causal), extra memory O(F·Dv + chunk·(F + D + Dv))
/// per thread. A row whose weights sum to zero returns zeros.
template <HeadsLike Q, HeadsLike K, HeadsLike V, class Map, class Encoder>
void linear_attention(const Q& q, const K& k, const V& v, const Map& map, const Encoder& encoder,
                      HeadsView<heads_scalar_t<Q>> out,
                      const LinearAttentionOptions& options = {}) {
  using Scalar = heads_scalar_t<Q>;
  detail::check_qkv_scalars<Q, K, V>();
  static_assert(
      FeatureMap<Map, Scalar>,
      "posenc::linear_attention: the map must model FeatureMap<Map, Scalar> (encoding.hpp): "
      "EluPlusOne, ReluPlusEpsilon, Favor<Scalar> (same scalar as q) or the user's "
      "own map");
  // Linear attention applies a QueryKeyTransform only: any other stage fails here, by name.
  [[maybe_unused]] constexpr RequireOnlyStages<Encoder, Stage::query_key_transform>
      only_transforms{};
  constexpr const char* fn = "posenc::linear_attention";
  const auto qv = detail::as_const_view(q);
  const auto kv = detail::as_const_view(k);
  const auto vv = detail::as_const_view(v);
  const auto shape =
      kernel::check_linear<Scalar>(fn, qv, kv, vv, map, encoder, options.causal, options.threads,
                                   options.chunk, options.first_position);
  detail::require(
      out.heads() == shape.heads && out.rows() == shape.rows && out.dim() == shape.value_dim, fn,
      "out has shape [", out.heads(), ", ", out.rows(), ", ", out.dim(), "] but must be [",
      shape.heads, ", ", shape.rows, ", ", shape.value_dim, "]");
  detail::parallel_tasks(
      shape.heads, detail::thread_count(options.threads, shape.heads),
      [] { return kernel::LinearWorkspace<Scalar>{}; },
      [&](Index h, kernel::LinearWorkspace<Scalar>& ws) {
        if (options.causal) {
          LinearAttentionHeadState<Scalar> state;
          kernel::reset_state(map, shape.width, shape.value_dim, state);
          kernel::causal_head(map, encoder, shape, h, qv, kv, vv, options.first_position,
                              options.first_position, options.chunk, ws, state, out);
        } else {
          kernel::noncausal_head(map, encoder, shape, h, qv, kv, vv, options.first_position,
                                 options.chunk, ws, out);
        }
      });
}

/// Linear attention; returns [H, N, Dv].
template <HeadsLike Q, HeadsLike K, HeadsLike V, class Map, class Encoder>
Heads<heads_scalar_t<Q>> linear_attention(const Q& q, const K& k, const V& v, const Map& map,
                                          const Encoder& encoder,
                                          const LinearAttentionOptions& options = {}) {
  const auto qv = detail::as_const_view(q);
  const auto vv = detail::as_const_view(v);
  Heads<heads_scalar_t<Q>> out(qv.heads(), qv.rows(), vv.dim());
  linear_attention(q, k, v, map, encoder, out.view(), options);
  return out;
}

/// Linear attention without positional encoding.
template <HeadsLike Q, HeadsLike K, HeadsLike V, class Map>
Heads<heads_scalar_t<Q>> linear_attention(const Q& q, const K& k, const V& v, const Map& map,
                                          const LinearAttentionOptions& options = {}) {
  return linear_attention(q, k, v, map, NoPositionalEncoding{}, options);
}

/// The oracle: the same result by the quadratic form, materialising the N × M weights
/// wᵢⱼ = φ(qᵢ)·φ(kⱼ) (masked to j <= i when causal) and normalising each row. For Favor the key
/// stabiliser of row i is the largest key projection among the keys row i sees.
template <HeadsLike Q, HeadsLike K, HeadsLike V, class Map, class Encoder = NoPositionalEncoding>
Heads<heads_scalar_t<Q>> linear_attention_reference(const Q& q, const K& k, const V& v,
                                                    const Map& map, const Encoder& encoder = {},
                                                    const LinearAttentionOptions& options = {}) {
  using Scalar = heads_scalar_t<Q>;
  detail::check_qkv_scalars<Q, K, V>();
  static_assert(FeatureMap<Map, Scalar>, "posenc::linear_attention_reference: unsupported map");
  [[maybe_unused]] constexpr RequireOnlyStages<Encoder, Stage::query_key_transform>
      only_transforms{};
  const auto qv = detail::as_const_view(q);
  const auto kv = detail::as_const_view(k);
  const auto vv = detail::as_const_view(v);
  const auto shape =
      kernel::check_linear<Scalar>("posenc::linear_attention_reference", qv, kv, vv, map, encoder,
                                   options.causal, 1, 1, options.first_position);
  Heads<Scalar> out(shape.heads, shape.rows, shape.value_dim);
  const Index N = shape.rows;
  const Index M = shape.keys;
  const Index first = options.first_position;
  std::vector<Index> qpos;
  std::vector<Index> kpos;
  kernel::fill_linear_positions(first, 0, N, qpos);
  kernel::fill_linear_positions(first, 0, M, kpos);
  for (Index h = 0; h < shape.heads; ++h) {
    const Index kvh = h / (shape.heads / shape.kv_heads);
    Matrix<Scalar> qt, kt, qf, kf;
    Vector<Scalar> key_max;
    kernel::load_linear_rows(encoder, true, h, qpos, first, qv.head(h), shape.width, qt);
    kernel::load_linear_rows(encoder, false, kvh, kpos, first, kv.head(kvh), shape.width, kt);
    kernel::query_features(map, qt, qf);
    kernel::key_features(map, kt, kf, key_max);
    Matrix<Scalar> weights = qf * kf.transpose();  // N × M
    for (Index i = 0; i < N; ++i) {
      const Index last = options.causal ? i : M - 1;
      if (last < 0) continue;  // no keys: the row stays zero
      if constexpr (StabilizedFeatureMap<Map, Scalar>) {
        const Scalar c = key_max.head(last + 1).maxCoeff();
        const Scalar extra = static_cast<Scalar>(map.stabilizer()) * qf.row(i).sum();
        for (Index j = 0; j <= last; ++j) {
          weights(i, j) = map.ratio() * (std::exp(key_max[j] - c) * weights(i, j) + extra);
        }
      }
      weights.row(i).tail(M - 1 - last).setZero();
    }
    const Vector<Scalar> den = weights.rowwise().sum();
    Matrix<Scalar> num = weights * vv.head(kvh);
    if (options.causal && !vv.head(kvh).allFinite()) {
      // Causal rows read only the values j <= i (0 · NaN would leak a later value into them).
      for (Index i = 0; i < N; ++i) {
        num.row(i).noalias() = weights.row(i).head(i + 1) * vv.head(kvh).topRows(i + 1);
      }
    }
    for (Index i = 0; i < N; ++i) {
      if (den[i] != Scalar(0)) {
        out.head(h).row(i) = num.row(i) / den[i];
      }
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Gradients (training).
// ---------------------------------------------------------------------------------------------

/// Gradients of a scalar loss L with respect to the inputs of one linear attention call: dq
/// [H, N, D], dk [H_kv, M, D] and dv [H_kv, M, Dv] (with grouped-query attention summed over the
/// query heads of each key/value head), and `encoder`, the gradient of the encoder's learnable
/// parameters (Encoder::Gradient, the layout of its parameters; NoGradient without any).
template <class Scalar, class Encoder>
struct LinearAttentionGradients {
  Heads<Scalar> dq;
  Heads<Scalar> dk;
  Heads<Scalar> dv;
  encoder_gradient_t<Encoder> encoder;
};

namespace detail {

/// Compile-time checks of the linear attention backward: a differentiable feature map and, if
/// any, a differentiable QueryKeyTransform (the only stage linear attention applies).
template <class Scalar, class Map, class Encoder>
struct RequireLinearBackward {
  static_assert(FeatureMap<Map, Scalar>,
                "posenc::linear_attention_backward: the map must model FeatureMap<Map, Scalar> "
                "(encoding.hpp) with the scalar of q");
  static_assert(StabilizedFeatureMap<Map, Scalar> || DifferentiableFeatureMap<Map, Scalar>,
                "posenc::linear_attention_backward: the feature map has no backward hook "
                "features_backward(x, dfeatures, dx) (DifferentiableFeatureMap, encoding.hpp)");
  static_assert(!StabilizedFeatureMap<Map, Scalar> ||
                    DifferentiableStabilizedFeatureMap<Map, Scalar>,
                "posenc::linear_attention_backward: the stabilised feature map has no backward "
                "hooks query_features_backward / key_exponentials_backward "
                "(DifferentiableStabilizedFeatureMap, encoding.hpp)");
  static_assert(!QueryKeyTransform<Encoder> || DifferentiableTransform<Encoder>,
                "posenc::linear_attention_backward: the encoder's QueryKeyTransform has no "
                "backward form (transform_queries_backward / transform_keys_backward)");
  static_assert(!HasLearnableParameters<Encoder> || LearnableTransform<Encoder>,
                "posenc::linear_attention_backward: the encoder has learnable parameters but no "
                "transform backward overloads taking the gradient (LearnableTransform)");
  static constexpr RequireOnlyStages<Encoder, Stage::query_key_transform> only_transforms{};
};

/// Checks the call and returns zeroed gradients of its shape.
template <class Scalar, class Map, class Encoder>
LinearAttentionGradients<Scalar, Encoder> linear_gradients_for(
    const char* fn, const HeadsView<const Scalar>& q, const HeadsView<const Scalar>& k,
    const HeadsView<const Scalar>& v, const HeadsView<const Scalar>& dout, const Map& map,
    const Encoder& encoder, const LinearAttentionOptions& options, kernel::LinearShape& shape) {
  shape = kernel::check_linear<Scalar>(fn, q, k, v, map, encoder, options.causal, options.threads,
                                       options.chunk, options.first_position);
  require(dout.heads() == shape.heads && dout.rows() == shape.rows && dout.dim() == shape.value_dim,
          fn, "dout has shape [", dout.heads(), ", ", dout.rows(), ", ", dout.dim(),
          "] but must be [", shape.heads, ", ", shape.rows, ", ", shape.value_dim,
          "] (the shape of the output)");
  LinearAttentionGradients<Scalar, Encoder> grads{
      Heads<Scalar>(shape.heads, shape.rows, shape.dim),
      Heads<Scalar>(shape.kv_heads, shape.keys, shape.dim),
      Heads<Scalar>(shape.kv_heads, shape.keys, shape.value_dim),
      {}};
  if constexpr (HasLearnableParameters<Encoder>) {
    grads.encoder = encoder.zero_gradient();
  } else {
    (void)encoder;
  }
  return grads;
}

}  // namespace detail

/// The backward of linear_attention(q, k, v, map, encoder, options): given dout = ∂L/∂out
/// [H, N, Dv], returns ∂L/∂q, ∂L/∂k, ∂L/∂v and the encoder's parameter gradient. Same options
/// as the forward (causal or not, first_position, chunk, threads). Needs no result of the
/// forward: the normaliser and output are recomputed in the scan that forms dq (which needs the
/// forward's prefix state anyway). Causal: a forward scan for dq, then a reverse scan of suffix
/// states for dk and dv; non-causal: global sums. Time about 3× the forward's; extra memory
/// O(F·Dv + chunk·(chunk + F + D + Dv)) per thread plus, causal, 2N numbers per thread (4N with
/// Favor: den_i, γ_i, c_i, ∂L/∂m_j). One task per key/value head (threads over key/value heads):
/// the same bits for any thread count.
/// The feature map needs its backward hook (DifferentiableFeatureMap or, for Favor,
/// DifferentiableStabilizedFeatureMap; encoding.hpp); Favor's stabilisers are differentiated as
/// the forward computes them (they cancel exactly when its stabilizer ε is 0). Non-finite
/// inputs follow the forward's policy: only the pairs the causal mask allows are ever combined,
/// so a non-finite k_j or v_j reaches only what autograd of the forward would reach.
template <HeadsLike Q, HeadsLike K, HeadsLike V, class Map, class Encoder, HeadsLike DO>
LinearAttentionGradients<heads_scalar_t<Q>, Encoder> linear_attention_backward(
    const Q& q, const K& k, const V& v, const Map& map, const Encoder& encoder, const DO& dout,
    const LinearAttentionOptions& options = {}) {
  using Scalar = heads_scalar_t<Q>;
  detail::check_qkv_scalars<Q, K, V>();
  detail::check_qkv_scalars<Q, DO, DO>();
  [[maybe_unused]] constexpr detail::RequireLinearBackward<Scalar, Map, Encoder> differentiable{};
  const auto qv = detail::as_const_view(q);
  const auto kv = detail::as_const_view(k);
  const auto vv = detail::as_const_view(v);
  const auto dv = detail::as_const_view(dout);
  kernel::LinearShape shape{};
  auto grads = detail::linear_gradients_for("posenc::linear_attention_backward", qv, kv, vv, dv,
                                            map, encoder, options, shape);
  kernel::linear_backward(
      map, encoder, shape, qv, kv, vv, dv, options,
      kernel::BackwardOutputs<Scalar>{grads.dq.view(), grads.dk.view(), grads.dv.view()},
      grads.encoder);
  return grads;
}

/// The backward of linear attention without positional encoding.
template <HeadsLike Q, HeadsLike K, HeadsLike V, class Map, HeadsLike DO>
LinearAttentionGradients<heads_scalar_t<Q>, NoPositionalEncoding> linear_attention_backward(
    const Q& q, const K& k, const V& v, const Map& map, const DO& dout,
    const LinearAttentionOptions& options = {}) {
  return linear_attention_backward(q, k, v, map, NoPositionalEncoding{}, dout, options);
}

/// The materialising oracle's backward of L = Σ dout ∘ linear_attention(q, k, v, map, encoder,
/// options): every weight of every allowed pair and the chain rule term by term. For tests.
template <HeadsLike Q, HeadsLike K, HeadsLike V, class Map, class Encoder, HeadsLike DO>
LinearAttentionGradients<heads_scalar_t<Q>, Encoder> linear_attention_backward_reference(
    const Q& q, const K& k, const V& v, const Map& map, const Encoder& encoder, const DO& dout,
    const LinearAttentionOptions& options = {}) {
  using Scalar = heads_scalar_t<Q>;
  detail::check_qkv_scalars<Q, K, V>();
  detail::check_qkv_scalars<Q, DO, DO>();
  [[maybe_unused]] constexpr detail::RequireLinearBackward<Scalar, Map, Encoder> differentiable{};
  const auto qv = detail::as_const_view(q);
  const auto kv = detail::as_const_view(k);
  const auto vv = detail::as_const_view(v);
  const auto dv = detail::as_const_view(dout);
  kernel::LinearShape shape{};
  LinearAttentionOptions checked = options;
  checked.threads = 1;
  checked.chunk = 1;
  auto grads = detail::linear_gradients_for("posenc::linear_attention_backward_reference", qv, kv,
                                            vv, dv, map, encoder, checked, shape);
  kernel::linear_reference_backward(
      map, encoder, shape, qv, kv, vv, dv, options.causal, options.first_position,
      kernel::BackwardOutputs<Scalar>{grads.dq.view(), grads.dk.view(), grads.dv.view()},
      grads.encoder);
  return grads;
}

}  // namespace posenc
