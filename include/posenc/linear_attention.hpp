// SPDX-License-Identifier: MIT
// Linear (kernelised) attention: exp(q·k) replaced by φ(q)·φ(k) for a positive feature map φ,
// so that attention costs O(N·F·Dv) instead of O(N·M·D). Non-causal (φ(K)ᵀV once) or causal (a
// running prefix state streamed over the sequence in chunks), a state object that continues
// decoding one token at a time, and the materialising oracle the streaming form is tested against.
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include <Eigen/QR>

#include "posenc/detail/check.hpp"
#include "posenc/detail/parallel.hpp"
#include "posenc/detail/random.hpp"
#include "posenc/encoding.hpp"
#include "posenc/tensor.hpp"

namespace posenc {

// ---------------------------------------------------------------------------------------------
// Feature maps
// ---------------------------------------------------------------------------------------------

/// φ(x) = elu(x) + 1 elementwise (x + 1 for x > 0, eˣ otherwise); F = D.
/// Katharopoulos et al. 2020, "Transformers are RNNs" (arXiv 2006.16236); fast-transformers'
/// "linear" and "causal-linear" attention. Matches the `causal_linear_elu1_out` goldens.
struct EluPlusOne {
  Index feature_dim(Index dim) const { return dim; }

  /// out = φ(x) (rows × D each), as max(x, 0) + exp(min(x, 0)): branch-free and vectorised.
  template <class In, class Out>
  void features(const In& x, Out&& out) const {
    using Scalar = typename std::remove_cvref_t<Out>::Scalar;
    out = (x.array().max(Scalar(0)) + x.array().min(Scalar(0)).exp()).matrix();
  }
};

/// φ(x) = max(x, 0) + epsilon elementwise; F = D. The Long Range Arena "linear_transformer_relu"
/// map (epsilon 1e-3; no temperature, no data normalisation).
struct ReluPlusEpsilon {
  double epsilon = 1e-3;

  Index feature_dim(Index dim) const { return dim; }

  template <class In, class Out>
  void features(const In& x, Out&& out) const {
    using Scalar = typename std::remove_cvref_t<Out>::Scalar;
    out = (x.array().max(Scalar(0)) + static_cast<Scalar>(epsilon)).matrix();
  }
};

/// Options of the Performer feature map.
struct FavorOptions {
  /// Draw the projection in blocks of D mutually orthogonal rows (Performer's default), each row
  /// rescaled to the norm of an independent Gaussian vector; false: i.i.d. Gaussian rows.
  bool orthogonal = true;
  /// ε added to every feature after the exponential (Performer's `numerical_stabilizer`).
  double stabilizer = 1e-6;
  /// Softmax temperature τ: φ(q)·φ(k) estimates exp(τ·q·k). Default 1/sqrt(D), the usual
  /// 1/sqrt(width) of softmax attention (Performer's D^(−1/4) on each side; fast-transformers'
  /// `softmax_temp`). After stochastic PE, D is the width R of the filtered queries.
  std::optional<double> temperature = std::nullopt;
};

/// Performer's FAVOR+ positive random features for the softmax kernel (Choromanski et al. 2021,
/// "Rethinking Attention with Performers", arXiv 2009.14794; google-research/performer
/// `softmax_kernel_transformation`):
///
///   φ(x) = F^(−1/2) · (exp(ωᵢ·x' − |x'|²/2 − c) + ε)ᵢ,   x' = sqrt(τ)·x,   ω: [F, D] projection
///
/// so that E[φ(q)·φ(k)] ∝ exp(τ·q·k). The stabiliser c is, for a query, the largest ωᵢ·x' of that
/// query; for keys it is one number shared by all keys of a sum: Performer takes the largest ωᵢ·k'
/// over the whole sequence; posenc takes the largest over the keys summed so far (for
/// non-causal attention that is the same number). The running maximum rescales the state when it
/// grows, so causal outputs are exact for any chunking, never depend on later keys, and
/// decoding token by token equals one pass.
template <class Scalar>
class Favor {
 public:
  using value_type = Scalar;

  /// F random features for inputs of width `dim`, drawn from `seed` (posenc's own generator,
  /// detail::GaussianSource: reproducible everywhere, not torch's or JAX's stream).
  Favor(Index dim, Index features, std::uint64_t seed, FavorOptions options = {})
      : Favor(draw_projection(dim, features, seed, options.orthogonal), options) {}

  /// An explicit projection matrix [F, D] (rows ωᵢ), e.g. one exported from a trained model.
  explicit Favor(Matrix<Scalar> projection, FavorOptions options = {})
      : projection_(std::move(projection)), options_(options) {
    constexpr const char* fn = "posenc::Favor";
    detail::require(projection_.rows() >= 1 && projection_.cols() >= 1, fn,
                    "the projection must be [features >= 1, dim >= 1], got [", projection_.rows(),
                    ", ", projection_.cols(), "]");
    detail::require(projection_.allFinite(), fn, "the projection has non-finite entries");
    detail::require(std::isfinite(options.stabilizer) && options.stabilizer >= 0.0, fn,
                    "stabilizer must be finite and >= 0, got ", options.stabilizer);
    const double tau =
        options.temperature.value_or(1.0 / std::sqrt(static_cast<double>(projection_.cols())));
    detail::require(std::isfinite(tau) && tau > 0.0, fn,
                    "temperature must be finite and positive, got ", tau);
    temperature_ = tau;
    scaled_projection_t_ = (projection_ * static_cast<Scalar>(std::sqrt(tau))).transpose();
  }

  Index dim() const { return projection_.cols(); }
  Index features() const { return projection_.rows(); }
  Index feature_dim(Index /*dim*/) const { return features(); }
  const Matrix<Scalar>& projection() const { return projection_; }
  double temperature() const { return temperature_; }
  double stabilizer() const { return options_.stabilizer; }
  /// F^(−1/2), the factor in front of every feature.
  Scalar ratio() const {
    return static_cast<Scalar>(1.0 / std::sqrt(static_cast<double>(features())));
  }

  /// Query features φ(x) for rows x (rows × D → rows × F), each row stabilised by its own max.
  template <class In, class Out>
  void query_features(const In& x, Out&& out) const {
    out.noalias() = x * scaled_projection_t_;
    const auto eps = static_cast<Scalar>(options_.stabilizer);
    const Scalar half_tau = static_cast<Scalar>(temperature_ / 2.0);
    for (Index r = 0; r < out.rows(); ++r) {
      const Scalar shift = out.row(r).maxCoeff() + half_tau * x.row(r).squaredNorm();
      out.row(r) = ratio() * ((out.row(r).array() - shift).exp() + eps);
    }
  }

  /// Key features without the shared stabiliser: out(r, i) = exp(ωᵢ·x'_r − |x'_r|²/2 − m_r) with
  /// m_r = maxᵢ ωᵢ·x'_r written to row_max[r]. The feature is then F^(−1/2)·(out·exp(m_r − c) + ε).
  template <class In, class Out, class Max>
  void key_exponentials(const In& x, Out&& out, Max&& row_max) const {
    out.noalias() = x * scaled_projection_t_;
    const Scalar half_tau = static_cast<Scalar>(temperature_ / 2.0);
    for (Index r = 0; r < out.rows(); ++r) {
      row_max[r] = out.row(r).maxCoeff();
      out.row(r) = (out.row(r).array() - (row_max[r] + half_tau * x.row(r).squaredNorm())).exp();
    }
  }

 private:
  static Matrix<Scalar> draw_projection(Index dim, Index features, std::uint64_t seed,
                                        bool orthogonal) {
    detail::require(dim >= 1 && features >= 1, "posenc::Favor",
                    "dim and features must be >= 1, got dim ", dim, " and features ", features);
    detail::GaussianSource normal(seed);
    Matrix<double> omega(features, dim);
    if (!orthogonal) {
      for (Index i = 0; i < omega.size(); ++i) omega.data()[i] = normal();
      return omega.cast<Scalar>();
    }
    // Blocks of `dim` orthonormal rows (Q of a Gaussian matrix), the last block truncated, then
    // each row scaled to the norm of a fresh Gaussian vector (Performer's scaling = 0). Q's
    // columns are multiplied by the signs of R's diagonal so that Q is Haar-distributed
    // (Mezzadri 2007): a raw Householder Q has a fixed-sign coordinate in its columns, which
    // biases the estimate of exp(q·k) (Performer's create_projection_matrix uses the raw Q).
    for (Index first = 0; first < features; first += dim) {
      Matrix<double> gaussian(dim, dim);
      for (Index i = 0; i < gaussian.size(); ++i) gaussian.data()[i] = normal();
      const Eigen::HouseholderQR<Matrix<double>> qr(gaussian);
      Matrix<double> q = qr.householderQ();
      for (Index j = 0; j < dim; ++j) {
        if (qr.matrixQR()(j, j) < 0.0) q.col(j) = -q.col(j);
      }
      const Index rows = std::min(dim, features - first);
      omega.middleRows(first, rows) = q.transpose().topRows(rows);
    }
    for (Index i = 0; i < features; ++i) {
      double norm_squared = 0.0;
      for (Index j = 0; j < dim; ++j) {
        const double g = normal();
        norm_squared += g * g;
      }
      omega.row(i) *= std::sqrt(norm_squared);
    }
    return omega.cast<Scalar>();
  }

  Matrix<Scalar> projection_;
  Matrix<Scalar> scaled_projection_t_;  // sqrt(τ)·ωᵀ, [D, F]
  FavorOptions options_;
  double temperature_ = 1.0;
};

namespace detail {
template <class M>
struct is_favor : std::false_type {};
template <class Scalar>
struct is_favor<Favor<Scalar>> : std::true_type {};
}  // namespace detail

/// A deterministic feature map: `feature_dim(D)` and `features(x, out)` writing φ of each row of
/// x (rows × D) to out (rows × F). EluPlusOne and ReluPlusEpsilon; a user type works the same way.
template <class M, class Scalar>
concept DeterministicFeatureMap = std::copy_constructible<M> &&
    requires(const M& m, Index dim, const Matrix<Scalar>& x, Matrix<Scalar>& out) {
  { m.feature_dim(dim) } -> std::convertible_to<Index>;
  m.features(x, out);
};

/// What linear attention accepts: a deterministic map, or Favor<Scalar>.
template <class M, class Scalar>
concept FeatureMap = DeterministicFeatureMap<M, Scalar> || std::same_as<M, Favor<Scalar>>;

// ---------------------------------------------------------------------------------------------
// Options and state
// ---------------------------------------------------------------------------------------------

/// Options of one linear attention call. An aggregate: `{.causal = false}`.
struct LinearAttentionOptions {
  /// Causal: row i attends to key rows 0 … i (q and k are the same N tokens). Otherwise every
  /// query attends to every key.
  bool causal = true;
  /// Absolute position of row 0 of q and of k: row i sits at first_position + i (what a
  /// QueryKeyTransform such as stochastic PE sees).
  Index first_position = 0;
  /// Threads (over heads); 0 = OpenMP's default.
  int threads = 0;
  /// Rows per chunk of the causal scan (a chunk is a small masked quadratic form).
  Index chunk = 64;
};

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

namespace detail {

template <class Encoder>
constexpr bool linear_encoder_v =
    std::same_as<Encoder, NoPositionalEncoding> || QueryKeyTransform<Encoder>;

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
  if constexpr (is_favor<Map>::value) {
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
  if constexpr (is_favor<Map>::value) {
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
  if constexpr (is_favor<Map>::value) {
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
  if constexpr (is_favor<Map>::value) {
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

/// One causal chunk: rows attend to the state (all earlier chunks) and to the chunk's own keys
/// j <= i; then the chunk's keys join the state. Query/key features are in the workspace.
template <class Scalar, class Map, class Values>
void causal_chunk(const Map& map, const Values& values, LinearWorkspace<Scalar>& ws,
                  LinearAttentionHeadState<Scalar>& s) {
  const auto& qf = ws.query_features;
  const Index rows = qf.rows();
  ws.weights.noalias() = qf * ws.key_features.transpose();
  if constexpr (is_favor<Map>::value) {
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
  ws.numerator.noalias() += ws.weights * values;
  ws.denominator += ws.weights.rowwise().sum();
  absorb_keys(map, values, ws, s);
}

/// out = numerator / denominator row by row; a zero denominator gives a zero row, never NaN.
template <class Scalar, class Out>
void write_normalized(const LinearWorkspace<Scalar>& ws, Out&& out) {
  for (Index i = 0; i < out.rows(); ++i) {
    const Scalar den = ws.denominator[i];
    if (den > Scalar(0)) {
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
                         Index chunk) {
  check_qkv_shapes(fn, q, k, v);
  require(!causal || q.rows() == k.rows(), fn,
          "causal linear attention needs as many keys as queries (the same tokens), got ", q.rows(),
          " queries and ", k.rows(), " keys; use LinearAttentionState to continue a sequence");
  require(threads >= 0, fn, "threads must be >= 0 (0 = OpenMP default), got ", threads);
  require(chunk >= 1, fn, "chunk must be >= 1, got ", chunk);
  Index width = q.dim();
  if constexpr (QueryKeyTransform<Encoder>)
    width = static_cast<Index>(encoder.transformed_dim(q.dim()));
  require(width >= 1, fn, "the encoder's transformed_dim(", q.dim(), ") is ", width);
  if constexpr (HasValidate<Encoder>) {
    encoder.validate(AttentionShape{q.heads(), k.heads(), q.rows(), k.rows(), q.dim(), v.dim()});
  }
  if constexpr (is_favor<Map>::value) {
    require(map.dim() == width, fn, "the Favor projection has width ", map.dim(),
            " but the queries and keys it sees have width ", width,
            QueryKeyTransform<Encoder> ? " (after the encoder's transform)" : "");
  } else if constexpr (std::same_as<Map, ReluPlusEpsilon>) {
    require(std::isfinite(map.epsilon) && map.epsilon >= 0.0, fn,
            "ReluPlusEpsilon::epsilon must be finite and >= 0, got ", map.epsilon);
  }
  const auto features = static_cast<Index>(map.feature_dim(width));
  require(features >= 1, fn, "the feature map's feature_dim(", width, ") is ", features);
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

}  // namespace detail

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
  static_assert(FeatureMap<Map, Scalar>,
                "posenc::LinearAttentionState: Map must be EluPlusOne, ReluPlusEpsilon, "
                "Favor<Scalar> or a deterministic feature map");
  static_assert(detail::linear_encoder_v<Encoder>,
                "posenc::LinearAttentionState: the encoder must be NoPositionalEncoding or a "
                "QueryKeyTransform (score biases need the N x M score matrix)");

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
    const auto shape =
        detail::check_linear<Scalar>(fn, qv, kv, vv, map_, encoder_, true, threads, chunk_);
    if (heads_.empty()) {
      shape_ = shape;
      heads_.resize(static_cast<std::size_t>(shape.heads));
      for (auto& s : heads_) detail::reset_state(map_, shape.width, shape.value_dim, s);
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
        [] { return detail::LinearWorkspace<Scalar>{}; },
        [&](Index h, detail::LinearWorkspace<Scalar>& ws) {
          detail::causal_head(map_, encoder_, shape, h, qv, kv, vv, first, first_position_, chunk_,
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
  detail::LinearShape shape_{};
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
  static_assert(FeatureMap<Map, Scalar>,
                "posenc::linear_attention: the map must be EluPlusOne, ReluPlusEpsilon, "
                "Favor<Scalar> (same scalar as q) or a deterministic feature map");
  static_assert(detail::linear_encoder_v<Encoder>,
                "posenc::linear_attention: the encoder must be NoPositionalEncoding or a "
                "QueryKeyTransform (score biases need the N x M score matrix)");
  constexpr const char* fn = "posenc::linear_attention";
  const auto qv = detail::as_const_view(q);
  const auto kv = detail::as_const_view(k);
  const auto vv = detail::as_const_view(v);
  const auto shape = detail::check_linear<Scalar>(fn, qv, kv, vv, map, encoder, options.causal,
                                                  options.threads, options.chunk);
  detail::require(
      out.heads() == shape.heads && out.rows() == shape.rows && out.dim() == shape.value_dim, fn,
      "out has shape [", out.heads(), ", ", out.rows(), ", ", out.dim(), "] but must be [",
      shape.heads, ", ", shape.rows, ", ", shape.value_dim, "]");
  detail::parallel_tasks(
      shape.heads, detail::thread_count(options.threads, shape.heads),
      [] { return detail::LinearWorkspace<Scalar>{}; },
      [&](Index h, detail::LinearWorkspace<Scalar>& ws) {
        if (options.causal) {
          LinearAttentionHeadState<Scalar> state;
          detail::reset_state(map, shape.width, shape.value_dim, state);
          detail::causal_head(map, encoder, shape, h, qv, kv, vv, options.first_position,
                              options.first_position, options.chunk, ws, state, out);
        } else {
          detail::noncausal_head(map, encoder, shape, h, qv, kv, vv, options.first_position,
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
  static_assert(detail::linear_encoder_v<Encoder>,
                "posenc::linear_attention_reference: unsupported encoder");
  const auto qv = detail::as_const_view(q);
  const auto kv = detail::as_const_view(k);
  const auto vv = detail::as_const_view(v);
  const auto shape = detail::check_linear<Scalar>("posenc::linear_attention_reference", qv, kv, vv,
                                                  map, encoder, options.causal, 1, 1);
  Heads<Scalar> out(shape.heads, shape.rows, shape.value_dim);
  const Index N = shape.rows;
  const Index M = shape.keys;
  const Index first = options.first_position;
  std::vector<Index> qpos;
  std::vector<Index> kpos;
  detail::fill_linear_positions(first, 0, N, qpos);
  detail::fill_linear_positions(first, 0, M, kpos);
  for (Index h = 0; h < shape.heads; ++h) {
    const Index kvh = h / (shape.heads / shape.kv_heads);
    Matrix<Scalar> qt, kt, qf, kf;
    Vector<Scalar> key_max;
    detail::load_linear_rows(encoder, true, h, qpos, first, qv.head(h), shape.width, qt);
    detail::load_linear_rows(encoder, false, kvh, kpos, first, kv.head(kvh), shape.width, kt);
    detail::query_features(map, qt, qf);
    detail::key_features(map, kt, kf, key_max);
    Matrix<Scalar> weights = qf * kf.transpose();  // N × M
    for (Index i = 0; i < N; ++i) {
      const Index last = options.causal ? i : M - 1;
      if (last < 0) continue;  // no keys: the row stays zero
      if constexpr (detail::is_favor<Map>::value) {
        const Scalar c = key_max.head(last + 1).maxCoeff();
        const Scalar extra = static_cast<Scalar>(map.stabilizer()) * qf.row(i).sum();
        for (Index j = 0; j <= last; ++j) {
          weights(i, j) = map.ratio() * (std::exp(key_max[j] - c) * weights(i, j) + extra);
        }
      }
      weights.row(i).tail(M - 1 - last).setZero();
    }
    const Vector<Scalar> den = weights.rowwise().sum();
    const Matrix<Scalar> num = weights * vv.head(kvh);
    for (Index i = 0; i < N; ++i) {
      if (den[i] > Scalar(0)) {
        out.head(h).row(i) = num.row(i) / den[i];
      }
    }
  }
  return out;
}

}  // namespace posenc
