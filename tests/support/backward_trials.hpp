// SPDX-License-Identifier: MIT
// The random problems of the streaming-vs-reference backward tests (attention, DAPE, SPE): odd
// sizes, grouped-query heads, every mask, query offsets, scattered explicit key positions,
// segments and tiles with remainders; and the streaming backward on one and on two threads.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "posenc/attention_backward.hpp"
#include "support/test_support.hpp"

namespace posenc::test {

/// What for_each_backward_trial draws.
struct BackwardTrialShape {
  Index heads = 1, kv_heads = 1, dim = 1;
  int trials = 8;
  std::uint64_t salt = 0;
  Index max_rows = 30;       // N and M in [1, max_rows] (M from min_keys on)
  Index min_keys = 1;        // convSPE needs a few keys
  Index value_dim = 0;       // 0: drawn in [1, 5]
  bool nonnegative = false;  // positions >= 0 (convSPE has noise for positions >= 0 only)
};

/// One problem; `options` points into the vectors (do not copy a trial).
template <class Scalar>
struct BackwardTrial {
  Index queries = 0, keys = 0, value_dim = 0;
  Heads<Scalar> q, k, v, dout;
  std::vector<Index> key_positions, query_segments, key_segments;
  AttentionOptions options;
  std::string where;
};

/// Calls check(trial) for shape.trials random problems: masks causal, none, sliding window and
/// blockwise causal in turn; query offsets around M − N; every third trial scattered explicit key
/// positions, every fourth segments; query and key blocks of 1 to 6 rows.
template <class Scalar, class Check>
void for_each_backward_trial(const BackwardTrialShape& shape, const std::string& label,
                             Check&& check) {
  auto rng = make_rng(shape.salt);
  std::uniform_int_distribution<Index> size(1, shape.max_rows);
  for (int trial = 0; trial < shape.trials; ++trial) {
    BackwardTrial<Scalar> t;
    t.queries = size(rng);
    t.keys = std::max(size(rng), shape.min_keys);
    t.value_dim = shape.value_dim > 0 ? shape.value_dim : size(rng) % 5 + 1;
    const Index N = t.queries, M = t.keys;
    t.q = random_heads<Scalar>(shape.heads, N, shape.dim, rng);
    t.k = random_heads<Scalar>(shape.kv_heads, M, shape.dim, rng);
    t.v = random_heads<Scalar>(shape.kv_heads, M, t.value_dim, rng);
    t.dout = random_heads<Scalar>(shape.heads, N, t.value_dim, rng);
    t.key_positions = iota(M);
    std::shuffle(t.key_positions.begin(), t.key_positions.end(), rng);
    t.query_segments.resize(static_cast<std::size_t>(N));
    t.key_segments.resize(static_cast<std::size_t>(M));
    for (Index r = 0; r < N; ++r) t.query_segments[static_cast<std::size_t>(r)] = 3 * r / N;
    for (Index c = 0; c < M; ++c) t.key_segments[static_cast<std::size_t>(c)] = 3 * c / M;
    const Mask masks[] = {Mask::causal(), Mask::none(), Mask::sliding_window(1 + trial),
                          Mask::blockwise_causal(2 * (1 + trial % 4))};
    const Index offset = M - N + trial % 3 - 1;
    t.options = {.mask = masks[trial % 4],
                 .query_offset = shape.nonnegative ? std::max<Index>(offset, 0) : offset,
                 .query_block = 1 + trial % 5,
                 .key_block = 1 + trial % 6};
    if (trial % 3 == 1) t.options.key_positions = t.key_positions;
    if (trial % 4 == 2) {
      t.options.query_segments = t.query_segments;
      t.options.key_segments = t.key_segments;
    }
    t.where = label + " trial " + std::to_string(trial) + " N " + std::to_string(N) + " M " +
              std::to_string(M);
    check(t);
  }
}

/// One forward (the tile centres of XPos follow the forward's own blocks), then the streaming
/// backward on one thread and on two.
template <class Scalar, class Encoder>
std::array<AttentionGradients<Scalar, Encoder>, 2> backward_on_one_and_two_threads(
    const BackwardTrial<Scalar>& t, const Encoder& encoder) {
  Heads<Scalar> out(t.q.heads(), t.queries, t.value_dim);
  Matrix<Scalar> lse(t.q.heads(), t.queries);
  attention(t.q, t.k, t.v, encoder, out.view(), lse, t.options);
  std::array<AttentionGradients<Scalar, Encoder>, 2> streamed;
  AttentionOptions options = t.options;
  for (const int threads : {1, 2}) {
    options.threads = threads;
    streamed[static_cast<std::size_t>(threads - 1)] =
        attention_backward(t.q, t.k, t.v, encoder, out, lse, t.dout, options);
  }
  return streamed;
}

/// dq, dk, dv of the streaming backward against the reference's (relative error below
/// `tolerance`), and the same bits on one and two threads.
template <class Scalar, class Encoder>
void expect_backward_close_and_deterministic(
    const std::array<AttentionGradients<Scalar, Encoder>, 2>& streamed,
    const AttentionGradients<Scalar, Encoder>& reference, double tolerance,
    const std::string& where) {
  const auto& s = streamed[0];
  EXPECT_LT(relative_error(s.dq.flat(), reference.dq.flat()), tolerance) << where << " dq";
  EXPECT_LT(relative_error(s.dk.flat(), reference.dk.flat()), tolerance) << where << " dk";
  EXPECT_LT(relative_error(s.dv.flat(), reference.dv.flat()), tolerance) << where << " dv";
  EXPECT_EQ(s.dq.flat(), streamed[1].dq.flat()) << where << ": threads change dq";
  EXPECT_EQ(s.dk.flat(), streamed[1].dk.flat()) << where << ": threads change dk";
  EXPECT_EQ(s.dv.flat(), streamed[1].dv.flat()) << where << ": threads change dv";
}

}  // namespace posenc::test
