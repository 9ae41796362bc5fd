// SPDX-License-Identifier: MIT
// compose(a, b, …): one encoder that models every stage its parts model, so that encodings of
// different stages stack (a query/key transform with a bias) and biases add up.
#pragma once

#include <type_traits>
#include <utility>

#include "posenc/detail/check.hpp"
#include "posenc/encoding.hpp"
#include "posenc/tensor.hpp"

namespace posenc {

namespace detail {

template <class E>
concept HasHeads = models_stage<E, Stage::score_bias> || models_stage<E, Stage::score_mixer>;

/// The Scalar of a composition: the parts' common Scalar (a part without one, such as
/// NoPositionalEncoding, defers to the other).
template <class A, class B>
struct composed_scalar {
  using SA = typename encoder_scalar<A>::type;
  using SB = typename encoder_scalar<B>::type;
  static_assert(std::is_void_v<SA> || std::is_void_v<SB> || std::is_same_v<SA, SB>,
                "posenc::compose: the encoders have different Scalar types (float vs double); "
                "build both for the scalar of q, k, v");
  static_assert(!(std::is_void_v<SA> && std::is_void_v<SB>),
                "posenc::compose: neither encoder has a Scalar; there is nothing to compose");
  using type = std::conditional_t<std::is_void_v<SA>, SB, SA>;
};

}  // namespace detail

/// The composition of two encoders A (first) and B (second), built by `compose`. It models the
/// union of their stages by forwarding:
///
///   QueryKeyTransform   A then B (B transforms A's output; widths chain)
///   ScoreBias           the biases add: bias = bias_A + bias_B
///   RelativeKeyValue    both terms add
///   ScoreMixer          forwarded (at most one part may be a mixer)
///   AbsoluteEncoding    both add to the embeddings
///   validate(shape)     forwarded to each part with the widths that part sees: a transform its
///                       input width, every other stage the final logit width
///   natural_scale/mask  forwarded from the part that declares one (both: they must agree)
///
/// Parts that model heads (biases, mixers) must agree on the head count (checked on
/// construction); the Scalar types must agree (checked at compile time). Nesting composes more
/// than two: compose(a, b, c) is Composed<Composed<A, B>, C>.
template <class A, class B>
class Composed {
  static_assert(!(ScoreMixer<A> && ScoreMixer<B>),
                "posenc::compose: two ScoreMixers cannot be composed (each produces the final "
                "scores from the logits)");

  // The stages of the composition: the union of the parts' (encoding.hpp's stage set).
  static constexpr unsigned stages = stages_of<A> | stages_of<B>;
  static constexpr bool transforms =
      (stages & static_cast<unsigned>(Stage::query_key_transform)) != 0;
  static constexpr bool biases = (stages & static_cast<unsigned>(Stage::score_bias)) != 0;
  static constexpr bool relative = (stages & static_cast<unsigned>(Stage::relative_key_value)) != 0;
  static constexpr bool mixes = (stages & static_cast<unsigned>(Stage::score_mixer)) != 0;
  static constexpr bool absolute = (stages & static_cast<unsigned>(Stage::absolute)) != 0;
  static constexpr bool has_heads = detail::HasHeads<A> || detail::HasHeads<B>;
  // Whether every part's transform / relative stage has its backward form.
  static constexpr bool transforms_differentiable =
      (!QueryKeyTransform<A> || DifferentiableTransform<A>)&&(!QueryKeyTransform<B> ||
                                                              DifferentiableTransform<B>);
  static constexpr bool relative_differentiable =
      (!RelativeKeyValue<A> || DifferentiableRelativeKeyValue<A>)&&(
          !RelativeKeyValue<B> || DifferentiableRelativeKeyValue<B>);
  // With a learnable part anywhere, the backward forms take the composed gradient (each part gets
  // its own member; a part without parameters ignores its NoGradient).
  static constexpr bool learnable = HasLearnableParameters<A> || HasLearnableParameters<B>;

 public:
  using Scalar = typename detail::composed_scalar<A, B>::type;

  /// Throws std::invalid_argument when both parts model heads and their counts differ.
  Composed(A first, B second) : first_(std::move(first)), second_(std::move(second)) {
    if constexpr (detail::HasHeads<A> && detail::HasHeads<B>) {
      detail::require(static_cast<Index>(first_.heads()) == static_cast<Index>(second_.heads()),
                      "posenc::compose", "the first encoder has ", first_.heads(),
                      " heads but the second has ", second_.heads());
    }
    if constexpr (HasNaturalScale<A> && HasNaturalScale<B>) {
      detail::require(static_cast<double>(first_.natural_scale()) ==
                          static_cast<double>(second_.natural_scale()),
                      "posenc::compose", "the parts' natural scales differ (",
                      first_.natural_scale(), " and ", second_.natural_scale(),
                      "); pass AttentionOptions::scale");
    }
    if constexpr (HasNaturalMask<A> && HasNaturalMask<B>) {
      detail::require(first_.natural_mask() == second_.natural_mask(), "posenc::compose",
                      "the parts' natural masks differ; pass AttentionOptions::mask");
    }
  }

  const A& first() const { return first_; }
  const B& second() const { return second_; }

  // --- QueryKeyTransform ---------------------------------------------------------------------

  Index transformed_dim(Index dim) const requires transforms {
    return second_width(first_width(dim));
  }

  void transform_queries(Index head, Positions positions, Index centre, ConstTileRef<Scalar> in,
                         TileRef<Scalar> out) const requires transforms {
    transform(head, positions, centre, in, out, /*queries=*/true);
  }

  void transform_keys(Index head, Positions positions, Index centre, ConstTileRef<Scalar> in,
                      TileRef<Scalar> out) const requires transforms {
    transform(head, positions, centre, in, out, /*queries=*/false);
  }

  // --- ScoreBias and ScoreMixer --------------------------------------------------------------

  Index heads() const requires has_heads {
    if constexpr (detail::HasHeads<A>) {
      return static_cast<Index>(first_.heads());
    } else {
      return static_cast<Index>(second_.heads());
    }
  }

  Scalar bias(Index head, Index i, Index j) const requires biases {
    Scalar sum = Scalar(0);
    if constexpr (ScoreBias<A>) sum += static_cast<Scalar>(first_.bias(head, i, j));
    if constexpr (ScoreBias<B>) sum += static_cast<Scalar>(second_.bias(head, i, j));
    return sum;
  }

  void add_bias(Index head, Positions query_positions, Positions key_positions,
                TileRef<Scalar> tile) const requires biases {
    if constexpr (ScoreBias<A>) first_.add_bias(head, query_positions, key_positions, tile);
    if constexpr (ScoreBias<B>) second_.add_bias(head, query_positions, key_positions, tile);
  }

  // --- RelativeKeyValue ----------------------------------------------------------------------

  void add_relative_logits(Index head, Positions query_positions, Positions key_positions,
                           ConstTileRef<Scalar> scaled_queries,
                           TileRef<Scalar> logits) const requires relative {
    if constexpr (RelativeKeyValue<A>) {
      first_.add_relative_logits(head, query_positions, key_positions, scaled_queries, logits);
    }
    if constexpr (RelativeKeyValue<B>) {
      second_.add_relative_logits(head, query_positions, key_positions, scaled_queries, logits);
    }
  }

  void add_relative_values(Index head, Positions query_positions, Positions key_positions,
                           ConstTileRef<Scalar> weights,
                           TileRef<Scalar> output) const requires relative {
    if constexpr (RelativeKeyValue<A>) {
      first_.add_relative_values(head, query_positions, key_positions, weights, output);
    }
    if constexpr (RelativeKeyValue<B>) {
      second_.add_relative_values(head, query_positions, key_positions, weights, output);
    }
  }

  // --- ScoreMixer ----------------------------------------------------------------------------

  Index key_halo() const requires mixes { return static_cast<Index>(mixer().key_halo()); }

  void mix(Positions query_positions, Positions key_positions, Index first_key, Index key_count,
           ConstTileRef<Scalar> logits, TileRef<Scalar> scores) const requires mixes {
    mixer().mix(query_positions, key_positions, first_key, key_count, logits, scores);
  }

  // --- AbsoluteEncoding ----------------------------------------------------------------------

  void add_to(TileRef<Scalar> x, Index first_position) const requires absolute {
    if constexpr (AbsoluteEncoding<A>) first_.add_to(x, first_position);
    if constexpr (AbsoluteEncoding<B>) second_.add_to(x, first_position);
  }

  // --- Gradients (attention_backward) -------------------------------------------------------
  // The gradient of a composition holds the parts' gradients (NoGradient for a part without
  // learnable parameters); each backward form forwards to the parts that model the stage, as the
  // forward does, and a chained transform back-propagates through B, then A.

  struct Gradient {
    encoder_gradient_t<A> first;
    encoder_gradient_t<B> second;
    Gradient& operator+=(const Gradient& other) {
      first += other.first;
      second += other.second;
      return *this;
    }
    void set_zero() {
      first.set_zero();
      second.set_zero();
    }
  };

  Gradient zero_gradient() const requires learnable { return {zero_of(first_), zero_of(second_)}; }

  void accumulate_bias_gradient(Index head, Positions query_positions, Positions key_positions,
                                ConstTileRef<Scalar> dbias, Gradient& gradient) const
      requires(biases&& learnable) {
    if constexpr (LearnableScoreBias<A>) {
      first_.accumulate_bias_gradient(head, query_positions, key_positions, dbias, gradient.first);
    }
    if constexpr (LearnableScoreBias<B>) {
      second_.accumulate_bias_gradient(head, query_positions, key_positions, dbias,
                                       gradient.second);
    }
  }

  void transform_queries_backward(Index head, Positions positions, Index centre,
                                  ConstTileRef<Scalar> in, ConstTileRef<Scalar> dout,
                                  TileRef<Scalar> din) const
      requires(transforms&& transforms_differentiable && !learnable) {
    NoGradient none;
    transform_backward(head, positions, centre, in, dout, din, true, none, none);
  }
  void transform_keys_backward(Index head, Positions positions, Index centre,
                               ConstTileRef<Scalar> in, ConstTileRef<Scalar> dout,
                               TileRef<Scalar> din) const
      requires(transforms&& transforms_differentiable && !learnable) {
    NoGradient none;
    transform_backward(head, positions, centre, in, dout, din, false, none, none);
  }
  void transform_queries_backward(Index head, Positions positions, Index centre,
                                  ConstTileRef<Scalar> in, ConstTileRef<Scalar> dout,
                                  TileRef<Scalar> din, Gradient& gradient) const
      requires(transforms&& transforms_differentiable&& learnable) {
    transform_backward(head, positions, centre, in, dout, din, true, gradient.first,
                       gradient.second);
  }
  void transform_keys_backward(Index head, Positions positions, Index centre,
                               ConstTileRef<Scalar> in, ConstTileRef<Scalar> dout,
                               TileRef<Scalar> din, Gradient& gradient) const
      requires(transforms&& transforms_differentiable&& learnable) {
    transform_backward(head, positions, centre, in, dout, din, false, gradient.first,
                       gradient.second);
  }

  void add_relative_value_scores(Index head, Positions query_positions, Positions key_positions,
                                 ConstTileRef<Scalar> dout, TileRef<Scalar> dscores) const
      requires(relative&& relative_differentiable) {
    if constexpr (RelativeKeyValue<A>) {
      first_.add_relative_value_scores(head, query_positions, key_positions, dout, dscores);
    }
    if constexpr (RelativeKeyValue<B>) {
      second_.add_relative_value_scores(head, query_positions, key_positions, dout, dscores);
    }
  }
  void add_relative_query_gradient(Index head, Positions query_positions, Positions key_positions,
                                   ConstTileRef<Scalar> dscores, TileRef<Scalar> dqueries) const
      requires(relative&& relative_differentiable) {
    if constexpr (RelativeKeyValue<A>) {
      first_.add_relative_query_gradient(head, query_positions, key_positions, dscores, dqueries);
    }
    if constexpr (RelativeKeyValue<B>) {
      second_.add_relative_query_gradient(head, query_positions, key_positions, dscores, dqueries);
    }
  }
  void accumulate_relative_gradient(Index head, Positions query_positions, Positions key_positions,
                                    ConstTileRef<Scalar> scaled_queries,
                                    ConstTileRef<Scalar> dscores, ConstTileRef<Scalar> weights,
                                    ConstTileRef<Scalar> dout, Gradient& gradient) const
      requires(relative&& relative_differentiable) {
    if constexpr (RelativeKeyValue<A>) {
      first_.accumulate_relative_gradient(head, query_positions, key_positions, scaled_queries,
                                          dscores, weights, dout, gradient.first);
    }
    if constexpr (RelativeKeyValue<B>) {
      second_.accumulate_relative_gradient(head, query_positions, key_positions, scaled_queries,
                                           dscores, weights, dout, gradient.second);
    }
  }

  // --- natural scale and mask (optional hooks of either part) ---------------------------------

  /// The part's natural scale (both parts declaring one must agree: checked on construction).
  double natural_scale() const requires(HasNaturalScale<A> || HasNaturalScale<B>) {
    if constexpr (HasNaturalScale<A>) {
      return static_cast<double>(first_.natural_scale());
    } else {
      return static_cast<double>(second_.natural_scale());
    }
  }
  /// The part's natural mask (both parts declaring one must agree: checked on construction).
  Mask natural_mask() const requires(HasNaturalMask<A> || HasNaturalMask<B>) {
    if constexpr (HasNaturalMask<A>) {
      return first_.natural_mask();
    } else {
      return second_.natural_mask();
    }
  }

  // --- validate ------------------------------------------------------------------------------

  void validate(const AttentionShape& shape) const {
    AttentionShape at_logits = shape;
    at_logits.query_dim = second_width(first_width(shape.query_dim));
    if constexpr (HasValidate<A>) {
      first_.validate(QueryKeyTransform<A> ? shape : at_logits);
    }
    if constexpr (HasValidate<B>) {
      AttentionShape after_first = shape;
      after_first.query_dim = first_width(shape.query_dim);
      second_.validate(QueryKeyTransform<B> ? after_first : at_logits);
    }
  }

 private:
  Index first_width(Index dim) const {
    if constexpr (QueryKeyTransform<A>) {
      return static_cast<Index>(first_.transformed_dim(dim));
    } else {
      return dim;
    }
  }

  Index second_width(Index dim) const {
    if constexpr (QueryKeyTransform<B>) {
      return static_cast<Index>(second_.transformed_dim(dim));
    } else {
      return dim;
    }
  }

  const auto& mixer() const {
    if constexpr (ScoreMixer<A>) {
      return first_;
    } else {
      return second_;
    }
  }

  template <class E>
  static encoder_gradient_t<E> zero_of(const E& e) {
    if constexpr (HasLearnableParameters<E>) {
      return e.zero_gradient();
    } else {
      (void)e;
      return {};
    }
  }

  /// din = T_Eᵀ(dout) for part e (and its parameter share when it has learnable parameters).
  template <class E, class G>
  static void transform_backward_one(const E& e, Index head, Positions positions, Index centre,
                                     ConstTileRef<Scalar> in, ConstTileRef<Scalar> dout,
                                     TileRef<Scalar> din, bool queries, G& gradient) {
    if constexpr (LearnableTransform<E>) {
      if (queries) {
        e.transform_queries_backward(head, positions, centre, in, dout, din, gradient);
      } else {
        e.transform_keys_backward(head, positions, centre, in, dout, din, gradient);
      }
    } else {
      (void)gradient;
      if (queries) {
        e.transform_queries_backward(head, positions, centre, in, dout, din);
      } else {
        e.transform_keys_backward(head, positions, centre, in, dout, din);
      }
    }
  }

  /// Backward of transform(): B's backward at A's output, then A's.
  template <class GA, class GB>
  void transform_backward(Index head, Positions positions, Index centre, ConstTileRef<Scalar> in,
                          ConstTileRef<Scalar> dout, TileRef<Scalar> din, bool queries,
                          GA& gradient_a, GB& gradient_b) const {
    if constexpr (QueryKeyTransform<A> && QueryKeyTransform<B>) {
      const Index middle = first_width(in.cols());
      Matrix<Scalar> between(in.rows(), middle);
      transform_one(first_, head, positions, centre, in, between, queries);
      Matrix<Scalar> dbetween(in.rows(), middle);
      transform_backward_one(second_, head, positions, centre, between, dout, dbetween, queries,
                             gradient_b);
      transform_backward_one(first_, head, positions, centre, in, dbetween, din, queries,
                             gradient_a);
    } else if constexpr (QueryKeyTransform<A>) {
      (void)gradient_b;
      transform_backward_one(first_, head, positions, centre, in, dout, din, queries, gradient_a);
    } else {
      (void)gradient_a;
      transform_backward_one(second_, head, positions, centre, in, dout, din, queries, gradient_b);
    }
  }

  template <class E>
  static void transform_one(const E& e, Index head, Positions positions, Index centre,
                            ConstTileRef<Scalar> in, TileRef<Scalar> out, bool queries) {
    if (queries) {
      e.transform_queries(head, positions, centre, in, out);
    } else {
      e.transform_keys(head, positions, centre, in, out);
    }
  }

  void transform(Index head, Positions positions, Index centre, ConstTileRef<Scalar> in,
                 TileRef<Scalar> out, bool queries) const {
    if constexpr (QueryKeyTransform<A> && QueryKeyTransform<B>) {
      const Index middle = first_width(in.cols());
      if (middle == out.cols()) {
        // A writes straight into `out`; B then transforms it in place (its width is unchanged).
        transform_one(first_, head, positions, centre, in, out, queries);
        transform_one(second_, head, positions, centre, out, out, queries);
      } else {
        Matrix<Scalar> between(in.rows(), middle);
        transform_one(first_, head, positions, centre, in, between, queries);
        transform_one(second_, head, positions, centre, between, out, queries);
      }
    } else if constexpr (QueryKeyTransform<A>) {
      transform_one(first_, head, positions, centre, in, out, queries);
    } else {
      transform_one(second_, head, positions, centre, in, out, queries);
    }
  }

  A first_;
  B second_;
};

/// One encoder modelling the stages of all its arguments (see Composed): e.g.
/// compose(RotaryEncoding<float>(64), Alibi<float>(8)), or two biases that add. Throws
/// std::invalid_argument when parts with heads disagree on the head count.
template <class A, class B, class... Rest>
auto compose(A a, B b, Rest... rest) {
  if constexpr (sizeof...(Rest) == 0) {
    return Composed<A, B>(std::move(a), std::move(b));
  } else {
    return compose(Composed<A, B>(std::move(a), std::move(b)), std::move(rest)...);
  }
}

}  // namespace posenc
