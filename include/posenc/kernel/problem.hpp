// SPDX-License-Identifier: MIT
// One attention call, checked: q, k, v, the resolved options and the scale (AttentionProblem),
// and the positions and extents of its blocks of rows. Built by make_problem at every entry point.
// IWYU pragma: private, include "posenc/attention.hpp"
#pragma once

#include <algorithm>
#include <cmath>
#include <functional>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "posenc/attention_options.hpp"
#include "posenc/detail/check.hpp"
#include "posenc/encoding.hpp"
#include "posenc/mask.hpp"
#include "posenc/tensor.hpp"

namespace posenc::kernel {

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
    return detail::query_position_of(query_positions, query_offset, r);
  }
  Index key_position(Index c) const { return detail::key_position_of(key_positions, c); }
  bool has_segments() const { return !query_segments.empty(); }
};

/// Below this many multiply-adds (H·N·M·(logit width + Dv), about 0.2 ms on one core) a call with
/// threads = 0 runs on the calling thread.
inline constexpr double single_thread_work = 1 << 24;

/// Checks every argument of an attention call and resolves defaults.
template <class Scalar, class Encoder>
AttentionProblem<Scalar> make_problem(const char* fn, HeadsView<const Scalar> q,
                                      HeadsView<const Scalar> k, HeadsView<const Scalar> v,
                                      const Encoder& encoder, const AttentionOptions& options) {
  using EncoderScalar = typename detail::encoder_scalar<Encoder>::type;
  static_assert(std::is_void_v<EncoderScalar> || std::is_same_v<EncoderScalar, Scalar>,
                "posenc::attention: the encoder's Scalar differs from the scalar of q, k, v");
  detail::check_qkv_shapes(fn, q, k, v);
  detail::require(options.query_positions.empty() ||
                      static_cast<Index>(options.query_positions.size()) == q.rows(),
                  fn, "query_positions has ", options.query_positions.size(), " entries but q has ",
                  q.rows(), " rows");
  detail::require(
      options.key_positions.empty() || static_cast<Index>(options.key_positions.size()) == k.rows(),
      fn, "key_positions has ", options.key_positions.size(), " entries but k has ", k.rows(),
      " rows");
  // Segments are given when either side is: then both, except that an empty span is the right
  // length for a side with no rows.
  const std::size_t query_ids = options.query_segments.size();
  const std::size_t key_ids = options.key_segments.size();
  detail::require((query_ids == 0 || key_ids > 0 || k.rows() == 0) &&
                      (key_ids == 0 || query_ids > 0 || q.rows() == 0),
                  fn, "query_segments and key_segments must be given together, got ", query_ids,
                  " and ", key_ids, " entries");
  detail::require(query_ids == 0 || static_cast<Index>(query_ids) == q.rows(), fn,
                  "query_segments has ", query_ids, " entries but q has ", q.rows(), " rows");
  detail::require(key_ids == 0 || static_cast<Index>(key_ids) == k.rows(), fn, "key_segments has ",
                  key_ids, " entries but k has ", k.rows(), " rows");
  detail::require_option_positions(fn, options, q.rows());
  detail::require(options.query_block >= 1 && options.key_block >= 1, fn,
                  "query_block and key_block must be >= 1, got ", options.query_block, " and ",
                  options.key_block);
  detail::require(options.threads >= 0, fn, "threads must be >= 0 (0 = OpenMP default), got ",
                  options.threads);
  if (options.scale) {
    detail::require(std::isfinite(*options.scale) && *options.scale > 0.0, fn,
                    "scale must be finite and positive, got ", *options.scale);
  }
  const Index logit_dim = detail::transformed_width(encoder, q.dim());
  detail::require(logit_dim >= 1, fn, "the encoder's transformed_dim(", q.dim(), ") is ",
                  logit_dim);
  if constexpr (ScoreBias<Encoder>) {
    detail::require(static_cast<Index>(encoder.heads()) == q.heads(), fn, "the bias has ",
                    encoder.heads(), " heads but q has ", q.heads());
  }
  if constexpr (ScoreMixer<Encoder>) {
    detail::require(static_cast<Index>(encoder.heads()) == q.heads(), fn, "the mixer has ",
                    encoder.heads(), " heads but q has ", q.heads());
  }
  if constexpr (HasValidate<Encoder>) {
    encoder.validate(AttentionShape{q.heads(), k.heads(), q.rows(), k.rows(), q.dim(), v.dim()});
  }
  const double scale = detail::resolve_scale(encoder, options.scale, logit_dim);
  detail::require(std::isfinite(scale) && scale > 0.0, fn,
                  "the encoder's natural_scale() must be finite and positive, got ", scale);
  // threads = 0 (automatic): a small call (a decoding step) runs on the calling thread, since
  // waking an OpenMP team costs more than the work, and far more on a loaded machine.
  const double work = static_cast<double>(q.heads()) * static_cast<double>(q.rows()) *
                      static_cast<double>(k.rows()) * static_cast<double>(logit_dim + v.dim());
  const int threads = options.threads == 0 && work < single_thread_work ? 1 : options.threads;
  return AttentionProblem<Scalar>{.q = q,
                                  .k = k,
                                  .v = v,
                                  .heads = q.heads(),
                                  .queries = q.rows(),
                                  .keys = k.rows(),
                                  .query_dim = q.dim(),
                                  .value_dim = v.dim(),
                                  .logit_dim = logit_dim,
                                  .heads_per_kv_head = q.heads() / k.heads(),
                                  .query_offset = options.query_offset,
                                  .query_positions = options.query_positions,
                                  .key_positions = options.key_positions,
                                  .query_segments = options.query_segments,
                                  .key_segments = options.key_segments,
                                  .mask = detail::resolve_mask(encoder, options.mask),
                                  .scale = static_cast<Scalar>(scale),
                                  .query_block = options.query_block,
                                  .key_block = options.key_block,
                                  .threads = threads};
}

/// Whether query row r may attend to key column c (mask and segments).
template <class Scalar>
bool allows(const AttentionProblem<Scalar>& p, Index r, Index c) {
  if (p.has_segments() && p.query_segments[static_cast<std::size_t>(r)] !=
                              p.key_segments[static_cast<std::size_t>(c)]) {
    return false;
  }
  return p.mask.allows(p.query_position(r), p.key_position(c));
}

/// Whether query row r may attend to any key: false only for the rows whose output is zero.
template <class Scalar>
bool has_allowed_key(const AttentionProblem<Scalar>& p, Index r) {
  if (p.keys == 0) return false;
  if (!p.has_segments() && p.key_positions.empty()) {  // keys at 0 … M−1: one interval test
    const KeyRange range = p.mask.key_range(p.query_position(r));
    return range.first <= range.last && range.first <= p.keys - 1 && range.last >= 0;
  }
  for (Index c = 0; c < p.keys; ++c) {
    if (allows(p, r, c)) return true;
  }
  return false;
}

/// The first and one-past-last address of a view's elements.
template <class Scalar>
std::pair<const void*, const void*> address_range(const HeadsView<Scalar>& view) {
  if (view.heads() == 0 || view.rows() == 0 || view.dim() == 0) return {nullptr, nullptr};
  const Scalar* last = view.data() + (view.heads() - 1) * view.head_stride() +
                       (view.rows() - 1) * view.row_stride() + view.dim();
  return {view.data(), last};
}

/// Whether two views' address ranges intersect (so interleaved non-overlapping layouts in one
/// buffer count as overlapping: the check is on ranges, not elements).
template <class A, class B>
bool views_overlap(const HeadsView<A>& a, const HeadsView<B>& b) {
  const auto [a_first, a_last] = address_range(a);
  const auto [b_first, b_last] = address_range(b);
  return a_first != nullptr && b_first != nullptr && std::less<const void*>()(a_first, b_last) &&
         std::less<const void*>()(b_first, a_last);
}

template <class Scalar>
void require_output_shape(const char* fn, const HeadsView<Scalar>& out,
                          const AttentionProblem<Scalar>& p) {
  detail::require(out.heads() == p.heads && out.rows() == p.queries && out.dim() == p.value_dim, fn,
                  "out has shape [", out.heads(), ", ", out.rows(), ", ", out.dim(),
                  "] but must be [", p.heads, ", ", p.queries, ", ", p.value_dim, "]");
  // out is written while q, k and v are still read: it may share no memory with them (checked
  // on address ranges, so interleaved non-overlapping layouts in one buffer are refused too).
  const std::pair<const char*, HeadsView<const Scalar>> inputs[] = {
      {"q", p.q}, {"k", p.k}, {"v", p.v}};
  for (const auto& [name, input] : inputs) {
    detail::require(!views_overlap(out, input), fn, "out shares memory with ", name,
                    " (out must not alias q, k or v: the kernel reads them while it writes out)");
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

}  // namespace posenc::kernel
