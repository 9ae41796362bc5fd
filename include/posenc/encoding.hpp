// SPDX-License-Identifier: MIT
// The five stage concepts an encoder may model (DESIGN.md §1) and NoPositionalEncoding.
// The attention kernel asks at compile time which stages an encoder models and calls only those;
// a new encoder is a new type, never a change to the kernel.
#pragma once

#include <concepts>
#include <span>

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

/// A ScoreBias that depends on the positions only through their difference: B_h(i, j) = b_h(i − j)
/// (ALiBi, KERPLE, T5). Declared with `static constexpr bool depends_only_on_distance = true;`.
/// A consumer may then evaluate the bias once per distance of a tile instead of once per entry
/// (DAPE does).
template <class E>
concept DistanceBias = ScoreBias<E> && requires {
  requires E::depends_only_on_distance;
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

/// Anything the attention kernel accepts: NoPositionalEncoding or a type modelling at least one
/// attention stage.
template <class E>
concept AttentionEncoder = std::copy_constructible<E> &&
    (std::same_as<E, NoPositionalEncoding> || QueryKeyTransform<E> || ScoreBias<E> ||
     RelativeKeyValue<E> || ScoreMixer<E>);

namespace detail {

template <class E>
concept HasValidate = requires(const E& e, const AttentionShape& shape) {
  e.validate(shape);
};

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

}  // namespace posenc
