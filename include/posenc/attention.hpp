// SPDX-License-Identifier: MIT
// Softmax attention with any encoder: the streaming kernel (`attention`, `attention_partial`,
// extra memory O(tile)), split-KV partials and their merge, and the materialising oracle it is
// tested against (`attention_reference`, `attention_weights`, `attention_scores`). The engine
// behind these faces lives in posenc/kernel/.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <utility>
#include <vector>

#include "posenc/attention_map.hpp"
#include "posenc/attention_options.hpp"
#include "posenc/detail/check.hpp"
#include "posenc/encoding.hpp"
#include "posenc/kernel/problem.hpp"
#include "posenc/kernel/reference.hpp"
#include "posenc/kernel/stream.hpp"
#include "posenc/mask.hpp"
#include "posenc/tensor.hpp"

namespace posenc {

namespace detail {

/// Throws unless row_max and row_sum of `partial` are [heads, rows] of its output.
template <class Partial>
void require_partial_shape(const char* fn, const char* name, const Partial& partial) {
  const Index heads = partial.output.heads();
  const Index rows = partial.output.rows();
  require(partial.row_max.rows() == heads && partial.row_max.cols() == rows &&
              partial.row_sum.rows() == heads && partial.row_sum.cols() == rows,
          fn, name, ".row_max and ", name, ".row_sum must be [heads, rows] = [", heads, ", ", rows,
          "] like its output, got [", partial.row_max.rows(), ", ", partial.row_max.cols(),
          "] and [", partial.row_sum.rows(), ", ", partial.row_sum.cols(), "]");
}

/// A zero AttentionMap over the positions and mask of problem `p`.
template <class Scalar>
AttentionMap<Scalar> empty_attention_map(const kernel::AttentionProblem<Scalar>& p) {
  std::vector<Index> queries(static_cast<std::size_t>(p.queries));
  std::vector<Index> keys(static_cast<std::size_t>(p.keys));
  for (Index r = 0; r < p.queries; ++r) queries[static_cast<std::size_t>(r)] = p.query_position(r);
  for (Index c = 0; c < p.keys; ++c) keys[static_cast<std::size_t>(c)] = p.key_position(c);
  return AttentionMap<Scalar>(p.heads, std::move(queries), std::move(keys), p.mask);
}

}  // namespace detail

/// Attention over a subset of the keys, before normalisation, so that pieces computed
/// separately (threads, processes, machines) combine exactly with merge_partials.
/// For query row i of head h, over the allowed keys j of the subset:
///   row_max = max_j s_ij, row_sum = Σ_j exp(s_ij − row_max), output = Σ_j exp(s_ij − row_max)·v_j.
/// A row with no allowed key in the subset: row_max = −inf, row_sum = 0, output 0. Non-finite
/// scores give what the formulas give in IEEE arithmetic (README, "Non-finite values"): a NaN
/// score gives row_max = NaN, row_sum and output NaN; allowed keys that all score −inf give
/// row_max = −inf, row_sum = NaN (exp(−inf − (−inf))) and output Σ_j 0·v_j (NaN exactly in the
/// columns where such a key has a non-finite value), so that a merge with a side holding finite
/// scores still carries 0·Inf = NaN into those columns, as one pass gives.
template <class Scalar>
struct AttentionPartial {
  Heads<Scalar> output;    // [H, N, Dv], unnormalised
  Matrix<Scalar> row_max;  // [H, N]
  Matrix<Scalar> row_sum;  // [H, N]

  /// The attention output output / row_sum: zero for rows with no allowed key (row_sum 0), NaN
  /// where row_sum is NaN. Throws when row_max or row_sum is not [heads, rows].
  Heads<Scalar> normalized() const {
    detail::require_partial_shape("posenc::AttentionPartial::normalized", "this", *this);
    Heads<Scalar> result(output.heads(), output.rows(), output.dim());
    for (Index h = 0; h < output.heads(); ++h) {
      for (Index r = 0; r < output.rows(); ++r) {
        const Scalar sum = row_sum(h, r);
        if (sum == Scalar(0)) {
          result.head(h).row(r).setZero();
        } else {
          result.head(h).row(r) = output.head(h).row(r) / sum;
        }
      }
    }
    return result;
  }
};

/// Combines the partials of two disjoint key subsets into the partial of their union (exact up
/// to rounding: the online-softmax rescaling; the same in either argument order). A NaN row_max
/// makes the merged row NaN; a subset whose row_max is −inf adds nothing unless neither subset
/// has a larger score (its weight exp(−inf − max) is 0). Throws when the shapes differ.
template <class Scalar>
AttentionPartial<Scalar> merge_partials(const AttentionPartial<Scalar>& a,
                                        const AttentionPartial<Scalar>& b) {
  constexpr const char* fn = "posenc::merge_partials";
  detail::require(a.output.heads() == b.output.heads() && a.output.rows() == b.output.rows() &&
                      a.output.dim() == b.output.dim(),
                  fn, "outputs have shapes [", a.output.heads(), ", ", a.output.rows(), ", ",
                  a.output.dim(), "] and [", b.output.heads(), ", ", b.output.rows(), ", ",
                  b.output.dim(), "]");
  detail::require_partial_shape(fn, "a", a);
  detail::require_partial_shape(fn, "b", b);
  AttentionPartial<Scalar> merged{Heads<Scalar>(a.output.heads(), a.output.rows(), a.output.dim()),
                                  Matrix<Scalar>(a.row_max.rows(), a.row_max.cols()),
                                  Matrix<Scalar>(a.row_max.rows(), a.row_max.cols())};
  constexpr Scalar minus_infinity = -std::numeric_limits<Scalar>::infinity();
  constexpr Scalar nan = std::numeric_limits<Scalar>::quiet_NaN();
  for (Index h = 0; h < a.output.heads(); ++h) {
    for (Index r = 0; r < a.output.rows(); ++r) {
      const Scalar ma = a.row_max(h, r);
      const Scalar mb = b.row_max(h, r);
      auto out = merged.output.head(h).row(r);
      if (std::isnan(ma) || std::isnan(mb)) {  // a NaN score reached this row
        merged.row_max(h, r) = nan;
        merged.row_sum(h, r) = nan;
        out.setConstant(nan);
        continue;
      }
      const Scalar m = std::max(ma, mb);
      merged.row_max(h, r) = m;
      if (m == minus_infinity) {  // no finite score on either side: 0 (nothing) or NaN
        merged.row_sum(h, r) = a.row_sum(h, r) + b.row_sum(h, r);
        out = a.output.head(h).row(r) + b.output.head(h).row(r);
        continue;
      }
      // The side with the larger max first (weight 1), so that the result does not depend on the
      // argument order, with or without fused multiply-adds. A side whose max is −inf has weight
      // exp(−inf − m) = 0 for every key: it adds nothing.
      const bool a_first = ma >= mb;
      const AttentionPartial<Scalar>& hi = a_first ? a : b;
      const AttentionPartial<Scalar>& lo = a_first ? b : a;
      const Scalar m_lo = a_first ? mb : ma;
      merged.row_sum(h, r) = hi.row_sum(h, r);
      out = hi.output.head(h).row(r);
      if (m_lo != minus_infinity) {
        const Scalar w = std::exp(m_lo - m);
        merged.row_sum(h, r) += w * lo.row_sum(h, r);
        out += w * lo.output.head(h).row(r);
      } else {
        // Weight 0: nothing, except 0 · v of keys with a non-finite value (NaN in those columns).
        out += Scalar(0) * lo.output.head(h).row(r);
      }
    }
  }
  return merged;
}

// ---------------------------------------------------------------------------------------------
// Public entry points. q: [H, N, D], k: [H_kv, M, D], v: [H_kv, M, Dv] (H_kv divides H:
// grouped-query attention when smaller), out: [H, N, Dv]. Any of Heads<T>, HeadsView<T>,
// HeadsView<const T> may be passed for q, k, v.
// ---------------------------------------------------------------------------------------------

/// Streaming attention into `out` ([H, N, Dv]). Extra memory O(tile) per thread.
template <HeadsLike Q, HeadsLike K, HeadsLike V, AttentionEncoder Encoder>
void attention(const Q& q, const K& k, const V& v, const Encoder& encoder,
               HeadsView<heads_scalar_t<Q>> out, const AttentionOptions& options = {}) {
  using Scalar = heads_scalar_t<Q>;
  detail::check_qkv_scalars<Q, K, V>();
  constexpr const char* fn = "posenc::attention";
  const auto p =
      kernel::make_problem<Scalar>(fn, detail::as_const_view(q), detail::as_const_view(k),
                                   detail::as_const_view(v), encoder, options);
  kernel::require_output_shape(fn, out, p);
  kernel::stream(p, encoder, kernel::ResultSink<Scalar>{out});
}

/// Streaming attention into `out` ([H, N, Dv]) that also writes the row log-sum-exp of the final
/// logits (after scale, every stage and the mask) into `lse` ([H, N]): lse = log Σ_j exp(s_ij)
/// over the allowed keys, −inf for a row with no allowed key. What attention_backward needs; no
/// extra pass over the keys.
template <HeadsLike Q, HeadsLike K, HeadsLike V, AttentionEncoder Encoder>
void attention(const Q& q, const K& k, const V& v, const Encoder& encoder,
               HeadsView<heads_scalar_t<Q>> out, Eigen::Ref<Matrix<heads_scalar_t<Q>>> lse,
               const AttentionOptions& options = {}) {
  using Scalar = heads_scalar_t<Q>;
  detail::check_qkv_scalars<Q, K, V>();
  constexpr const char* fn = "posenc::attention";
  const auto p =
      kernel::make_problem<Scalar>(fn, detail::as_const_view(q), detail::as_const_view(k),
                                   detail::as_const_view(v), encoder, options);
  kernel::require_output_shape(fn, out, p);
  detail::require(lse.rows() == p.heads && lse.cols() == p.queries, fn, "lse has shape [",
                  lse.rows(), ", ", lse.cols(), "] but must be [", p.heads, ", ", p.queries, "]");
  kernel::ResultSink<Scalar> sink{out};
  sink.lse = lse.data();
  sink.lse_stride = lse.outerStride();
  kernel::stream(p, encoder, sink);
}

/// Streaming attention; returns [H, N, Dv].
template <HeadsLike Q, HeadsLike K, HeadsLike V, AttentionEncoder Encoder = NoPositionalEncoding>
Heads<heads_scalar_t<Q>> attention(const Q& q, const K& k, const V& v, const Encoder& encoder = {},
                                   const AttentionOptions& options = {}) {
  const auto qv = detail::as_const_view(q);
  const auto vv = detail::as_const_view(v);
  Heads<heads_scalar_t<Q>> out(qv.heads(), qv.rows(), vv.dim());
  attention(q, k, v, encoder, out.view(), options);
  return out;
}

/// Streaming attention without positional encoding (NoPE).
template <HeadsLike Q, HeadsLike K, HeadsLike V>
Heads<heads_scalar_t<Q>> attention(const Q& q, const K& k, const V& v,
                                   const AttentionOptions& options) {
  return attention(q, k, v, NoPositionalEncoding{}, options);
}

/// Streaming attention over this subset of keys (their absolute positions in
/// options.key_positions, or 0…M−1), unnormalised; combine subsets with merge_partials.
template <HeadsLike Q, HeadsLike K, HeadsLike V, AttentionEncoder Encoder = NoPositionalEncoding>
AttentionPartial<heads_scalar_t<Q>> attention_partial(const Q& q, const K& k, const V& v,
                                                      const Encoder& encoder = {},
                                                      const AttentionOptions& options = {}) {
  using Scalar = heads_scalar_t<Q>;
  detail::check_qkv_scalars<Q, K, V>();
  const auto p = kernel::make_problem<Scalar>("posenc::attention_partial", detail::as_const_view(q),
                                              detail::as_const_view(k), detail::as_const_view(v),
                                              encoder, options);
  AttentionPartial<Scalar> partial{
      Heads<Scalar>(p.heads, p.queries, p.value_dim),
      Matrix<Scalar>::Constant(p.heads, p.queries, -std::numeric_limits<Scalar>::infinity()),
      Matrix<Scalar>::Zero(p.heads, p.queries)};
  kernel::stream(
      p, encoder,
      kernel::ResultSink<Scalar>{partial.output.view(), &partial.row_max, &partial.row_sum});
  return partial;
}

/// The materialising oracle: same result as `attention`, by the obvious method (O(N·M) memory).
template <HeadsLike Q, HeadsLike K, HeadsLike V, AttentionEncoder Encoder = NoPositionalEncoding>
Heads<heads_scalar_t<Q>> attention_reference(const Q& q, const K& k, const V& v,
                                             const Encoder& encoder = {},
                                             const AttentionOptions& options = {}) {
  using Scalar = heads_scalar_t<Q>;
  detail::check_qkv_scalars<Q, K, V>();
  const auto p = kernel::make_problem<Scalar>("posenc::attention_reference",
                                              detail::as_const_view(q), detail::as_const_view(k),
                                              detail::as_const_view(v), encoder, options);
  Heads<Scalar> out(p.heads, p.queries, p.value_dim);
  kernel::reference_output(p, encoder, out.view());
  return out;
}

template <HeadsLike Q, HeadsLike K, HeadsLike V>
Heads<heads_scalar_t<Q>> attention_reference(const Q& q, const K& k, const V& v,
                                             const AttentionOptions& options) {
  return attention_reference(q, k, v, NoPositionalEncoding{}, options);
}

/// Attention probabilities [H, N, M] (rows sum to 1, or are zero when nothing is allowed), for
/// analysis and plots, as an AttentionMap that carries the query and key positions and the mask of
/// the call (attention_statistics and empirical_receptive_field read them). Materialises N × M
/// per head.
template <HeadsLike Q, HeadsLike K, HeadsLike V, AttentionEncoder Encoder = NoPositionalEncoding>
AttentionMap<heads_scalar_t<Q>> attention_weights(const Q& q, const K& k, const V& v,
                                                  const Encoder& encoder = {},
                                                  const AttentionOptions& options = {}) {
  using Scalar = heads_scalar_t<Q>;
  detail::check_qkv_scalars<Q, K, V>();
  const auto p = kernel::make_problem<Scalar>("posenc::attention_weights", detail::as_const_view(q),
                                              detail::as_const_view(k), detail::as_const_view(v),
                                              encoder, options);
  const std::vector<Matrix<Scalar>> weights = kernel::reference_weights(p, encoder);
  AttentionMap<Scalar> out = detail::empty_attention_map(p);
  for (Index h = 0; h < p.heads; ++h) out.head(h) = weights[static_cast<std::size_t>(h)];
  return out;
}

template <HeadsLike Q, HeadsLike K, HeadsLike V>
AttentionMap<heads_scalar_t<Q>> attention_weights(const Q& q, const K& k, const V& v,
                                                  const AttentionOptions& options) {
  return attention_weights(q, k, v, NoPositionalEncoding{}, options);
}

/// Pre-softmax scores [H, N, M] (every stage applied, forbidden keys −inf): the scores whose
/// row softmax is attention_weights, as an AttentionMap with the positions and mask of the call
/// (empirical_attention_resolution reads them). For analysis (empirical score curves).
/// Materialises N × M.
template <HeadsLike Q, HeadsLike K, AttentionEncoder Encoder = NoPositionalEncoding>
AttentionMap<heads_scalar_t<Q>> attention_scores(const Q& q, const K& k,
                                                 const Encoder& encoder = {},
                                                 const AttentionOptions& options = {}) {
  using Scalar = heads_scalar_t<Q>;
  detail::check_qkv_scalars<Q, K, K>();
  const auto kv = detail::as_const_view(k);
  const auto p = kernel::make_problem<Scalar>("posenc::attention_scores", detail::as_const_view(q),
                                              kv, kv, encoder, options);
  const std::vector<Matrix<Scalar>> scores = kernel::reference_scores(p, encoder);
  AttentionMap<Scalar> out = detail::empty_attention_map(p);
  for (Index h = 0; h < p.heads; ++h) out.head(h) = scores[static_cast<std::size_t>(h)];
  return out;
}

}  // namespace posenc
