// SPDX-License-Identifier: MIT
// Checks shared by the relative-position encoders' tests: the streaming kernel equals the
// reference for every mask, query offset and explicit positions (tiny tiles, odd sizes), and
// one-token decoding against a growing key set equals one causal pass.
#pragma once

#include <gtest/gtest.h>

#include <array>
#include <cstdint>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "posenc/attention.hpp"
#include "support/test_support.hpp"

namespace posenc::test {

/// The bias tile of `head` for the given positions, filled by the encoder's add_bias.
template <class Encoder>
Matrix<typename Encoder::Scalar> tile_of(const Encoder& e, Index head,
                                         const std::vector<Index>& qpos,
                                         const std::vector<Index>& kpos) {
  using T = typename Encoder::Scalar;
  Matrix<T> tile =
      Matrix<T>::Zero(static_cast<Index>(qpos.size()), static_cast<Index>(kpos.size()));
  e.add_bias(head, qpos, kpos, tile);
  return tile;
}

/// The masks every encoder is checked under.
inline std::vector<std::pair<std::string, Mask>> all_masks() {
  return {{"none", Mask::none()},
          {"causal", Mask::causal()},
          {"sliding_window(4)", Mask::sliding_window(4)},
          {"blockwise_causal(6)", Mask::blockwise_causal(6)}};
}

/// `count` increasing positions from `first` with random gaps of 1 to 3.
inline std::vector<Index> spread_positions(Index count, Index first, std::mt19937_64& rng) {
  std::vector<Index> positions(static_cast<std::size_t>(count));
  Index p = first;
  for (auto& position : positions) {
    position = p;
    p += 1 + static_cast<Index>(rng() % 3);
  }
  return positions;
}

/// Streaming attention == attention_reference for every mask × {query offsets 0, 3, 10^6 with
/// keys near 10^6, explicit spread positions, explicit queries with consecutive keys}, N = 13
/// and M = 17 queries/keys in 5 × 7 tiles. `far_keys`: also query offset 10^6 against keys
/// 0..M−1 (only for biases that stay moderate at distance 10^6; a bias of ~10^5 leaves logits
/// without the digits to compare at kernel tolerance).
template <class T, class Encoder>
void expect_streaming_matches_reference(const Encoder& encoder, Index heads, Index dim,
                                        Index value_dim, std::uint64_t salt, bool far_keys) {
  constexpr Index N = 13;
  constexpr Index M = 17;
  constexpr Index million = 1'000'000;
  auto rng = make_rng(salt);
  const Heads<T> q = random_heads<T>(heads, N, dim, rng);
  const Heads<T> k = random_heads<T>(heads, M, dim, rng);
  const Heads<T> v = random_heads<T>(heads, M, value_dim, rng);
  std::vector<Index> near_keys(static_cast<std::size_t>(M));
  for (Index c = 0; c < M; ++c) near_keys[static_cast<std::size_t>(c)] = million - 5 + c;
  const std::vector<Index> spread_queries = spread_positions(N, million, rng);
  const std::vector<Index> spread_keys = spread_positions(M, million - 10, rng);
  struct Case {
    std::string name;
    Index query_offset;
    Positions query_positions;
    Positions key_positions;
  };
  std::vector<Case> cases = {
      {"query_offset 0", 0, {}, {}},
      {"query_offset 3", 3, {}, {}},
      {"query_offset 1e6, explicit consecutive keys near 1e6", million, {}, near_keys},
      {"explicit spread positions near 1e6", 0, spread_queries, spread_keys},
      {"explicit spread queries, consecutive keys", 0, spread_queries, near_keys}};
  if (far_keys) cases.push_back({"query_offset 1e6, keys 0..M-1", million, {}, {}});
  for (const auto& [mask_name, mask] : all_masks()) {
    for (const Case& c : cases) {
      const AttentionOptions options{.mask = mask,
                                     .query_offset = c.query_offset,
                                     .query_positions = c.query_positions,
                                     .key_positions = c.key_positions,
                                     .query_block = 5,
                                     .key_block = 7};
      const Heads<T> streamed = attention(q, k, v, encoder, options);
      const Heads<T> reference = attention_reference(q, k, v, encoder, options);
      EXPECT_LE(relative_error(streamed.flat(), reference.flat()), Tolerance<T>::kernel)
          << "mask " << mask_name << ", " << c.name;
    }
  }
}

/// Decoding: for t = 0..N−1, query row t at position t (query_offset, then an explicit
/// position) against keys 0..t equals row t of one causal pass over all N.
template <class T, class Encoder>
void expect_decoding_matches_causal_pass(const Encoder& encoder, Index heads, Index dim,
                                         Index value_dim, std::uint64_t salt) {
  constexpr Index N = 11;
  auto rng = make_rng(salt);
  const Heads<T> q = random_heads<T>(heads, N, dim, rng);
  const Heads<T> k = random_heads<T>(heads, N, dim, rng);
  const Heads<T> v = random_heads<T>(heads, N, value_dim, rng);
  const Heads<T> full =
      attention(q, k, v, encoder, {.mask = Mask::causal(), .query_block = 4, .key_block = 3});
  for (Index t = 0; t < N; ++t) {
    const auto q_t = q.view().middle_rows(t, 1);
    const auto k_t = k.view().middle_rows(0, t + 1);
    const auto v_t = v.view().middle_rows(0, t + 1);
    const std::array<Index, 1> position{t};
    const Heads<T> by_offset =
        attention(q_t, k_t, v_t, encoder, {.mask = Mask::causal(), .query_offset = t});
    const Heads<T> by_position =
        attention(q_t, k_t, v_t, encoder, {.mask = Mask::causal(), .query_positions = position});
    for (Index h = 0; h < heads; ++h) {
      EXPECT_LE(relative_error(by_offset.head(h).row(0), full.head(h).row(t)), Tolerance<T>::kernel)
          << "step " << t << ", head " << h << " (query_offset)";
      EXPECT_LE(relative_error(by_position.head(h).row(0), full.head(h).row(t)),
                Tolerance<T>::kernel)
          << "step " << t << ", head " << h << " (explicit position)";
    }
  }
}

}  // namespace posenc::test
