// SPDX-License-Identifier: MIT
// The whole plug-in contract in one place: the five stage concepts an encoder may model, every
// optional hook an encoder may declare, the stage set every consumer asks (stages_of), and the
// feature-map contract of linear attention. The kernel, the KV cache, linear attention, compose and
// the analysis tools ask this list at compile time and call only what an encoder models; a new
// encoder is a new type, never a change to them.
#pragma once

#include <concepts>
#include <span>

#include "posenc/mask.hpp"
#include "posenc/tensor.hpp"

namespace posenc {

/// Read-only positions of the rows of a tile (absolute, 64-bit; not necessarily sorted).
using Positions = std::span<const Index>;

/// Row-major tile arguments of the stage functions.
template <class Scalar>
using TileRef = Eigen::Ref<Matrix<Scalar>>;
template <class Scalar>
using ConstTileRef = const Eigen::Ref<const Matrix<Scalar>>&;

/// The shape of one attention call, handed to an encoder's optional `validate(shape)` before any
/// work so that it can reject head counts or widths it was not built for.
struct AttentionShape {
  Index heads;      // query heads H
  Index kv_heads;   // key/value heads (== heads, or a divisor of it for grouped-query attention)
  Index queries;    // N
  Index keys;       // M
  Index query_dim;  // D, the width of q and k before any QueryKeyTransform
  Index value_dim;  // Dv
};

/// Adds p_i to the rows of token embeddings x (rows at consecutive positions starting at
/// `first_position`). Applied to embeddings before the projections, not inside attention.
template <class E>
concept AbsoluteEncoding = requires(const E& e, TileRef<typename E::Scalar> x,
                                    Index first_position) {
  typename E::Scalar;
  e.add_to(x, first_position);
};

/// Rotates / scales / filters queries and keys by position before the logits (RoPE, XPos, SPE).
///
/// `transform_queries(head, positions, centre, in, out)` writes out.row(r) for in.row(r) at
/// `positions[r]`; `out` has `transformed_dim(in.cols())` columns and may alias `in` when the
/// width is unchanged. `centre` is a position shared by every query and key that meet in one
/// logit tile: per-position factors that cancel in q·k (XPos's ζ^(±p/scale_base)) are measured
/// from it so they stay in floating-point range; pure rotations ignore it.
template <class E>
concept QueryKeyTransform = requires(const E& e, Index head, Index dim, Positions positions,
                                     Index centre, ConstTileRef<typename E::Scalar> in,
                                     TileRef<typename E::Scalar> out) {
  typename E::Scalar;
  { e.transformed_dim(dim) } -> std::convertible_to<Index>;
  e.transform_queries(head, positions, centre, in, out);
  e.transform_keys(head, positions, centre, in, out);
};

/// Adds a positional bias B_h(i, j) to scaled logits (ALiBi, T5, KERPLE, FIRE).
///
/// `add_bias(head, query_positions, key_positions, tile)` adds B_h(query_positions[r],
/// key_positions[c]) to tile(r, c) for the whole tile at once.
template <class E>
concept ScoreBias = requires(const E& e, Index head, Index i, Index j, Positions query_positions,
                             Positions key_positions, TileRef<typename E::Scalar> tile) {
  typename E::Scalar;
  { e.heads() } -> std::convertible_to<Index>;
  { e.bias(head, i, j) } -> std::convertible_to<typename E::Scalar>;
  e.add_bias(head, query_positions, key_positions, tile);
};

/// Query-dependent relative terms (Shaw et al. 2018): the logit gets scale·q_i·a^K(j − i) and the
/// output gets Σ_j p_ij·a^V(j − i).
///
/// `add_relative_logits(head, qpos, kpos, scaled_queries, logits)` adds
/// scaled_queries.row(r)·a^K(kpos[c] − qpos[r]) to logits(r, c);
/// `add_relative_values(head, qpos, kpos, weights, output)` adds
/// Σ_c weights(r, c)·a^V(kpos[c] − qpos[r]) to output.row(r).
template <class E>
concept RelativeKeyValue = requires(const E& e, Index head, Positions query_positions,
                                    Positions key_positions, ConstTileRef<typename E::Scalar> in,
                                    TileRef<typename E::Scalar> out) {
  typename E::Scalar;
  e.add_relative_logits(head, query_positions, key_positions, in, out);
  e.add_relative_values(head, query_positions, key_positions, in, out);
};

/// Mixes the scaled logits of all heads at each (i, j) into the final scores (DAPE).
///
/// `mix(query_positions, key_positions, first_key, key_count, logits, scores)`:
/// `logits` is [heads, rows·K] (head h's rows × K tile row-major in row h) for the K =
/// key_positions.size() keys of the tile plus up to `key_halo()` neighbours on each side that
/// lie inside the sequence; keys outside the sequence are simply absent (zero padding).
/// `scores` is [heads, rows·key_count] for the keys [first_key, first_key + key_count) of
/// `key_positions`. The mixer adds its own bias: scores = A + B + f(A, B).
template <class E>
concept ScoreMixer = requires(const E& e, Positions query_positions, Positions key_positions,
                              Index first_key, Index key_count,
                              ConstTileRef<typename E::Scalar> logits,
                              TileRef<typename E::Scalar> scores) {
  typename E::Scalar;
  { e.heads() } -> std::convertible_to<Index>;
  { e.key_halo() } -> std::convertible_to<Index>;
  e.mix(query_positions, key_positions, first_key, key_count, logits, scores);
};

/// Plain attention with no positional information ("NoPE"): the baseline every encoder is
/// measured against. Models no stage.
struct NoPositionalEncoding {};

// ---------------------------------------------------------------------------------------------
// Optional hooks. An encoder may declare any of these next to the stages it models; consumers
// use them when present and a documented default otherwise.
// ---------------------------------------------------------------------------------------------

/// `validate(const AttentionShape&)`: rejects (std::invalid_argument) head counts or widths the
/// encoder was not built for, before any work. Called by every attention entry point.
template <class E>
concept HasValidate = requires(const E& e, const AttentionShape& shape) {
  e.validate(shape);
};

/// `double natural_scale() const`: the logit scale the encoder was trained with, used when the
/// caller sets none (T5: 1, since T5 folds 1/√d into its initialisation). Default 1/√(logit
/// width).
template <class E>
concept HasNaturalScale = requires(const E& e) {
  { e.natural_scale() } -> std::convertible_to<double>;
};

/// `Mask natural_mask() const`: the mask the encoder was built for, used when the caller sets
/// none (a bidirectional T5 bias: Mask::none(); a causal one: Mask::causal()). Default causal.
template <class E>
concept HasNaturalMask = requires(const E& e) {
  { e.natural_mask() } -> std::convertible_to<Mask>;
};

/// `static constexpr bool depends_only_on_distance = true;` on a ScoreBias: B_h(i, j) = b_h(i − j)
/// (ALiBi, KERPLE, T5). A consumer may then evaluate the bias once per distance of a tile instead
/// of once per entry (DAPE does).
template <class E>
concept DistanceBias = ScoreBias<E> && requires {
  requires E::depends_only_on_distance;
};

/// `bool keys_ignore_centre() const` on a QueryKeyTransform: true when transform_keys ignores the
/// kernel's `centre` argument (RoPE: always; XPos: with a fixed centre), so transformed keys may
/// be computed once and cached (KvCache does, when the encoder models no other stage).
template <class E>
concept DeclaresCentreFreeKeys = QueryKeyTransform<E> && requires(const E& e) {
  { e.keys_ignore_centre() } -> std::convertible_to<bool>;
};

// ---------------------------------------------------------------------------------------------
// The stage set: what every consumer asks.
// ---------------------------------------------------------------------------------------------

/// The five stages of the concepts above (README, "How an encoder reaches attention"), as bits of
/// a set.
enum class Stage : unsigned {
  absolute = 1u << 0,             // AbsoluteEncoding
  query_key_transform = 1u << 1,  // QueryKeyTransform
  score_bias = 1u << 2,           // ScoreBias
  relative_key_value = 1u << 3,   // RelativeKeyValue
  score_mixer = 1u << 4,          // ScoreMixer
};

/// The set of stages E models (0 for NoPositionalEncoding).
template <class E>
inline constexpr unsigned stages_of =
    (AbsoluteEncoding<E> ? static_cast<unsigned>(Stage::absolute) : 0u) |
    (QueryKeyTransform<E> ? static_cast<unsigned>(Stage::query_key_transform) : 0u) |
    (ScoreBias<E> ? static_cast<unsigned>(Stage::score_bias) : 0u) |
    (RelativeKeyValue<E> ? static_cast<unsigned>(Stage::relative_key_value) : 0u) |
    (ScoreMixer<E> ? static_cast<unsigned>(Stage::score_mixer) : 0u);

/// Whether E models stage S.
template <class E, Stage S>
inline constexpr bool models_stage = (stages_of<E> & static_cast<unsigned>(S)) != 0;

/// Whether E models no stage outside `Allowed` (NoPositionalEncoding models none).
template <class E, Stage... Allowed>
inline constexpr bool models_only = (stages_of<E> & ~(0u | ... | static_cast<unsigned>(Allowed))) ==
                                    0;

/// Anything the attention kernel accepts: NoPositionalEncoding or a type modelling at least one
/// attention stage (an AbsoluteEncoding alone acts before the projections, not in attention).
template <class E>
concept AttentionEncoder = std::copy_constructible<E> &&
    (std::same_as<E, NoPositionalEncoding> ||
     (stages_of<E> & ~static_cast<unsigned>(Stage::absolute)) != 0);

/// Compile-time rejection, with a message naming the stage, of an encoder that models a stage
/// outside `Allowed`: a consumer that can apply only some stages (linear attention: a
/// QueryKeyTransform) instantiates `RequireOnlyStages<Encoder, Allowed...>{}` so that a composed
/// encoder never loses a stage silently.
template <class E, Stage... Allowed>
struct RequireOnlyStages {
  static constexpr unsigned allowed = (0u | ... | static_cast<unsigned>(Allowed));
  static constexpr bool ok(Stage s) {
    return (stages_of<E> & static_cast<unsigned>(s)) == 0 ||
           (allowed & static_cast<unsigned>(s)) != 0;
  }
  static_assert(ok(Stage::score_bias),
                "posenc: the encoder models ScoreBias (an additive bias B(i, j) on the N x M "
                "logits), a stage this consumer cannot apply");
  static_assert(ok(Stage::relative_key_value),
                "posenc: the encoder models RelativeKeyValue (Shaw's q_i.a(j - i) logit and "
                "output terms), a stage this consumer cannot apply");
  static_assert(ok(Stage::score_mixer),
                "posenc: the encoder models ScoreMixer (a network over the logits of all heads), "
                "a stage this consumer cannot apply");
  static_assert(ok(Stage::query_key_transform),
                "posenc: the encoder models QueryKeyTransform, a stage this consumer cannot apply");
  static_assert(ok(Stage::absolute),
                "posenc: the encoder models AbsoluteEncoding (added to the embeddings before the "
                "projections), a stage this consumer cannot apply");
};

// ---------------------------------------------------------------------------------------------
// Gradients (training). An encoder with learnable parameters declares a gradient type with the
// layout of its parameters, and for each stage it models, the backward form next to the forward.
// The backward kernel (attention_backward) calls exactly the backward forms of the stages the
// encoder models, as the forward calls the stages.
// ---------------------------------------------------------------------------------------------

/// Learnable parameters: `typename E::Gradient`, a plain struct with one member per learnable
/// parameter, named and shaped like the parameter (so an optimiser walks both side by side);
/// `e.zero_gradient()` returns one filled with zeros; `g += other` sums two (the kernel keeps one
/// accumulator per task and sums them in task order at the end); `g.set_zero()` zeroes one in
/// place, keeping its storage (the kernel reuses its accumulators from call to call, so that a
/// training step allocates nothing).
template <class E>
concept HasLearnableParameters = requires(const E& e, typename E::Gradient& g,
                                          const typename E::Gradient& other) {
  { e.zero_gradient() } -> std::same_as<typename E::Gradient>;
  g += other;
  g.set_zero();
};

/// The backward form of a ScoreBias with learnable parameters:
/// `accumulate_bias_gradient(head, query_positions, key_positions, dbias, gradient)` adds
/// Σ_{r,c} dbias(r, c) · ∂B_h(query_positions[r], key_positions[c]) / ∂θ to the member of
/// `gradient` for every parameter θ. `dbias` is ∂L/∂B over the tile: from the kernel ∂L/∂logits,
/// zero where the mask forbids a key; from a mixer that reads B (DAPE V2's convolutions read
/// masked neighbours) possibly nonzero anywhere. A bias without learnable parameters (ALiBi)
/// needs no backward form: the kernel propagates ∂L/∂logits to q and k itself.
template <class E>
concept LearnableScoreBias = ScoreBias<E> && HasLearnableParameters<E> &&
    requires(const E& e, Index head, Positions query_positions, Positions key_positions,
             ConstTileRef<typename E::Scalar> dbias, typename E::Gradient& gradient) {
  e.accumulate_bias_gradient(head, query_positions, key_positions, dbias, gradient);
};

/// The backward form of a QueryKeyTransform: `transform_queries_backward(head, positions, centre,
/// in, dout, din)` writes din = J(in)ᵀ·dout row by row, the gradient with respect to the rows
/// `in` that transform_queries(head, positions, centre, in, out) maps to out, given dout =
/// ∂L/∂out (din has in's width, dout the transformed width); likewise transform_keys_backward.
/// A transform with learnable parameters also has overloads taking a trailing `gradient` to
/// which it adds the parameters' share.
template <class E>
concept DifferentiableTransform = QueryKeyTransform<E> &&
    requires(const E& e, Index head, Positions positions, Index centre,
             ConstTileRef<typename E::Scalar> in, ConstTileRef<typename E::Scalar> dout,
             TileRef<typename E::Scalar> din) {
  e.transform_queries_backward(head, positions, centre, in, dout, din);
  e.transform_keys_backward(head, positions, centre, in, dout, din);
};

/// A DifferentiableTransform with learnable parameters (SPE's filters and gate):
/// `transform_queries_backward(head, positions, centre, in, dout, din, gradient)` writes din as
/// above and adds Σ_rows dout·∂out/∂θ to `gradient` for every parameter θ; likewise for keys.
/// The kernel calls these overloads (and only these) when the encoder has learnable parameters.
template <class E>
concept LearnableTransform = DifferentiableTransform<E> && HasLearnableParameters<E> &&
    requires(const E& e, Index head, Positions positions, Index centre,
             ConstTileRef<typename E::Scalar> in, ConstTileRef<typename E::Scalar> dout,
             TileRef<typename E::Scalar> din, typename E::Gradient& gradient) {
  e.transform_queries_backward(head, positions, centre, in, dout, din, gradient);
  e.transform_keys_backward(head, positions, centre, in, dout, din, gradient);
};

/// The backward form of a RelativeKeyValue stage (Shaw), for a tile with dout = ∂L/∂out rows and
/// dscores = ∂L/∂logits:
///   add_relative_value_scores(head, qpos, kpos, dout, dscores): dscores(r, c) += dout_r·a^V(c, r),
///     the output term's share of ∂L/∂p;
///   add_relative_query_gradient(head, qpos, kpos, dscores, dqueries): dqueries_r +=
///     Σ_c dscores(r, c)·a^K(c, r), the logit term's share of ∂L/∂(scaled queries);
///   accumulate_relative_gradient(head, qpos, kpos, scaled_queries, dscores, weights, dout,
///     gradient): the tables' gradients.
template <class E>
concept DifferentiableRelativeKeyValue = RelativeKeyValue<E> && HasLearnableParameters<E> &&
    requires(const E& e, Index head, Positions query_positions, Positions key_positions,
             ConstTileRef<typename E::Scalar> in, TileRef<typename E::Scalar> out,
             typename E::Gradient& gradient) {
  e.add_relative_value_scores(head, query_positions, key_positions, in, out);
  e.add_relative_query_gradient(head, query_positions, key_positions, in, out);
  e.accumulate_relative_gradient(head, query_positions, key_positions, in, in, in, in, gradient);
};

/// The backward form of a ScoreMixer (DAPE), with the arguments of mix:
/// `mix_backward(query_positions, key_positions, first_key, key_count, logits, dscores, dlogits,
/// gradient)` takes dscores = ∂L/∂scores [heads, rows·key_count] (zero where the mask forbids a
/// key), writes dlogits = ∂L/∂logits [heads, rows·K] at all K keys of `logits` and adds the
/// parameters' share (its network's and its own bias's) to `gradient`; the overload without
/// `gradient` writes dlogits only. A logit reaches the scores of up to key_halo() keys on each
/// side, so with a halo dlogits is the share of this call's scores: the kernel sums the shares of
/// every call whose scores a key's logit reaches.
template <class E>
concept DifferentiableScoreMixer = ScoreMixer<E> && HasLearnableParameters<E> &&
    requires(const E& e, Positions query_positions, Positions key_positions, Index first_key,
             Index key_count, ConstTileRef<typename E::Scalar> logits,
             ConstTileRef<typename E::Scalar> dscores, TileRef<typename E::Scalar> dlogits,
             typename E::Gradient& gradient) {
  e.mix_backward(query_positions, key_positions, first_key, key_count, logits, dscores, dlogits);
  e.mix_backward(query_positions, key_positions, first_key, key_count, logits, dscores, dlogits,
                 gradient);
};

/// The backward form of an AbsoluteEncoding with learnable parameters (a learned table):
/// `accumulate_gradient(dx, first_position, gradient)` adds the parameters' share of ∂L/∂x for
/// rows added by add_to(x, first_position) (∂L/∂x itself passes through the addition unchanged).
template <class E>
concept LearnableAbsoluteEncoding = AbsoluteEncoding<E> && HasLearnableParameters<E> &&
    requires(const E& e, ConstTileRef<typename E::Scalar> dx, Index first_position,
             typename E::Gradient& gradient) {
  e.accumulate_gradient(dx, first_position, gradient);
};

/// The gradient of an encoder without learnable parameters: empty.
struct NoGradient {
  NoGradient& operator+=(const NoGradient&) { return *this; }
  void set_zero() {}
};

/// E::Gradient for an encoder with learnable parameters, else NoGradient.
template <class E>
struct encoder_gradient {
  using type = NoGradient;
};
template <HasLearnableParameters E>
struct encoder_gradient<E> {
  using type = typename E::Gradient;
};
template <class E>
using encoder_gradient_t = typename encoder_gradient<E>::type;

namespace detail {

/// The width of q and k after E's QueryKeyTransform (dim when it has none).
template <class E>
Index transformed_width(const E& encoder, Index dim) {
  if constexpr (QueryKeyTransform<E>) {
    return static_cast<Index>(encoder.transformed_dim(dim));
  } else {
    (void)encoder;
    return dim;
  }
}

/// Scalar type of an encoder, or void for scalar-agnostic encoders such as NoPE.
template <class E>
struct encoder_scalar {
  using type = void;
};
template <class E>
requires requires { typename E::Scalar; }
struct encoder_scalar<E> {
  using type = typename E::Scalar;
};

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Feature maps of linear attention (posenc/feature_maps.hpp has EluPlusOne, ReluPlusEpsilon and
// Favor; linear_attention.hpp consumes them).
// ---------------------------------------------------------------------------------------------

/// A positive feature map φ for linear attention: `feature_dim(D)` is F, and `features(x, out)`
/// writes φ of each row of x (rows × D) to out (rows × F), out resized by the caller.
/// φ(q)·φ(k) then stands for exp(q·k) (up to a constant).
template <class M, class Scalar>
concept FeatureMap = std::copy_constructible<M> &&
    requires(const M& m, Index dim, const Matrix<Scalar>& x, Matrix<Scalar>& out) {
  { m.feature_dim(dim) } -> std::convertible_to<Index>;
  m.features(x, out);
};

/// Optional hook of a feature map whose features are exponentials that overflow unless
/// stabilised (Performer's FAVOR+): instead of `features`, linear attention then calls
///
///   query_features(x, out)              φ(x) of query rows, each stabilised by its own maximum;
///   key_exponentials(x, out, row_max)   exp(ωᵢ·x' − |x'|²/2 − m_r) with m_r written to row_max[r]
///
/// and assembles the key features φ(k) = ratio()·(out·exp(m_r − c) + stabilizer()) with one
/// shared stabiliser c per sum (the largest m_r so far), rescaling its running state when c grows.
template <class M, class Scalar>
concept StabilizedFeatureMap = FeatureMap<M, Scalar> &&
    requires(const M& m, const Matrix<Scalar>& x, Matrix<Scalar>& out, Vector<Scalar>& row_max) {
  m.query_features(x, out);
  m.key_exponentials(x, out, row_max);
  { m.ratio() } -> std::convertible_to<Scalar>;
  { m.stabilizer() } -> std::convertible_to<double>;
};

/// Optional hook of a feature map: `validate(fn, width, after_transform)` throws
/// std::invalid_argument (message starting with `fn`) when the map cannot take inputs of this
/// width or its own parameters are invalid; `after_transform` says the width is that of q and k
/// after the encoder's QueryKeyTransform. Called by linear attention before any work.
template <class M>
concept ValidatedFeatureMap = requires(const M& m, const char* fn, Index width, bool transformed) {
  m.validate(fn, width, transformed);
};

/// The backward hook of a feature map (linear_attention_backward needs it):
/// `features_backward(x, dfeatures, dx)` writes dx = J_φ(x)ᵀ·dfeatures row by row, the gradient
/// with respect to the rows x (rows × D) given dfeatures = ∂L/∂φ(x) (rows × F); dx is sized
/// rows × D by the caller and aliases neither argument.
template <class M, class Scalar>
concept DifferentiableFeatureMap = FeatureMap<M, Scalar> &&
    requires(const M& m, const Matrix<Scalar>& x, const Matrix<Scalar>& dfeatures,
             Matrix<Scalar>& dx) {
  m.features_backward(x, dfeatures, dx);
};

/// The backward hooks of a StabilizedFeatureMap, one per forward hook:
/// `query_features_backward(x, dfeatures, dx)` is the backward of query_features (its own row
/// maximum included), `key_exponentials_backward(x, dexponentials, drow_max, dx)` that of
/// key_exponentials given the gradients of both its outputs. Linear attention differentiates
/// what it assembles itself (ratio, stabilizer, the shared stabiliser c and the key it comes from).
template <class M, class Scalar>
concept DifferentiableStabilizedFeatureMap = StabilizedFeatureMap<M, Scalar> &&
    requires(const M& m, const Matrix<Scalar>& x, const Matrix<Scalar>& dfeatures,
             const Vector<Scalar>& drow_max, Matrix<Scalar>& dx) {
  m.query_features_backward(x, dfeatures, dx);
  m.key_exponentials_backward(x, dfeatures, drow_max, dx);
};

}  // namespace posenc
