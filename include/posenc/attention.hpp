// SPDX-License-Identifier: MIT
// The one attention kernel every encoder plugs into: a streaming, tiled, threaded kernel whose
// extra memory is O(tile) (`attention`, `attention_partial`), and the materialising oracle it is
// tested against (`attention_reference`, `attention_weights`).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "posenc/detail/check.hpp"
#include "posenc/detail/parallel.hpp"
#include "posenc/detail/tile_kernels.hpp"
#include "posenc/encoding.hpp"
#include "posenc/mask.hpp"
#include "posenc/tensor.hpp"

namespace posenc {

/// Options of one attention call. An aggregate: write `{.mask = Mask::none(), .query_offset = 7}`.
struct AttentionOptions {
  /// Which keys each query sees, on absolute positions. Causal by default.
  Mask mask = Mask::causal();
  /// Absolute position of query row 0 (queries sit at query_offset … query_offset+N−1) when no
  /// explicit query positions are given. Keys sit at 0 … M−1 unless given explicitly.
  Index query_offset = 0;
  /// Explicit absolute positions (packed sequences, evicted caches): N resp. M entries, or empty.
  Positions query_positions = {};
  Positions key_positions = {};
  /// Document ids for packed sequences: a query attends only to keys of its own document.
  /// Either both empty or N resp. M entries.
  std::span<const Index> query_segments = {};
  std::span<const Index> key_segments = {};
  /// Logit scale; default 1/sqrt(width of the dot product after any QueryKeyTransform).
  std::optional<double> scale = std::nullopt;
  /// Threads of the streaming kernel; 0 = OpenMP's default.
  int threads = 0;
  /// Tile sizes of the streaming kernel (queries × keys).
  Index query_block = 128;
  Index key_block = 128;
};

/// Attention over a subset of the keys, before normalisation, so that pieces computed
/// separately (threads, processes, machines) combine exactly with merge_partials.
/// For query row i of head h: row_max = max_j s_ij over the allowed keys of the subset (−inf if
/// none), row_sum = Σ_j exp(s_ij − row_max), output = Σ_j exp(s_ij − row_max)·v_j.
template <class Scalar>
struct AttentionPartial {
  Heads<Scalar> output;    // [H, N, Dv], unnormalised
  Matrix<Scalar> row_max;  // [H, N]
  Matrix<Scalar> row_sum;  // [H, N]

  /// The attention output output / row_sum; rows with no allowed key are zero.
  Heads<Scalar> normalized() const {
    Heads<Scalar> result(output.heads(), output.rows(), output.dim());
    for (Index h = 0; h < output.heads(); ++h) {
      for (Index r = 0; r < output.rows(); ++r) {
        const Scalar sum = row_sum(h, r);
        if (sum > Scalar(0)) result.head(h).row(r) = output.head(h).row(r) / sum;
      }
    }
    return result;
  }
};

/// Combines the partials of two disjoint key subsets into the partial of their union (exact up
/// to rounding: the online-softmax rescaling). Throws when the shapes differ.
template <class Scalar>
AttentionPartial<Scalar> merge_partials(const AttentionPartial<Scalar>& a,
                                        const AttentionPartial<Scalar>& b) {
  constexpr const char* fn = "posenc::merge_partials";
  detail::require(a.output.heads() == b.output.heads() && a.output.rows() == b.output.rows() &&
                      a.output.dim() == b.output.dim(),
                  fn, "outputs have shapes [", a.output.heads(), ", ", a.output.rows(), ", ",
                  a.output.dim(), "] and [", b.output.heads(), ", ", b.output.rows(), ", ",
                  b.output.dim(), "]");
  detail::require(
      a.row_max.rows() == a.output.heads() && a.row_max.cols() == a.output.rows() &&
          a.row_sum.rows() == a.row_max.rows() && a.row_sum.cols() == a.row_max.cols() &&
          b.row_max.rows() == a.row_max.rows() && b.row_max.cols() == a.row_max.cols() &&
          b.row_sum.rows() == a.row_max.rows() && b.row_sum.cols() == a.row_max.cols(),
      fn, "row_max/row_sum must be [heads, rows] = [", a.output.heads(), ", ", a.output.rows(),
      "], got a.row_max [", a.row_max.rows(), ", ", a.row_max.cols(), "] and b.row_max [",
      b.row_max.rows(), ", ", b.row_max.cols(), "]");
  AttentionPartial<Scalar> merged{Heads<Scalar>(a.output.heads(), a.output.rows(), a.output.dim()),
                                  Matrix<Scalar>(a.row_max.rows(), a.row_max.cols()),
                                  Matrix<Scalar>(a.row_max.rows(), a.row_max.cols())};
  constexpr Scalar minus_infinity = -std::numeric_limits<Scalar>::infinity();
  for (Index h = 0; h < a.output.heads(); ++h) {
    for (Index r = 0; r < a.output.rows(); ++r) {
      const Scalar ma = a.row_max(h, r);
      const Scalar mb = b.row_max(h, r);
      const Scalar m = std::max(ma, mb);
      merged.row_max(h, r) = m;
      if (m == minus_infinity) {  // neither subset had an allowed key
        merged.row_sum(h, r) = Scalar(0);
        continue;
      }
      const Scalar wa = ma == minus_infinity ? Scalar(0) : std::exp(ma - m);
      const Scalar wb = mb == minus_infinity ? Scalar(0) : std::exp(mb - m);
      merged.row_sum(h, r) = wa * a.row_sum(h, r) + wb * b.row_sum(h, r);
      merged.output.head(h).row(r) = wa * a.output.head(h).row(r) + wb * b.output.head(h).row(r);
    }
  }
  return merged;
}

namespace detail {

/// One validated attention problem: inputs, positions, mask and scale.
template <class Scalar>
struct AttentionProblem {
  HeadsView<const Scalar> q, k, v;
  Index heads, queries, keys, query_dim, value_dim, logit_dim;
  Index heads_per_kv_head;
  Index query_offset;
  Positions query_positions, key_positions;  // empty: default positions
  std::span<const Index> query_segments, key_segments;
  Mask mask;
  Scalar scale;
  Index query_block, key_block;
  int threads;

  Index kv_head(Index h) const { return h / heads_per_kv_head; }
  Index query_position(Index r) const {
    return query_positions.empty() ? query_offset + r
                                   : query_positions[static_cast<std::size_t>(r)];
  }
  Index key_position(Index c) const {
    return key_positions.empty() ? c : key_positions[static_cast<std::size_t>(c)];
  }
  bool has_segments() const { return !query_segments.empty(); }
};

template <class Encoder>
Index transformed_width(const Encoder& encoder, Index dim) {
  if constexpr (QueryKeyTransform<Encoder>) {
    return static_cast<Index>(encoder.transformed_dim(dim));
  } else {
    (void)encoder;
    return dim;
  }
}

/// Checks every argument of an attention call and resolves defaults.
template <class Scalar, class Encoder>
AttentionProblem<Scalar> make_problem(const char* fn, HeadsView<const Scalar> q,
                                      HeadsView<const Scalar> k, HeadsView<const Scalar> v,
                                      const Encoder& encoder, const AttentionOptions& options) {
  using EncoderScalar = typename encoder_scalar<Encoder>::type;
  static_assert(std::is_void_v<EncoderScalar> || std::is_same_v<EncoderScalar, Scalar>,
                "posenc::attention: the encoder's Scalar differs from the scalar of q, k, v");
  check_qkv_shapes(fn, q, k, v);
  require(options.query_positions.empty() ||
              static_cast<Index>(options.query_positions.size()) == q.rows(),
          fn, "query_positions has ", options.query_positions.size(), " entries but q has ",
          q.rows(), " rows");
  require(
      options.key_positions.empty() || static_cast<Index>(options.key_positions.size()) == k.rows(),
      fn, "key_positions has ", options.key_positions.size(), " entries but k has ", k.rows(),
      " rows");
  require(options.query_segments.empty() == options.key_segments.empty(), fn,
          "query_segments and key_segments must be given together, got ",
          options.query_segments.size(), " and ", options.key_segments.size(), " entries");
  require(options.query_segments.empty() ||
              static_cast<Index>(options.query_segments.size()) == q.rows(),
          fn, "query_segments has ", options.query_segments.size(), " entries but q has ", q.rows(),
          " rows");
  require(
      options.key_segments.empty() || static_cast<Index>(options.key_segments.size()) == k.rows(),
      fn, "key_segments has ", options.key_segments.size(), " entries but k has ", k.rows(),
      " rows");
  require(options.query_block >= 1 && options.key_block >= 1, fn,
          "query_block and key_block must be >= 1, got ", options.query_block, " and ",
          options.key_block);
  require(options.threads >= 0, fn, "threads must be >= 0 (0 = OpenMP default), got ",
          options.threads);
  if (options.scale) {
    require(std::isfinite(*options.scale) && *options.scale > 0.0, fn,
            "scale must be finite and positive, got ", *options.scale);
  }
  const Index logit_dim = transformed_width(encoder, q.dim());
  require(logit_dim >= 1, fn, "the encoder's transformed_dim(", q.dim(), ") is ", logit_dim);
  if constexpr (ScoreBias<Encoder>) {
    require(static_cast<Index>(encoder.heads()) == q.heads(), fn, "the bias has ", encoder.heads(),
            " heads but q has ", q.heads());
  }
  if constexpr (ScoreMixer<Encoder>) {
    require(static_cast<Index>(encoder.heads()) == q.heads(), fn, "the mixer has ", encoder.heads(),
            " heads but q has ", q.heads());
  }
  if constexpr (HasValidate<Encoder>) {
    encoder.validate(AttentionShape{q.heads(), k.heads(), q.rows(), k.rows(), q.dim(), v.dim()});
  }
  const double scale = options.scale.value_or(1.0 / std::sqrt(static_cast<double>(logit_dim)));
  return AttentionProblem<Scalar>{q,
                                  k,
                                  v,
                                  q.heads(),
                                  q.rows(),
                                  k.rows(),
                                  q.dim(),
                                  v.dim(),
                                  logit_dim,
                                  q.heads() / k.heads(),
                                  options.query_offset,
                                  options.query_positions,
                                  options.key_positions,
                                  options.query_segments,
                                  options.key_segments,
                                  options.mask,
                                  static_cast<Scalar>(scale),
                                  options.query_block,
                                  options.key_block,
                                  options.threads};
}

template <class Scalar>
void require_output_shape(const char* fn, const HeadsView<Scalar>& out,
                          const AttentionProblem<Scalar>& p) {
  require(out.heads() == p.heads && out.rows() == p.queries && out.dim() == p.value_dim, fn,
          "out has shape [", out.heads(), ", ", out.rows(), ", ", out.dim(), "] but must be [",
          p.heads, ", ", p.queries, ", ", p.value_dim, "]");
}

/// Extreme positions and segment ids of a block of rows.
struct BlockExtent {
  Index position_min, position_max, segment_min, segment_max;
};

template <class PositionOf>
BlockExtent block_extent(PositionOf position_of, bool sorted, std::span<const Index> segments,
                         Index first, Index count) {
  BlockExtent e{position_of(first), position_of(first), 0, 0};
  if (sorted) {
    e.position_max = position_of(first + count - 1);
  } else {
    for (Index r = first; r < first + count; ++r) {
      e.position_min = std::min(e.position_min, position_of(r));
      e.position_max = std::max(e.position_max, position_of(r));
    }
  }
  if (!segments.empty()) {
    e.segment_min = e.segment_max = segments[static_cast<std::size_t>(first)];
    for (Index r = first; r < first + count; ++r) {
      e.segment_min = std::min(e.segment_min, segments[static_cast<std::size_t>(r)]);
      e.segment_max = std::max(e.segment_max, segments[static_cast<std::size_t>(r)]);
    }
  }
  return e;
}

/// Mask and segments together, for one tile.
inline TileCoverage tile_coverage(const Mask& mask, bool segmented, const BlockExtent& queries,
                                  const BlockExtent& keys) {
  TileCoverage coverage = mask.classify(queries.position_min, queries.position_max,
                                        keys.position_min, keys.position_max);
  if (coverage == TileCoverage::none || !segmented) return coverage;
  if (queries.segment_max < keys.segment_min || keys.segment_max < queries.segment_min) {
    return TileCoverage::none;
  }
  const bool one_document = queries.segment_min == queries.segment_max &&
                            keys.segment_min == keys.segment_max &&
                            queries.segment_min == keys.segment_min;
  return one_document ? coverage : TileCoverage::partial;
}

/// The columns [first, last) of a tile whose keys sit at first_key, first_key + 1, … that the mask
/// allows for a query at `query_position` (first >= last: none).
inline std::pair<Index, Index> allowed_columns(const Mask& mask, Index query_position,
                                               Index first_key, Index cols) {
  const KeyRange range = mask.key_range(query_position);
  // Compare in differences so that extreme ranges (±2^63) do not overflow.
  const Index lo = range.first <= first_key ? 0 : std::min<Index>(range.first - first_key, cols);
  const Index hi =
      range.last < first_key ? 0 : std::min<Index>(range.last - first_key, cols - 1) + 1;
  return {lo, hi};
}

/// Sets the entries of a score tile that the mask or the segments forbid to −inf.
/// `keys_consecutive`: the key positions are kpos[0], kpos[0]+1, … (the default), so each row's
/// allowed keys form one column interval.
template <class Scalar, class Tile>
void apply_mask(const Mask& mask, Positions qpos, Positions kpos, bool keys_consecutive,
                std::span<const Index> qseg, std::span<const Index> kseg, Tile& tile) {
  constexpr Scalar minus_infinity = -std::numeric_limits<Scalar>::infinity();
  const Index rows = tile.rows();
  const Index cols = tile.cols();
  for (Index r = 0; r < rows; ++r) {
    if (keys_consecutive) {
      const auto [lo, hi] = allowed_columns(mask, qpos[static_cast<std::size_t>(r)], kpos[0], cols);
      if (hi <= lo) {
        tile.row(r).setConstant(minus_infinity);
      } else {
        tile.row(r).head(lo).setConstant(minus_infinity);
        tile.row(r).tail(cols - hi).setConstant(minus_infinity);
      }
    } else {
      const KeyRange range = mask.key_range(qpos[static_cast<std::size_t>(r)]);
      for (Index c = 0; c < cols; ++c) {
        if (!range.contains(kpos[static_cast<std::size_t>(c)])) tile(r, c) = minus_infinity;
      }
    }
    if (!qseg.empty()) {
      const Index document = qseg[static_cast<std::size_t>(r)];
      for (Index c = 0; c < cols; ++c) {
        if (kseg[static_cast<std::size_t>(c)] != document) tile(r, c) = minus_infinity;
      }
    }
  }
}

/// A row-major tile inside a larger buffer (row stride = padded width).
template <class Scalar>
using StridedTile = Eigen::Map<Matrix<Scalar>, Eigen::Unaligned, Eigen::OuterStride<>>;

/// Online-softmax state of one block of query rows (Milakov & Gimelshein 2018; FlashAttention,
/// Dao et al. 2022): running max, running sum, unnormalised output. `output` is rows × Dv inside
/// rows × padded(Dv) storage (`padded_output`), the layout the P·V micro-kernel writes.
template <class Scalar>
struct OnlineSoftmax {
  Eigen::Map<Vector<Scalar>> row_max;
  Eigen::Map<Vector<Scalar>> row_sum;
  Eigen::Map<Vector<Scalar>> rescale;
  StridedTile<Scalar> output;
  StridedTile<Scalar> padded_output;

  void reset() {
    row_max.setConstant(-std::numeric_limits<Scalar>::infinity());
    row_sum.setZero();
    padded_output.setZero();
  }

  /// Turns `scores` (rows × cols) into exp(scores − new max) in place (−inf, i.e. masked, gives
  /// exactly 0) and rescales the running sum and output. Returns false when no entry of the
  /// tile is allowed (nothing to add).
  bool absorb(StridedTile<Scalar>& scores) {
    constexpr Scalar minus_infinity = -std::numeric_limits<Scalar>::infinity();
    bool any = false;
    bool rescaled = false;
    for (Index r = 0; r < scores.rows(); ++r) {
      auto row = scores.row(r);
      const Scalar old_max = row_max[r];
      const Scalar new_max = std::max(old_max, row_maximum(row.data(), scores.cols()));
      if (new_max == minus_infinity) {  // every key so far is masked for this row
        row.setZero();
        rescale[r] = Scalar(1);
        continue;
      }
      any = true;
      const Scalar tile_sum = exp_shifted_row(row.data(), scores.cols(), new_max);
      const Scalar factor = old_max == new_max          ? Scalar(1)
                            : old_max == minus_infinity ? Scalar(0)
                                                        : std::exp(old_max - new_max);
      rescaled = rescaled || factor != Scalar(1);
      rescale[r] = factor;
      row_sum[r] = row_sum[r] * factor + tile_sum;
      row_max[r] = new_max;
    }
    if (any && rescaled) padded_output.array().colwise() *= rescale.array();
    return any;
  }
};

/// Buffers of one thread of the streaming kernel. They only grow; each thread keeps its own
/// between calls (see WorkspaceLease), so repeated calls of a shape allocate nothing.
template <class Scalar>
struct TileWorkspace {
  Vector<Scalar> queries, keys, keys_t, values_p, logits, scores, row_max, row_sum, rescale, output;
  std::vector<Index> query_positions, key_positions, column_begin, column_end;
  std::vector<OnlineSoftmax<Scalar>> states;
  bool in_use = false;

  /// `slots`: query blocks whose state a task keeps at once (the heads of a ScoreMixer task,
  /// the query blocks of a per-head task); `mixes`: a ScoreMixer's all-head logits and scores.
  void reserve(Index slots, Index query_block, Index key_block, Index key_halo, Index query_dim,
               Index logit_dim, Index value_dim, bool mixes) {
    const Index key_rows = key_block + 2 * key_halo;
    grow(queries, slots * query_block * logit_dim);
    grow(keys, key_rows * std::max(query_dim, logit_dim));
    grow(keys_t, logit_dim * padded_width<Scalar>(key_rows));
    grow(values_p, key_block * padded_width<Scalar>(value_dim));
    grow(logits, mixes ? slots * query_block * key_rows : 0);
    grow(scores, (mixes ? slots : 1) * query_block * padded_width<Scalar>(key_block));
    grow(row_max, slots * query_block);
    grow(row_sum, slots * query_block);
    grow(rescale, slots * query_block);
    grow(output, slots * query_block * padded_width<Scalar>(value_dim));
    if (static_cast<Index>(query_positions.size()) < slots * query_block) {
      query_positions.resize(static_cast<std::size_t>(slots * query_block));
    }
    if (static_cast<Index>(column_begin.size()) < query_block) {
      column_begin.resize(static_cast<std::size_t>(query_block));
      column_end.resize(static_cast<std::size_t>(query_block));
    }
    if (static_cast<Index>(key_positions.size()) < key_rows) {
      key_positions.resize(static_cast<std::size_t>(key_rows));
    }
    states.reserve(static_cast<std::size_t>(slots));
  }

 private:
  // Zeroed once when grown: tile entries the micro-kernels skip are then never uninitialised.
  static void grow(Vector<Scalar>& buffer, Index size) {
    if (buffer.size() < size) buffer.setZero(size);
  }
};

/// The calling thread's workspace, kept for the life of the thread (OpenMP reuses its threads,
/// so the kernel's steady state allocates nothing). A few tiles: O(tile), never O(N).
template <class Scalar>
TileWorkspace<Scalar>& thread_workspace() {
  thread_local TileWorkspace<Scalar> workspace;
  return workspace;
}

/// Exclusive use of the thread's workspace for one call, or of a fresh one if the thread's is
/// already in use (an encoder stage that itself calls attention).
template <class Scalar>
class WorkspaceLease {
 public:
  WorkspaceLease() {
    TileWorkspace<Scalar>& mine = thread_workspace<Scalar>();
    if (mine.in_use) {
      owned_ = std::make_unique<TileWorkspace<Scalar>>();
      workspace_ = owned_.get();
    } else {
      workspace_ = &mine;
    }
    workspace_->in_use = true;
  }
  WorkspaceLease(WorkspaceLease&& other) noexcept
      : workspace_(std::exchange(other.workspace_, nullptr)), owned_(std::move(other.owned_)) {}
  WorkspaceLease(const WorkspaceLease&) = delete;
  WorkspaceLease& operator=(const WorkspaceLease&) = delete;
  WorkspaceLease& operator=(WorkspaceLease&&) = delete;
  ~WorkspaceLease() {
    if (workspace_ != nullptr) workspace_->in_use = false;
  }

  TileWorkspace<Scalar>& get() { return *workspace_; }

 private:
  TileWorkspace<Scalar>* workspace_ = nullptr;
  std::unique_ptr<TileWorkspace<Scalar>> owned_;
};

template <class Scalar>
Eigen::Map<Matrix<Scalar>> as_matrix(Vector<Scalar>& buffer, Index offset, Index rows, Index cols) {
  return Eigen::Map<Matrix<Scalar>>(buffer.data() + offset, rows, cols);
}
template <class Scalar>
Eigen::Map<Vector<Scalar>> as_vector(Vector<Scalar>& buffer, Index offset, Index size) {
  return Eigen::Map<Vector<Scalar>>(buffer.data() + offset, size);
}
template <class Scalar>
StridedTile<Scalar> as_strided(Scalar* data, Index rows, Index cols, Index stride) {
  return StridedTile<Scalar>(data, rows, cols, Eigen::OuterStride<>(stride));
}

/// The online-softmax state of `rows` query rows stored at slot `slot` of the workspace.
template <class Scalar>
OnlineSoftmax<Scalar> softmax_state(TileWorkspace<Scalar>& ws, Index slot, Index query_block,
                                    Index rows, Index value_dim) {
  const Index ld = padded_width<Scalar>(value_dim);
  Scalar* output = ws.output.data() + slot * query_block * ld;
  return {as_vector(ws.row_max, slot * query_block, rows),
          as_vector(ws.row_sum, slot * query_block, rows),
          as_vector(ws.rescale, slot * query_block, rows), as_strided(output, rows, value_dim, ld),
          as_strided(output, rows, ld, ld)};
}

/// Packs a key tile transposed into ws.keys_t (the layout of the Q·Kᵀ micro-kernel); returns its
/// row stride.
template <class Scalar, class Keys>
Index pack_keys(const Keys& keys, TileWorkspace<Scalar>& ws) {
  const Index ldk = padded_width<Scalar>(keys.rows());
  pack_transposed(keys.data(), keys.outerStride(), keys.rows(), keys.cols(), ws.keys_t.data(), ldk);
  return ldk;
}

/// logits (rows × keys.rows(), row stride ld) = queries · keysᵀ by the register-blocked
/// micro-kernel, after packing the key tile transposed into the workspace.
template <class Scalar, class Queries, class Keys>
void compute_logits(const Queries& queries, const Keys& keys, TileWorkspace<Scalar>& ws,
                    Scalar* logits, Index ld) {
  const Index ldk = pack_keys(keys, ws);
  tile_logits(queries.data(), queries.outerStride(), queries.rows(), keys.cols(), ws.keys_t.data(),
              ldk, keys.rows(), logits, ld);
}

/// Writes the scaled, transformed query tile of head h (rows × logit_dim) into `out`.
template <class Scalar, class Encoder>
void load_queries(const AttentionProblem<Scalar>& p, const Encoder& encoder, Index h, Index first,
                  Positions qpos, Eigen::Map<Matrix<Scalar>> out) {
  const auto source = p.q.head(h).middleRows(first, out.rows());
  if constexpr (QueryKeyTransform<Encoder>) {
    encoder.transform_queries(h, qpos, qpos[0], source, out);
    out *= p.scale;
  } else {
    out.noalias() = p.scale * source;
  }
}

/// Writes the transformed key tile of kv head kvh (count × logit_dim) into `buffer` and returns
/// it, or (no transform) returns a view of k itself.
template <class Scalar, class Encoder>
auto load_keys(const AttentionProblem<Scalar>& p, const Encoder& encoder, Index kvh, Index first,
               Index count, Positions kpos, Index centre, Vector<Scalar>& buffer) {
  using Map = Eigen::Map<const Matrix<Scalar>, Eigen::Unaligned, Eigen::OuterStride<>>;
  if constexpr (QueryKeyTransform<Encoder>) {
    auto out = as_matrix(buffer, 0, count, p.logit_dim);
    encoder.transform_keys(kvh, kpos, centre, p.k.head(kvh).middleRows(first, count), out);
    return Map(out.data(), count, p.logit_dim, Eigen::OuterStride<>(p.logit_dim));
  } else {
    (void)encoder;
    (void)kpos;
    (void)centre;
    (void)buffer;
    return Map(p.k.head(kvh).data() + first * p.k.row_stride(), count, p.query_dim,
               Eigen::OuterStride<>(p.k.row_stride()));
  }
}

template <class Scalar>
void fill_positions(const AttentionProblem<Scalar>& p, bool queries, Index first, Index count,
                    std::vector<Index>& out) {
  for (Index r = 0; r < count; ++r) {
    out[static_cast<std::size_t>(r)] =
        queries ? p.query_position(first + r) : p.key_position(first + r);
  }
}

/// Where the streaming kernel writes its result: normalised output, or a partial.
template <class Scalar>
struct ResultSink {
  HeadsView<Scalar> output;
  Matrix<Scalar>* row_max = nullptr;  // partial mode when non-null
  Matrix<Scalar>* row_sum = nullptr;

  void write(Index h, Index first, const OnlineSoftmax<Scalar>& state) const {
    auto out = output.head(h).middleRows(first, state.output.rows());
    if (row_max != nullptr) {
      out = state.output;
      row_max->row(h).segment(first, state.row_max.size()) = state.row_max.transpose();
      row_sum->row(h).segment(first, state.row_sum.size()) = state.row_sum.transpose();
      return;
    }
    for (Index r = 0; r < out.rows(); ++r) {
      const Scalar sum = state.row_sum[r];
      if (sum > Scalar(0)) {
        out.row(r) = state.output.row(r) / sum;
      } else {
        out.row(r).setZero();  // no allowed key: zeros, never NaN
      }
    }
  }
};

/// On a partial tile with consecutive keys, each row's allowed columns (in the workspace): they
/// bound the work of both products, since the entries outside are masked to −inf and get weight
/// 0. No limits on other tiles.
template <class Scalar>
ColumnLimits column_limits(const AttentionProblem<Scalar>& p, TileCoverage coverage, Positions qpos,
                           Index key_first, Index cols, TileWorkspace<Scalar>& ws) {
  if (coverage != TileCoverage::partial || !p.key_positions.empty()) return {};
  for (std::size_t r = 0; r < qpos.size(); ++r) {
    const auto [lo, hi] = allowed_columns(p.mask, qpos[r], key_first, cols);
    ws.column_begin[r] = lo;
    ws.column_end[r] = hi;
  }
  return {ws.column_begin.data(), ws.column_end.data()};
}

/// Bias, mask and online-softmax update for one head's finished score tile, then P·V.
template <class Scalar, class Encoder>
void finish_tile(const AttentionProblem<Scalar>& p, const Encoder& encoder, Index h,
                 Index query_first, Index key_first, Positions qpos, Positions kpos,
                 TileCoverage coverage, StridedTile<Scalar>& scores, OnlineSoftmax<Scalar>& state,
                 TileWorkspace<Scalar>& ws, ColumnLimits limits = {}) {
  if constexpr (ScoreBias<Encoder>) encoder.add_bias(h, qpos, kpos, scores);
  if (coverage == TileCoverage::partial) {
    std::span<const Index> qseg;
    std::span<const Index> kseg;
    if (p.has_segments()) {
      qseg = p.query_segments.subspan(static_cast<std::size_t>(query_first), qpos.size());
      kseg = p.key_segments.subspan(static_cast<std::size_t>(key_first), kpos.size());
    }
    apply_mask<Scalar>(p.mask, qpos, kpos, p.key_positions.empty(), qseg, kseg, scores);
  }
  if (!state.absorb(scores)) return;
  const HeadsView<const Scalar>& v = p.v;
  const Scalar* values = v.head(p.kv_head(h)).data() + key_first * v.row_stride();
  const Index width = padded_width<Scalar>(p.value_dim);
  Index ldv = v.row_stride();
  if (width != p.value_dim) {  // pad the value rows to whole packets; else read v in place
    pack_rows(values, v.row_stride(), scores.cols(), p.value_dim, ws.values_p.data(), width);
    values = ws.values_p.data();
    ldv = width;
  }
  tile_accumulate(scores.data(), scores.outerStride(), scores.rows(), scores.cols(), values, ldv,
                  width, state.padded_output.data(), state.padded_output.outerStride(), limits);
  if constexpr (RelativeKeyValue<Encoder>) {
    encoder.add_relative_values(h, qpos, kpos, scores, state.output);
  }
}

template <class Scalar>
BlockExtent query_extent(const AttentionProblem<Scalar>& p, Index first, Index count) {
  return block_extent([&](Index r) { return p.query_position(r); }, p.query_positions.empty(),
                      p.query_segments, first, count);
}
template <class Scalar>
BlockExtent key_extent(const AttentionProblem<Scalar>& p, Index first, Index count) {
  return block_extent([&](Index c) { return p.key_position(c); }, p.key_positions.empty(),
                      p.key_segments, first, count);
}

inline Index ceil_div(Index a, Index b) { return (a + b - 1) / b; }

/// Query blocks that one per-head task takes together: up to four, fewer when that would leave
/// less than two tasks per thread. They share each key tile's transform and packing (so with
/// four, a key tile is transformed and packed a quarter as often), while each block keeps its
/// own score tile, coverage and softmax state.
inline constexpr Index max_blocks_per_task = 4;

inline Index blocks_per_task(Index heads, Index query_blocks, int requested_threads) {
  const auto threads = static_cast<Index>(thread_count(requested_threads, heads * query_blocks));
  Index group = max_blocks_per_task;
  while (group > 1 && heads * ceil_div(query_blocks, group) < 2 * threads) group /= 2;
  return group;
}

/// Streaming kernel without a ScoreMixer: one task per (head, group of blocks_per_task query
/// blocks).
template <class Scalar, class Encoder>
void stream_per_head(const AttentionProblem<Scalar>& p, const Encoder& encoder,
                     const ResultSink<Scalar>& sink) {
  const Index query_blocks = ceil_div(p.queries, p.query_block);
  const Index key_blocks = ceil_div(p.keys, p.key_block);
  const Index group_size = blocks_per_task(p.heads, query_blocks, p.threads);
  const Index groups = ceil_div(query_blocks, group_size);
  const Index tasks = p.heads * groups;
  const Index qb = p.query_block;
  parallel_tasks(
      tasks, thread_count(p.threads, tasks),
      [&] {
        WorkspaceLease<Scalar> lease;
        lease.get().reserve(group_size, qb, p.key_block, 0, p.query_dim, p.logit_dim, p.value_dim,
                            false);
        return lease;
      },
      [&](Index task, WorkspaceLease<Scalar>& lease) {
        TileWorkspace<Scalar>& ws = lease.get();
        // Last query blocks first: under a causal mask they see the most keys.
        const Index group = groups - 1 - task / p.heads;
        const Index h = task % p.heads;
        const Index first = group * group_size * qb;
        const Index rows = std::min(group_size * qb, p.queries - first);
        const Index blocks = ceil_div(rows, qb);
        fill_positions(p, true, first, rows, ws.query_positions);
        const Positions qpos(ws.query_positions.data(), static_cast<std::size_t>(rows));
        load_queries(p, encoder, h, first, qpos, as_matrix(ws.queries, 0, rows, p.logit_dim));
        const BlockExtent group_extent = query_extent(p, first, rows);
        std::array<BlockExtent, max_blocks_per_task> block_extents{};
        std::vector<OnlineSoftmax<Scalar>>& states = ws.states;
        states.clear();  // capacity reserved: no allocation
        for (Index b = 0; b < blocks; ++b) {
          const Index block_rows = std::min(qb, rows - b * qb);
          block_extents[static_cast<std::size_t>(b)] = query_extent(p, first + b * qb, block_rows);
          states.push_back(softmax_state(ws, b, qb, block_rows, p.value_dim));
          states.back().reset();
        }
        const Index lds = padded_width<Scalar>(p.key_block);
        for (Index kb = 0; kb < key_blocks; ++kb) {
          const Index key_first = kb * p.key_block;
          const Index cols = std::min(p.key_block, p.keys - key_first);
          const BlockExtent kext = key_extent(p, key_first, cols);
          if (tile_coverage(p.mask, p.has_segments(), group_extent, kext) == TileCoverage::none) {
            continue;
          }
          fill_positions(p, false, key_first, cols, ws.key_positions);
          const Positions kpos(ws.key_positions.data(), static_cast<std::size_t>(cols));
          const auto keys =
              load_keys(p, encoder, p.kv_head(h), key_first, cols, kpos, qpos[0], ws.keys);
          const Index ldk = pack_keys(keys, ws);
          for (Index b = 0; b < blocks; ++b) {
            const TileCoverage coverage = tile_coverage(
                p.mask, p.has_segments(), block_extents[static_cast<std::size_t>(b)], kext);
            if (coverage == TileCoverage::none) continue;
            OnlineSoftmax<Scalar>& state = states[static_cast<std::size_t>(b)];
            const Index block_rows = state.row_max.size();
            const auto queries =
                as_matrix(ws.queries, b * qb * p.logit_dim, block_rows, p.logit_dim);
            const Positions block_qpos = qpos.subspan(static_cast<std::size_t>(b * qb),
                                                      static_cast<std::size_t>(block_rows));
            auto scores = as_strided(ws.scores.data(), block_rows, cols, lds);
            const ColumnLimits limits = column_limits(p, coverage, block_qpos, key_first, cols, ws);
            tile_logits(queries.data(), p.logit_dim, block_rows, p.logit_dim, ws.keys_t.data(), ldk,
                        cols, scores.data(), lds, limits);
            if constexpr (RelativeKeyValue<Encoder>) {
              encoder.add_relative_logits(h, block_qpos, kpos, queries, scores);
            }
            finish_tile(p, encoder, h, first + b * qb, key_first, block_qpos, kpos, coverage,
                        scores, state, ws, limits);
          }
        }
        for (Index b = 0; b < blocks; ++b) {
          sink.write(h, first + b * qb, states[static_cast<std::size_t>(b)]);
        }
      });
}

/// Streaming kernel with a ScoreMixer (which needs every head of a tile): one task per query
/// block; the logits of each tile are computed for all heads, with `key_halo()` extra key
/// columns on each side, mixed, then each head continues as in stream_per_head.
template <class Scalar, class Encoder>
void stream_mixed(const AttentionProblem<Scalar>& p, const Encoder& encoder,
                  const ResultSink<Scalar>& sink) {
  const Index halo = static_cast<Index>(encoder.key_halo());
  const Index query_blocks = ceil_div(p.queries, p.query_block);
  const Index key_blocks = ceil_div(p.keys, p.key_block);
  const Index H = p.heads;
  const Index qb = p.query_block;
  parallel_tasks(
      query_blocks, thread_count(p.threads, query_blocks),
      [&] {
        WorkspaceLease<Scalar> lease;
        lease.get().reserve(H, qb, p.key_block, halo, p.query_dim, p.logit_dim, p.value_dim, true);
        return lease;
      },
      [&](Index task, WorkspaceLease<Scalar>& lease) {
        TileWorkspace<Scalar>& ws = lease.get();
        const Index block = query_blocks - 1 - task;
        const Index first = block * qb;
        const Index rows = std::min(qb, p.queries - first);
        fill_positions(p, true, first, rows, ws.query_positions);
        const Positions qpos(ws.query_positions.data(), static_cast<std::size_t>(rows));
        const BlockExtent qext = query_extent(p, first, rows);
        std::vector<OnlineSoftmax<Scalar>>& states = ws.states;
        states.clear();  // capacity reserved: no allocation
        for (Index h = 0; h < H; ++h) {
          load_queries(p, encoder, h, first, qpos,
                       as_matrix(ws.queries, h * qb * p.logit_dim, rows, p.logit_dim));
          states.push_back(softmax_state(ws, h, qb, rows, p.value_dim));
          states.back().reset();
        }
        for (Index kb = 0; kb < key_blocks; ++kb) {
          const Index key_first = kb * p.key_block;
          const Index cols = std::min(p.key_block, p.keys - key_first);
          const TileCoverage coverage =
              tile_coverage(p.mask, p.has_segments(), qext, key_extent(p, key_first, cols));
          if (coverage == TileCoverage::none) continue;
          const Index ext_first = std::max<Index>(0, key_first - halo);
          const Index ext_count = std::min(p.keys, key_first + cols + halo) - ext_first;
          fill_positions(p, false, ext_first, ext_count, ws.key_positions);
          const Positions kpos_ext(ws.key_positions.data(), static_cast<std::size_t>(ext_count));
          const Positions kpos = kpos_ext.subspan(static_cast<std::size_t>(key_first - ext_first),
                                                  static_cast<std::size_t>(cols));
          auto logits = as_matrix(ws.logits, 0, H, rows * ext_count);
          for (Index h = 0; h < H; ++h) {
            const auto queries = as_matrix(ws.queries, h * qb * p.logit_dim, rows, p.logit_dim);
            const auto keys = load_keys(p, encoder, p.kv_head(h), ext_first, ext_count, kpos_ext,
                                        qpos[0], ws.keys);
            auto head_logits = as_strided(logits.row(h).data(), rows, ext_count, ext_count);
            compute_logits(queries, keys, ws, head_logits.data(), ext_count);
            if constexpr (RelativeKeyValue<Encoder>) {
              encoder.add_relative_logits(h, qpos, kpos_ext, queries, head_logits);
            }
          }
          auto scores = as_matrix(ws.scores, 0, H, rows * cols);
          encoder.mix(qpos, kpos_ext, key_first - ext_first, cols, logits, scores);
          // The mixer reads every logit (a convolution reads masked neighbours), so the limits
          // bound P·V only.
          const ColumnLimits limits = column_limits(p, coverage, qpos, key_first, cols, ws);
          for (Index h = 0; h < H; ++h) {
            auto head_scores = as_strided(scores.row(h).data(), rows, cols, cols);
            finish_tile(p, encoder, h, first, key_first, qpos, kpos, coverage, head_scores,
                        states[static_cast<std::size_t>(h)], ws, limits);
          }
        }
        for (Index h = 0; h < H; ++h) sink.write(h, first, states[static_cast<std::size_t>(h)]);
      });
}

template <class Scalar, class Encoder>
void stream(const AttentionProblem<Scalar>& p, const Encoder& encoder,
            const ResultSink<Scalar>& sink) {
  if (p.queries == 0) return;
  if constexpr (ScoreMixer<Encoder>) {
    stream_mixed(p, encoder, sink);
  } else {
    stream_per_head(p, encoder, sink);
  }
}

/// The oracle's first half: every N × M score matrix (all stages applied, forbidden keys −inf).
template <class Scalar, class Encoder>
std::vector<Matrix<Scalar>> reference_scores(const AttentionProblem<Scalar>& p,
                                             const Encoder& encoder) {
  const Index N = p.queries;
  const Index M = p.keys;
  std::vector<Matrix<Scalar>> result(static_cast<std::size_t>(p.heads), Matrix<Scalar>(N, M));
  if (N == 0 || M == 0) return result;
  std::vector<Index> qpos(static_cast<std::size_t>(N));
  std::vector<Index> kpos(static_cast<std::size_t>(M));
  fill_positions(p, true, 0, N, qpos);
  fill_positions(p, false, 0, M, kpos);
  const Index centre = qpos[0];
  Matrix<Scalar> logits(p.heads, N * M);
  for (Index h = 0; h < p.heads; ++h) {
    Matrix<Scalar> queries(N, p.logit_dim);
    Matrix<Scalar> keys(M, p.logit_dim);
    if constexpr (QueryKeyTransform<Encoder>) {
      encoder.transform_queries(h, qpos, centre, p.q.head(h), queries);
      encoder.transform_keys(p.kv_head(h), kpos, centre, p.k.head(p.kv_head(h)), keys);
    } else {
      queries = p.q.head(h);
      keys = p.k.head(p.kv_head(h));
    }
    queries *= p.scale;
    Eigen::Map<Matrix<Scalar>> head_logits(logits.row(h).data(), N, M);
    head_logits = queries * keys.transpose();
    if constexpr (RelativeKeyValue<Encoder>) {
      encoder.add_relative_logits(h, qpos, kpos, queries, head_logits);
    }
  }
  Matrix<Scalar> scores;
  if constexpr (ScoreMixer<Encoder>) {
    scores.resize(p.heads, N * M);
    encoder.mix(qpos, kpos, 0, M, logits, scores);
  } else {
    scores.swap(logits);
  }
  constexpr Scalar minus_infinity = -std::numeric_limits<Scalar>::infinity();
  for (Index h = 0; h < p.heads; ++h) {
    Eigen::Map<Matrix<Scalar>> s(scores.row(h).data(), N, M);
    if constexpr (ScoreBias<Encoder>) encoder.add_bias(h, qpos, kpos, s);
    for (Index r = 0; r < N; ++r) {
      const auto row = static_cast<std::size_t>(r);
      for (Index c = 0; c < M; ++c) {
        const auto col = static_cast<std::size_t>(c);
        const bool same_document =
            !p.has_segments() || p.query_segments[row] == p.key_segments[col];
        if (!same_document || !p.mask.allows(qpos[row], kpos[col])) s(r, c) = minus_infinity;
      }
    }
    result[static_cast<std::size_t>(h)] = s;
  }
  return result;
}

/// The oracle: materialise every N × M score matrix, mask, softmax. Returns the probabilities
/// per head (N × M each).
template <class Scalar, class Encoder>
std::vector<Matrix<Scalar>> reference_weights(const AttentionProblem<Scalar>& p,
                                              const Encoder& encoder) {
  std::vector<Matrix<Scalar>> weights = reference_scores(p, encoder);
  constexpr Scalar minus_infinity = -std::numeric_limits<Scalar>::infinity();
  for (Matrix<Scalar>& w : weights) {
    for (Index r = 0; r < w.rows(); ++r) {
      const Scalar max = w.row(r).maxCoeff();
      if (max == minus_infinity) {  // nothing allowed: the row is zero
        w.row(r).setZero();
        continue;
      }
      // select: Eigen's vectorised exp maps −inf to the smallest normal number, not to 0.
      w.row(r) = (w.row(r).array() == minus_infinity)
                     .select(Scalar(0), (w.row(r).array() - max).exp())
                     .matrix();
      w.row(r) /= w.row(r).sum();
    }
  }
  return weights;
}

template <class Scalar, class Encoder>
void reference_output(const AttentionProblem<Scalar>& p, const Encoder& encoder,
                      HeadsView<Scalar> out) {
  const std::vector<Matrix<Scalar>> weights = reference_weights(p, encoder);
  if (p.queries == 0) return;
  std::vector<Index> qpos(static_cast<std::size_t>(p.queries));
  std::vector<Index> kpos(static_cast<std::size_t>(p.keys));
  fill_positions(p, true, 0, p.queries, qpos);
  fill_positions(p, false, 0, p.keys, kpos);
  for (Index h = 0; h < p.heads; ++h) {
    const Matrix<Scalar>& w = weights[static_cast<std::size_t>(h)];
    Matrix<Scalar> o = w * p.v.head(p.kv_head(h));
    if constexpr (RelativeKeyValue<Encoder>) {
      if (p.keys > 0) encoder.add_relative_values(h, qpos, kpos, w, o);
    }
    out.head(h) = o;
  }
}

}  // namespace detail

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
      detail::make_problem<Scalar>(fn, detail::as_const_view(q), detail::as_const_view(k),
                                   detail::as_const_view(v), encoder, options);
  detail::require_output_shape(fn, out, p);
  detail::stream(p, encoder, detail::ResultSink<Scalar>{out});
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
  const auto p = detail::make_problem<Scalar>("posenc::attention_partial", detail::as_const_view(q),
                                              detail::as_const_view(k), detail::as_const_view(v),
                                              encoder, options);
  AttentionPartial<Scalar> partial{
      Heads<Scalar>(p.heads, p.queries, p.value_dim),
      Matrix<Scalar>::Constant(p.heads, p.queries, -std::numeric_limits<Scalar>::infinity()),
      Matrix<Scalar>::Zero(p.heads, p.queries)};
  detail::stream(
      p, encoder,
      detail::ResultSink<Scalar>{partial.output.view(), &partial.row_max, &partial.row_sum});
  return partial;
}

/// The materialising oracle: same result as `attention`, by the obvious method (O(N·M) memory).
template <HeadsLike Q, HeadsLike K, HeadsLike V, AttentionEncoder Encoder = NoPositionalEncoding>
Heads<heads_scalar_t<Q>> attention_reference(const Q& q, const K& k, const V& v,
                                             const Encoder& encoder = {},
                                             const AttentionOptions& options = {}) {
  using Scalar = heads_scalar_t<Q>;
  detail::check_qkv_scalars<Q, K, V>();
  const auto p = detail::make_problem<Scalar>("posenc::attention_reference",
                                              detail::as_const_view(q), detail::as_const_view(k),
                                              detail::as_const_view(v), encoder, options);
  Heads<Scalar> out(p.heads, p.queries, p.value_dim);
  detail::reference_output(p, encoder, out.view());
  return out;
}

template <HeadsLike Q, HeadsLike K, HeadsLike V>
Heads<heads_scalar_t<Q>> attention_reference(const Q& q, const K& k, const V& v,
                                             const AttentionOptions& options) {
  return attention_reference(q, k, v, NoPositionalEncoding{}, options);
}

/// Attention probabilities [H, N, M] (rows sum to 1, or are zero when nothing is allowed), for
/// analysis and plots. Materialises N × M per head.
template <HeadsLike Q, HeadsLike K, HeadsLike V, AttentionEncoder Encoder = NoPositionalEncoding>
Heads<heads_scalar_t<Q>> attention_weights(const Q& q, const K& k, const V& v,
                                           const Encoder& encoder = {},
                                           const AttentionOptions& options = {}) {
  using Scalar = heads_scalar_t<Q>;
  detail::check_qkv_scalars<Q, K, V>();
  const auto p = detail::make_problem<Scalar>("posenc::attention_weights", detail::as_const_view(q),
                                              detail::as_const_view(k), detail::as_const_view(v),
                                              encoder, options);
  const std::vector<Matrix<Scalar>> weights = detail::reference_weights(p, encoder);
  Heads<Scalar> out(p.heads, p.queries, p.keys);
  for (Index h = 0; h < p.heads; ++h) out.head(h) = weights[static_cast<std::size_t>(h)];
  return out;
}

template <HeadsLike Q, HeadsLike K, HeadsLike V>
Heads<heads_scalar_t<Q>> attention_weights(const Q& q, const K& k, const V& v,
                                           const AttentionOptions& options) {
  return attention_weights(q, k, v, NoPositionalEncoding{}, options);
}

/// Pre-softmax scores [H, N, M] (every stage applied, forbidden keys −inf): the scores whose
/// row softmax is attention_weights. For analysis (empirical score curves). Materialises N × M.
template <HeadsLike Q, HeadsLike K, AttentionEncoder Encoder = NoPositionalEncoding>
Heads<heads_scalar_t<Q>> attention_scores(const Q& q, const K& k, const Encoder& encoder = {},
                                          const AttentionOptions& options = {}) {
  using Scalar = heads_scalar_t<Q>;
  detail::check_qkv_scalars<Q, K, K>();
  const auto kv = detail::as_const_view(k);
  const auto p = detail::make_problem<Scalar>("posenc::attention_scores", detail::as_const_view(q),
                                              kv, kv, encoder, options);
  const std::vector<Matrix<Scalar>> scores = detail::reference_scores(p, encoder);
  Heads<Scalar> out(p.heads, p.queries, p.keys);
  for (Index h = 0; h < p.heads; ++h) out.head(h) = scores[static_cast<std::size_t>(h)];
  return out;
}

}  // namespace posenc
