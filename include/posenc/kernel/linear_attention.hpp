// SPDX-License-Identifier: MIT
// The engine of linear attention: per-head running sums (LinearAttentionHeadState), the causal
// scan in chunks (a small masked quadratic form per chunk, then the chunk joins the state), the
// non-causal pass, and the shape checks. The faces are in posenc/linear_attention.hpp.
// IWYU pragma: private, include "posenc/linear_attention.hpp"
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "posenc/attention_options.hpp"
#include "posenc/detail/check.hpp"
#include "posenc/encoding.hpp"
#include "posenc/tensor.hpp"

namespace posenc {

/// The running sums of one head after some keys, in a form that stays in floating-point range:
///   key_values = Σⱼ φ̃(kⱼ) vⱼᵀ  [F, Dv],   key_sum = Σⱼ φ̃(kⱼ)  [F].
/// For a deterministic map φ̃ = φ. For Favor, φ̃(k) = exp(ω·k' − |k'|²/2 − offset) and the
/// feature is φ(k) = F^(−1/2)·(φ̃(k) + ε), so that Σ φ(k)vᵀ = F^(−1/2)·(key_values +
/// ε·1·value_sumᵀ); `offset` is the largest ωᵢ·k' seen so far.
template <class Scalar>
struct LinearAttentionHeadState {
  Matrix<Scalar> key_values;
  Vector<Scalar> key_sum;
  Vector<Scalar> value_sum;  // Σⱼ vⱼ (used by Favor)
  Index count = 0;           // keys absorbed
  Scalar offset = -std::numeric_limits<Scalar>::infinity();
};

namespace kernel {

/// Scratch of one head task, sized for one chunk.
template <class Scalar>
struct LinearWorkspace {
  Matrix<Scalar> queries, keys, query_features, key_features, weights, numerator;
  Vector<Scalar> key_max, prefix_max, denominator, feature_sum;
  std::vector<Index> positions;
};

/// Rows of q or k transformed by the encoder (or copied), rows × width.
template <class Scalar, class Encoder, class In>
void load_linear_rows(const Encoder& encoder, bool queries, Index head, Positions positions,
                      Index centre, const In& in, Index width, Matrix<Scalar>& out) {
  out.resize(in.rows(), width);
  if constexpr (QueryKeyTransform<Encoder>) {
    if (queries) {
      encoder.transform_queries(head, positions, centre, in, out);
    } else {
      encoder.transform_keys(head, positions, centre, in, out);
    }
  } else {
    (void)encoder, (void)queries, (void)head, (void)positions, (void)centre;
    out = in;
  }
}

template <class Scalar, class Map>
void query_features(const Map& map, const Matrix<Scalar>& x, Matrix<Scalar>& out) {
  out.resize(x.rows(), static_cast<Index>(map.feature_dim(x.cols())));
  if constexpr (StabilizedFeatureMap<Map, Scalar>) {
    map.query_features(x, out);
  } else {
    map.features(x, out);
  }
}

/// Key features: φ(k) (deterministic), or Favor's exponentials with their row maxima.
template <class Scalar, class Map>
void key_features(const Map& map, const Matrix<Scalar>& x, Matrix<Scalar>& out,
                  Vector<Scalar>& row_max) {
  out.resize(x.rows(), static_cast<Index>(map.feature_dim(x.cols())));
  if constexpr (StabilizedFeatureMap<Map, Scalar>) {
    row_max.resize(x.rows());
    map.key_exponentials(x, out, row_max);
  } else {
    map.features(x, out);
  }
}

template <class Scalar, class Map>
void reset_state(const Map& map, Index width, Index value_dim,
                 LinearAttentionHeadState<Scalar>& s) {
  const auto features = static_cast<Index>(map.feature_dim(width));
  s.key_values.setZero(features, value_dim);
  s.key_sum.setZero(features);
  s.value_sum.setZero(value_dim);
  s.count = 0;
  s.offset = -std::numeric_limits<Scalar>::infinity();
}

/// Adds the keys of one chunk (features in ws.key_features / ws.key_max) to the state.
template <class Scalar, class Map, class Values>
void absorb_keys(const Map& map, const Values& values, LinearWorkspace<Scalar>& ws,
                 LinearAttentionHeadState<Scalar>& s) {
  auto& kf = ws.key_features;
  if constexpr (StabilizedFeatureMap<Map, Scalar>) {
    const Scalar new_offset = std::max(s.offset, ws.key_max.maxCoeff());
    if (s.count > 0 && new_offset > s.offset) {
      const Scalar shrink = std::exp(s.offset - new_offset);
      s.key_values *= shrink;
      s.key_sum *= shrink;
    }
    for (Index j = 0; j < kf.rows(); ++j) kf.row(j) *= std::exp(ws.key_max[j] - new_offset);
    s.offset = new_offset;
    s.value_sum.noalias() += values.colwise().sum().transpose();
  } else {
    (void)map;
  }
  s.key_values.noalias() += kf.transpose() * values;
  s.key_sum.noalias() += kf.colwise().sum().transpose();
  s.count += kf.rows();
}

/// numerator/denominator of every query row of the chunk against the state alone.
template <class Scalar, class Map>
void read_state(const Map& map, const LinearAttentionHeadState<Scalar>& s,
                LinearWorkspace<Scalar>& ws) {
  const auto& qf = ws.query_features;
  ws.numerator.noalias() = qf * s.key_values;
  ws.denominator.noalias() = qf * s.key_sum;
  if constexpr (StabilizedFeatureMap<Map, Scalar>) {
    const Scalar ratio = map.ratio();
    const auto eps = static_cast<Scalar>(map.stabilizer());
    ws.feature_sum = qf.rowwise().sum();
    for (Index i = 0; i < qf.rows(); ++i) {
      ws.numerator.row(i) =
          ratio * (ws.numerator.row(i) + eps * ws.feature_sum[i] * s.value_sum.transpose());
      ws.denominator[i] =
          ratio * (ws.denominator[i] + eps * ws.feature_sum[i] * static_cast<Scalar>(s.count));
    }
  } else {
    (void)map;
  }
}

/// The numerator and denominator of one causal chunk: rows attend to the state (all earlier
/// chunks) and to the chunk's own keys j <= i, whose weights are left in ws.weights (zero above
/// the diagonal; for Favor also ws.prefix_max, the stabiliser c_i of each row, and
/// ws.feature_sum). Query/key features are in the workspace; the state is not changed.
template <class Scalar, class Map, class Values>
void causal_chunk_sums(const Map& map, const Values& values, LinearWorkspace<Scalar>& ws,
                       const LinearAttentionHeadState<Scalar>& s) {
  const auto& qf = ws.query_features;
  const Index rows = qf.rows();
  ws.weights.noalias() = qf * ws.key_features.transpose();
  if constexpr (StabilizedFeatureMap<Map, Scalar>) {
    // Row i is stabilised by c_i = the largest key projection among keys <= i, exactly as if
    // the keys had been absorbed one at a time.
    const Scalar ratio = map.ratio();
    const auto eps = static_cast<Scalar>(map.stabilizer());
    ws.prefix_max.resize(rows);
    Scalar running = s.offset;
    for (Index i = 0; i < rows; ++i) ws.prefix_max[i] = running = std::max(running, ws.key_max[i]);
    ws.numerator.noalias() = qf * s.key_values;
    ws.denominator.noalias() = qf * s.key_sum;
    ws.feature_sum = qf.rowwise().sum();
    for (Index i = 0; i < rows; ++i) {
      const Scalar alpha = s.count == 0 ? Scalar(0) : std::exp(s.offset - ws.prefix_max[i]);
      const Scalar extra = eps * ws.feature_sum[i];
      ws.numerator.row(i) = ratio * (alpha * ws.numerator.row(i) + extra * s.value_sum.transpose());
      ws.denominator[i] =
          ratio * (alpha * ws.denominator[i] + extra * static_cast<Scalar>(s.count));
      auto row = ws.weights.row(i).head(i + 1).array();
      row = ratio *
            ((ws.key_max.head(i + 1).array() - ws.prefix_max[i]).exp().transpose() * row + extra);
      ws.weights.row(i).tail(rows - 1 - i).setZero();
    }
  } else {
    read_state(map, s, ws);
    ws.weights.template triangularView<Eigen::StrictlyUpper>().setZero();
  }
  if (values.allFinite()) {
    ws.numerator.noalias() += ws.weights * values;
  } else {
    // Row i reads only the values j <= i: 0 · NaN would leak a later key's value into it (and
    // Eigen's triangular product multiplies the zero triangle of its diagonal blocks).
    for (Index i = 0; i < rows; ++i) {
      ws.numerator.row(i).noalias() += ws.weights.row(i).head(i + 1) * values.topRows(i + 1);
    }
  }
  ws.denominator += ws.weights.rowwise().sum();
}

/// One causal chunk: causal_chunk_sums, then the chunk's keys join the state.
template <class Scalar, class Map, class Values>
void causal_chunk(const Map& map, const Values& values, LinearWorkspace<Scalar>& ws,
                  LinearAttentionHeadState<Scalar>& s) {
  causal_chunk_sums(map, values, ws, s);
  absorb_keys(map, values, ws, s);
}

/// out = numerator / denominator row by row; a zero denominator (no key, or a feature map that
/// gives all-zero features) gives a zero row; a NaN one (a non-finite input reached the row)
/// gives NaN.
template <class Scalar, class Out>
void write_normalized(const LinearWorkspace<Scalar>& ws, Out&& out) {
  for (Index i = 0; i < out.rows(); ++i) {
    const Scalar den = ws.denominator[i];
    if (den != Scalar(0)) {
      out.row(i) = ws.numerator.row(i) / den;
    } else {
      out.row(i).setZero();
    }
  }
}

inline void fill_linear_positions(Index first_position, Index first_row, Index count,
                                  std::vector<Index>& out) {
  out.resize(static_cast<std::size_t>(count));
  for (Index r = 0; r < count; ++r)
    out[static_cast<std::size_t>(r)] = first_position + first_row + r;
}

/// The shape of a linear attention call, checked.
struct LinearShape {
  Index heads, kv_heads, rows, keys, dim, width, value_dim, features;
};

template <class Scalar, class Map, class Encoder>
LinearShape check_linear(const char* fn, const HeadsView<const Scalar>& q,
                         const HeadsView<const Scalar>& k, const HeadsView<const Scalar>& v,
                         const Map& map, const Encoder& encoder, bool causal, int threads,
                         Index chunk, Index first_position) {
  detail::check_qkv_shapes(fn, q, k, v);
  detail::require_position_run(fn, "first_position", first_position, std::max(q.rows(), k.rows()));
  detail::require(!causal || q.rows() == k.rows(), fn,
                  "causal linear attention needs as many keys as queries (the same tokens), got ",
                  q.rows(), " queries and ", k.rows(),
                  " keys; use LinearAttentionState to continue a sequence");
  detail::require(threads >= 0, fn, "threads must be >= 0 (0 = OpenMP default), got ", threads);
  detail::require(chunk >= 1, fn, "chunk must be >= 1, got ", chunk);
  const Index width = detail::transformed_width(encoder, q.dim());
  detail::require(width >= 1, fn, "the encoder's transformed_dim(", q.dim(), ") is ", width);
  if constexpr (HasValidate<Encoder>) {
    encoder.validate(AttentionShape{q.heads(), k.heads(), q.rows(), k.rows(), q.dim(), v.dim()});
  }
  if constexpr (ValidatedFeatureMap<Map>) map.validate(fn, width, QueryKeyTransform<Encoder>);
  const auto features = static_cast<Index>(map.feature_dim(width));
  detail::require(features >= 1, fn, "the feature map's feature_dim(", width, ") is ", features);
  return {q.heads(), k.heads(), q.rows(), k.rows(), q.dim(), width, v.dim(), features};
}

/// Non-causal linear attention of one head: all keys into the state, then every query reads it.
template <class Scalar, class Map, class Encoder>
void noncausal_head(const Map& map, const Encoder& encoder, const LinearShape& shape, Index h,
                    const HeadsView<const Scalar>& q, const HeadsView<const Scalar>& k,
                    const HeadsView<const Scalar>& v, Index first_position, Index chunk,
                    LinearWorkspace<Scalar>& ws, HeadsView<Scalar> out) {
  const Index kvh = h / (shape.heads / shape.kv_heads);
  LinearAttentionHeadState<Scalar> s;
  reset_state(map, shape.width, shape.value_dim, s);
  for (Index first = 0; first < shape.keys; first += chunk) {
    const Index rows = std::min(chunk, shape.keys - first);
    fill_linear_positions(first_position, first, rows, ws.positions);
    load_linear_rows(encoder, false, kvh, ws.positions, first_position,
                     k.head(kvh).middleRows(first, rows), shape.width, ws.keys);
    key_features(map, ws.keys, ws.key_features, ws.key_max);
    absorb_keys(map, v.head(kvh).middleRows(first, rows), ws, s);
  }
  for (Index first = 0; first < shape.rows; first += chunk) {
    const Index rows = std::min(chunk, shape.rows - first);
    fill_linear_positions(first_position, first, rows, ws.positions);
    load_linear_rows(encoder, true, h, ws.positions, first_position,
                     q.head(h).middleRows(first, rows), shape.width, ws.queries);
    query_features(map, ws.queries, ws.query_features);
    read_state(map, s, ws);
    write_normalized(ws, out.head(h).middleRows(first, rows));
  }
}

/// Causal scan of one head over rows [0, N) continuing `s`; row r sits at first_position + r.
template <class Scalar, class Map, class Encoder>
void causal_head(const Map& map, const Encoder& encoder, const LinearShape& shape, Index h,
                 const HeadsView<const Scalar>& q, const HeadsView<const Scalar>& k,
                 const HeadsView<const Scalar>& v, Index first_position, Index centre, Index chunk,
                 LinearWorkspace<Scalar>& ws, LinearAttentionHeadState<Scalar>& s,
                 HeadsView<Scalar> out) {
  const Index kvh = h / (shape.heads / shape.kv_heads);
  for (Index first = 0; first < shape.rows; first += chunk) {
    const Index rows = std::min(chunk, shape.rows - first);
    fill_linear_positions(first_position, first, rows, ws.positions);
    load_linear_rows(encoder, true, h, ws.positions, centre, q.head(h).middleRows(first, rows),
                     shape.width, ws.queries);
    load_linear_rows(encoder, false, kvh, ws.positions, centre, k.head(kvh).middleRows(first, rows),
                     shape.width, ws.keys);
    query_features(map, ws.queries, ws.query_features);
    key_features(map, ws.keys, ws.key_features, ws.key_max);
    causal_chunk(map, v.head(kvh).middleRows(first, rows), ws, s);
    write_normalized(ws, out.head(h).middleRows(first, rows));
  }
}

}  // namespace kernel

}  // namespace posenc
